"""The work of one graph task: a batch in, a batch (or a small summary) out; writes are idempotent.

Every task that writes names its output by its own content-hash key, so a task run twice (a lost worker,
a re-run) writes the same bytes to the same place. T2 work inside a stage is keyed by (unit, state id):
states already in the store are not computed again, and a state reached by several channels is
computed once.
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.archive import atomic_target, read_dps, read_part
from ..io.arrays import first_rows, order_by, take_rows
from ..io.layout import DATAPOINT
from ..tiers.base import T2StateUnit, T3Context, Verdict
from ..tiers.rights import ChannelArchive, channel_view
from ..tiers.states import HISTORY_SCHEMA, STATE_COLUMNS, alert_access, thinned_history
from .plan import ChannelPlan
from .store import contains, open_store

log = logging.getLogger("ampel_dask")
PROVENANCE = ["state_id", "stock", "alert_id", "unit", "unit_version", "config_hash", "t2_key", "run_id", "code"]


def read_partition(archive_root: str, rel_paths: str | list[str], columns: list[str] | None) -> pa.Table:
    """The columns T0 needs (never the nested history unless a filter asks for it), of one part or of
    a work unit of small parts (their rows concatenated in the given order)."""
    paths = [f"{archive_root}/{p}" for p in ([rel_paths] if isinstance(rel_paths, str) else rel_paths)]
    tables = []
    for path in paths:
        pf = pq.ParquetFile(path)  # opened once: a work unit may be a hundred small parts
        cols = columns
        if cols is not None:  # an older part lacks the history aggregates: a channel's view makes them
            names = set(pf.schema_arrow.names) | {"dps"}
            cols = [c for c in cols if c in names]
        tables.append(read_part(path, cols, pf))
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    return table.replace_schema_metadata({b"ampel_dask.paths": "\n".join(paths).encode()})


@lru_cache(maxsize=2)  # a 25k-alert part decodes to ~45 MB
def _histories(path: str) -> pa.ChunkedArray:
    """The nested history of a partition: read once per process however many channels need it."""
    return read_dps(path)


def with_histories(table: pa.Table) -> pa.Table:
    """Add ``dps`` to a batch read without it (rows in file order, as read_partition returns them)."""
    if "dps" in table.column_names:
        return table
    paths = (table.schema.metadata or {}).get(b"ampel_dask.paths")
    if paths is None:
        raise ValueError("batch has neither dps nor the paths of its partitions")
    chunks = [c for p in paths.decode().split("\n") for c in _histories(p).chunks]
    return table.append_column("dps", pa.chunked_array(chunks, type=pa.list_(DATAPOINT)) if chunks else pa.array([], pa.list_(DATAPOINT)))


@dataclass
class T0Result:
    verdict: Verdict
    counts: dict[str, int] = field(default_factory=dict)


def run_t0(table: pa.Table, plan: ChannelPlan) -> T0Result:
    """Data rights first (reason 'access'), then the channel's filters in order; first rejection wins.

    The filters see the channel's view of the batch only (tiers/rights.py): the alerts it may see,
    with history aggregates over the datapoints it may see."""
    view, seen = channel_view(table, plan.access, with_histories)
    inner = Verdict.accept_all(view.num_rows)
    for f in plan.filters:
        if not inner.accepted.any():
            break
        inner = inner & f.verdict(view)  # whole batch (vectorised); earlier rejections keep their reason
    v = Verdict.accept_all(table.num_rows)
    v.reject(~seen, "access")
    codes = np.zeros(table.num_rows, dtype=inner.codes.dtype)
    codes[seen] = inner.codes
    for i, reason in enumerate(inner.reasons):
        v.reject(codes == i + 1, reason)
    return T0Result(v, v.counts())


def run_t1(table: pa.Table, t0: T0Result, plan: ChannelPlan, store_spec: dict, key: str, run_id: str, carried: dict | None = None) -> pa.Table:
    """States of the accepted alerts; stored as the channel's selection for this work unit.

    ``carried``: what this unit's ``hist`` task returned, when a history channel decoded the unit's
    histories already: the rows any packet channel accepted, with their histories (one decode)."""
    store = open_store(store_spec)
    accepted = t0.verdict.accepted
    if accepted.any() and carried and "dps" in carried:
        rows = np.flatnonzero(accepted)
        dps = carried["dps"].take(pa.array(np.searchsorted(carried["rows"], rows)))
        passing = table.filter(pa.array(accepted)).append_column("dps", dps)
    else:
        passing = with_histories(table).filter(pa.array(accepted)) if accepted.any() else None
    if passing is None:
        passing = table.slice(0, 0).append_column("dps", pa.array([], pa.list_(DATAPOINT))) if "dps" not in table.column_names else table.slice(0, 0)
    states = plan.t1.states(passing, plan.access)
    store.write_states(plan.name, key, states)
    store.write_journal(run_id, key, _journal(states.column("stock"), run_id, 0, plan.name, "accepted", alert_id=states.column("alert_id")))
    n = table.num_rows
    counts = {"alerts": n, "passed": int(t0.verdict.accepted.sum()), "rejected": n - int(t0.verdict.accepted.sum()), "reasons": {k: v for k, v in t0.counts.items() if k != "accepted"}}
    store.mark_task(key, {"kind": "t1", "channel": plan.name, "states": states.num_rows, **counts})
    return states


def state_rows(table: pa.Table) -> pa.Table:
    """The columns a state takes from its alert (and ``dps`` if the batch has it): what a work unit
    keeps in memory after T0, while it waits for the history channels' ``hist`` task."""
    return table.select([c for c in [*STATE_COLUMNS, "programid"] if c != "state_id" and c in table.column_names])  # programid: data rights


