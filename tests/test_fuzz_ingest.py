"""Hostile input, fuzzed: seeded mutations of real ZTF and Rubin/LSST packets never crash, hang or abort an ingest.

Every expectation comes from outside the code under test:
- alert ids: fastavro on the unmutated packets (and, for a mutation that may leave a packet readable, on
  the mutated bytes: nothing fastavro cannot read may be archived);
- containers are written here from the Avro spec (header map, blocks, sync markers) and compressed with
  the codec libraries themselves; a packet re-encoded with another codec, or gzipped, is the same alert
  (a metamorphic relation: it must be archived);
- bytes: a file of one alert holds one alert, whatever its damage (so its archived plus quarantined
  alerts are exactly one where the damage leaves its block header alone), and no file holds more
  records than it has bytes.
Crash-prone cases (schemas that crash fastavro) run the CLI in a subprocess with a timeout.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import random
import subprocess
import sys
import tarfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cramjam
import fastavro
import pytest
from fastavro import schemaless_reader
from fastavro._read import HEADER_SCHEMA
from zlib_ng import zlib_ng

from ampel_dask.io import columnar
from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest

SEED = 23
MAGIC = b"Obj\x01"
# base packets mutated (one mutation each, so that every alert id belongs to one file) and kept intact
MUTATED = {"lsst/elasticc_v0_9_alerce.tar.gz": 110, "ztf/ampel_core_real_201712.tar.gz": 60, "ztf/fink_basic_alerts_2023_2025.tar.gz": 40,
           "ztf/pitt_google": 30, "lsst/rubin_fink_v9_0.tar.gz": 20, "ztf/alerce/ZTF_samples": 20, "ztf/kowalski": 10}  # fmt: skip
INTACT = 6  # per group


# --- Avro by hand (the spec), independent of ampel_dask.io.avro ---------------------------------------


def zz(n: int) -> bytes:
    """Avro's zig-zag varint (long)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def container(schema: bytes, blocks: list[tuple[int, bytes]], codec: bytes = b"null", sync: bytes = b"fuzz-sync-marker") -> bytes:
    meta = {b"avro.schema": schema, b"avro.codec": codec}
    head = MAGIC + zz(len(meta)) + b"".join(zz(len(k)) + k + zz(len(v)) + v for k, v in meta.items()) + zz(0) + sync
    return head + b"".join(zz(c) + zz(len(d)) + d + sync for c, d in blocks)


@dataclass
class Parsed:
    schema: bytes
    codec: bytes
    sync: bytes
    header_end: int
    blocks: list[tuple[int, int, int, int]]  # (start of block header, count, start of data, size)


def parse(packet: bytes) -> Parsed:
    bio = io.BytesIO(packet)
    head = schemaless_reader(bio, HEADER_SCHEMA, None)
    pos = end = bio.tell()
    blocks = []
    while pos < len(packet):
        start = pos
        bio.seek(pos)
        count = schemaless_reader(bio, "long", None)
        size = schemaless_reader(bio, "long", None)
        data = bio.tell()
        blocks.append((start, count, data, size))
        pos = data + size + 16
    return Parsed(head["meta"]["avro.schema"], head["meta"].get("avro.codec", b"null"), head["sync"], end, blocks)


def block_bytes(packet: bytes, p: Parsed) -> list[tuple[int, bytes]]:
    """The blocks' records as uncompressed bytes (the corpus is all codec null or snappy)."""
    out = []
    for _, count, start, size in p.blocks:
        data = packet[start : start + size]
        if p.codec == b"snappy":
            data = bytes(cramjam.snappy.decompress_raw(data[:-4]))
        out.append((count, data))
    return out


def compress(codec: str, data: bytes) -> bytes:
    if codec == "deflate":
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()
    if codec == "bzip2":
        return bz2.compress(data)
    if codec == "xz":
        return lzma.compress(data)
    if codec == "snappy":
        return bytes(cramjam.snappy.compress_raw(data)) + zlib.crc32(data).to_bytes(4, "big")
    if codec == "zstandard":
        return bytes(cramjam.zstd.compress(data))
    raise ValueError(codec)


