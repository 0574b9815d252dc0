"""Compaction (issue #20): the archive's shape does not depend on the order alerts came in.

Oracles: nights from a plain-Python reading of the packets (fastavro, jd -> UTC date), the arithmetic
of the rule (ceil(n / target) parts of target rows, the last smaller), files read straight with pyarrow,
and the metamorphic relation "same alerts, any order and chunking -> same parts, same T2 rows".
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import tarfile
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import fastavro
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ampel_dask.cli import main
from ampel_dask.graph.compact import Background
from ampel_dask.graph.ingest import IngestOptions, ingest_packets
from ampel_dask.io import compact as compact_mod
from ampel_dask.io.archive import Archive
from ampel_dask.io.compact import CompactOptions, compact
from ampel_dask.io.sources import Packet

from .test_graph import TARBALLS, run, t2_rows

TARBALLS_ALL = [*TARBALLS, "ztf/ampel_core_real_201712.tar.gz"]


@pytest.fixture(scope="module")
def packets(data_dir) -> list[Packet]:
    """Every one-alert packet of three real ZTF tarballs, carried in memory (same labels in any order)."""
    out = []
    for rel in TARBALLS_ALL:
        with tarfile.open(data_dir / rel) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".avro"):
                    out.append(Packet(str(data_dir / rel), m.name, tar.extractfile(m).read()))
    return out


@pytest.fixture(scope="module")
def nights(packets) -> Counter:
    """Alerts per (survey, night), in plain Python: the UTC date of each candidate's jd (ZTF nights are
    UTC dates), one count per distinct candid."""
    seen: dict[int, int] = {}
    for p in packets:
        for rec in fastavro.reader(io.BytesIO(p.data)):
            c = rec["candidate"]
            mjd = c["jd"] - 2400000.5
            d = date(1858, 11, 17) + timedelta(days=math.floor(mjd))
            seen.setdefault(c["candid"], int(d.strftime("%Y%m%d")))
    return Counter(("ztf", n) for n in seen.values())


def shape(root: Path) -> dict[tuple[str, int], list[int]]:
    out: dict[tuple[str, int], list[int]] = {}
    for p in Archive(root).partitions():
        out.setdefault((p.survey, p.night), []).append(p.rows)
    return {k: sorted(v, reverse=True) for k, v in out.items()}


def expected_shape(n: int, target: int) -> list[int]:
    return [target] * (n // target) + ([n % target] if n % target else [])


def hashes(root: Path) -> set[tuple]:
    return {(p.survey, p.night, p.content_hash, p.rows) for p in Archive(root).partitions()}


def raw_rows(root: Path) -> dict[str, pa.Table]:
    """Every indexed part's rows, histories and cutouts, read with pyarrow alone, sorted by alert id; a
    part's cutouts are the rows of its alerts in its own file and in the files it references (so a
    cutout that two parts both claimed would be counted twice)."""
    index = pq.read_table(root / "_index.parquet").to_pylist()
    flat, hist, cut = [], [], []
    for e in index:
        t = pq.read_table(root / e["path"])
        flat.append(t)
        with pa.memory_map(str(root / e["dps"])) as src:
            d = pa.ipc.open_file(src).read_all()
        hist.append(pa.table({"alert_id": t.column("alert_id"), "dps": d.column("dps")}))
        for f in filter(None, [e["cutouts"], *(e.get("cutout_refs") or [])]):
            c = pq.read_table(root / f)
            cut.append(c.filter(pa.compute.is_in(c.column("alert_id"), t.column("alert_id"))))
    out = {"flat": pa.concat_tables(flat), "dps": pa.concat_tables(hist), "cutouts": pa.concat_tables(cut)}
    return {k: v.combine_chunks().sort_by("alert_id").replace_schema_metadata(None) for k, v in out.items()}


def assert_same_rows(a: dict[str, pa.Table], b: dict[str, pa.Table]) -> None:
    for k in a:
        assert a[k].num_rows == b[k].num_rows, k
        assert a[k].equals(b[k]), k


def test_shape_does_not_depend_on_order(packets, nights, tmp_path):
    """As they come (one part per tarball night) and shuffled in chunks of 10 packets (tiny parts over
    mixed nights): the same parts, byte for byte, and the rows per night the packets say."""
    assert sum(nights.values()) == len(packets)  # no alert twice: which copy wins would depend on order
    opts = IngestOptions(workers=0, progress=False)
    ingest_packets(packets, tmp_path / "a", opts)
    mixed = packets[:]
    random.Random(7).shuffle(mixed)
    ingest_packets(mixed, tmp_path / "b", opts.model_copy(update={"chunk_packets": 10}))
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert shape(tmp_path / "b") == {k: [n] for k, n in nights.items()}  # every night < 25,000 rows: one part
    # a workflow on both: the same T2 rows
    run(tmp_path / "a", tmp_path / "sa")
    run(tmp_path / "b", tmp_path / "sb")
    rows = t2_rows(tmp_path / "sa")
    assert rows and rows == t2_rows(tmp_path / "sb")


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), chunk=st.integers(10, 400), target=st.sampled_from([40, 97, 250]), split=st.integers(1, 3))
def test_any_order_and_chunking_gives_the_canonical_parts(packets, nights, tmp_path_factory, seed, chunk, target, split):
    """Shuffled, chunked, and ingested in ``split`` separate ingests: every night ends as parts of
    ``target`` rows and one smaller; ingested in one go (split 1) the same parts as the night-ordered
    ingest with the same target."""
    root = tmp_path_factory.mktemp("order")
    mixed = packets[:]
    random.Random(seed).shuffle(mixed)
    opts = IngestOptions(workers=0, progress=False, chunk_packets=chunk, compact_rows=target)
    step = math.ceil(len(mixed) / split)
    for i in range(0, len(mixed), step):
        ingest_packets(mixed[i : i + step], root / "x", opts)
    assert shape(root / "x") == {k: expected_shape(n, target) for k, n in nights.items()}
    if split == 1:
        ingest_packets(packets, root / "y", opts.model_copy(update={"chunk_packets": 2000}))
        assert hashes(root / "x") == hashes(root / "y")


@pytest.fixture(scope="module")
def tiny_once(packets, tmp_path_factory) -> Path:
    mixed = packets[:]
    random.Random(3).shuffle(mixed)
    root = tmp_path_factory.mktemp("tiny") / "archive"
    ingest_packets(mixed, root, IngestOptions(workers=0, progress=False, chunk_packets=10, compact_rows=0))
    return root


@pytest.fixture
def tiny(tiny_once, tmp_path) -> Path:
    """An archive of tiny parts (shuffled, chunks of 10 packets, no compaction at ingest), a copy per test."""
    shutil.copytree(tiny_once, tmp_path / "tiny")
    return tmp_path / "tiny"


def indexed_files(root: Path) -> set[str]:
    return {f for p in Archive(root).partitions() for f in (p.path, p.dps, p.cutouts, *p.cutout_refs) if f}


def test_compaction_keeps_every_row_history_and_cutout(tiny, tiny_rows, nights):
    before = tiny_rows  # ``tiny`` is a copy of the archive they were read from
    parts_before = len(Archive(tiny).partitions())
    rep = compact(tiny, CompactOptions(target_rows=60))
    assert not any(p.cutout_refs for p in Archive(tiny).partitions())  # tiny parts' cutouts: rewritten
    assert rep.parts_before == parts_before and rep.parts_after == len(Archive(tiny).partitions()) < parts_before
    assert shape(tiny) == {k: expected_shape(n, 60) for k, n in nights.items()}
    assert_same_rows(before, raw_rows(tiny))
    for p in Archive(tiny).partitions():  # each part in canonical order: stock, mjd, alert id
        t = pq.read_table(tiny / p.path, columns=["stock", "mjd", "alert_id"])
        keys = list(zip(*(t.column(c).to_pylist() for c in ("stock", "mjd", "alert_id"))))
        assert keys == sorted(keys)
    again = compact(tiny, CompactOptions(target_rows=60))
    assert again.nights == 0 and again.written == 0  # in shape: nothing to do


def cutout_bytes_of(root: Path) -> dict[str, int]:
    return {f.relative_to(root).as_posix(): f.stat().st_size for f in root.glob("survey=*/night=*/_cutouts-*")}


@pytest.fixture(scope="module")
def tiny_rows(tiny_once) -> dict[str, pa.Table]:
    return raw_rows(tiny_once)


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.sampled_from([40, 60, 250]), second=st.sampled_from([25, 97, 100000]), threshold=st.sampled_from([0, 60_000, 400_000]))
@example(first=60, second=25, threshold=0)  # every file referenced, then parts holding references cut smaller
def test_referenced_cutouts_are_every_cutout_once_and_files_live_while_referenced(tiny_once, tiny_rows, tmp_path_factory, first, second, threshold):
    """Cutouts files of at least ``reference_bytes`` are referenced by the merged parts, not rewritten:
    compacted twice (the second time merging parts that hold references, into more or fewer parts),
    every cutout is still there once (pyarrow alone, against the tiny archive), no referenced file is
    retired or deleted, files at or above the threshold are never rewritten, and ``read_cutouts`` gives
    a part its own alerts' cutouts only, even when asked for alerts of other parts."""
    root = tmp_path_factory.mktemp("refs") / "a"
    shutil.copytree(tiny_once, root)
    before, original = tiny_rows, cutout_bytes_of(root)
    for target in (first, second):
        sizes = cutout_bytes_of(root)
        big = {f for f, n in sizes.items() if n >= threshold}  # the files there before this compaction
        compact(root, CompactOptions(target_rows=target, reference_bytes=threshold, grace_seconds=0))
        compact(root, CompactOptions(target_rows=target, reference_bytes=threshold, grace_seconds=0))  # deletes the retired files
        assert_same_rows(before, raw_rows(root))
        parts = Archive(root).partitions()
        refs = {f for p in parts for f in p.cutout_refs}
        assert refs <= big and refs <= set(cutout_bytes_of(root))  # only big files, and all still in place
        assert {f.relative_to(root).as_posix() for f in root.glob("survey=*/night=*/*")} == indexed_files(root)
        for f, n in cutout_bytes_of(root).items():
            assert f not in sizes or sizes[f] == n  # a file kept is never rewritten
    if threshold == 0:
        assert refs and set(original) <= {f for p in parts for f in p.cutout_files}  # every original file referenced
    arch = Archive(root)
    every = before["cutouts"].column("alert_id").to_pylist()
    for p in parts[:: max(1, len(parts) // 8)]:  # a sample: with every tiny file referenced, reading all took 12 s
        mine = set(pq.read_table(root / p.path, columns=["alert_id"]).column("alert_id").to_pylist())
        got = arch.read_cutouts(p)
        assert got is None or sorted(got.column("alert_id").to_pylist()) == sorted(mine & set(every))
        asked = arch.read_cutouts(p, every)  # every alert of the archive asked for: its own come back
        assert asked is None or sorted(asked.column("alert_id").to_pylist()) == sorted(mine & set(every))


def test_a_merge_that_spills_writes_the_parts_a_merge_in_memory_writes(tiny_once, tmp_path, monkeypatch):
    """The largest night of tiny parts merged with its parts and pieces held in memory (it fits
    ``HOLD_BYTES``), with every piece spilled to disk and each part read twice (``HOLD_BYTES`` 0), and
    with a third of its bytes in memory (pieces spilled together, several per file, as a large night
    does): the same parts, byte for byte (rows and histories by their content hash, cutouts by their
    bytes)."""
    arch = Archive(tiny_once)
    work = max(compact_mod.plan(arch, 60), key=lambda w: w.rows)
    spills, spill = [], compact_mod._spill
    monkeypatch.setattr(compact_mod, "_spill", lambda path, table: spills.append(table.num_rows) or spill(path, table))
    merged, default = {}, compact_mod.HOLD_BYTES
    for hold in (default, 0, sum(arch.read(p).nbytes for p in work.parts) // 3):
        monkeypatch.setattr(compact_mod, "HOLD_BYTES", hold)
        spills.clear()
        staged = compact_mod.merge(tiny_once, work, 60, tmp_path / str(hold))
        assert len(staged) == math.ceil(work.rows / 60) > 1 and all(s.cutouts is not None for s in staged)
        merged[hold] = [(s.content_hash, s.cutouts.read_bytes()) for s in staged]
        if hold == default:
            assert not spills
        elif hold == 0:
            assert len(spills) >= 2 * len(work.parts)  # rows and cutouts of every part's pieces, one by one
    assert 0 < len(spills) < 2 * len(work.parts) and max(spills) > 1  # the third: pieces spilled together
    first, *rest = merged.values()
    assert all(m == first for m in rest)


def test_replaced_files_wait_for_their_grace_period(tiny):
    compact(tiny, CompactOptions(target_rows=60, grace_seconds=3600))
    on_disk = lambda: {f.relative_to(tiny).as_posix() for f in tiny.glob("survey=*/night=*/*")}  # noqa: E731
    indexed = indexed_files(tiny)
    retired = set(json.loads((tiny / "_retired.json").read_text()))
    kept = lambda: {f.relative_to(tiny / "_retired").as_posix() for f in tiny.glob("_retired/survey=*/night=*/*")}  # noqa: E731
    assert retired and not retired & indexed and on_disk() == indexed  # the folders: no row twice
    assert kept() == retired  # moved aside, kept for their grace period
    ds = pads.dataset(tiny / "survey=ztf", format="parquet", partitioning="hive")  # a reader of the folders
    assert sorted(ds.to_table(columns=["alert_id"]).column("alert_id").to_pylist()) == sorted(raw_rows(tiny)["flat"].column("alert_id").to_pylist())
    assert compact(tiny, CompactOptions(target_rows=60, grace_seconds=3600)).deleted == []
    assert sorted(compact(tiny, CompactOptions(target_rows=60, grace_seconds=0)).deleted) == sorted(retired)
    assert on_disk() == indexed and kept() == set()


@pytest.mark.parametrize("where", ["replace_partitions", "retire"])
def test_a_crash_before_the_index_swap_leaves_the_old_parts_and_a_later_compact_completes(tiny, tiny_rows, nights, monkeypatch, where):
    before = tiny_rows  # ``tiny`` is a copy of the archive they were read from
    old_index = (tiny / "_index.parquet").read_bytes()

    def boom(*a, **k):
        raise OSError("injected crash")

    if where == "retire":
        monkeypatch.setattr(Archive, "retire", boom)
    else:
        monkeypatch.setattr(Archive, "replace_partitions", boom)
    with pytest.raises(OSError, match="injected"):
        compact(tiny, CompactOptions(target_rows=60))
    monkeypatch.undo()
    assert (tiny / "_index.parquet").read_bytes() == old_index  # the old parts, all of them
    assert_same_rows(before, raw_rows(tiny))
    assert (tiny / "_publishing").exists()  # what a killed process leaves: the next publish sweeps
    rep = compact(tiny, CompactOptions(target_rows=60, grace_seconds=0))
    assert rep.nights == len(nights)
    assert shape(tiny) == {k: expected_shape(n, 60) for k, n in nights.items()}
    assert_same_rows(before, raw_rows(tiny))
    compact(tiny, CompactOptions(target_rows=60, grace_seconds=0))  # deletes what the swap retired
    indexed = indexed_files(tiny)
    assert {f.relative_to(tiny).as_posix() for f in tiny.glob("survey=*/night=*/*")} == indexed  # no orphan, no leftover


def test_a_night_changed_meanwhile_is_left_for_the_next_compaction(tiny):
    """A merge made from parts another compaction replaced is discarded, not indexed beside them."""
    arch = Archive(tiny)
    works = compact_mod.plan(arch, 60)
    staged = compact_mod.merge(tiny, works[0], 60, arch.tmp_dir / "t")
    compact(tiny, CompactOptions(target_rows=60))
    index = (tiny / "_index.parquet").read_bytes()
    assert compact_mod.commit(arch, works[0], staged) is None
    assert (tiny / "_index.parquet").read_bytes() == index
    assert not any(s.path.exists() for s in staged)


def test_live_compacts_every_n_batches_in_the_background(tiny, nights):
    bg = Background(tiny, every=2, options=CompactOptions(target_rows=60))
    bg.after_batch([n for _, n in nights])
    assert bg.thread is None  # one batch: not yet
    bg.after_batch([])
    bg.close()
    assert not bg.errors and bg.reports[0].nights == len(nights)
    assert shape(tiny) == {k: expected_shape(n, 60) for k, n in nights.items()}


def test_cli_compact_prints_parts_before_and_after(tiny):
    n = len(Archive(tiny).partitions())
    res = CliRunner().invoke(main, ["compact", str(tiny), "--target-rows", "100000", "--nights", "20180101:20181231", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    in_2018 = {p.night for p in Archive(tiny).partitions() if 20180101 <= p.night <= 20181231}
    assert out["nights"] == len(in_2018) and out["parts_before"] > out["parts_after"] == len(in_2018)
    assert len(Archive(tiny).partitions()) == n - out["parts_before"] + out["parts_after"]
