"""The work of one graph task: a batch in, a batch (or a small summary) out; writes are idempotent.

Every task that writes names its output by its own content-hash key, so a task run twice (a lost worker,
a re-run) writes the same bytes to the same place. T2 work inside a stage is keyed by (unit, state id):
states already in the store are not computed again, and a state reached by several channels is
computed once. Reading batches, the history shuffle, provenance and the T3 selection have their own
modules (batches, shuffle, provenance, selection).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..io.arrays import contains, first_rows, lookup, sorted_unique
from ..io.files import sync as sync_files
from ..io.layout import DATAPOINT
from ..io.stores import FAILURE, UNIT_FAILED, open_store
from ..keys import id_hex, id_values, key_of
from ..tiers.base import T2PointUnit, T2StateUnit, T3Context, Verdict
from ..tiers.rights import ChannelArchive, channel_view
from ..tiers.states import HISTORY_SCHEMA, STATE_COLUMNS
from .batches import read_partition, with_histories
from .failures import Blocked, UnitFailed, attempt, t3_blocked, unit_output
from .plan import ChannelPlan, t2_units
from .points import run_point_unit
from .provenance import journal_rows, with_provenance
from .selection import Batches, latest_rows, selection_in_batches, with_dps
from .history import bucket_history
from .shuffle import accepted_by_any, read_bucket, write_buckets
from .workers import cluster_map


@dataclass
class T0Result:
    verdict: Verdict
    counts: dict[str, int] = field(default_factory=dict)


def run_t0(table: pa.Table, plan: ChannelPlan, key: str = "") -> T0Result:
    """Data rights first (reason 'access'), then the channel's filters in order; first rejection wins.

    The filters see the channel's view of the batch only (tiers/rights.py): the alerts it may see,
    with history aggregates over the datapoints it may see. A filter that raises fails the task with
    :class:`UnitFailed` (the runner names every channel that shares this filter chain)."""
    view, seen = channel_view(table, plan.access, with_histories)
    inner = Verdict.accept_all(view.num_rows)
    for f in plan.filters:
        if not inner.accepted.any():
            break
        try:
            verdict = f.verdict(view)  # whole batch (vectorised)
        except Exception as exc:
            raise UnitFailed.of(exc, "T0", f.name(), [plan.name], view.num_rows, key) from None
        inner = inner & verdict  # earlier rejections keep their reason
    v = Verdict.accept_all(table.num_rows)
    v.reject(~seen, "access")
    codes = np.zeros(table.num_rows, dtype=inner.codes.dtype)
    codes[seen] = inner.codes
    for i, reason in enumerate(inner.reasons):
        v.reject(codes == i + 1, reason)
    return T0Result(v, v.counts())


#: states a unit works on at a time (a history bucket's T1 join, a T2 unit's call): what a unit holds
#: beside its input grows with it; for 3 M LSST alerts (~105,000 states per bucket) building the
#: states took ~0.5 GB beyond its inputs and T2LightCurveFeatures ~0.4 GB, a third of that in slices
SLICE_ROWS = 32_768


def object_slices(stock: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Ranges ``(lo, hi)`` of ``stock`` values, ascending, of about ``rows`` of its values each (more
    where one object has more), together covering all of them: no object is split between two."""
    s = np.sort(stock)
    ends = np.unique(np.searchsorted(s, s[rows - 1 :: rows], side="right")) if len(s) else s[:0]
    ends = np.append(ends[ends < len(s)], len(s)) if len(s) else ends
    starts = np.r_[0, ends[:-1]]
    return [(int(s[a]), int(s[b - 1])) for a, b in zip(starts, ends)]


def _objects(table: pa.Table, lo: int, hi: int) -> pa.Table:
    """The rows of the objects whose stock is in ``[lo, hi]``."""
    stock = table.column("stock")
    return table.filter(pc.and_(pc.greater_equal(stock, lo), pc.less_equal(stock, hi)))