def alert_id(rec: dict) -> int:
    """ZTF: the candidate's candid (top-level too, except in Spark rewrites); Rubin: the triggering diaSourceId."""
    if "candidate" in rec:
        return int(rec["candidate"]["candid"])
    return int(rec["diaSource"]["diaSourceId"])


def reference_ids(packet: bytes) -> list[int]:
    """What fastavro reads from a packet, up to its first error (gzip unwrapped as gzip does)."""
    ids = []
    try:
        if packet[:2] == b"\x1f\x8b":
            packet = gzip.decompress(packet)
        for rec in fastavro.reader(io.BytesIO(packet)):
            ids.append(alert_id(rec))
    except Exception:
        pass
    return ids


# --- the corpus: real packets ---------------------------------------------------------------------------


def real_packets(data_dir: Path, where: str, n: int) -> list[tuple[str, bytes]]:
    path = data_dir / where
    out = []
    if path.is_dir():
        for p in sorted(path.rglob("*.avro")):
            if len(out) == n:
                break
            out.append((p.name, p.read_bytes()))
        return out
    with tarfile.open(path, "r|gz") as tar:
        for m in tar:
            if len(out) == n:
                break
            if m.isfile():
                out.append((Path(m.name).name, tar.extractfile(m).read()))
    return out


@dataclass
class Case:
    name: str
    data: bytes
    kind: str  # the mutation
    expect: str  # intact | recoded (must be archived) | broken (nothing archived) | damaged (fastavro decides)
    ids: list[int]  # the unmutated packet's alert ids
    exact: bool = False  # the damage leaves block headers alone: archived + quarantined alerts == len(ids)
    reason: str = ""  # a phrase the quarantine reason must hold


@dataclass
class Corpus:
    cases: list[Case] = field(default_factory=list)


def _body_span(p: Parsed) -> tuple[int, int]:
    """The first block's data (where a mutation leaves every header and marker alone)."""
    _, _, start, size = p.blocks[0]
    return start, start + size