def passing_alerts(table: pa.Table, t0: T0Result) -> pa.Table:
    """What a state needs of the alerts that pass (their datapoints come from the history join)."""
    return table.select([c for c in STATE_COLUMNS if c not in ("state_id", "dps")]).filter(pa.array(t0.verdict.accepted))


def t0_counts(t0: T0Result, n: int) -> dict:
    acc = int(t0.verdict.accepted.sum())
    return {"alerts": n, "passed": acc, "rejected": n - acc, "reasons": {k: v for k, v in t0.counts.items() if k != "accepted"}}


def run_t1_history(shuffle_dir: str, bucket: int, plan: ChannelPlan, store_spec: dict, key: str, run_id: str, _after: object = None) -> pa.Table:
    """States with each object's archived history, for the objects of one bucket.

    The passing alerts and the archived datapoints of these objects come from the shuffle files the
    ``pass`` and ``hist`` tasks wrote for this bucket (a disk shuffle: no table travels through the
    scheduler, each bucket reads only its own share).
    """
    alerts = read_bucket(shuffle_dir, "alerts", bucket)
    history = read_bucket(shuffle_dir, "history", bucket)
    store = open_store(store_spec)
    if alerts is None:
        store.mark_task(key, {"kind": "t1h", "channel": plan.name, "states": 0})
        return None
    if history is None:  # passing alerts whose packets hold no datapoint at all
        history = HISTORY_SCHEMA.empty_table()
    states = plan.t1.states(alerts, plan.access, history)
    store.write_states(plan.name, key, states)
    store.write_journal(run_id, key, _journal(states.column("stock"), run_id, 1, plan.name, "state", alert_id=states.column("alert_id")))
    store.mark_task(key, {"kind": "t1h", "channel": plan.name, "states": states.num_rows})
    return states


def bucket_of(stock: np.ndarray, nbuckets: int) -> np.ndarray:
    from ..io.layout import splitmix64

    return (splitmix64(np.asarray(stock, dtype=np.int64)) % np.uint64(nbuckets)).astype(np.int64)


def write_buckets(table: pa.Table, shuffle_dir: str, kind: str, name: str, nbuckets: int) -> None:
    """Rows grouped by the bucket of their stock into one Arrow IPC file ``<kind>/<name>.arrow`` whose
    record batch *i* holds bucket *i* (empty or not): one file per task instead of one per bucket, and
    each reader reads only its batch of every file. Rows already in bucket order are not moved."""
    if not table.num_rows:
        return
    b = bucket_of(table.column("stock").to_numpy(), nbuckets)
    if (b[1:] < b[:-1]).any():
        order = np.argsort(b, kind="stable")
        table, b = table.take(pa.array(order)), b[order]
    table = table.combine_chunks()
    bounds = np.searchsorted(b, np.arange(nbuckets + 1))
    with atomic_target(Path(shuffle_dir) / kind / f"{name}.arrow") as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            for k in range(nbuckets):
                writer.write_batch(_one_batch(table.slice(bounds[k], bounds[k + 1] - bounds[k])))


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns], schema=table.schema)