def _states(plan: ChannelPlan, key: str, alerts: pa.Table, history: pa.Table | None = None) -> pa.Table:
    """The channel's T1 unit on these alerts; if it raises, the task fails naming unit and channel."""
    try:
        return plan.t1.states(alerts, plan.access) if history is None else plan.t1.states(alerts, plan.access, history)
    except Exception as exc:
        raise UnitFailed.of(exc, "T1", plan.t1.name(), [plan.name], alerts.num_rows, key) from None


@dataclass
class Waiting:
    """What a work unit keeps for its packet channels' T1 while the history channels' ``hist`` tasks
    run (they wait for every unit's T0): the state columns of the alerts one of them accepted, not of
    every alert. Holding every alert's made the workers' memory grow with the run's size (2.5 GB per
    worker for ztf_archive.yml on 10 M alerts)."""

    rows: np.ndarray  # the kept alerts' rows in the work unit's batch (sorted)
    table: pa.Table  # their state columns


def waiting_rows(table: pa.Table, *t0s: T0Result) -> Waiting:
    """The :class:`Waiting` rows of a work unit, from its batch and its packet channels' T0."""
    rows = np.flatnonzero(accepted_by_any(list(t0s)))
    return Waiting(rows, state_rows(table).take(pa.array(rows)))


def run_t1(table: pa.Table | Waiting, t0: T0Result, plan: ChannelPlan, spec: dict, key: str, run_id: str, carried: dict | None = None) -> pa.Table:
    """States of the accepted alerts; stored as the channel's selection for this work unit.

    ``table``: the unit's batch, or its :class:`Waiting` rows when history channels run beside.
    ``carried``: what this unit's ``hist`` task returned, when a history channel decoded the unit's
    histories already: the rows any packet channel accepted, with their histories (one decode)."""
    store = open_store(spec)
    accepted = t0.verdict.accepted
    rows = np.flatnonzero(accepted)
    if isinstance(table, Waiting):  # kept rows only: this channel's are among them
        alerts = table.table.take(pa.array(np.searchsorted(table.rows, rows)))
    else:  # the columns a state takes (the batch has every column a filter reads), of the accepted rows
        alerts = state_rows(table).filter(pa.array(accepted)) if len(rows) else state_rows(table).slice(0, 0)
    if len(rows) and carried and "dps" in carried:
        passing = alerts.append_column("dps", carried["dps"].take(pa.array(np.searchsorted(carried["rows"], rows))))
    elif len(rows) and "dps" not in alerts.column_names:
        full = with_histories(table)  # the unit's histories, decoded once per process (batches._histories)
        passing = alerts.append_column("dps", full.column("dps").filter(pa.array(accepted)))
    elif len(rows):
        passing = alerts
    else:
        passing = alerts if "dps" in alerts.column_names else alerts.append_column("dps", pa.array([], pa.list_(DATAPOINT)))
    states = _states(plan, key, passing)
    store.write_states(plan.name, key, states)
    store.write_journal(run_id, key, journal_rows(states.column("stock"), run_id, 0, plan.name, "accepted", alert_id=states.column("alert_id")))
    n = len(accepted)
    counts = {"alerts": n, "passed": int(t0.verdict.accepted.sum()), "rejected": n - int(t0.verdict.accepted.sum()), "reasons": {k: v for k, v in t0.counts.items() if k != "accepted"}}
    store.mark_task(key, {"kind": "t1", "channel": plan.name, "states": states.num_rows, **counts})
    return states


def read_t0_t1(archive_root: str, paths: list[str], columns: list[str] | None, plan: ChannelPlan, t0_key: str, spec: dict, key: str, run_id: str) -> pa.Table:
    """A work unit of a workflow's only channel, read, filtered and made states in one task (what
    ``read``, ``t0`` and ``t1`` do as three when channels share a read): two fewer tasks per work unit
    to schedule, and the batch let go as soon as its states are made. A T0 or T1 failure raises as in
    its own task (named by ``t0_key`` / ``key``)."""
    table = read_partition(archive_root, paths, columns)
    return run_t1(table, run_t0(table, plan, t0_key), plan, spec, key, run_id)