def mutate(rng: random.Random, name: str, packet: bytes, ids: list[int], others: list[bytes]) -> Case:
    p = parse(packet)
    lo, hi = _body_span(p)
    kind = rng.choice(["flip_data"] * 6 + ["smash_data"] * 4 + ["flip_any"] * 4 + ["length_forge"] * 3 + ["truncate"] * 3 + ["extend"]
                      + ["count_zero", "count_huge", "count_plus_one", "count_negative", "size_forge"] + ["codec_lie"] * 2
                      + ["recode"] * 4 + ["gzip"] * 2 + ["gzip_truncated", "schema_swap", "junk", "empty"])  # fmt: skip
    data = bytearray(packet)
    single = len(ids) == 1 and len(p.blocks) == 1
    case = lambda expect, **kw: Case(f"{kind}-{name}", bytes(data), kind, expect, ids, **kw)  # noqa: E731
    if kind == "flip_data" and p.codec == b"null":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        return case("damaged", exact=True)
    if kind == "smash_data" and p.codec == b"null":
        at = rng.randrange(lo, hi - 1)
        n = rng.randint(1, min(64, hi - at))
        fill = rng.choice([0x00, 0xFF, None])
        data[at : at + n] = bytes(rng.randrange(256) if fill is None else fill for _ in range(n))
        return case("damaged", exact=True)
    if kind == "length_forge" and p.codec == b"null":
        at = rng.randrange(lo, hi - 10)
        data[at : at + 10] = zz(rng.choice([2**62, 2**31, 10**9, 2**40]))[:10].ljust(10, b"\x00")
        return case("damaged", exact=True)
    if kind == "truncate":
        data = data[: rng.randrange(1, len(packet) - 16)]
        return case("broken" if single else "damaged")
    if kind == "extend":
        data += os.urandom(rng.randint(1, 300))
        return case("damaged")
    if kind.startswith("count_") or kind == "size_forge":
        start, count, dstart, size = p.blocks[0]
        if kind == "size_forge":
            head = zz(count) + zz(rng.choice([size + 1, size - 1, size * 1000, 2**62]))
        else:
            head = zz({"count_zero": 0, "count_huge": 2**62, "count_plus_one": count + 1, "count_negative": -5}[kind]) + zz(size)
        data = bytearray(packet[:start] + head + packet[dstart:])
        if kind == "count_plus_one":
            return case("damaged")
        return case("broken" if single else "damaged", reason={"count_zero": "declares 0 records", "count_huge": "records in"}.get(kind, ""))
    if kind == "codec_lie" and p.codec == b"null":
        codec = rng.choice([b"deflate", b"bzip2", b"xz", b"snappy", b"zstandard", b"lz4", b"rot13"])
        data = bytearray(container(p.schema, block_bytes(packet, p), codec, p.sync))
        return case("broken")
    if kind == "recode":
        codec = rng.choice(["deflate", "bzip2", "xz", "snappy", "zstandard"])
        data = bytearray(container(p.schema, [(c, compress(codec, b)) for c, b in block_bytes(packet, p)], codec.encode(), p.sync))
        kind = f"recode_{codec}"
        return case("recoded")
    if kind == "gzip":
        data = bytearray(gzip.compress(packet, mtime=0))
        return case("recoded")
    if kind == "gzip_truncated":
        z = gzip.compress(packet, mtime=0)
        data = bytearray(z[: rng.randrange(10, len(z) - 1)])
        return case("broken")
    if kind == "schema_swap":
        other = parse(rng.choice([o for o in others if parse(o).schema != p.schema]))
        data = bytearray(container(other.schema, block_bytes(packet, p), b"null", p.sync))
        return case("damaged")
    if kind == "junk":
        data = bytearray(os.urandom(rng.randint(1, 5000)))
        return case("broken")
    if kind == "empty":
        data = bytearray()
        return case("broken", reason="empty packet")
    # a body mutation drawn for a compressed packet: flip bits anywhere instead
    kind = "flip_any"
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return case("damaged")


def bomb(codec: str, mib: int) -> bytes:
    """``mib`` MiB of zeros compressed with an Avro codec, built from 1 MiB pieces (so a 4 GiB bomb takes
    milliseconds): deflate blocks ended by a full flush repeat as they are; bzip2, xz and gzip streams
    concatenate (their readers, and Avro's, read every stream)."""
    mb = b"\0" * (1 << 20)
    if codec in ("deflate", "gzip"):
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        body = (c.compress(mb) + c.flush(zlib.Z_FULL_FLUSH)) * mib + c.flush()
        if codec == "deflate":
            return body
        crc = 0
        for _ in range(mib):
            crc = zlib_ng.crc32(mb, crc)
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + crc.to_bytes(4, "little") + ((mib << 20) & 0xFFFFFFFF).to_bytes(4, "little")
    if codec == "bzip2":
        return bz2.compress(mb) * mib
    if codec == "xz":
        return lzma.compress(mb, preset=0) * mib
    return compress(codec, mb * mib)  # zstd and snappy: fast enough whole


BOMB_SCHEMA = json.dumps({"type": "record", "name": "alert", "fields": [{"name": "candid", "type": "long"}, {"name": "candidate", "type": "bytes"}]}).encode()


def bombs() -> list[Case]:
    """A block per codec that inflates past the default 64 MiB block limit (a few KB to 3 MB on disk)."""
    return [Case(f"bomb-{codec}.avro", container(BOMB_SCHEMA, [(1, bomb(codec, 65))], codec.encode()), f"bomb_{codec}", "broken", [], reason="inflates beyond 67108864 bytes")
            for codec in ("deflate", "bzip2", "xz", "zstandard", "snappy")]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(data_dir) -> tuple[list[Case], list[Case]]:
    rng = random.Random(SEED)
    intact, mutated = [], []
    every: list[bytes] = []
    for where, n in MUTATED.items():
        packets = real_packets(data_dir, where, n + INTACT)
        every += [pk for _, pk in packets[:3]]
        for name, pk in packets[:INTACT]:
            ids = reference_ids(pk)
            intact.append(Case(f"intact-{name}", pk, "intact", "intact", ids))
        for name, pk in packets[INTACT:]:
            mutated.append((name, pk, reference_ids(pk)))
    cases = [mutate(rng, name, pk, ids, every) for name, pk, ids in mutated]
    all_ids = [i for c in intact + cases for i in c.ids]
    assert all(c.ids for c in intact + cases) and len(all_ids) == len(set(all_ids))  # one alert id, one file: accounting per file is exact
    return intact, cases


