"""Keeping the archive's object-bucketed history (``io/history.py``) and reading it for a history join.

Ingest calls :func:`update_history` after it wrote (and compacted) its parts: the parts no segment
covers yet are read (flat columns and histories), thinned to each datapoint's first copy per packet
class, written as new segments, and the manifest names them; then segments of one size tier are merged.
A run whose history sources are all covered reads each bucket's history straight from the segments
(:func:`bucket_history`) instead of shuffling every archived datapoint through disk.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import history as hs
from ..io.archive import Archive, Partition, read_dps
from ..io.layout import BAND_CODES, band_as
from ..keys import key_of
from .shuffle import stocks_of
from ..tiers.states import HISTORY_SCHEMA, TIME_EPS, access_by_survey, thinned_history

log = logging.getLogger(__name__)

SEGMENT_ROWS = 250_000  # alerts read per segment built (a task each on a cluster)
_HEAD = ("alert_id", "stock", "mjd", "programid")


def packet_classes(programid: np.ndarray) -> np.ndarray:
    """A packet's class: its ZTF programid, -1 for none (a survey without programids is one class)."""
    pid = np.asarray(programid, dtype=np.float64)
    return np.where(np.isfinite(pid), pid, -1).astype(np.int16)


def build_segment(root: str, survey: str, rel_paths: list[str], name: str) -> tuple[str, int]:
    """Write the segment of these parts' datapoints (:func:`segment_rows`); returns its name and rows."""
    tables = []
    for rel in rel_paths:
        path = f"{root}/{rel}"
        pf = pq.ParquetFile(path)
        head = pf.read(columns=[c for c in _HEAD if c in pf.schema_arrow.names], use_threads=False)
        tables.append(head.append_column("dps", read_dps(path, coded=True)))
    return name, hs.write_segment(segment_rows(pa.concat_tables(tables, promote_options="default")), hs.history_dir(root, survey), name)


def segment_rows(alerts: pa.Table) -> pa.Table:
    """Alerts' packets (``alert_id``, ``stock``, ``mjd``, ``dps``, and ``programid`` where the survey
    has one) as segment rows: for each packet class, each (object, datapoint) once, the copy of the
    earliest packet of that class that carried it (``thinned_history``)."""
    pid = pc.cast(alerts.column("programid"), pa.float64()).to_numpy(zero_copy_only=False) if "programid" in alerts.column_names else np.full(alerts.num_rows, np.nan)
    cls = packet_classes(pid)
    pieces = []
    for c in np.unique(cls):
        flat = thinned_history(alerts, cls == c)
        flat = flat.set_column(flat.schema.get_field_index("band"), "band", band_as(flat.column("band"), pa.string()))
        pieces.append(flat.add_column(3, "packet_pid", pa.array(np.full(flat.num_rows, c, np.int16))))
    table = pa.concat_tables(pieces) if pieces else _EMPTY
    return table.set_column(table.schema.get_field_index("band"), "band", band_as(table.column("band"), BAND_CODES))


_EMPTY = pa.schema([*HISTORY_SCHEMA][:3] + [pa.field("packet_pid", pa.int16())] + [*HISTORY_SCHEMA][3:]).empty_table()


def update_history(archive: Archive, client=None, surveys: list[str] | None = None) -> dict:
    """Cover the archive's parts no segment covers yet, then merge segments of one size tier. Segments
    are built as tasks on ``client`` (or here); the manifest is written here, under the archive's lock.
    Returns what was done (segments written and merged, parts covered, seconds)."""
    t0 = time.perf_counter()
    out = {"segments": 0, "merged": 0, "parts": 0, "seconds": 0.0}
    root = str(archive.root)
    for survey in sorted(surveys or {p.survey for p in archive.partitions()}):
        covered = set(hs.load_manifest(root, survey)["covered"])
        todo = [p for p in archive.partitions([survey]) if p.content_hash not in covered]
        groups = _groups(todo)
        jobs = [(root, survey, [p.path for p in g], f"seg-{key_of('build', hs.VERSION, hs.BUCKETS, sorted(p.content_hash for p in g))}.arrow") for g in groups]
        built = _run(client, build_segment, jobs)
        with archive.locked():
            stale = hs.stale_segments(root, survey)  # a history of another layout: replaced by this one
            m = hs.load_manifest(root, survey)
            for (name, rows), g in zip(built, groups):
                m["segments"][name] = rows
                m["covered"] = [*m["covered"], *(p.content_hash for p in g)]
            if built:
                hs.save_manifest(root, survey, m)
                live = {(hs.history_dir(root, survey) / n).relative_to(root).as_posix() for n in m["segments"]}
                archive.retire([f for f in stale if f not in live])
            if orphans := hs.sweep_orphans(root, survey, set(archive.retired()), time.time()):
                log.warning("removed %d history file(s) of %s that a killed history update left unnamed", len(orphans), survey)
        out["segments"] += len(built)
        out["parts"] += len(todo)
        out["merged"] += _merge_tiers(archive, survey, client)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _groups(parts: list[Partition]) -> list[list[Partition]]:
    out: list[list[Partition]] = []
    for p in sorted(parts, key=lambda p: (p.night, p.path)):
        if not out or sum(x.rows for x in out[-1]) + p.rows > SEGMENT_ROWS:
            out.append([])
        out[-1].append(p)
    return [g for g in out if g]


