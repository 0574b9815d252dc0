"""Ingest decodes alert batches with DataFusion (Arrow-native); fastavro is the careful path for damage.

Both paths must archive the same bytes for every schema in ../shared/data, containers must really take
the fast path, and a record that does not decode must be quarantined without its neighbours.
"""

from __future__ import annotations

import io
import json
import shutil

import fastavro
import pyarrow as pa
import pytest

from ampel_dask.io import avro, columnar, decode
from ampel_dask.io.archive import Archive
from ampel_dask.io.avro import Record, SchemaCache, frame, iter_packet
from ampel_dask.graph.ingest import IngestOptions, ingest

from .conftest import group_location

OPTS = IngestOptions(workers=0, progress=False)


def archive_files(root) -> dict[str, bytes]:
    """Every file's bytes; of ``_retired.json`` (files a compaction replaced -> when) only which files."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "_index.lock" and "quarantine" not in p.parts}
    if "_retired.json" in files:
        files["_retired.json"] = json.dumps(sorted(json.loads(files["_retired.json"]))).encode()
    return files


def test_fastavro_path_archives_the_same_bytes_for_every_schema(group_archives, data_dir, manifest, tmp_path, monkeypatch):
    """DataFusion refused everywhere: every packet goes through fastavro's dicts instead. Each group's
    archive (parts, histories, cutouts, index) is byte-identical to the one the fast path wrote."""

    def refuse(*args, **kwargs):
        raise RuntimeError("DataFusion unavailable (test)")

    monkeypatch.setattr(columnar, "decode_blocks", refuse)
    monkeypatch.setattr(decode, "decode_blocks", refuse)
    for group, rows in sorted(manifest.items()):
        fast_root, fast_report = group_archives[group]
        root = tmp_path / group
        report = ingest([str(data_dir / group_location(rows))], root, OPTS)
        assert report.summary() | {"seconds": 0} == fast_report.summary() | {"seconds": 0}, group
        assert archive_files(root) == archive_files(fast_root), group
        shutil.rmtree(root)


def test_containers_take_the_arrow_path(data_dir, tmp_path, monkeypatch):
    """With fastavro's record decoding forbidden, container packets of every ZTF schema version and of
    Rubin's (plain and Spark-written) are still archived: the fast path decoded them."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the careful path was taken")

    monkeypatch.setattr(decode, "iter_packet", forbidden)
    monkeypatch.setattr(decode, "records_rows", forbidden)
    sources = [data_dir / "ztf" / "schema_evolution", data_dir / "ztf" / "kowalski", data_dir / "lsst" / "rubin_fink_v9_0.tar.gz", data_dir / "lsst" / "elasticc_v0_9_alerce.tar.gz"]
    report = ingest([str(s) for s in sources], tmp_path, OPTS)
    assert report.quarantined == 0 and report.read == 65 + 36 + 226 + 4257
    assert report.ingested + report.duplicates == report.read


def _damage_record(packet: bytes) -> bytes:
    """The packet with the start of its record (the first string's length) overwritten by 0xFF bytes,
    a malformed Avro long, its container framing left intact: only decoding can tell."""
    ws, blocks = frame(packet, SchemaCache())
    (block,) = blocks
    start = packet.index(block.data)
    return packet[:start] + b"\xff" * 16 + packet[start + 16 :]


def test_a_record_that_does_not_decode_is_quarantined_and_its_batch_kept(data_dir, tmp_path):
    good = sorted((data_dir / "ztf" / "fink_local_202001").glob("*.avro"))
    src = tmp_path / "in"
    src.mkdir()
    for p in good[:9]:
        shutil.copy(p, src / p.name)
    bad = _damage_record(good[9].read_bytes())
    with pytest.raises(Exception):  # fastavro cannot decode it either
        list(fastavro.reader(io.BytesIO(bad)))
    (src / "damaged.avro").write_bytes(bad)
    report = ingest([str(src)], tmp_path / "archive", OPTS)
    assert (report.read, report.ingested, report.quarantined) == (10, 9, 1)
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "archive" / "quarantine").glob("*.json")]
    assert entry["source"].endswith("damaged.avro") and "does not decode" in entry["reason"]
    ids = {a for part in Archive(tmp_path / "archive").partitions() for a in Archive(tmp_path / "archive").read(part, ["alert_id"]).column("alert_id").to_pylist()}
    expected = {next(fastavro.reader(open(p, "rb")))["candid"] for p in good[:9]}
    assert ids == expected


def test_datafusion_reads_what_fastavro_reads(data_dir, tmp_path):
    """Value by value, for one packet of each LSST schema version (named types spelt out for DataFusion)."""
    cache = SchemaCache()
    seen = 0
    for path in sorted((data_dir / "lsst" / "schema_samples").rglob("*.avro")):
        recs = [r for r in iter_packet(path.read_bytes(), cache) if isinstance(r, Record)]
        if not recs:
            continue
        rows = columnar.decode_blocks(recs[0].schema, [(1, r.raw) for r in recs], tmp_path)
        ref = pa.array([r.value for r in recs], type=rows.type)
        assert _same(rows.to_pylist(), ref.to_pylist()), path.name
        seen += 1
    assert seen >= 10


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_frame_leaves_damage_to_the_careful_path(data_dir):
    packet = next((data_dir / "ztf" / "kowalski").rglob("*.avro")).read_bytes()
    cache = SchemaCache()
    assert frame(packet, cache) is not None
    assert frame(packet[: len(packet) // 2], cache) is None  # truncated: the block runs past the end
    assert frame(b"\x00\x00\x00\x02\x58" + packet[100:], cache) is None  # a wire message
    assert avro.packet_kind(packet) == "container"


def test_a_block_with_bytes_after_its_record_does_not_hang_the_ingest(data_dir, tmp_path, monkeypatch):
    """DataFusion's reader loops for ever on such a block (a damaged length field can make one); its
    helper process is killed after the timeout and fastavro takes the batch. A block whose records end
    before its bytes do is damaged (its count leaves a record out, or a length inside is wrong): it is
    quarantined, its neighbours archived."""
    monkeypatch.setattr(columnar, "TIMEOUT_S", 3.0)
    good = sorted((data_dir / "ztf" / "fink_local_202001").glob("*.avro"))
    src = tmp_path / "in"
    src.mkdir()
    for p in good[:9]:
        shutil.copy(p, src / p.name)
    packet = good[9].read_bytes()
    ws, (block,) = frame(packet, SchemaCache())
    start = packet.index(block.data)
    head = packet[: start - len(columnar._long(1)) - len(columnar._long(len(block.data)))]
    sync = packet[start + len(block.data) :]
    (src / "trailing.avro").write_bytes(head + columnar._long(1) + columnar._long(len(block.data) + 1) + block.data + b"\x00" + sync)
    report = ingest([str(src)], tmp_path / "archive", OPTS)
    assert (report.read, report.ingested, report.quarantined) == (10, 9, 1)
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "archive" / "quarantine").glob("*.json")]
    assert entry["source"].endswith("trailing.avro") and "1 bytes after its last record" in entry["reason"]