def read_bucket(shuffle_dir: str, kind: str, bucket: int) -> pa.Table | None:
    tables = []
    for f in sorted((Path(shuffle_dir) / kind).glob("*.arrow")):
        with pa.OSFile(str(f)) as src:  # reads the footer and this bucket's batch only
            batch = pa.ipc.open_file(src).get_batch(bucket)
        if batch.num_rows:
            tables.append(pa.Table.from_batches([batch]))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def stocks_of(summaries: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The objects that passed (sorted) and each one's latest passing alert time, from the (stock, mjd)
    of every passing alert."""
    stock = np.concatenate([s for s, _ in summaries] or [np.empty(0, np.int64)])
    mjd = np.concatenate([m for _, m in summaries] or [np.empty(0)])
    if not len(stock):
        return stock, mjd
    order = np.argsort(stock, kind="stable")
    stock, mjd = stock[order], mjd[order]
    starts = np.flatnonzero(np.r_[True, stock[1:] != stock[:-1]])
    return stock[starts], np.maximum.reduceat(mjd, starts)


def history_pieces(archive_root: str, rel_paths: list[str], passing: tuple[np.ndarray, np.ndarray], shuffle_dir: str, name: str, nbuckets: int,
                   table: pa.Table | None = None, packet_t0: list[T0Result] | None = None, access: list[str] | None = None) -> dict:
    """The passing objects' packets in these archive parts, up to each object's latest passing alert
    (later packets add nothing to its states), as flat datapoints thinned to one copy per object and
    datapoint, written by object bucket (the shuffle). ``access``: the channel's tags; only packets
    whose alert it may see are read (a copy of a datapoint from a packet it may not see is not its).

    ``table``: these parts' rows as read for T0, when the run read them; their histories are then
    decoded here once for the packet channels' T1 as well: the rows any of ``packet_t0`` accepted are
    returned with their histories (``rows``, ``dps``). Without it, parts without such alerts cost only
    a read of three small columns."""
    stocks, until = passing
    out: dict = {"written": 0}

    def wanted(head: pa.Table) -> np.ndarray:
        if not len(stocks):
            return np.zeros(head.num_rows, dtype=bool)
        stock = head.column("stock").to_numpy()
        at = np.minimum(np.searchsorted(stocks, stock), len(stocks) - 1)
        keep = (stocks[at] == stock) & (head.column("mjd").to_numpy() <= until[at] + 1e-6)
        return keep if access is None else keep & alert_access(head, access)

    pieces = []  # (alerts with their histories, which rows to keep)
    if table is not None:
        keep = wanted(table)
        carry = np.zeros(table.num_rows, dtype=bool)
        for t0 in packet_t0 or []:
            carry |= t0.verdict.accepted
        if keep.any() or carry.any():
            full = with_histories(table.select(["alert_id", "stock", "mjd"]))  # the thinning's columns only
            if keep.any():
                pieces.append((full, keep))
            if carry.any():
                out.update(rows=np.flatnonzero(carry), dps=take_rows(full.column("dps"), np.flatnonzero(carry)))
    elif len(stocks):
        for rel in rel_paths:
            path = f"{archive_root}/{rel}"
            pf = pq.ParquetFile(path)
            head = pf.read(columns=[c for c in ("alert_id", "stock", "mjd", "survey", "programid") if c in pf.schema_arrow.names], use_threads=False)
            keep = wanted(head)
            if keep.any():
                pieces.append((head.append_column("dps", read_dps(path)), keep))
    if pieces:
        alerts = pa.concat_tables([a for a, _ in pieces])
        flat = thinned_history(alerts, np.concatenate([k for _, k in pieces]), group=lambda stock: bucket_of(stock, nbuckets))
        write_buckets(flat, shuffle_dir, "history", name, nbuckets)
        out["written"] = flat.num_rows
    return out


def run_t2_stage(store_spec: dict, key: str, run_id: str, inputs: list[tuple[str, list[str], pa.Table]], units: list[T2StateUnit]) -> dict:
    """All T2 units of one work unit (partition or bucket): dedupe states across channels, skip done."""
    store = open_store(store_spec)
    counts = {"computed": 0, "reused": 0, "failed": 0, "units": {}}
    results: dict[str, pa.Table] = {}
    journal = []
    t_start = time.perf_counter()
    for unit in units:
        ukey = unit.identity.key
        batches = [s for _, keys, s in inputs if ukey in keys and s is not None and s.num_rows]
        if not batches:
            continue
        states = pa.concat_tables(batches, promote_options="default")
        first = first_rows(states.column("state_id").to_numpy())  # each state once
        todo = ~contains(store.done_state_ids(unit.name(), ukey), states.column("state_id").to_numpy()[first])
        c = {"states": len(first), "computed": int(todo.sum()), "reused": int((~todo).sum()), "failed": 0}
        if todo.any():
            pick = first[todo]  # one gather of the new states' datapoints, none when all rows are new
            batch = states if len(pick) == states.num_rows else states.take(pa.array(pick))
            deps = {d.name(): _dep_results(store, d, batch, results) for d in unit.dependencies()}
            try:
                out = _as_table(unit.process(batch, deps), batch.num_rows, unit)
            except Exception as exc:  # a unit failure is reported, not stored: the next run retries it
                log.exception("T2 unit %s failed on %d states", unit.name(), batch.num_rows)
                c.update(computed=0, failed=batch.num_rows, error=f"{type(exc).__name__}: {exc}")
                out = None
            if out is not None:
                table = _with_provenance(out, batch, unit, run_id)
                store.write_t2(unit.name(), ukey, key, table)
                results[ukey] = table
                journal.append(_journal(batch.column("stock"), run_id, 2, unit.name(), "computed", state_id=batch.column("state_id")))
        counts["units"][unit.name()] = c
        for k in ("computed", "reused", "failed"):
            counts[k] += c[k]
    if journal:
        store.write_journal(run_id, key, pa.concat_tables(journal))
    counts["seconds"] = round(time.perf_counter() - t_start, 4)
    counts["worker"] = {"pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    if counts["failed"] == 0:
        store.mark_task(key, {"kind": "t2", **counts})
    return counts


def _unique_states(states: pa.Table) -> pa.Table:
    first = first_rows(states.column("state_id").to_numpy())
    return states if len(first) == states.num_rows else states.take(pa.array(first))  # no copy when all differ


def _dep_results(store, dep: T2StateUnit, batch: pa.Table, fresh: dict[str, pa.Table]) -> pa.Table:
    """The dependency's results aligned row by row with ``batch``: fresh from this stage where there,
    the store only for the states this stage did not compute (a stage never re-reads every result)."""
    sid = batch.column("state_id").to_numpy()
    pieces = [fresh[dep.identity.key]] if dep.identity.key in fresh else []
    have = np.sort(pieces[0].column("state_id").to_numpy()) if pieces else np.empty(0, dtype=np.int64)
    missing = sid[~contains(have, sid)]
    if len(missing):
        stored = store.read_t2(dep.name(), dep.identity.key, missing)
        if stored is not None:
            pieces.append(stored)
    if not pieces:
        raise RuntimeError(f"no results of {dep.name()} for the states of a dependent unit")
    table = _unique_states(pa.concat_tables(pieces, promote_options="default"))
    ids = table.column("state_id").to_numpy()
    order = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids[order], sid), 0, max(len(ids) - 1, 0))
    if not len(ids) or (ids[order][pos] != sid).any():
        raise RuntimeError(f"no results of {dep.name()} for some states of a dependent unit")
    return table.take(pa.array(order[pos]))


def _as_table(out: pa.Table | list[dict], n: int, unit: T2StateUnit) -> pa.Table:
    table = out if isinstance(out, pa.Table) else pa.Table.from_pylist(out)
    if table.num_rows != n:
        raise ValueError(f"{unit.name()} returned {table.num_rows} rows for {n} states")
    return table


def _with_provenance(out: pa.Table, states: pa.Table, unit: T2StateUnit, run_id: str) -> pa.Table:
    n = states.num_rows
    ukey = unit.identity.key
    sid = states.column("state_id")
    prov = {
        "state_id": sid,
        "stock": states.column("stock"),
        "alert_id": states.column("alert_id"),
        "unit": pa.array([unit.name()] * n),
        "unit_version": pa.array([str(unit.version)] * n),
        "config_hash": pa.array([unit.config_hash] * n),
        "t2_key": t2_keys(ukey, sid.to_numpy()),
        "run_id": pa.array([run_id] * n),
        "code": out.column("code").cast(pa.int32()) if "code" in out.column_names else pa.array(np.zeros(n, dtype=np.int32)),
    }
    body = {c: out.column(c) for c in out.column_names if c not in prov}
    return pa.table({**prov, **body})


def t2_keys(unit_key: str, state_ids: np.ndarray) -> pa.Array:
    """One 16-hex-digit key per (unit identity, state): the state id mixed with a 64-bit salt of the
    unit's key (splitmix64), vectorised; a per-row blake2b cost ~2 us per result."""
    import hashlib

    from ..io.layout import splitmix64

    salt = np.uint64(int.from_bytes(hashlib.blake2b(unit_key.encode(), digest_size=8).digest(), "big"))
    mixed = splitmix64(np.asarray(state_ids, dtype=np.int64).view(np.uint64) ^ salt)
    n = len(mixed)
    text = mixed.astype(">u8").tobytes().hex().encode()
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 16 * n + 1, 16, dtype=np.int32)), pa.py_buffer(text))


