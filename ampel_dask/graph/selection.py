"""A channel's T3 selection: each object's latest state, joined with its latest T2 results.

The join is by 128-bit state content id (``keys.state_ids``): a T2 row joins a state only if it was
computed from the same datapoint values; one computed from other values (even with the same datapoint
ids) has another id and is refused, and so is a key column that is not a content id at all.

A state whose T2 unit failed and was recorded (``on_error: record``) is in the selection like any
other, with the unit's body columns null and ``<Unit>__code`` = -1 (``UNIT_FAILED``: codes a unit sets
itself are >= 0); a selection that holds such states also has ``<Unit>__failure``, the error (null for
the others). Without failures the selection is what it always was.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..io.arrays import contains, first_rows, id_order, lookup, lookup_sorted, order_by, sorted_unique
from ..io.files import atomic_target
from ..io.layout import DATAPOINT
from ..io.stores import FAILURE, PROVENANCE, ResultStore, open_store
from ..keys import id_values
from ..tiers.base import T2PointUnit
from ..tiers.labels import with_label
from .plan import ChannelPlan
from .workers import cluster_map


#: objects per batch of a selection too large to be one table: 1.5 M LSST objects with ~110 T2 columns
#: are 1.3 GB, and joining them took twice that on one worker
SELECTION_ROWS = 131_072


def selection(store: ResultStore, plan: ChannelPlan, state_keys: list[str]) -> pa.Table | None:
    """The channel's population: each object's latest state, with the latest T2 results as columns;
    without the states' datapoints unless one of the channel's T3 units reads every row's (a unit that
    reads some rows' gets them from :func:`with_dps`)."""
    sel = _states(store, plan, state_keys)
    return None if sel is None else selection_of(store, plan, sel)


def _states(store: ResultStore, plan: ChannelPlan, state_keys: list[str]) -> pa.Table | None:
    return latest_states(store, plan.name, state_keys, by_set=plan.history, dps=reads_dps(plan))


def reads_dps(plan: ChannelPlan) -> bool:
    """Does the selection hold the states' datapoints (a T3 unit of the channel reads every row's)? They
    are most of its bytes: 76 of 94 MB for the DECENT channel's 34,000 objects at 3 M ZTF alerts."""
    return any(u.reads_all_dps for u in plan.t3)


def with_dps(store: ResultStore, channel: str, state_keys: list[str], sel: pa.Table, rows: np.ndarray) -> pa.Table:
    """``sel`` (a selection without datapoints) with ``dps``: the datapoints of the states at ``rows``,
    null in the other rows. The sets holding them are found from their ``state_id`` columns and only
    those read whole."""
    sid = id_values(sel.column("state_id"))
    want = sorted_unique(sid[np.asarray(rows, dtype=np.int64)])
    pieces = []
    for key in state_keys if len(want) else ():
        ids = store.read_states(channel, [key], columns=["state_id"], dps=False)
        hit = contains(want, id_values(ids.column("state_id"))) if ids is not None else None
        if hit is not None and hit.any():
            pieces.append(store.read_states(channel, [key], columns=["state_id", "dps"]).filter(pa.array(hit)))
    if not pieces:
        return sel.append_column("dps", pa.nulls(sel.num_rows, pa.list_(DATAPOINT)))
    found = pa.concat_tables(pieces, promote_options="default")
    found = found.take(pa.array(first_rows(id_values(found.column("state_id")))))  # a state in two sets: one copy
    at = np.full(sel.num_rows, -1, dtype=np.int64)
    at[rows] = lookup(id_values(found.column("state_id")), sid[rows])
    return sel.append_column("dps", found.column("dps").take(pa.array(np.maximum(at, 0), mask=at < 0)))


def _state_units(plan: ChannelPlan) -> list:
    """The channel's T2 units with a result per state (a T2PointUnit's are per datapoint: read with
    ``store.read_t2_points``)."""
    return [u for u in plan.t2 if not isinstance(u, T2PointUnit)]