def write_inputs(folder: Path, cases: list[Case]) -> dict[str, Case]:
    folder.mkdir(parents=True, exist_ok=True)
    by_path = {}
    for i, c in enumerate(cases):
        path = folder / f"{i:04d}-{c.name.removesuffix('.avro')}.avro"
        path.write_bytes(c.data)
        by_path[str(path)] = c
    return by_path


def outcome(root: Path) -> tuple[dict[str, list[int]], dict[str, list[dict]]]:
    """Archived alert ids by source file, and quarantine entries by source file."""
    arch = Archive(root)
    archived: dict[str, list[int]] = defaultdict(list)
    for part in arch.partitions():
        t = arch.read(part, ["alert_id", "source"])
        for a, s in zip(t.column("alert_id").to_pylist(), t.column("source").to_pylist()):
            archived[s.split("#")[0]].append(a)
    entries: dict[str, list[dict]] = defaultdict(list)
    for p in (root / "quarantine").glob("*.json"):
        e = json.loads(p.read_text())
        entries[e["source"]].append(e)
    return archived, entries


def check(by_path: dict[str, Case], report, root: Path) -> Counter:
    """Every oracle of the module docstring, for one ingest of these files; returns outcomes by kind."""
    archived, entries = outcome(root)
    assert report.read == report.ingested + report.duplicates + report.quarantined
    assert report.duplicates == 0  # one alert id, one file
    assert report.ingested == sum(len(v) for v in archived.values())
    assert report.quarantined == sum(e["records"] for v in entries.values() for e in v)
    assert set(entries) <= set(by_path), "a quarantine entry names a file that was not given"
    seen = Counter()
    for path, c in by_path.items():
        got, bad = archived.get(path, []), entries.get(path, [])
        lost = sum(e["records"] for e in bad)
        where = f"{c.kind} {Path(path).name}: archived {got}, quarantined {[e['reason'][:160] for e in bad]}"
        assert 1 <= len(got) + lost <= max(1, len(c.data)), where  # accounted for, and no more records than bytes
        assert all(e["reason"] for e in bad), where
        if c.expect in ("intact", "recoded"):
            assert sorted(got) == sorted(c.ids) and not bad, where
        elif c.expect == "broken":
            assert not got and lost >= 1, where
            assert all(c.reason in e["reason"] for e in bad), where
        else:  # damaged: only what fastavro itself reads from the damaged bytes may be archived
            assert set(got) <= set(reference_ids(c.data)), where
        if c.exact:
            assert len(got) + lost == len(c.ids), where
        for e in bad:  # quarantine keeps the bytes as they came (never inflated), cut to the limit
            if e["raw_file"]:
                kept = (root / "quarantine" / e["raw_file"]).read_bytes()
                assert kept in c.data or c.data.find(kept) >= 0, where
        seen[(c.kind.split("_")[0] if c.kind.startswith(("recode", "bomb")) else c.kind, "archived" if got else "quarantined")] += 1
    return seen