def _run(client, fn, jobs: list[tuple]) -> list:
    if client is None or not jobs:  # on a cluster even one job: the driver of an ingest is its busiest process
        return [fn(*j) for j in jobs]
    return client.gather([client.submit(fn, *j, pure=False) for j in jobs])


def _merge_tiers(archive: Archive, survey: str, client) -> int:
    """Merge segments of one size tier until no tier holds :data:`~io.history.FANOUT` of them; the ones
    merged away are retired (runs reading them finish). Returns how many merges were done."""
    root, folder, merges = str(archive.root), hs.history_dir(archive.root, survey), 0
    while groups := hs.tiers_to_merge(hs.load_manifest(root, survey)["segments"]):
        done = _run(client, hs.merge_segments, [([str(folder / n) for n in g], folder) for g in groups])
        with archive.locked():
            m = hs.load_manifest(root, survey)
            retired = []
            for g, (name, rows) in zip(groups, done):
                if all(n in m["segments"] for n in g):
                    for n in g:
                        m["segments"].pop(n)
                    m["segments"][name] = rows
                    retired += [n for n in g if n != name]
            hs.save_manifest(root, survey, m)
            archive.retire([(folder / n).relative_to(archive.root).as_posix() for n in retired])
        merges += len(groups)
    return merges


def history_segments(archive: Archive, sources: list[Partition]) -> dict[str, list[str]] | None:
    """Per survey, the segments holding every datapoint of these parts; None when some part is not
    covered (an archive written before ingest kept a history, or with ``--no-history``): the run then
    shuffles the parts' histories itself (``graph/shuffle.py``)."""
    out = {}
    for survey in sorted({p.survey for p in sources}):
        m = hs.load_manifest(archive.root, survey)
        missing = {p.content_hash for p in sources if p.survey == survey} - set(m["covered"])
        if missing:
            log.info("the archive's history of %s does not cover %d part(s): this run shuffles the histories (`ampel-dask ingest` keeps it)", survey, len(missing))
            return None
        out[survey] = [str(hs.history_dir(archive.root, survey) / n) for n in sorted(m["segments"])]
    return out


def bucket_history(segments: dict[str, list[str]], alerts: pa.Table, access: list[str]) -> pa.Table:
    """The archived history of the objects of these passing alerts (``segments``: per survey, its
    segment files): each object's datapoints that a packet the channel may see published at or before
    the object's latest passing alert (later packets add nothing to its states), as
    :data:`~tiers.states.HISTORY_SCHEMA` rows. A datapoint may come once per packet class here;
    ``first_copies`` in the join keeps its earliest."""
    stocks, until = stocks_of([(alerts.column("stock").to_numpy(), alerts.column("mjd").to_numpy())])
    pieces = []
    for survey, paths in sorted(segments.items()):
        rows = hs.lookup(paths, stocks)
        if rows is None:
            continue
        at = np.searchsorted(stocks, rows.column("stock").to_numpy())
        keep = rows.column("packet_mjd").to_numpy() <= until[at] + TIME_EPS
        pid = rows.column("packet_pid").to_numpy().astype(np.float64)  # -1 (none) is private, as NaN is
        keep &= access_by_survey([survey], np.zeros(rows.num_rows, np.int64), pid, access)
        pieces.append(rows.filter(pa.array(keep)).drop_columns(["packet_pid"]))
    return pa.concat_tables(pieces) if pieces else HISTORY_SCHEMA.empty_table()


__all__ = ["update_history", "build_segment", "segment_rows", "bucket_history", "history_segments", "packet_classes"]