def _journal(stock: pa.ChunkedArray | pa.Array, run_id: str, tier: int, channel_or_unit: str, action: str, alert_id=None, state_id=None) -> pa.Table:
    n = len(stock)
    return pa.table(
        {
            "stock": stock,
            "run_id": pa.array([run_id] * n),
            "tier": pa.array(np.full(n, tier, dtype=np.int8)),
            "channel": pa.array([channel_or_unit if tier != 2 else None] * n, pa.string()),
            "unit": pa.array([channel_or_unit if tier == 2 else None] * n, pa.string()),
            "action": pa.array([action] * n),
            "alert_id": alert_id if alert_id is not None else pa.nulls(n, pa.int64()),
            "state_id": state_id if state_id is not None else pa.nulls(n, pa.int64()),
        }
    )


def selection(store, plan: ChannelPlan, state_keys: list[str]) -> pa.Table | None:
    """The channel's population: each object's latest state, with the latest T2 results as columns."""
    states = store.read_states(plan.name, state_keys)
    if states is None or states.num_rows == 0:
        return None
    stock = states.column("stock").to_numpy()
    mjd = states.column("mjd").to_numpy()
    alert = states.column("alert_id").to_numpy()
    order = order_by((stock, "ascending"), (mjd, "descending"), (alert, "descending"))
    first = order[np.r_[True, stock[order][1:] != stock[order][:-1]]]  # one row per object, by stock: the
    sel = states.take(pa.array(first))  # selection's order, so its light curves are gathered once
    sid = sel.column("state_id").to_numpy()
    for unit in plan.t2:
        res = store.read_t2(unit.name(), unit.identity.key, sid)
        if res is None:
            continue
        body = [c for c in res.column_names if c not in PROVENANCE or c == "code"]
        sel = _left_join(sel, res.select(["state_id", *body]), prefix=f"{unit.name()}__")
    return sel