@pytest.mark.timeout(300)
def test_fuzzed_real_packets_never_take_down_an_ingest(corpus, tmp_path, monkeypatch):
    """~300 seeded mutations of real packets beside intact ones, in one ingest: every intact (and every
    validly re-encoded) alert archived, nothing fastavro cannot read archived, every file accounted for."""
    # DataFusion loops on some damaged blocks until its helper is killed; here after ~1 s instead of ~10 s
    # (the careful path then takes the batch: the outcome is the same, only slower to reach)
    monkeypatch.setattr(columnar, "TIMEOUT_S", 1.0)
    monkeypatch.setattr(columnar, "BYTES_PER_S", 4e7)
    intact, cases = corpus
    by_path = write_inputs(tmp_path / "in", intact + cases + bombs())
    report = ingest([str(tmp_path / "in")], tmp_path / "archive", IngestOptions(workers=0, progress=False))
    seen = check(by_path, report, tmp_path / "archive")
    assert report.quarantined > 0
    kinds = Counter(k for k, _ in seen.elements())
    assert len(cases) >= 280 and len(kinds) >= 20, kinds  # the draw covers every kind of mutation
    assert seen[("flip_data", "quarantined")] and seen[("flip_data", "archived")]  # both happen: damage in cutouts passes


# --- crash-prone cases: the CLI in a subprocess, with a timeout ----------------------------------------