def stored_states(spec: dict, channel: str, key: str) -> pa.Table | None:
    """The states a finished T1 task stored, for a T2 stage that groups its work unit with new ones
    (``compile.stage_groups``): they are read, not built again."""
    return open_store(spec).read_states(channel, [key])


def state_rows(table: pa.Table) -> pa.Table:
    """The columns a state takes from its alert (and ``dps`` if the batch has it)."""
    return table.select([c for c in [*STATE_COLUMNS, "programid"] if c != "state_id" and c in table.column_names])  # programid: data rights


def passing_alerts(table: pa.Table, t0: T0Result) -> pa.Table:
    """What a state needs of the alerts that pass (their datapoints come from the history join)."""
    return table.select([c for c in STATE_COLUMNS if c not in ("state_id", "dps")]).filter(pa.array(t0.verdict.accepted))


def t0_counts(t0: T0Result, n: int) -> dict:
    acc = int(t0.verdict.accepted.sum())
    return {"alerts": n, "passed": acc, "rejected": n - acc, "reasons": {k: v for k, v in t0.counts.items() if k != "accepted"}}


def run_t1_history(shuffle_dir: str, bucket: int, plan: ChannelPlan, spec: dict, key: str, run_id: str, _after: object = None,
                   segments: dict[str, list[str]] | None = None) -> pa.Table:  # fmt: skip
    """States with each object's archived history, for the objects of one bucket.

    The passing alerts come from the shuffle files the ``pass`` tasks wrote for this bucket (a disk
    shuffle: no table travels through the scheduler, each bucket reads only its own share). The
    archived datapoints of their objects come from the archive's object-bucketed history
    (``segments``, per survey: only these objects' rows are read, see ``graph/history.py``), or, for an
    archive without one, from the shuffle files the ``hist`` tasks wrote.
    """
    alerts = read_bucket(shuffle_dir, "alerts", bucket)
    if segments is not None:
        history = bucket_history(segments, alerts, plan.access) if alerts is not None else None
    else:
        history = read_bucket(shuffle_dir, "history", bucket)
    store = open_store(spec)
    if alerts is None:
        store.mark_task(key, {"kind": "t1h", "channel": plan.name, "states": 0})
        return None
    if history is None:  # passing alerts whose packets hold no datapoint at all
        history = HISTORY_SCHEMA.empty_table()
    ranges = object_slices(alerts.column("stock").to_numpy(), SLICE_ROWS)
    if len(ranges) < 2:
        states = _states(plan, key, alerts, history)
    else:  # an object's states need only its own alerts and history
        states = pa.concat_tables([_states(plan, key, _objects(alerts, lo, hi), _objects(history, lo, hi)) for lo, hi in ranges])
    store.write_states(plan.name, key, states)
    store.write_journal(run_id, key, journal_rows(states.column("stock"), run_id, 1, plan.name, "state", alert_id=states.column("alert_id")))
    store.mark_task(key, {"kind": "t1h", "channel": plan.name, "states": states.num_rows})
    return states


