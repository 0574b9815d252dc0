"""Bad input is quarantined with a reason; the good alerts around it are ingested; exit code 3."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import fastavro
import pytest

from ampel_dask.io import columnar
from ampel_dask.io.archive import Archive
from ampel_dask.io.avro import _block_header
from ampel_dask.graph.ingest import IngestOptions, ingest

GOOD_DIR = "ztf/fink_local_202001"  # 40 single-alert files


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ampel_dask.cli", *args], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def first_block(data: bytes) -> tuple[int, int, int]:
    """(end of the container header, start and length of the first data block's records), parsed here
    by hand: the header ends with the 16-byte sync marker the file also ends with; a block starts with
    its record count and byte size (zigzag varints)."""

    def varint(i: int) -> tuple[int, int]:
        n = shift = 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return (n >> 1) ^ -(n & 1), i

    header_end = data.find(data[-16:]) + 16
    _, i = varint(header_end)
    size, start = varint(i)
    assert start + size + 16 == len(data)  # one block: the real single-alert files are
    return header_end, start, size


def damaged_record(data: bytes) -> bytes:
    """The alert with the first 64 bytes of its record inverted: inside the data block, past the schema
    header (its first fields' lengths become nonsense). A flipped byte inside a float or a cutout would
    decode as a wrong value: Avro carries no checksum to tell."""
    _, start, _ = first_block(data)
    out = bytearray(data)
    out[start : start + 64] = bytes(b ^ 0xFF for b in out[start : start + 64])
    return bytes(out)


@pytest.fixture()
def bad_inputs(tmp_path, data_dir):
    good = sorted((data_dir / GOOD_DIR).glob("*.avro"))
    src = tmp_path / "in"
    src.mkdir()
    for p in good[:30]:
        (src / p.name).write_bytes(p.read_bytes())
    blob = good[30].read_bytes()
    (src / "truncated.avro").write_bytes(blob[: len(blob) // 2])
    (src / "random.avro").write_bytes(os.urandom(5000))
    other = io.BytesIO()
    schema = {"type": "record", "name": "weather", "fields": [{"name": "station", "type": "string"}, {"name": "temp", "type": "double"}]}
    fastavro.writer(other, schema, [{"station": "Palomar", "temp": 11.5}])
    (src / "unknown_schema.avro").write_bytes(other.getvalue())
    tar_path = tmp_path / "ztf_public_20200101.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for p in good[31:36]:
            add_member(tar, p.name, p.read_bytes())
        add_member(tar, "empty.avro", b"")
        add_member(tar, "corrupt.avro", damaged_record(good[36].read_bytes()))
        for p in good[37:40]:
            add_member(tar, p.name, p.read_bytes())
    return src, tar_path


def test_bad_packets_are_quarantined_and_good_ones_kept(tmp_path, bad_inputs, data_dir):
    src, tar_path = bad_inputs
    archive = tmp_path / "archive"
    proc = cli("ingest", str(src), str(tar_path), "--archive", str(archive), "--json", "--workers", "0")
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ingested"] == 30 + 5 + 3  # every good alert, nothing else lost
    assert summary["quarantined"] == 5  # truncated, random, unknown schema, empty member, corrupt member
    assert summary["read"] == summary["ingested"] + summary["duplicates"] + summary["quarantined"]
    entries = [json.loads(p.read_text()) for p in (archive / "quarantine").glob("*.json")]
    reasons = {(Path(e["source"]).name, e["member"]): e["reason"] for e in entries}
    assert "truncated" in reasons[("truncated.avro", None)] or "runs past the end" in reasons[("truncated.avro", None)]
    assert "neither an Avro container" in reasons[("random.avro", None)]
    assert "unknown alert schema 'weather'" in reasons[("unknown_schema.avro", None)]
    assert "empty tar member" in reasons[(tar_path.name, "empty.avro")]
    # the damaged member's block is named by its offset: the header's end (the header itself is intact)
    header_end = first_block(sorted((data_dir / GOOD_DIR).glob("*.avro"))[36].read_bytes())[0]
    assert reasons[(tar_path.name, "corrupt.avro")].startswith(f"record 0 in block at byte {header_end} does not decode (1 record(s) of the block lost)")
    # the raw bytes are kept for inspection (the unknown-schema record is a standalone Avro file)
    unknown = next(e for e in entries if "weather" in e["reason"])
    rec = next(fastavro.reader(open(archive / "quarantine" / unknown["raw_file"], "rb")))
    assert rec == {"station": "Palomar", "temp": 11.5}


def test_quarantine_is_idempotent(tmp_path, bad_inputs):
    src, tar_path = bad_inputs
    opts = IngestOptions(workers=0, progress=False)
    r1 = ingest([str(src), str(tar_path)], tmp_path / "a", opts)
    files1 = sorted(p.name for p in (tmp_path / "a" / "quarantine").iterdir())
    r2 = ingest([str(src), str(tar_path)], tmp_path / "a", opts)
    files2 = sorted(p.name for p in (tmp_path / "a" / "quarantine").iterdir())
    assert r1.quarantined == r2.quarantined == 5 and files1 == files2
    assert r2.ingested == 0 and r2.duplicates == r1.ingested


def multi_block_container(data_dir: Path, per_block: int = 1, codec: str = "null") -> tuple[list, bytearray]:
    """Six real alerts written as one container, ``per_block`` records per block."""
    recs = []
    for p in sorted((data_dir / GOOD_DIR).glob("*.avro"))[:6]:
        reader = fastavro.reader(open(p, "rb"))
        schema = reader.writer_schema
        recs += list(reader)
    buf = io.BytesIO()
    writer = fastavro.write.Writer(buf, fastavro.parse_schema(schema), codec=codec, sync_interval=2**30)
    for i, rec in enumerate(recs, 1):
        writer.write(rec)
        if i % per_block == 0:
            writer.flush()  # ends the block
    writer.flush()
    return recs, bytearray(buf.getvalue())


def test_damaged_block_in_multi_record_container_keeps_other_blocks(tmp_path, data_dir):
    """A container of many alerts with one damaged block: the records of the other blocks survive."""
    recs, data = multi_block_container(data_dir)
    block_starts = [i for i in range(len(data)) if data[i : i + 16] == data[-16:]]
    head = block_starts[2] + 16  # the count/size header of the fourth block
    data[head : head + 12] = b"\xff" * 12
    (tmp_path / "multi.avro").write_bytes(bytes(data))
    report = ingest([str(tmp_path / "multi.avro")], tmp_path / "arch", IngestOptions(workers=0, progress=False))
    assert report.quarantined == 1
    assert report.ingested == len(recs) - 1


def test_damaged_sync_marker_loses_only_its_block(tmp_path, data_dir):
    """A block whose trailing sync marker is damaged is quarantined; the block after it, whose start that
    marker was, is read (a resync to the next intact marker used to skip it too)."""
    recs, data = multi_block_container(data_dir)
    markers = [i for i in range(len(data)) if data[i : i + 16] == data[-16:]]
    assert len(markers) == len(recs) + 1  # the header's, then one after each block
    data[markers[2] + 5] ^= 0xFF  # the marker that ends the second block
    (tmp_path / "multi.avro").write_bytes(bytes(data))
    report = ingest([str(tmp_path / "multi.avro")], tmp_path / "arch", IngestOptions(workers=0, progress=False))
    assert report.quarantined == 1
    assert report.ingested == len(recs) - 1
    entry = json.loads(next((tmp_path / "arch" / "quarantine").glob("*.json")).read_text())
    assert "sync marker mismatch" in entry["reason"]


def test_a_damaged_block_counts_every_alert_it_held(tmp_path, data_dir):
    """Counts reconcile in alerts, not in damaged regions: a block of two alerts whose compressed data
    is damaged is two quarantined alerts (its header, which agrees with the file's structure, says so)."""
    recs, data = multi_block_container(data_dir, per_block=2, codec="deflate")
    markers = [i for i in range(len(data)) if data[i : i + 16] == data[-16:]]
    assert len(markers) == 4  # the header's, then one after each of the three blocks
    count, start, _ = _block_header(bytes(data), markers[1] + 16)  # the second block's header
    assert count == 2
    data[start : start + 8] = b"\xff" * 8  # its deflate stream's first block type: reserved (invalid)
    (tmp_path / "multi.avro").write_bytes(bytes(data))
    report = ingest([str(tmp_path / "multi.avro")], tmp_path / "arch", IngestOptions(workers=0, progress=False))
    assert (report.read, report.quarantined, report.ingested) == (6, 2, 4)
    entry = json.loads(next((tmp_path / "arch" / "quarantine").glob("*.json")).read_text())
    assert entry["records"] == 2 and entry["record"] == 2 and "(2 records)" in entry["reason"]
    archived = Archive(tmp_path / "arch")
    ids = sorted(i for p in archived.partitions() for i in archived.read(p, ["alert_id"]).column("alert_id").to_pylist())
    assert ids == sorted(r["candid"] for k, r in enumerate(recs) if k not in (2, 3))


def test_unknown_wire_schema_id_is_quarantined(tmp_path, data_dir):
    good = (data_dir / "lsst/wire_format/boom").glob("*.avro")
    raw = next(iter(good)).read_bytes()
    (tmp_path / "future.avro").write_bytes(b"\x00" + (4200).to_bytes(4, "big") + raw[5:])
    report = ingest([str(tmp_path / "future.avro")], tmp_path / "arch", IngestOptions(workers=0, progress=False))
    assert report.quarantined == 1 and report.ingested == 0
    entry = json.loads(next((tmp_path / "arch" / "quarantine").glob("*.json")).read_text())
    assert "unknown Confluent schema id 4200" in entry["reason"]


def test_usage_errors_exit_2(tmp_path):
    proc = cli("ingest", str(tmp_path / "does-not-exist"), "--archive", str(tmp_path / "a"))
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr
    proc = cli("ingest", str(tmp_path / "*.nothing"), "--archive", str(tmp_path / "a"))
    assert proc.returncode == 2 and "no files match" in proc.stderr
    proc = cli("ingest", "--archive", str(tmp_path / "a"))
    assert proc.returncode == 2
    assert not Archive(tmp_path / "a").exists()


def test_reingest_of_alerts_with_and_without_cutouts(tmp_path, data_dir):
    """A staged part whose known alerts are dropped as duplicates, while some of its new ones carry no
    cutouts: the new alerts are archived with the right cutouts (this crashed on filtering the cutouts
    with the part's row mask)."""
    paths = sorted((data_dir / GOOD_DIR).glob("*.avro"))[:3]
    src = tmp_path / "in"
    src.mkdir()
    for i, p in enumerate(paths):
        reader = fastavro.reader(open(p, "rb"))
        schema, (rec,) = reader.writer_schema, list(reader)
        if i:  # the second and third without stamps
            rec.update(cutoutScience=None, cutoutTemplate=None, cutoutDifference=None)
        with open(src / p.name, "wb") as fh:
            fastavro.writer(fh, schema, [rec])
    opts = IngestOptions(workers=0, progress=False)
    first = ingest([str(src / paths[0].name)], tmp_path / "arch", opts)
    second = ingest([str(src)], tmp_path / "arch", opts)
    assert (first.ingested, second.ingested, second.duplicates, second.quarantined) == (1, 2, 1, 0)
    arch = Archive(tmp_path / "arch")
    parts = arch.partitions()
    with_cutouts = [arch.read_cutouts(p) for p in parts if p.cutouts]
    assert sum(t.num_rows for t in with_cutouts) == 1  # only the first alert has stamps
    # parts a compaction replaced wait in _retired/ for their grace period (by design); nothing else is unindexed
    stray = [f for f in (tmp_path / "arch").rglob("part-*.parquet")
             if f.relative_to(tmp_path / "arch").parts[0] != "_retired" and f.relative_to(tmp_path / "arch").as_posix() not in {p.path for p in parts}]  # fmt: skip
    assert not stray


def test_corrupt_gzip_tarball_is_reported(tmp_path, data_dir):
    """Inverted bytes inside a tarball's gzip stream may still inflate; gzip's CRC at the end tells."""
    data = bytearray((data_dir / "ztf" / "fink_ztf_public_20181129.tar.gz").read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    (tmp_path / "night.tar.gz").write_bytes(bytes(data))
    proc = cli("ingest", str(tmp_path / "night.tar.gz"), "--archive", str(tmp_path / "a"), "--json", "--workers", "0")
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["quarantined"] >= 1 and summary["read"] == summary["ingested"] + summary["duplicates"] + summary["quarantined"]
    reasons = [json.loads(p.read_text())["reason"] for p in (tmp_path / "a" / "quarantine").glob("*.json")]
    assert any("tarball corrupt" in r or "tarball unreadable" in r for r in reasons), reasons


def test_a_glob_matching_folders_searches_them(tmp_path, data_dir):
    report = ingest([str(data_dir / "ztf" / "kowalski" / "*")], tmp_path / "a", IngestOptions(workers=0, progress=False))
    assert report.read == 36 and report.quarantined == 0


def test_an_unreadable_folder_is_quarantined_not_skipped(tmp_path, data_dir, monkeypatch):
    """As root every folder is readable, so the walk's error is simulated (os.walk reports it to onerror)."""
    from ampel_dask.io import sources

    real_walk = os.walk

    def walk(top, onerror=None, **kw):
        err = PermissionError(13, "Permission denied")
        err.filename = str(Path(top) / "locked")
        onerror(err)
        yield from real_walk(top, onerror=onerror, **kw)

    monkeypatch.setattr(sources.os, "walk", walk)
    (tmp_path / "in").mkdir()
    shutil.copy(next((data_dir / GOOD_DIR).glob("*.avro")), tmp_path / "in")
    report = ingest([str(tmp_path / "in")], tmp_path / "a", IngestOptions(workers=0, progress=False))
    assert (report.ingested, report.quarantined) == (1, 1)
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "a" / "quarantine").glob("*.json")]
    assert entry["source"].endswith("locked") and "unreadable directory: Permission denied" in entry["reason"]


def test_parts_a_killed_ingest_left_unindexed_are_swept(tmp_path, data_dir):
    """kill -9 between renaming parts into place and indexing them leaves files no index names; readers
    of the folders would count their rows twice after the re-ingest. The next ingest removes them."""
    import pyarrow.dataset as ds

    opts = IngestOptions(workers=0, progress=False)
    ingest([str(data_dir / GOOD_DIR)], tmp_path / "a", opts)
    arch = Archive(tmp_path / "a")
    part = arch.partitions()[0]
    night = (tmp_path / "a" / part.path).parent
    for src, name in ((part.path, "part-0000orphan.parquet"), (part.dps, "_dps-0000orphan.arrow")):
        shutil.copy(tmp_path / "a" / src, night / name)  # as if published, never indexed
    (tmp_path / "a" / "_publishing").write_text("12345")  # the marker such an ingest leaves behind
    report = ingest([str(data_dir / "ztf" / "kowalski")], tmp_path / "a", opts)
    assert report.ingested == 36
    assert not list(night.glob("*orphan*"))
    rows = ds.dataset(str(tmp_path / "a" / "survey=ztf"), partitioning="hive").count_rows()
    assert rows == sum(p.rows for p in Archive(tmp_path / "a").partitions())


# --- hostile input (issue 23): forged counts, special files, tarball damage, limits, what quarantine keeps ---


def ids_of(paths) -> list[int]:
    """Alert ids by fastavro, straight from the packets (ZTF: candid)."""
    return sorted(r["candid"] for p in paths for r in fastavro.reader(io.BytesIO(p if isinstance(p, bytes) else p.read_bytes())))


def archived_ids(root: Path) -> list[int]:
    arch = Archive(root)
    return sorted(i for p in arch.partitions() for i in arch.read(p, ["alert_id"]).column("alert_id").to_pylist())


def entries_of(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (root / "quarantine").glob("*.json")]


def with_count(packet: bytes, count: int) -> bytes:
    """The one-block packet with its block's record count replaced (the count is the varint after the
    header; a ZTF alert's count, 1, is the byte 0x02)."""
    count_at = packet.index(packet[-16:]) + 16  # the header's sync marker ends the header
    assert packet[count_at] == 0x02
    return packet[:count_at] + columnar._long(count) + packet[count_at + 1 :]


def test_a_forged_block_count_neither_inflates_nor_loses_the_count(tmp_path, data_dir):
    """A count of 2^62 on a one-alert file read 4.6e18 alerts; a count of 0 read none and lost the alert.
    Each is now one alert, quarantined (the count does not fit the bytes), beside ten archived ones."""
    good = sorted((data_dir / GOOD_DIR).glob("*.avro"))
    (tmp_path / "in").mkdir()
    for p in good[:10]:
        shutil.copy(p, tmp_path / "in")
    (tmp_path / "in" / "huge.avro").write_bytes(with_count(good[10].read_bytes(), 2**62))
    (tmp_path / "in" / "zero.avro").write_bytes(with_count(good[11].read_bytes(), 0))
    proc = cli("ingest", str(tmp_path / "in"), "--archive", str(tmp_path / "a"), "--json", "--workers", "0")
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["read"], summary["ingested"], summary["quarantined"]) == (12, 10, 2)
    assert archived_ids(tmp_path / "a") == ids_of(good[:10])
    reasons = {Path(e["source"]).name: e["reason"] for e in entries_of(tmp_path / "a")}
    assert f"block declares {2**62} records in" in reasons["huge.avro"] and "block declares 0 records in" in reasons["zero.avro"]


def test_special_files_and_links_out_are_skipped_with_their_reason(tmp_path, data_dir):
    """A FIFO named *.avro hung the ingest, a symlink to /dev/zero grew without bound, a symlink out of
    the sources was copied into quarantine. Only regular files are read, links only inside the sources
    (or anywhere with --follow-links); the skipped ones are named with the reason; nothing is quarantined."""
    import socket

    good = sorted((data_dir / GOOD_DIR).glob("*.avro"))
    src, outside = tmp_path / "in", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    (outside / "more").mkdir(parents=True)
    for p in good[:3]:
        shutil.copy(p, src)
    shutil.copy(good[3], src / "sub")
    shutil.copy(good[4], outside)
    shutil.copy(good[5], outside / "more")
    os.mkfifo(src / "fifo.avro")
    (src / "zero.avro").symlink_to("/dev/zero")
    (src / "outside.avro").symlink_to(outside / good[4].name)
    (src / "inside.avro").symlink_to(src / "sub" / good[3].name)  # read once, as sub/...
    (src / "dangling.avro").symlink_to(tmp_path / "nowhere.avro")
    (src / "linked_folder").symlink_to(outside / "more")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "socket.avro"))
    try:
        proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "ingest", str(src), "--archive", str(tmp_path / "a"), "--json", "--workers", "0"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert archived_ids(tmp_path / "a") == ids_of(good[:4])
        assert not (tmp_path / "a" / "quarantine").exists() or not list((tmp_path / "a" / "quarantine").iterdir())
        said = proc.stderr
        for line in (f"'{src / 'fifo.avro'}': a FIFO, not a regular file", f"'{src / 'socket.avro'}': a socket, not a regular file",
                     f"'{src / 'zero.avro'}': symlink to /dev/zero, outside the sources", f"'{src / 'outside.avro'}': symlink to {outside / good[4].name}, outside the sources",
                     f"'{src / 'dangling.avro'}': symlink to {tmp_path / 'nowhere.avro'}, outside the sources", f"'{src / 'linked_folder'}': symlink to {outside / 'more'}, outside the sources"):  # fmt: skip
            assert line in said, said
        assert json.loads(proc.stdout.strip().splitlines()[-1])["skipped"] == 6

        report = ingest([str(src)], tmp_path / "b", IngestOptions(workers=0, progress=False, follow_links=True))
        assert archived_ids(tmp_path / "b") == ids_of(good[:6]) and report.quarantined == 0
        assert report.skipped_reasons == {str(src / "fifo.avro"): "a FIFO, not a regular file", str(src / "socket.avro"): "a socket, not a regular file",
                                          str(src / "zero.avro"): "symlink to /dev/zero: a character device, not a regular file",
                                          str(src / "dangling.avro"): f"symlink to {tmp_path / 'nowhere.avro'}, which does not exist"}  # fmt: skip
        # named on the command line, a FIFO is still only skipped (never opened, never waited for)
        report = ingest([str(src / "fifo.avro")], tmp_path / "c", IngestOptions(workers=0, progress=False))
        assert (report.read, report.skipped_reasons) == (0, {str(src / "fifo.avro"): "a FIFO, not a regular file"})
    finally:
        sock.close()