def cli(*args: str, timeout: float = 180, limit_bytes: int | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """``ampel-dask ingest`` as a user runs it; ``limit_bytes`` caps its address space (and its helpers',
    which inherit the limit) as ``prlimit --as`` does."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "ingest", *args, "--json", "--no-progress"], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap if limit_bytes else None, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    assert proc.returncode in (0, 3), f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def record(name: str, fields: list) -> dict:
    return {"type": "record", "name": name, "fields": fields}


ZTF_LIKE = [{"name": "objectId", "type": "string"}, {"name": "candid", "type": "long"}, {"name": "candidate", "type": record("candidate", [{"name": "jd", "type": "double"}])}]
NESTED = {"type": "long"}
for _level in range(100):
    NESTED = record(f"n{_level}", [{"name": "x", "type": NESTED}])

# schemas a container may name that crash or hang a decoder: (file, schema, records written with it, phrase of the reason)
REFUSED = [
    ("recursive_required", record("N", [{"name": "next", "type": "N"}]), [(1, b"")], "requires itself"),
    ("recursive_deep", record("N", [{"name": "next", "type": ["null", "N"]}]), [(1, b"\x02" * 200_000 + b"\x00")], "recursive type 'N'"),
    ("recursive_in_alert", record("alert", ZTF_LIKE + [{"name": "prv", "type": ["null", "alert"]}]), [(1, b"\x02a\x02" + b"\x00" * 8 + b"\x02" * 50_000)], "recursive type 'alert'"),
    ("mutual", record("A", [{"name": "b", "type": record("B", [{"name": "a", "type": ["null", "A"]}])}]), [(1, b"\x02" * 100_000)], "recursive type 'A'"),
    ("array_of_null", record("alert", ZTF_LIKE + [{"name": "junk", "type": {"type": "array", "items": "null"}}]), [(1, b"\x02a\x02" + b"\x00" * 8 + zz(2**62) + b"\x00")], "array of items that take no bytes"),
    ("string", "string", [(3, zz(1) + b"a" + zz(1) + b"b" + zz(1) + b"c")], "its top level is 'string', not a record"),
    ("bytes", "bytes", [(2, zz(2) + b"ab" + zz(0))], "its top level is 'bytes', not a record"),
    ("array", {"type": "array", "items": "long"}, [(1, zz(1) + zz(7) + zz(0))], "not a record"),
    ("nested_100", NESTED, [(1, b"\x02")], "nests more than 64"),
]


@pytest.mark.timeout(600)
def test_schemas_that_crash_decoders_are_refused_not_decoded(tmp_path, data_dir):
    """Each would kill fastavro (exit 139) or loop; beside ten real alerts, in one ingest in this process's
    stead (a subprocess with a timeout), on one worker process and without a cluster: each is
    quarantined with its reason and the count its blocks declare, the ten alerts archived, exit 3."""
    src = tmp_path / "in"
    src.mkdir()
    good = sorted((data_dir / "ztf" / "fink_local_202001").glob("*.avro"))[:10]
    for p in good:
        (src / p.name).write_bytes(p.read_bytes())
    for name, schema, blocks, _ in REFUSED:
        (src / f"{name}.avro").write_bytes(container(json.dumps(schema).encode(), blocks))
    # a Rubin wire message whose schema (found in --schema-dir) is recursive
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "lsst.v99_0.alert.json").write_text(json.dumps(record("lsst.v99_0.alert", [{"name": "n", "type": ["null", "lsst.v99_0.alert"]}])))
    (src / "wire_recursive.avro").write_bytes(b"\x00" + (9900).to_bytes(4, "big") + b"\x02" * 100_000 + b"\x00")
    expected_ids = sorted(alert_id(next(fastavro.reader(open(p, "rb")))) for p in good)
    declared = sum(c for _, _, blocks, _ in REFUSED for c, _ in blocks) + 1
    for workers in ("0", "1"):
        root = tmp_path / f"archive{workers}"
        proc, summary = cli(str(src), "--archive", str(root), "--workers", workers, "--schema-dir", str(tmp_path / "schemas"))
        assert proc.returncode == 3 and "KilledWorker" not in proc.stderr, proc.stderr[-2000:]
        assert (summary["ingested"], summary["quarantined"], summary["read"]) == (10, declared, 10 + declared), summary
        archived, entries = outcome(root)
        assert sorted(i for v in archived.values() for i in v) == expected_ids
        for name, _, blocks, phrase in REFUSED:
            (entry,) = entries[str(src / f"{name}.avro")]
            assert entry["reason"].startswith("writer schema refused") and phrase in entry["reason"], entry["reason"]
            assert entry["records"] == sum(c for c, _ in blocks)
        (wire,) = entries[str(src / "wire_recursive.avro")]
        assert "writer schema refused" in wire["reason"] and "schema id 9900" in wire["reason"]


def tar_bomb(path: Path, late: bytes) -> None:
    """A nightly tarball whose first member is 3 GiB of zeros and whose second is ``late``: a valid gzip
    file of 3 MB, written in pieces (deflate blocks after a full flush repeat as they are)."""
    head = tarfile.TarInfo("huge.avro")
    head.size = 3 << 30
    second = tarfile.TarInfo("late.avro")
    second.size = len(late)
    first = head.tobuf(tarfile.GNU_FORMAT)
    rest = second.tobuf(tarfile.GNU_FORMAT) + late + b"\0" * (-len(late) % 512) + b"\0" * 10240
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = z.compress(first) + z.flush(zlib.Z_FULL_FLUSH)
    body += (z.compress(b"\0" * (1 << 20)) + z.flush(zlib.Z_FULL_FLUSH)) * 3072 + z.compress(rest) + z.flush()
    crc = zlib_ng.crc32(first)
    for _ in range(3072):
        crc = zlib_ng.crc32(b"\0" * (1 << 20), crc)
    crc = zlib_ng.crc32(rest, crc)
    size = len(first) + (3 << 30) + len(rest)
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little"))


BOMBS = {  # file -> what it inflates to (2-4 GiB), each a few KB to 4 MB on disk
    "bzip2.avro": lambda: container(BOMB_SCHEMA, [(1, bomb("bzip2", 4096))], b"bzip2"),
    "deflate.avro": lambda: container(BOMB_SCHEMA, [(1, bomb("deflate", 4096))], b"deflate"),
    "xz.avro": lambda: container(BOMB_SCHEMA, [(1, bomb("xz", 3072))], b"xz"),
    "gzip.avro.gz": lambda: bomb("gzip", 3072),  # a gzipped packet
    "blocks.avro": lambda: container(BOMB_SCHEMA, [(1, bomb("deflate", 60))] * 6, b"deflate"),  # blocks under 64 MiB, 360 MiB together
}


@pytest.mark.timeout(600)
def test_bombs_are_quarantined_in_bounded_memory(tmp_path, data_dir):
    """Inputs that inflate to 2-4 GiB, ingested by the CLI with its address space capped at 2 GiB
    (prlimit --as): each quarantined with the limit it passed, keeping its original (compressed) bytes;
    the real alerts beside them archived; exit 3."""
    src = tmp_path / "in"
    src.mkdir()
    good = sorted((data_dir / "ztf" / "fink_local_202001").glob("*.avro"))[:5]
    for p in good:
        (src / p.name).write_bytes(p.read_bytes())
    bombs_ = {name: make() for name, make in BOMBS.items()}
    for name, data in bombs_.items():
        (src / name).write_bytes(data)
    tar_bomb(tmp_path / "night.tar.gz", good[0].read_bytes())

    proc, summary = cli(str(src), str(tmp_path / "night.tar.gz"), "--archive", str(tmp_path / "a"), "--workers", "0", limit_bytes=2 << 30)
    assert proc.returncode == 3
    assert (summary["ingested"], summary["duplicates"]) == (5, 1)  # the tarball's late member is good[0] again
    archived, entries = outcome(tmp_path / "a")
    assert sorted(i for v in archived.values() for i in v) == sorted(alert_id(next(fastavro.reader(open(p, "rb")))) for p in good)
    reasons = {Path(s).name: [e["reason"] for e in v] for s, v in entries.items()}
    for name, codec in (("bzip2.avro", b"bzip2"), ("deflate.avro", b"deflate"), ("xz.avro", b"xz")):
        at = len(container(BOMB_SCHEMA, [], codec))  # the block starts where the header ends
        assert reasons[name] == [f"block inflates beyond {64 << 20} bytes (container block at byte {at}, 1 record)"], reasons[name]
    assert reasons["gzip.avro.gz"] == [f"gzip packet inflates beyond {256 << 20} bytes"]
    assert any(f"packet inflates beyond {256 << 20} bytes" in r for r in reasons["blocks.avro"]), reasons["blocks.avro"]
    (tar_entry,) = entries[str(tmp_path / "night.tar.gz")]
    assert tar_entry["member"] == "huge.avro" and tar_entry["reason"] == f"tar member larger than {256 << 20} bytes ({3 << 30} bytes)"
    for s, v in entries.items():  # what quarantine keeps is the input as it came, never what it inflates to
        for e in v:
            if e["raw_file"]:
                kept = (tmp_path / "a" / "quarantine" / e["raw_file"]).read_bytes()
                assert kept in bombs_[Path(s).name] and len(kept) == e["raw_bytes"] <= 16 << 20
    assert summary["read"] == summary["ingested"] + summary["duplicates"] + summary["quarantined"]


# --- properties of the capped inflaters and of the gzip stream (hypothesis) ------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ampel_dask.io.gzip_stream import GzipStream  # noqa: E402
from ampel_dask.io.limits import TooLarge, gunzip, inflate_block  # noqa: E402

# bytes that compress well and badly: runs of a byte, random bytes, and both
CONTENT = st.lists(st.one_of(st.binary(max_size=3000), st.tuples(st.integers(0, 255), st.integers(1, 200_000)).map(lambda t: bytes([t[0]]) * t[1])), max_size=6).map(b"".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=CONTENT, codec=st.sampled_from(["null", "deflate", "bzip2", "xz", "snappy", "zstandard"]), slack=st.integers(-5000, 5000))
def test_a_capped_inflater_gives_the_bytes_or_stops_past_the_cap(content, codec, slack):
    """Every codec: the original bytes when they fit the cap, TooLarge when they do not (the codec
    libraries compress; the cap is the content's own length plus or minus a little)."""
    cap = max(0, len(content) + slack)
    packed = content if codec == "null" else compress(codec, content)
    if len(content) <= cap:
        assert inflate_block(codec, packed, cap) == content
    else:
        with pytest.raises(TooLarge):
            inflate_block(codec, packed, cap)
    members = [gzip.compress(content, mtime=0), gzip.compress(content[:7], mtime=0)]
    whole = b"".join(members)
    if len(content) + min(7, len(content)) <= cap:
        assert gunzip(whole, cap) == content + content[:7]
    else:
        with pytest.raises(TooLarge):
            gunzip(whole, cap)


def _reference_prefix(data: bytes) -> tuple[bytes, bool]:
    """What a gzip file inflates to before its first error, fed to zlib one byte at a time (slow and
    plain: the reference for GzipStream), and whether it ended cleanly."""
    out, d, i = [], zlib.decompressobj(31), 0
    while i < len(data):
        try:
            out.append(d.decompress(data[i : i + 1]))
        except zlib.error:
            return b"".join(out), False
        i += 1
        if d.eof:
            rest = d.unused_data + data[i:]
            if not rest.strip(b"\0"):
                return b"".join(out), True
            rest = rest.lstrip(b"\0")
            i = len(data) - len(rest)
            d = zlib.decompressobj(31)
    return b"".join(out), False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(CONTENT, min_size=1, max_size=3), damage=st.one_of(st.none(), st.tuples(st.floats(0, 1), st.integers(0, 255))), cut=st.one_of(st.none(), st.floats(0, 1)))
def test_the_gzip_stream_delivers_every_byte_before_the_damage(parts, damage, cut):
    """One or more gzip members, perhaps with a byte changed or the end cut off: GzipStream delivers
    exactly what zlib, fed one byte at a time, inflates before its first error, and names a problem
    exactly when that reference does not end cleanly."""
    data = bytearray(b"".join(gzip.compress(p, mtime=0) for p in parts))
    if damage is not None:
        data[int(damage[0] * (len(data) - 1))] = damage[1]
    if cut is not None:
        data = data[: int(cut * len(data))]
    expected, clean = _reference_prefix(bytes(data))
    if not data:
        expected, clean = b"", False
    stream = io.BufferedReader(GzipStream(io.BytesIO(bytes(data))), 1 << 16)
    got = b"".join(iter(lambda: stream.read(50_000), b""))
    assert got == expected
    assert (stream.raw.problem is None) == clean, stream.raw.problem


MEMBER_SIZES = st.sampled_from([1, 511, 512, 513, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, 700_000, (1 << 20) + 3])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.one_of(MEMBER_SIZES, st.integers(0, 5000)), min_size=1, max_size=8), gz=st.booleans(), seed=st.integers(0, 2**16))
def test_a_tarball_stream_gives_every_member_as_written(tmp_path_factory, sizes, gz, seed):
    """Members of sizes around tar's 512-byte blocks and the stream's 64 KB reads, gzipped or not: the
    stream gives each member's bytes as tarfile wrote them, in order, and an empty one as a problem."""
    from ampel_dask.io.sources import Packet, _members

    rng = random.Random(seed)
    written = [(f"m{i}.avro", rng.randbytes(n)) for i, n in enumerate(sizes)]
    path = tmp_path_factory.mktemp("tar") / ("night.tar.gz" if gz else "night.tar")
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in written:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = [(x.member, x.data) if isinstance(x, Packet) else (x[1], x[2]) for x in _members(path)]
    assert got == [(name, data if data else "empty tar member (0 bytes)") for name, data in written]


@settings(max_examples=40, deadline=None)
@given(packets=st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.text(max_size=8)), st.one_of(st.none(), st.binary(max_size=300))), max_size=6),
       problems=st.lists(st.tuples(st.text(max_size=5), st.none(), st.text(max_size=5), st.binary(max_size=20)), max_size=2), protocol=st.integers(2, 5))  # fmt: skip
def test_a_chunk_pickled_for_a_worker_is_the_same_chunk(packets, problems, protocol):
    """A chunk shipped to a worker (pickle, with Dask's out-of-band buffers at protocol 5, or without)
    arrives equal to itself; at protocol 5 each member's bytes travel as a buffer of their own."""
    import pickle

    from ampel_dask.io.sources import Chunk, Packet

    chunk = Chunk(3, [Packet(s, m, d) for s, m, d in packets], sum(len(d or b"") for *_, d in packets), problems)
    assert pickle.loads(pickle.dumps(chunk, protocol=protocol)) == chunk
    if protocol == 5:
        buffers: list = []
        data = pickle.dumps(chunk, protocol=5, buffer_callback=buffers.append)
        assert pickle.loads(data, buffers=buffers) == chunk
        assert len(buffers) == sum(d is not None for *_, d in packets)
