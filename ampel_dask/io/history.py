"""The archive's object-bucketed history: each object's datapoints once, by object bucket, kept by ingest.

Layout, per survey::

    ARCHIVE/survey=ztf/_history/seg-<key>.arrow     segments: Arrow IPC, :data:`BUCKETS` record batches,
                                                   batch k = the datapoints of the objects in bucket k,
                                                   sorted by (stock, dp_id)
    ARCHIVE/survey=ztf/_history/_manifest.json      the segments, and the parts whose datapoints they hold

A row is one datapoint of one object as first published by a packet of one *packet class* (the
packet's ZTF programid; -1 for none): ``stock``, ``packet`` and ``packet_mjd`` (the alert that published
it first, i.e. its publication time), ``packet_pid`` and the datapoint's fields (``band`` as codes).
The class is kept because a channel may only see some packets, and a copy from a packet it may not see
is not its copy (``graph/shuffle.history_pieces`` reads packets the same way). So a channel's history of
an object is, over the classes it may see, each datapoint's earliest row: the rule of
``tiers.states.first_copies``, which is a total order, so it can be applied per segment first and again
across segments.

Why uncompressed and sorted: a run looks up only the objects that passed its filters (numpy's
``searchsorted`` on the memory-mapped ``stock`` column, then a gather of their rows), so what it reads
grows with its selection, not with the archive. Compressed buffers would have to be inflated whole, and
objects are spread at random over the buckets and their rows. Segments are written per ingest and
merged in tiers (:func:`tiers_to_merge`): each datapoint is rewritten O(log N) times, and a bucket is
read from O(log N) files.

Durability: segments are written (fsync'ed) before the manifest that names them is replaced, under the
archive's lock; a segment the manifest does not name is never read, and one a killed update left
unnamed is removed by a later update once a day old (:func:`sweep_orphans`). Segments merged away are
retired like compacted parts (``_retired.json``), so that a run reading them finishes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..keys import bucket_of, key_of
from .arrays import first_of_groups, one_batch, order_by
from .files import atomic_target, atomic_write
from .layout import band_as

#: object buckets of a survey's history. A lookup maps the pages it touches of one bucket's batch at a
#: time, and a bucket's objects are spread over all of it, so smaller buckets map less at once (10 M
#: LSST alerts, with the history built by the same workers just before: 1,765-1,968 MiB per worker with
#: 16, 1,681-1,780 with 128; built apart, 1,419-1,490 with 128; benchmarks/README.md). A merge holds
#: one bucket of its inputs in memory too.
BUCKETS = 128
FANOUT = 4  # segments of one size tier merged into one
MERGE_ROWS = 64_000_000  # rows of a merge's output at most (~7 GB; one of its buckets, ~60 MB, in memory at a time)
DIR = "_history"
MANIFEST = "_manifest.json"
#: which datapoints and copies a segment holds; a manifest of another version is rebuilt
VERSION = 1


def history_dir(root: str | Path, survey: str) -> Path:
    return Path(root) / f"survey={survey}" / DIR


def load_manifest(root: str | Path, survey: str) -> dict:
    """The survey's segments (name -> rows) and covered parts (content hashes); empty if none or of
    another :data:`VERSION`."""
    path = history_dir(root, survey) / MANIFEST
    if path.exists():
        m = json.loads(path.read_text())
        if m.get("version") == VERSION and m.get("buckets") == BUCKETS:
            return m
    return {"version": VERSION, "buckets": BUCKETS, "segments": {}, "covered": []}


def stale_segments(root: str | Path, survey: str) -> list[str]:
    """Segments (relative to the root) of a manifest of another :data:`VERSION` or bucket count: the
    history is built again, and these are retired when its manifest is replaced."""
    path = history_dir(root, survey) / MANIFEST
    if not path.exists():
        return []
    m = json.loads(path.read_text())
    if m.get("version") == VERSION and m.get("buckets") == BUCKETS:
        return []
    return [(path.parent / n).relative_to(root).as_posix() for n in m.get("segments", {})]


def save_manifest(root: str | Path, survey: str, manifest: dict) -> None:
    """Replace the manifest (call with the archive's lock held)."""
    manifest = {**manifest, "covered": sorted(set(manifest["covered"]))}
    atomic_write(history_dir(root, survey) / MANIFEST, json.dumps(manifest, sort_keys=True).encode())


def segment_paths(root: str | Path, survey: str) -> list[str]:
    d = history_dir(root, survey)
    return [str(d / n) for n in sorted(load_manifest(root, survey)["segments"])]


def live_files(root: str | Path) -> set[str]:
    """Every segment a manifest names, relative to the archive root (what deletion of retired files keeps)."""
    root = Path(root)
    out = set()
    for m in root.glob(f"survey=*/{DIR}/{MANIFEST}"):
        survey = m.parent.parent.name.removeprefix("survey=")
        out |= {(m.parent / n).relative_to(root).as_posix() for n in load_manifest(root, survey)["segments"]}
    return out


#: a file of a history folder that no manifest names (and no retirement lists) is removed once it is this
#: old: segments are written before the manifest names them, by a build or merge of minutes at most, so one
#: unnamed for a day was left by a process killed in between (or is a killed writer's temporary file)
ORPHAN_AGE_S = 86_400.0


def sweep_orphans(root: str | Path, survey: str, retired: set[str], now: float, age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Remove the survey's segment files (and writers' temporary files) that its manifest does not name,
    that are not ``retired`` (they wait for their grace period) and are older than ``age_s`` (call with
    the archive's lock held). Returns them, relative to the root."""
    root, folder = Path(root), history_dir(root, survey)
    named = set(load_manifest(root, survey)["segments"])
    removed = []
    for f in sorted(folder.iterdir()) if folder.exists() else []:
        rel = f.relative_to(root).as_posix()
        ours = f.name.startswith("seg-") or f.name.endswith(".tmp")  # segments, and writers' temporary files
        if ours and f.is_file() and f.name not in named and rel not in retired and now - f.stat().st_mtime > age_s:
            f.unlink()
            removed.append(rel)
    return removed


def carry_coverage(root: str | Path, merged: list[tuple[list[tuple[str, str]], list[tuple[str, str]]]]) -> None:
    """Compaction replaced parts by others holding the same rows: ``(old, new)`` lists of (survey,
    content hash). The new ones are covered when all the old ones were (call with the lock held)."""
    by_survey: dict[str, dict] = {}
    for old, new in merged:
        for survey in {s for s, _ in old + new}:
            m = by_survey.setdefault(survey, load_manifest(root, survey))
            covered = set(m["covered"])
            olds = {h for s, h in old if s == survey}
            if olds and olds <= covered:
                m["covered"] = sorted((covered - olds) | {h for s, h in new if s == survey})
    for survey, m in by_survey.items():
        if m["segments"]:
            save_manifest(root, survey, m)


def write_segment(table: pa.Table, folder: Path, name: str) -> int:
    """Write rows (any order) as a segment: sorted by (bucket, stock, dp_id), one record batch per
    bucket, uncompressed, fsync'ed. Returns the row count."""
    stock = table.column("stock").to_numpy()
    b = bucket_of(stock, BUCKETS)
    order = order_by((b, "ascending"), (stock, "ascending"), (table.column("dp_id").to_numpy(zero_copy_only=False), "ascending"))
    table = table.take(pa.array(order)).combine_chunks()  # one dictionary for ``band`` in every batch
    bounds = np.searchsorted(b[order], np.arange(BUCKETS + 1))
    with atomic_target(folder / name, durable=True) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            for k in range(BUCKETS):
                writer.write_batch(one_batch(table.slice(bounds[k], bounds[k + 1] - bounds[k])))
    return table.num_rows


def first_per_class(table: pa.Table) -> pa.Table:
    """Each (stock, dp_id, packet_pid) once: the row of the earliest packet (``packet_mjd``, then
    ``packet``), the rule of ``tiers.states.first_copies`` within each packet class."""
    if not table.num_rows:
        return table
    col = lambda c: table.column(c).to_numpy(zero_copy_only=False)  # noqa: E731
    return table.take(pa.array(first_of_groups([col("stock"), col("dp_id"), col("packet_pid")], [col("packet_mjd"), col("packet")])))


def merge_segments(paths: list[str], folder: Path) -> tuple[str, int]:
    """One segment of the union of these, each datapoint's earliest copy per packet class; bucket by
    bucket (a bucket of all of them in memory at a time). Returns its name and rows."""
    name = f"seg-{key_of('merge', VERSION, BUCKETS, sorted(Path(p).name for p in paths))}.arrow"
    # read, not mapped: a mapped page read once stays in the process's resident memory, which Dask's
    # memory monitor counts (a 13-way merge of 6.5 GB showed 8.3 GiB "unmanaged" on its worker)
    readers = [pa.ipc.open_file(pa.OSFile(p)) for p in paths]
    # an IPC file holds one dictionary per field: ``band`` gets the union of the inputs' names
    bands = pa.array(sorted({b for r in readers for b in _band_names(r)}), pa.string())
    rows = 0
    with atomic_target(folder / name, durable=True) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        writer = None
        for k in range(BUCKETS):
            piece = pa.concat_tables([pa.Table.from_batches([r.get_batch(k)]) for r in readers])
            piece = first_per_class(piece.set_column(piece.schema.get_field_index("band"), "band", band_as(piece.column("band"), pa.string())))
            order = order_by((piece.column("stock").to_numpy(), "ascending"), (piece.column("dp_id").to_numpy(), "ascending"))
            piece = piece.take(pa.array(order))
            i = piece.schema.get_field_index("band")
            codes = pa.DictionaryArray.from_arrays(pc.index_in(piece.column("band").combine_chunks(), value_set=bands).cast(pa.int16()), bands)
            batch = pa.RecordBatch.from_arrays([codes if j == i else c.combine_chunks() for j, c in enumerate(piece.columns)],
                                               schema=piece.schema.set(i, pa.field("band", codes.type)))  # fmt: skip
            if writer is None:
                writer = pa.ipc.new_file(sink, batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
        writer.close()  # type: ignore[union-attr]
    return name, rows


def _band_names(reader: pa.ipc.RecordBatchFileReader) -> list[str]:
    if not reader.num_record_batches:
        return []
    band = reader.get_batch(0).column("band")
    return [b for b in (band.dictionary if pa.types.is_dictionary(band.type) else band.unique()).to_pylist() if b is not None]


def tiers_to_merge(segments: dict[str, int], cap: int = MERGE_ROWS) -> list[list[str]]:
    """Groups of segments to merge: :data:`FANOUT` or more of one size tier (rows in [FANOUT^t,
    FANOUT^(t+1))) become one of a higher tier. A merge holds one bucket of its inputs in memory, so a
    group stops at ``cap`` rows (:data:`MERGE_ROWS`) and a segment that large is not merged again."""
    tiers: dict[int, list[tuple[int, str]]] = {}
    for name, rows in segments.items():
        if rows < cap:
            tiers.setdefault(_tier(rows), []).append((rows, name))
    groups = []
    for _, members in sorted(tiers.items()):
        if len(members) < FANOUT:
            continue
        group: list[str] = []
        total = 0
        for rows, name in sorted(members):
            if group and total + rows > cap:
                groups.append(group)
                group, total = [], 0
            group.append(name)
            total += rows
        groups.append(group)
    return [sorted(g) for g in groups if len(g) >= 2]


def _tier(rows: int) -> int:
    """t with FANOUT^t <= rows < FANOUT^(t+1) (0 for none), in integers."""
    t = 0
    while FANOUT ** (t + 1) <= rows:
        t += 1
    return t


def lookup(paths: list[str], stocks: np.ndarray) -> pa.Table | None:
    """The rows of these objects (``stocks`` sorted, unique) in these segments: per segment and bucket
    of theirs, a binary search of the memory-mapped ``stock`` column and a gather of their runs (only
    their pages are read)."""
    sb = bucket_of(stocks, BUCKETS)
    pieces = []
    for path in paths:
        with pa.memory_map(path) as src:
            reader = pa.ipc.open_file(src)
            for k in np.unique(sb):
                piece = _runs_of(reader.get_batch(int(k)), stocks[sb == k])
                if piece is not None:  # a copy: the batch's mapped pages are let go here, one batch at a time
                    pieces.append(piece)
    return pa.concat_tables(pieces) if pieces else None


def _runs_of(batch: pa.RecordBatch, mine: np.ndarray) -> pa.Table | None:
    if not batch.num_rows:
        return None
    col = batch.column("stock").to_numpy()
    lo, hi = np.searchsorted(col, mine, "left"), np.searchsorted(col, mine, "right")
    n = hi - lo
    if not n.any():
        return None
    idx = np.repeat(lo - (np.cumsum(n) - n), n) + np.arange(n.sum(), dtype=np.int64)
    return pa.Table.from_batches([batch]).take(pa.array(idx))


__all__ = ["BUCKETS", "history_dir", "load_manifest", "save_manifest", "segment_paths", "carry_coverage", "live_files", "stale_segments", "sweep_orphans", "write_segment",
           "merge_segments", "first_per_class", "tiers_to_merge", "lookup"]  # fmt: skip