def _failures(store: ResultStore, unit, sid: np.ndarray, have: np.ndarray) -> pa.Table | None:
    """Recorded failures of the states ``sid`` without a result (``have``: sorted ids with one): a failure
    recorded before a later success is no failure."""
    open_ = sid[~contains(have, sid)]
    return store.read_t2_failures(unit.name(), unit.identity.key, open_) if len(open_) else None


def _join_unit(sel: pa.Table, unit, res: pa.Table | None, fails: pa.Table | None) -> pa.Table:
    """``sel`` with the unit's results (body and ``code``) and recorded failures as ``<Unit>__`` columns."""
    pieces = []
    if res is not None:
        body = [c for c in res.column_names if c not in PROVENANCE or c == "code"]
        pieces.append(res.select(["state_id", *body]))
    if fails is not None and fails.num_rows:
        pieces.append(fails.select(["state_id", "code", FAILURE]))
    if not pieces:
        return sel
    right = pa.concat_tables(pieces, promote_options="default") if len(pieces) > 1 else pieces[0]
    return left_join(sel, right, prefix=f"{unit.name()}__", label=lambda col, u=unit: _label(u, col))


@dataclass
class Batches:
    """A selection too large to be one table: files of whole objects in the selection's (stock) order,
    on the store's scratch space, read one at a time. ``schema``: what every batch is given (a batch
    without one unit's results has its columns as nulls); ``keys``: each row's stock, object and state."""

    files: list[str]
    schema: pa.Schema
    keys: pa.Table

    @property
    def num_rows(self) -> int:
        return self.keys.num_rows

    def __iter__(self) -> Iterator[pa.Table]:
        for f in self.files:
            with pa.memory_map(f) as src:
                yield _conform(pa.ipc.open_file(src).read_all(), self.schema)

    def column(self, name: str) -> pa.ChunkedArray:
        return self.keys.column(name)

    def whole(self) -> pa.Table:
        return pa.concat_tables(list(self))