def _left_join(left: pa.Table, right: pa.Table, prefix: str) -> pa.Table:
    """Add ``right``'s columns (one row per state_id) to ``left`` by state_id; nulls where missing.

    Done with sorted ids and ``take`` because Arrow's hash join cannot carry list columns (dps).
    """
    rid = right.column("state_id").to_numpy()
    order = np.argsort(rid)
    lid = left.column("state_id").to_numpy()
    pos = np.searchsorted(rid[order], lid)
    pos = np.clip(pos, 0, max(len(rid) - 1, 0))
    found = (len(rid) > 0) & (rid[order][pos] == lid) if len(rid) else np.zeros(len(lid), dtype=bool)
    idx = pa.array(np.where(found, order[pos] if len(rid) else 0, 0), mask=~found)
    for name in right.column_names:
        if name != "state_id":
            left = left.append_column(prefix + name, right.column(name).take(idx))
    return left


def run_t3(store_spec: dict, plan: ChannelPlan, unit_index: int, key: str, run_id: str, sel: pa.Table | None, archive_root: str | None) -> dict:
    """One T3 unit over its channel's selection (computed once per channel, see :func:`selection`)."""
    from ..io.archive import Archive

    store = open_store(store_spec)
    unit = plan.t3[unit_index]
    out_dir = store.t3_dir(plan.name, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[dict] = []
    if sel is not None and sel.num_rows:
        archive = ChannelArchive(Archive(archive_root), plan.access) if archive_root else None  # only what the channel may see
        ctx = T3Context(out_dir=out_dir, run_id=run_id, channel=plan.name, archive=archive)
        outputs = unit.react(sel, ctx) or []
        objects = pa.table({"stock": sel.column("stock"), "object_id": sel.column("object_id"), "state_id": sel.column("state_id"),
                            "unit": pa.array([unit.name()] * sel.num_rows), "channel": pa.array([plan.name] * sel.num_rows),
                            "run_id": pa.array([run_id] * sel.num_rows), "t3_key": pa.array([key] * sel.num_rows)})  # fmt: skip
        store.write_t3_objects(plan.name, key, objects)
        store.write_journal(run_id, key, _journal(sel.column("stock"), run_id, 3, plan.name, f"t3:{unit.name()}"))
    info = {"kind": "t3", "channel": plan.name, "unit": unit.name(), "objects": 0 if sel is None else sel.num_rows, "outputs": outputs}
    store.mark_task(key, info)
    return info