def gzip_tar_with_flush_points(members: list[tuple[str, bytes]], flush_before_data: bool) -> tuple[bytes, list[int]]:
    """A gzip tarball compressed with a full flush before each member's data (or header): returns it and,
    per member, the offset in the gzip file where a fresh deflate block starts for that member."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)
    body = raw.getvalue()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        cuts = [m.offset_data if flush_before_data else m.offset for m in tar.getmembers()]
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    out, starts, prev = [head], [], 0
    for cut in cuts:
        out.append(z.compress(body[prev:cut]) + z.flush(zlib.Z_FULL_FLUSH))
        starts.append(sum(map(len, out)))
        prev = cut
    out.append(z.compress(body[prev:]) + z.flush())
    out.append(zlib.crc32(body).to_bytes(4, "little") + (len(body) & 0xFFFFFFFF).to_bytes(4, "little"))
    return b"".join(out), starts


def test_a_tarball_whose_gzip_check_fails_loses_no_member(tmp_path, data_dir):
    """The CRC (or length) at the end of a tarball's gzip stream does not match: every member was read
    and is archived; the entry says the check failed after the last member, by name."""
    good = sorted((data_dir / GOOD_DIR).glob("*.avro"))[:5]
    data, _ = gzip_tar_with_flush_points([(p.name, p.read_bytes()) for p in good], False)
    for name, at in (("crc", -8), ("length", -4)):
        bad = bytearray(data)
        bad[at] ^= 0xFF
        (tmp_path / f"{name}.tar.gz").write_bytes(bytes(bad))
        report = ingest([str(tmp_path / f"{name}.tar.gz")], tmp_path / name, IngestOptions(workers=0, progress=False))
        assert archived_ids(tmp_path / name) == ids_of(good)
        (entry,) = entries_of(tmp_path / name)
        assert entry["member"] is None and f"gzip check failed at the end, after member {good[-1].name!r}" in entry["reason"]
        assert f"incorrect {'data' if name == 'crc' else 'length'} check" in entry["reason"]
        assert (report.read, report.ingested, report.quarantined) == (6, 5, 1)


@pytest.mark.parametrize("inside", [True, False])
def test_tarball_damage_is_named_by_the_member_it_is_in(tmp_path, data_dir, inside):
    """An invalid deflate block where the third member's data (or header) starts: the two members before
    it are archived, the entry names the third (or the member after which the stream broke)."""
    good = sorted((data_dir / GOOD_DIR).glob("*.avro"))[:5]
    data, starts = gzip_tar_with_flush_points([(p.name, p.read_bytes()) for p in good], flush_before_data=inside)
    bad = bytearray(data)
    bad[starts[2]] = 0b110  # BFINAL 0, BTYPE 11: a reserved block type, an error at exactly this byte
    (tmp_path / "night.tar.gz").write_bytes(bytes(bad))
    ingest([str(tmp_path / "night.tar.gz")], tmp_path / "a", IngestOptions(workers=0, progress=False))
    assert archived_ids(tmp_path / "a") == ids_of(good[:2])
    (entry,) = entries_of(tmp_path / "a")
    if inside:
        assert entry["member"] == good[2].name and f"unreadable inside member {good[2].name!r}" in entry["reason"]
    else:
        assert entry["member"] is None and f"unreadable after member {good[1].name!r}" in entry["reason"]
    assert f"gzip data damaged at compressed byte {starts[2]}" in entry["reason"] and "invalid block type" in entry["reason"]


def test_limits_quarantine_what_passes_them_and_keep_the_original_bytes(tmp_path, data_dir):
    """A tar member or file larger than --max-file-mb is not read (its first bytes kept); a damaged
    gzipped packet keeps its gzip bytes, not what they inflate to; junk keeps --quarantine-keep-mb."""
    small = sorted((data_dir / "lsst").glob("elasticc_v0_9_alerce.tar.gz"))[0]
    with tarfile.open(small) as t:
        elasticc = [(m.name, t.extractfile(m).read()) for m in t.getmembers()[:3] if m.isfile()]
    good = sorted((data_dir / GOOD_DIR).glob("*.avro"))
    with tarfile.open(tmp_path / "night.tar.gz", "w:gz") as tar:
        add_member(tar, "big.avro", good[0].read_bytes())  # ~64 KB: past a 20 KB limit
        for name, data in elasticc:  # ~7 KB each
            add_member(tar, name, data)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.avro").write_bytes(good[1].read_bytes())
    damaged = gzip.compress(good[2].read_bytes()[:5000], mtime=0)  # a truncated alert, gzipped
    (tmp_path / "in" / "damaged.avro.gz").write_bytes(damaged)
    junk = os.urandom(15000)
    (tmp_path / "in" / "junk.avro").write_bytes(junk)
    opts = IngestOptions(workers=0, progress=False, max_file_mb=20000 / 2**20, quarantine_keep_mb=4096 / 2**20)
    report = ingest([str(tmp_path / "in"), str(tmp_path / "night.tar.gz")], tmp_path / "a", opts)
    assert report.ingested == 3 and report.quarantined == 4
    by = {(Path(e["source"]).name, e["member"]): e for e in entries_of(tmp_path / "a")}
    member = by[("night.tar.gz", "big.avro")]
    assert member["reason"] == f"tar member larger than 20000 bytes ({len(good[0].read_bytes())} bytes)" and member["raw_file"] is None
    file = by[("big.avro", None)]
    assert file["reason"] == "file larger than 20000 bytes" and (file["raw_bytes"], file["raw_kept"]) == (20001, 4096)
    assert (tmp_path / "a" / "quarantine" / file["raw_file"]).read_bytes() == good[1].read_bytes()[:4096]
    gz = by[("damaged.avro.gz", None)]
    assert (tmp_path / "a" / "quarantine" / gz["raw_file"]).read_bytes() == damaged and gz["raw_bytes"] == len(damaged)
    j = by[("junk.avro", None)]
    assert (tmp_path / "a" / "quarantine" / j["raw_file"]).read_bytes() == junk[:4096] and (j["raw_bytes"], j["raw_kept"]) == (15000, 4096)


def test_a_chunk_decoded_in_rounds_archives_the_same_alerts(tmp_path, data_dir):
    """Packets are decoded in rounds of at most --max-packet-mb inflated; with a 200 KB limit the 40
    alerts of one night (~60 KB each) take several rounds (a part each, where one chunk makes one part)
    and are archived all the same."""
    src = str(data_dir / GOOD_DIR)
    whole = ingest([src], tmp_path / "whole", IngestOptions(workers=0, progress=False))
    report = ingest([src], tmp_path / "a", IngestOptions(workers=0, progress=False, max_packet_mb=0.2))
    assert (report.read, report.ingested, report.quarantined) == (40, 40, 0)
    sizes = []  # each packet's record, encoded again by fastavro: the bytes a round holds
    for p in sorted((data_dir / GOOD_DIR).glob("*.avro")):
        reader = fastavro.reader(open(p, "rb"))
        out = io.BytesIO()
        fastavro.schemaless_writer(out, reader.writer_schema, next(reader))
        sizes.append(len(out.getvalue()))
    rounds, held = 1, 0
    for i, n in enumerate(sizes):  # a round ends once it holds the limit, unless no packet is left
        held += n
        if held >= int(0.2 * 2**20) and i + 1 < len(sizes):
            rounds, held = rounds + 1, 0
    assert whole.partitions == 1 and report.partitions == rounds > 1
    assert archived_ids(tmp_path / "a") == ids_of(sorted((data_dir / GOOD_DIR).glob("*.avro")))