def run_t2_stage(spec: dict, key: str, run_id: str, inputs: list[tuple[str, list[str], pa.Table]], units: list[T2StateUnit | T2PointUnit],
                 policies: dict[str, str] | None = None, skip: frozenset[str] = frozenset()) -> dict:  # fmt: skip
    """All T2 units of one work unit (partition or bucket): dedupe states across channels, skip done.

    ``policies``: unit key -> ``on_error`` ("fail" by default). A unit that raises fails the states (or,
    a T2PointUnit, the datapoints) it was given (see ``graph/failures.py``): the stage counts them and
    lists them in ``failures``, stores them with their error under "record", and leaves no marker, so
    that the next run retries them. ``skip``: stages whose results cannot hold these states (this run's
    other object buckets: objects are in one bucket each), not read for the done check."""
    store = open_store(spec)
    policies = policies or {}
    counts: dict = {"computed": 0, "reused": 0, "failed": 0, "recorded": 0, "units": {}, "failures": []}
    results: dict[str, pa.Table] = {}
    failed: dict[str, dict[str, np.ndarray | str]] = {}  # unit key -> its failed state ids by policy, first error
    journal = []
    t_start = time.perf_counter()
    for unit in units:
        ukey = unit.identity.key
        chans = [(name, s) for name, keys, s in inputs if ukey in keys and s is not None and s.num_rows]
        if not chans:
            continue
        states = pa.concat_tables([s for _, s in chans], promote_options="default")
        if isinstance(unit, T2PointUnit):  # per datapoint, keyed by its content (points.py)
            c, rows, fails = run_point_unit(store, unit, chans, key, run_id, policies.get(ukey, "fail"))
            journal += rows
            counts["failures"] += fails
            counts["units"][unit.name()] = c
            for k in ("computed", "reused", "failed", "recorded"):
                counts[k] += c[k]
            continue
        sid = id_values(states.column("state_id"))  # 128-bit content ids: a state whose values differ is another state
        first = first_rows(sid)  # each state once
        todo = ~contains(store.done_state_ids(unit.name(), ukey, skip), sid[first])
        c = {"states": len(first), "computed": 0, "reused": int((~todo).sum()), "failed": 0, "recorded": 0}
        if todo.any():
            pick = first[todo]  # one gather of the new states' datapoints, none when all rows are new
            batch = states if len(pick) == states.num_rows else states.take(pa.array(pick))
            out, fails = _compute(store, unit, batch, results, failed, policies.get(ukey, "fail"), run_id)
            if out is not None:
                # named by the stage; an attempt where some states failed by the states it holds too, so
                # that the retry of the failed ones (named by the stage) never replaces its results
                name = key_of(key, sorted(id_hex(id_values(out.column("state_id"))))) if fails else key
                store.write_t2(unit.name(), ukey, name, out, lead=_lead(batch, out))
                results[ukey] = out
                journal.append(journal_rows(out.column("stock"), run_id, 2, unit.name(), "computed", state_id=out.column("state_id")))
            c["computed"] = 0 if out is None else out.num_rows
            recorded = [rows for rows, f in fails if f["policy"] == "record"]
            rec = _failure_rows(batch, np.concatenate(recorded), fails, unit, run_id) if recorded else pa.table({})
            store.write_t2_failures(unit.name(), ukey, key, rec)  # replaces what this stage recorded before
            sid = id_values(batch.column("state_id"))
            for rows, f in fails:
                ids = sorted_unique(sid[rows])
                f["channels"] = list(dict.fromkeys(name for name, s in chans if contains(ids, id_values(s.column("state_id"))).any()))
                c["failed"] += len(rows)
                c["recorded"] += f["recorded"]
                counts["failures"].append(f)
                mine = failed.setdefault(ukey, {"error": f["error"], "fail": ids[:0], "record": ids[:0]})
                mine[f["policy"]] = sorted_unique(np.concatenate([mine[f["policy"]], ids]))  # type: ignore[list-item]
            if fails:  # every failed state, recorded or not: `explain` shows the run that failed on it
                rows = pa.array(np.concatenate([r for r, _ in fails]))
                journal.append(journal_rows(batch.column("stock").take(rows), run_id, 2, unit.name(), "failed", state_id=batch.column("state_id").take(rows)))
        counts["units"][unit.name()] = c
        for k in ("computed", "reused", "failed", "recorded"):
            counts[k] += c[k]
    if journal:
        store.write_journal(run_id, key, pa.concat_tables(journal))
    counts["seconds"] = round(time.perf_counter() - t_start, 4)
    counts["worker"] = {"pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    if counts["failed"] == 0:  # a stage with failures stays unmarked: the next run comes back to it
        store.mark_task(key, {"kind": "t2", **counts})
    return counts


def _compute(store, unit: T2StateUnit, batch: pa.Table, fresh: dict[str, pa.Table], failed: dict[str, dict], policy: str,
             run_id: str) -> tuple[pa.Table | None, list]:  # fmt: skip
    """``unit`` on the states of ``batch``: its results (with provenance) and its failures, each as
    (row indexes into ``batch``, failure dict). States where a dependency failed in this stage are not
    given to the unit: they fail for it too, under the dependency's policy."""
    sid = id_values(batch.column("state_id"))
    blocked = np.zeros(len(sid), dtype=bool)
    fails: list[tuple[np.ndarray, dict]] = []
    for d in unit.dependencies():
        bad = failed.get(d.identity.key)
        for pol in ("fail", "record") if bad else ():
            hit = contains(bad[pol], sid) & ~blocked
            if hit.any():
                blocked |= hit
                error = f"its dependency {d.name()} failed on them: {bad['error']}"
                fails.append((np.flatnonzero(hit), _failure(unit, int(hit.sum()), pol, error, cause=d.name())))
    runnable = np.flatnonzero(~blocked)
    if not len(runnable):
        return None, fails
    sub = batch if len(runnable) == len(sid) else batch.take(pa.array(runnable))
    got = [(d, _dep_results(store, d, sub, fresh)) for d in unit.dependencies()]

    def run(rows: np.ndarray) -> pa.Table:
        deps = {}
        for d, table in got:  # by name, and by identity key for several units of one kind
            deps[d.name()] = deps[d.identity.key] = _rows(table, rows)
        return _as_table(unit.process(_rows(sub, rows), deps), len(rows), unit)

    ok, bad_pieces = attempt(run, len(runnable), isolate=policy == "record", piece=SLICE_ROWS)
    for rows, error, trace in bad_pieces:
        fails.append((runnable[rows], _failure(unit, len(rows), policy, error, trace=trace)))
    if not ok:
        return None, fails
    done = np.concatenate([rows for rows, _ in ok])
    out = pa.concat_tables([t for _, t in ok], promote_options="default") if len(ok) > 1 else ok[0][1]
    states = batch if len(done) == len(sid) else batch.take(pa.array(runnable[done]))
    return with_provenance(out, states, unit, run_id), fails


def _rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table``'s rows ``rows`` (ascending): no copy for the whole table or one run of rows (the pieces
    and halves :func:`attempt` calls a unit on), a gather otherwise."""
    if len(rows) == table.num_rows:
        return table
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return table.slice(int(rows[0]), len(rows))
    return table.take(pa.array(rows))


def _failure(unit: T2StateUnit, n: int, policy: str, error: str, cause: str | None = None, trace: str | None = None) -> dict:
    f = {"tier": "T2", "unit": unit.name(), "channels": [], "states": n, "policy": policy, "recorded": n if policy == "record" else 0,
         "error": error, "cause": cause}  # fmt: skip
    return f | ({"traceback": trace} if trace else {})


def _failure_rows(batch: pa.Table, rows: np.ndarray, fails: list, unit: T2StateUnit, run_id: str) -> pa.Table:
    """The recorded failures as stored: provenance, ``code`` = UNIT_FAILED and the error text."""
    errors = np.empty(batch.num_rows, dtype=object)
    for r, f in fails:
        errors[r] = f["error"]
    states = batch.take(pa.array(rows))
    body = pa.table({"code": pa.array(np.full(len(rows), UNIT_FAILED, dtype=np.int32)), FAILURE: pa.array(errors[rows].tolist(), pa.string())})
    return with_provenance(body, states, unit, run_id)


def _unique_states(states: pa.Table) -> pa.Table:
    first = first_rows(id_values(states.column("state_id")))
    return states if len(first) == states.num_rows else states.take(pa.array(first))  # no copy when all differ


def _dep_results(store, dep: T2StateUnit, batch: pa.Table, fresh: dict[str, pa.Table]) -> pa.Table:
    """The dependency's results aligned row by row with ``batch``: fresh from this stage where there,
    the store only for the states this stage did not compute (a stage never re-reads every result).

    Joined by 128-bit state content id: a result computed from other datapoint values (even with the
    same datapoint ids) has another id and never joins; a state without its result is an error."""
    sid = id_values(batch.column("state_id"))
    pieces = [fresh[dep.identity.key]] if dep.identity.key in fresh else []
    have = lookup(id_values(pieces[0].column("state_id")), sid) >= 0 if pieces else np.zeros(len(sid), dtype=bool)
    missing = sid[~have]
    if len(missing):
        stored = store.read_t2(dep.name(), dep.identity.key, missing)
        if stored is not None:
            pieces.append(stored)
    if not pieces:
        raise RuntimeError(f"no results of {dep.name()} for the states of a dependent unit")
    table = _unique_states(pa.concat_tables(pieces, promote_options="default"))
    at = lookup(id_values(table.column("state_id")), sid)
    if (at < 0).any():
        raise RuntimeError(f"no results of {dep.name()} for {int((at < 0).sum())} states of a dependent unit")
    return table.take(pa.array(at))


def _lead(states: pa.Table, out: pa.Table) -> np.ndarray:
    """Rows of ``out`` (results of ``states``) that hold an object's latest state among ``states``: what
    a T3 selection after this run wants of them (the store keeps them apart, ``write_t2``'s ``lead``)."""
    latest = latest_rows(*(states.column(c).to_numpy() for c in ("stock", "mjd", "alert_id")))
    return contains(sorted_unique(id_values(states.column("state_id"))[latest]), id_values(out.column("state_id")))


def _as_table(out: pa.Table | list[dict], n: int, unit: T2StateUnit) -> pa.Table:
    return unit_output(out, n, unit.name())


def run_t3(spec: dict, plan: ChannelPlan, unit_index: int, key: str, run_id: str, sel: pa.Table | Batches | Blocked | None, archive_root: str | None,
           state_keys: list[str] | None = None) -> dict:  # fmt: skip
    """One T3 unit over its channel's selection (computed once per channel, see :func:`selection`; a
    large one in batches, given to ``react_batches``); not
    over a selection whose T2 results are incomplete (``Blocked``: a unit failed unrecorded), and a unit
    that raises fails the task naming itself and the channel. A unit that reads some rows' datapoints
    (``dps_rows``) gets them from the channel's state sets ``state_keys``."""
    from ..io.archive import Archive

    store = open_store(spec)
    unit = plan.t3[unit_index]
    if isinstance(sel, Blocked):  # no marker: the next run comes back to it
        return {"kind": "t3", "channel": plan.name, "unit": unit.name(), "objects": 0, "outputs": [], "skipped": sel.reason}
    if sel is not None and sel.num_rows and unit.reads_dps and not unit.reads_all_dps and "dps" not in sel.schema.names:
        sel = sel.whole() if isinstance(sel, Batches) else sel  # as react_batches does by default
        try:
            rows = unit.dps_rows(sel)
        except Exception as exc:  # the unit's own code: it fails as react would
            raise UnitFailed.of(exc, "T3", unit.name(), [plan.name], sel.num_rows, key) from None
        sel = with_dps(store, plan.name, state_keys or [], sel, rows)
    out_dir = store.t3_dir(plan.name, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[dict] = []
    if sel is not None and sel.num_rows:
        archive = ChannelArchive(Archive(archive_root), plan.access) if archive_root else None  # only what the channel may see
        ctx = T3Context(out_dir=out_dir, run_id=run_id, channel=plan.name, archive=archive, mapper=cluster_map,
                        deliveries=partial(store.deliveries, plan.name))
        try:
            outputs = (unit.react_batches(iter(sel), ctx) if isinstance(sel, Batches) else unit.react(sel, ctx)) or []
        except Exception as exc:
            raise UnitFailed.of(exc, "T3", unit.name(), [plan.name], sel.num_rows, key) from None
        objects = pa.table({"stock": sel.column("stock"), "object_id": sel.column("object_id"), "state_id": sel.column("state_id"),
                            "unit": pa.array([unit.name()] * sel.num_rows), "channel": pa.array([plan.name] * sel.num_rows),
                            "run_id": pa.array([run_id] * sel.num_rows), "t3_key": pa.array([key] * sel.num_rows)})  # fmt: skip
        store.write_t3_objects(plan.name, key, objects)
        store.write_journal(run_id, key, journal_rows(sel.column("stock"), run_id, 3, plan.name, f"t3:{unit.name()}"))
    info = {"kind": "t3", "channel": plan.name, "unit": unit.name(), "objects": 0 if sel is None else sel.num_rows, "outputs": outputs}
    store.mark_task(key, info)
    return info


# --- adapters: how the graph calls the task bodies (arguments as the compiler lays them out) ---


def t2_stage(spec: dict, key: str, run_id: str, buckets: frozenset[str], n: int, *deps: object) -> dict:
    """deps: ``n`` channel plans, their ``n`` states tables, then tasks that only have to finish first.
    ``buckets``: a history channel's stages, one per object bucket, of which this is one (else empty)."""
    plans, states = deps[:n], deps[n : 2 * n]
    inputs = [(p.name, [u.identity.key for u in p.t2], s) for p, s in zip(plans, states)]  # type: ignore[attr-defined]
    policies: dict[str, str] = {}
    for p in plans:  # a unit shared by channels records its failures only if each of them says so
        for k, pol in p.on_error.items():  # type: ignore[attr-defined]
            policies[k] = "fail" if "fail" in (policies.get(k), pol) else "record"
    try:
        return run_t2_stage(spec, key, run_id, inputs, t2_units(list(plans)), policies, buckets - {key})  # type: ignore[arg-type]
    finally:  # what the stage wrote is fsync'ed before it reports (its marker did this too, when it wrote one)
        sync_files()


def pass_to_shuffle(table: pa.Table, t0: T0Result, plan: ChannelPlan, spec: dict, key: str, shuffle_dir: str, nbuckets: int,
                    *_after: object) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Alerts of one work unit that pass a history channel's T0, written by object bucket; counts go to
    a marker; returns the passing alerts' (stock, mjd) (small). ``_after``: tasks that run first."""
    passing = passing_alerts(table, t0)
    write_buckets(passing, shuffle_dir, "alerts", key, nbuckets)
    open_store(spec).mark_task(key, {"kind": "t0", "channel": plan.name, **t0_counts(t0, table.num_rows)})
    return passing.column("stock").to_numpy(), passing.column("mjd").to_numpy()


def written(pieces: dict) -> int:
    """A hist task's row count (what the t1h tasks wait for, without the histories it carries)."""
    return pieces["written"]


def selection_task(spec: dict, plan: ChannelPlan, state_names: list[str], scratch: str, *after: object) -> pa.Table | Batches | Blocked | None:
    """``after``: what the tasks writing the channel's states and T2 results returned; T3 gets no
    selection (``Blocked``) when one of them failed on the channel's states without recording it.
    A large selection comes as :class:`Batches` in ``scratch`` (removed with the run's shuffles)."""
    why = t3_blocked(plan.name, after)
    return Blocked(why) if why else selection_in_batches(open_store(spec), plan, state_names, scratch, spec=spec)