def selection_in_batches(store: ResultStore, plan: ChannelPlan, state_keys: list[str], scratch: str | Path, rows: int | None = None,
                         spec: dict | None = None) -> pa.Table | Batches | None:  # fmt: skip
    """:func:`selection`, or, for more than ``rows`` objects (default :data:`SELECTION_ROWS`), the same
    rows as :class:`Batches` of at most ``rows`` objects written under ``scratch``: the selection is
    never one table in memory. Three steps, each spread over the cluster (``cluster_map``; in turn
    outside a worker): the latest states of groups of sets (:func:`_spread_states`); :data:`SHARES`
    shares of each unit's T2 results, read once, cut to the selection and sent to their batch's scratch
    files; then each batch joined alone. ``spec``: the store's, for the steps on other workers (without
    it they run here, with ``store``). On one worker the selection of 10 M LSST alerts (898k objects)
    took 24 s while the other worker waited; spread, ~11 s."""
    rows = rows or SELECTION_ROWS
    scratch = Path(scratch)
    shutil.rmtree(scratch, ignore_errors=True)  # what an attempt lost with its worker left
    scratch.mkdir(parents=True)
    ref = spec if spec is not None else store
    sel = _spread_states(store, ref, plan, state_keys, scratch, small=rows)
    if sel is None or sel.num_rows <= rows:
        shutil.rmtree(scratch)  # one table: nothing for T3 to read from scratch
        return None if sel is None else selection_of(store, plan, sel)
    sid = id_values(sel.column("state_id"))
    order = id_order(sid)
    np.save(scratch / "sid.npy", sid[order])  # what the readers look their pieces' ids up in
    np.save(scratch / "batch.npy", (order // rows).astype(np.int32))  # the batch of each sorted id
    nbatch = -(-sel.num_rows // rows)
    units = _state_units(plan)
    reads = [(ref, u, unit.name(), unit.identity.key, (i, SHARES), str(scratch), nbatch) for u, unit in enumerate(units) for i in range(SHARES)]
    seen = cluster_map(_scatter_t2, reads)
    fails = []
    for u, unit in enumerate(units):
        have = [h for (v, *_), h in zip(reads, seen) if v == u and len(h)]
        fails.append(_failures(store, unit, sid, sorted_unique(np.concatenate(have)) if have else sid[:0]))
    joins = []
    for j in range(nbatch):
        part = sel.slice(j * rows, rows)
        _write(scratch / f"states-{j}.arrow", part)
        psid = sorted_unique(id_values(part.column("state_id")))
        mine = [None if f is None else f.filter(contains(psid, id_values(f.column("state_id")))) for f in fails]
        joins.append((plan, j, str(scratch), mine))
    schemas = cluster_map(_join_batch, joins)
    files = [str(scratch / f"selection-{j}.arrow") for j in range(nbatch)]
    keys = sel.select([c for c in ("stock", "object_id", "state_id") if c in sel.column_names])
    return Batches(files, _unified(schemas, [f"{u.name()}__" for u in units]), keys)


#: shares of each unit's T2 results a large selection reads in parallel (one task each)
SHARES = 8
#: state sets whose latest states per object one task of a selection finds
SETS_PER_TASK = 8


def _spread_states(store: ResultStore, ref: ResultStore | dict, plan: ChannelPlan, keys: list[str], scratch: Path, small: int = 0) -> pa.Table | None:
    """:func:`latest_states` of the channel's sets, found in parallel: the latest per object of each
    group of :data:`SETS_PER_TASK` sets (written to ``scratch``), then the latest of those. The groups
    are runs of ``keys`` in order, so a tie goes to the row it went to when all sets were read in turn.
    One group, or sets of at most ``small`` states in all (their T1 markers' counts), are read here
    (``store``), without a task or a file: the DECENT channel's 64 sets at 3 M ZTF alerts (36,000
    states) took 0.05 s here, and their 8 tasks waited behind a history channel's bucket stages for up
    to 5 s, putting the channel's T3 at the end of the run."""
    dps = reads_dps(plan)
    if len(keys) <= SETS_PER_TASK or _states_in(store, keys) <= small:
        return latest_states(store, plan.name, keys, by_set=plan.history, dps=dps)
    groups = [keys[i : i + SETS_PER_TASK] for i in range(0, len(keys), SETS_PER_TASK)]
    jobs = [(ref, plan.name, g, plan.history, dps, str(scratch / f"latest-{n}.arrow")) for n, g in enumerate(groups)]
    found = [(job[-1], light) for job, light in zip(jobs, cluster_map(_group_latest, jobs)) if light is not None]
    if not found:
        return None
    sel = _latest_of([light for _, light in found], lambda i: _read(Path(found[i][0])))
    for path, _ in found:
        Path(path).unlink()
    return sel


def _states_in(store: ResultStore, keys: list[str]) -> float:
    """The states the sets hold, as the markers of the tasks that wrote them count them (inf when one
    has no count)."""
    n = 0
    for key in keys:
        info = store.task_info(key) or {}
        if not isinstance(info.get("states"), int):
            return float("inf")
        n += info["states"]
    return n


def _group_latest(job: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`latest_states` of one group of sets, written to ``path``; returns its (stock, mjd, alert_id)."""
    ref, channel, keys, by_set, dps, path = job
    store = open_store(ref) if isinstance(ref, dict) else ref
    sel = latest_states(store, channel, keys, by_set=by_set, dps=dps)
    if sel is None:
        return None
    _write(Path(path), sel)
    return tuple(sel.column(c).to_numpy() for c in ("stock", "mjd", "alert_id"))  # type: ignore[return-value]


def _scatter_t2(job: tuple) -> np.ndarray:
    """One share of a unit's T2 results, cut to the selection and written by batch
    (``t2-<unit>-<batch>-<share>.<piece>.arrow``); returns the state ids it found (sorted)."""
    ref, u, name, unit_key, share, scratch, nbatch = job
    store = open_store(ref) if isinstance(ref, dict) else ref
    scratch = Path(scratch)
    sorted_sid = np.load(scratch / "sid.npy", mmap_mode="r")
    batch_of = np.load(scratch / "batch.npy", mmap_mode="r")
    have = []
    for k, piece in enumerate(store.t2_pieces(name, unit_key, np.asarray(sorted_sid), share=share)):
        ids = id_values(piece.column("state_id"))
        have.append(ids)
        batch = batch_of[lookup_sorted(sorted_sid, ids)]  # every id is one of the selection's: pieces are cut to it
        # rows grouped by batch with one gather, then sliced (a filter per batch scanned every column
        # once per batch: 1,281 filters of ~110 columns at 10 M LSST alerts)
        by = np.argsort(batch, kind="stable")
        bounds = np.searchsorted(batch[by], np.arange(nbatch + 1))
        piece = piece.take(pa.array(by))
        for j in np.flatnonzero(np.diff(bounds)):
            _write(scratch / f"t2-{u}-{j}-{share[0]}.{k}.arrow", piece.slice(bounds[j], bounds[j + 1] - bounds[j]))
    return sorted_unique(np.concatenate(have)) if have else np.empty(0, dtype=sorted_sid.dtype)


def _join_batch(job: tuple) -> pa.Schema:
    """Batch ``j``: its states joined with each unit's results found by :func:`_scatter_t2` (one row per
    state) and its recorded failures ``fails``, written as ``selection-<j>.arrow``; returns its schema."""
    plan, j, scratch, fails = job
    scratch = Path(scratch)
    done = [scratch / f"states-{j}.arrow"]
    part = _read(done[0])
    for u, unit in enumerate(_state_units(plan)):
        mine = sorted(scratch.glob(f"t2-{u}-{j}-*.arrow"))
        done += mine
        res = None
        if mine:
            res = pa.concat_tables([_read(f) for f in mine], promote_options="default")
            res = res.take(pa.array(first_rows(id_values(res.column("state_id")))))
        part = _join_unit(part, unit, res, fails[u])
    _write(scratch / f"selection-{j}.arrow", part)
    for f in done:
        f.unlink()
    return part.schema


def selection_of(store: ResultStore, plan: ChannelPlan, sel: pa.Table) -> pa.Table:
    """The latest states ``sel`` joined with the channel's T2 results (the body of :func:`selection`)."""
    sid = id_values(sel.column("state_id"))
    for unit in _state_units(plan):
        res = store.read_t2(unit.name(), unit.identity.key, sid)
        have = sorted_unique(id_values(res.column("state_id"))) if res is not None else sid[:0]
        sel = _join_unit(sel, unit, res, _failures(store, unit, sid, have))
    return sel


def _write(path: Path, table: pa.Table) -> Path:
    """A scratch file (Arrow IPC, LZ4): read back once, by this process or another worker."""
    with atomic_target(path, scratch=True) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
            w.write_table(table)
    return path


def _read(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).read_all()


def _unified(schemas: list[pa.Schema], prefixes: list[str]) -> pa.Schema:
    """One schema for every batch, its columns in the order one table would have them: the states'
    columns, then each unit's in unit order (a batch may lack a unit's columns, or hold them as nulls)."""
    merged = pa.unify_schemas(schemas, promote_options="permissive")
    rank = {name: i for i, name in enumerate(merged.names)}

    def place(name: str) -> tuple[int, int]:
        unit = next((k for k, p in enumerate(prefixes) if name.startswith(p)), -1)
        return (unit + 1, rank[name])

    return pa.schema([merged.field(n) for n in sorted(merged.names, key=place)])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order: a column it lacks is nulls, one of another type cast."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def latest_rows(stock: np.ndarray, mjd: np.ndarray, alert: np.ndarray) -> np.ndarray:
    """Row of each object's latest state (latest time, then alert id; the first such row on ties), in
    the order of ``stock``: the selection's order, so that its light curves are gathered once."""
    order = order_by((stock, "ascending"), (mjd, "descending"), (alert, "descending")).astype(np.int64)
    return order[np.r_[True, stock[order][1:] != stock[order][:-1]]]


def latest_states(store: ResultStore, channel: str, keys: list[str], by_set: bool = False, dps: bool = True) -> pa.Table | None:
    """Each object's latest state among the state sets ``keys`` (``dps``: with its datapoints).

    ``by_set``: found from three small columns of every set first, then each set read whole once for
    its chosen rows only. For a history channel, whose states hold each object's light curve up to every
    one of its alerts: reading them all at once to keep one per object took 7 s and ~2.4 GB of one
    worker on 1 M replicated LSST alerts (7.9 GB on 3 M)."""
    if not by_set:
        states = store.read_states(channel, keys, dps=dps)
        if states is None or states.num_rows == 0:
            return None
        first = latest_rows(*(states.column(c).to_numpy() for c in ("stock", "mjd", "alert_id")))
        return states.take(pa.array(first))
    light = [(k, t) for k in keys if (t := store.read_states(channel, [k], columns=["stock", "mjd", "alert_id"])) is not None and t.num_rows]
    if not light:
        return None
    columns = [tuple(t.column(c).to_numpy() for c in ("stock", "mjd", "alert_id")) for _, t in light]
    return _latest_of(columns, lambda i: store.read_states(channel, [light[i][0]], dps=dps))


def _latest_of(light: list[tuple[np.ndarray, np.ndarray, np.ndarray]], whole: Callable[[int], pa.Table]) -> pa.Table:
    """Each object's latest row among tables given by their (stock, mjd, alert_id) columns (``light``,
    in order: ties go to the first), each table read (``whole(i)``) once and only if it holds a chosen
    row; in the order of stock."""
    first = latest_rows(*(np.concatenate([cols[i] for cols in light]) for i in range(3)))
    which = np.repeat(np.arange(len(light)), [len(cols[0]) for cols in light])[first]  # the table of each chosen row
    offsets = np.cumsum([0, *(len(cols[0]) for cols in light)])
    pieces, placed = [], []
    for i in np.unique(which):
        mine = np.flatnonzero(which == i)
        pieces.append(whole(int(i)).take(pa.array(first[mine] - offsets[i])))
        placed.append(mine)
    sel = pa.concat_tables(pieces, promote_options="default")
    at = np.empty(len(first), dtype=np.int64)
    at[np.concatenate(placed)] = np.arange(len(first))
    return sel.take(pa.array(at))  # back in the order of stock


def _label(unit, column: str) -> tuple[str, str]:
    """A T2 column's (label, unit); the framework's ``failure`` column is labelled here, not by the unit."""
    return ("Unit failure", "") if column == FAILURE else unit.label(column, unit.config)


def left_join(left: pa.Table, right: pa.Table, prefix: str, label: Callable[[str], tuple[str, str]] | None = None) -> pa.Table:
    """Add ``right``'s columns (one row per state_id) to ``left`` by state content id; nulls where
    ``right`` has no row with the same content id. Both sides must hold 128-bit content ids.
    ``label(column)``: the (label, unit) each added column carries in its field metadata (reports show it).

    Done with sorted ids and ``take`` because Arrow's hash join cannot carry list columns (dps).
    """
    at = lookup(id_values(right.column("state_id")), id_values(left.column("state_id")))
    found = at >= 0
    idx = pa.array(np.where(found, at, 0), mask=~found)
    for name in right.column_names:
        if name != "state_id":
            col = right.column(name).take(idx)
            field = pa.field(prefix + name, col.type)
            left = left.append_column(with_label(field, *label(name)) if label else field, col)
    return left
