"""Workflow + archive partitions -> a Dask graph whose keys are content hashes.

Per archive partition (content hash h): ``read-h`` -> ``t0-<filters, access, h>`` per distinct filter
chain -> ``t1-<chain, policy, h>`` per channel -> one ``t2-...`` stage for all T2 units of all channels
(states de-duplicated across channels, stored states skipped). Channels whose T1 policy joins the
archived history get a shuffle by object: passing alerts, and their objects' packets from every
archive part as flat datapoints (one copy each) -> ``t1h`` per object bucket -> a T2 stage per
bucket. T3 runs per channel and unit after its channel's T2 stages. Identical work has identical keys, so it collapses within a run; finished
work has a marker in the store, so a re-run leaves it out of the graph entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..io.archive import Archive, Partition
from ..tiers.base import T2StateUnit
from ..tiers.states import HISTORY_RULE
from . import tasks
from .plan import ChannelPlan, key_of


@dataclass
class CompiledRun:
    graph: dict = field(default_factory=dict)
    sinks: list[str] = field(default_factory=list)  # keys whose (small) results the driver gathers
    t1_names: dict[str, list[str]] = field(default_factory=dict)  # channel -> store names of its states
    count_names: dict[str, list[str]] = field(default_factory=dict)  # channel -> markers holding T0 counts
    t2_names: list[str] = field(default_factory=list)
    t3_names: list[str] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    history_partitions: list[Partition] = field(default_factory=list)  # parts the history joins read
    skipped_partitions: int = 0
    shuffle_dirs: list[str] = field(default_factory=list)  # removed when the run is done
    produced_by: dict[str, list[str]] = field(default_factory=dict)  # channel -> tasks its T3 waits for

    @property
    def tasks(self) -> int:
        """Graph tasks (the channel plans are data keys, not tasks)."""
        return sum(1 for v in self.graph.values() if isinstance(v, tuple))


def _units(plans: list[ChannelPlan]) -> list[T2StateUnit]:
    seen: dict[str, T2StateUnit] = {}
    for p in plans:
        for u in p.t2:
            seen.setdefault(u.identity.key, u)
    return list(seen.values())


@dataclass(frozen=True)
class WorkUnit:
    """One part, or several small parts of the same survey and month read as one batch."""

    parts: tuple[Partition, ...]

    @property
    def key(self) -> str:
        return key_of([p.content_hash for p in self.parts])

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.parts]


def work_units(parts: list[Partition], min_rows: int = 10_000) -> list[WorkUnit]:
    """Group small parts so each task has enough rows to amortise its fixed cost.

    Deterministic and local: small parts are grouped only with parts of the same survey and month
    (night // 100), in (night, path) order, so adding a night changes at most one month's groups.
    """
    out: list[WorkUnit] = []
    buf: list[Partition] = []
    month = None
    for p in sorted(parts, key=lambda p: (p.survey, p.night, p.path)):
        if p.rows >= min_rows:
            out.append(WorkUnit((p,)))
            continue
        if buf and ((p.survey, p.night // 100) != month or sum(x.rows for x in buf) >= min_rows):
            out.append(WorkUnit(tuple(buf)))
            buf = []
        buf.append(p)
        month = (p.survey, p.night // 100)
    if buf:
        out.append(WorkUnit(tuple(buf)))
    return out


def compile_run(plans: list[ChannelPlan], archive: Archive, parts: list[Partition], store, run_id: str, history_buckets: int = 16, batch_rows: int = 10_000,
                t3_states: dict[str, list[str]] | None = None) -> CompiledRun:
    """``t3_states``: per channel, states of earlier runs that T3 reads besides this run's (live mode's
    selection so far), so that T3 after the last micro-batch sees what one archive run would see."""
    run = CompiledRun(partitions=parts, t1_names={p.name: [] for p in plans}, count_names={p.name: [] for p in plans})
    dsk = run.graph
    spec = store.spec
    root = str(archive.root)
    packet = [p for p in plans if not p.history]
    hist = [p for p in plans if p.history]
    # each channel plan (units, models, catalogs) is one graph key, shipped once per worker and
    # referenced by the tasks, instead of being pickled into every task
    pk = {c.name: f"plan-{key_of(c.name, c.t1_key, [u.identity.key for u in [*c.t2, *c.t3]])}" for c in plans}
    for c in plans:
        dsk[pk[c.name]] = c

    def ensure_read_t0(unit: WorkUnit, chans: list[ChannelPlan]) -> dict[str, str]:
        h = unit.key
        cols = None
        if all(c.columns is not None for c in plans):
            cols = sorted(set().union(*(c.columns for c in plans)))
        dsk.setdefault(f"read-{h}", (tasks.read_partition, root, unit.paths, cols))
        out = {}
        for c in chans:
            k = f"t0-{key_of(c.t0_key, h)}"
            dsk.setdefault(k, (tasks.run_t0, f"read-{h}", pk[c.name]))
            out[c.name] = k
        return out

    # --- channels on the packet's own history: everything per partition ---
    stage_units = _units(packet)
    units = work_units(parts, batch_rows)
    t1_of_unit: dict[str, list[tuple[str, str]]] = {}  # work unit -> its packet channels' (T1, T0) tasks
    for part in units:
        h = part.key
        names = {c.name: key_of(c.t1_key, h) for c in packet}
        for c in packet:
            run.t1_names[c.name].append(names[c.name])
            run.count_names[c.name].append(names[c.name])
        if not packet:
            continue
        inputs = [[c.name, [u.identity.key for u in c.t2], names[c.name]] for c in packet]
        stage = key_of("t2", sorted(names.values()), [u.identity.key for u in stage_units]) if stage_units else None
        if stage:
            run.t2_names.append(stage)
        finished = all(store.task_info(n) for n in names.values()) and (stage is None or store.task_info(stage))
        if finished:
            run.skipped_partitions += len(part.parts)
            continue
        t0 = ensure_read_t0(part, packet)
        rows = f"read-{h}"
        if hist:  # T1 waits for the history channels' hist task: keep only the columns it needs meanwhile
            rows = f"rows-{h}"
            dsk[rows] = (tasks.state_rows, f"read-{h}")
        for c in packet:
            dsk[f"t1-{names[c.name]}"] = (tasks.run_t1, rows, t0[c.name], pk[c.name], spec, names[c.name], run_id)
            t1_of_unit.setdefault(h, []).append((f"t1-{names[c.name]}", t0[c.name]))
        if stage:
            dsk[f"t2-{stage}"] = (_stage, spec, stage, run_id, len(inputs), *[pk[c.name] for c in packet], *[f"t1-{n}" for _, _, n in inputs])
            run.sinks.append(f"t2-{stage}")
        else:
            run.sinks += [f"t1-{names[c.name]}" for c in packet]
        for c in packet:
            run.produced_by.setdefault(c.name, []).append(f"t2-{stage}" if stage else f"t1-{names[c.name]}")

    # --- channels joining each object's archived history: shuffle by object bucket ---
    # their T2 stages run after the partition stages, so a state both reach is computed once
    packet_stages = [k for k in dsk if k.startswith("t2-")]
    for c in hist:
        sel_id = key_of([p.content_hash for p in parts])
        sources = archive.partitions(sorted({p.survey for p in parts}))
        run.history_partitions = sources
        hist_id = key_of([p.content_hash for p in sources])
        names = [key_of("t1h", HISTORY_RULE, c.t1_key, sel_id, hist_id, b, history_buckets) for b in range(history_buckets)]
        stages = [key_of("t2h", n, [u.identity.key for u in c.t2]) if c.t2 else None for n in names]
        counts = [key_of("t0c", c.t0_key, u.key) for u in units]
        run.t1_names[c.name] += names
        run.count_names[c.name] += counts
        run.t2_names += [s for s in stages if s]
        if all(store.task_info(k) for k in names + counts + [s for s in stages if s]):
            continue
        shuffle = str(store.shuffle_dir(run_id, key_of(c.t1_key, sel_id, hist_id)))
        run.shuffle_dirs.append(shuffle)
        pass_keys = []
        for unit, ck in zip(units, counts):
            t0 = ensure_read_t0(unit, [c])[c.name]
            dsk[f"pass-{ck}"] = (_pass, f"read-{unit.key}", t0, pk[c.name], spec, ck, shuffle, history_buckets)
            pass_keys.append(f"pass-{ck}")
        stocks_key = f"stocks-{key_of(c.t0_key, sel_id)}"
        dsk[stocks_key] = (tasks.stocks_of, pass_keys)
        hist_keys = []
        for q in work_units(sources, batch_rows):
            hk = key_of(c.t0_key, sel_id, q.key, history_buckets)
            read = next((k for k in (f"rows-{q.key}", f"read-{q.key}") if k in dsk), None)
            # a unit the run read: its histories are decoded once, here, for its packet channels' T1 too
            t1s = t1_of_unit.pop(q.key, []) if read else []
            dsk[f"hist-{hk}"] = (tasks.history_pieces, root, q.paths, stocks_key, shuffle, hk, history_buckets, read, [t0 for _, t0 in t1s], c.access)
            # the t1h tasks wait for every hist task; they get its row count, not the histories it carries to T1
            dsk[f"hw-{hk}"] = (_written, f"hist-{hk}")
            hist_keys.append(f"hw-{hk}")
            for k, _ in t1s:
                dsk[k] = (*dsk[k], f"hist-{hk}")
        for b, (n, s) in enumerate(zip(names, stages)):
            dsk[f"t1h-{n}"] = (tasks.run_t1_history, shuffle, b, pk[c.name], spec, n, run_id, hist_keys)
            if s:
                dsk[f"t2-{s}"] = (_stage, spec, s, run_id, 1, pk[c.name], f"t1h-{n}", *packet_stages)
                run.sinks.append(f"t2-{s}")
            else:
                run.sinks.append(f"t1h-{n}")
            run.produced_by.setdefault(c.name, []).append(f"t2-{s}" if s else f"t1h-{n}")

    # --- T3 per channel and unit, after the tasks that write the channel's states and T2 results (not
    # every channel's: one channel's report can be drawn while another's history join still runs) ---
    # (the channel's selection is one task, shared by its T3 units)
    for c in plans:
        t2_deps = run.produced_by.get(c.name, [])
        t3_sel = sorted(set(run.t1_names[c.name]) | set((t3_states or {}).get(c.name, [])))
        sel_key = f"sel-{key_of('sel', c.name, t3_sel, [u.identity.key for u in c.t2])}"
        for i, unit in enumerate(c.t3):
            name = key_of("t3", unit.identity.key, c.name, t3_sel, [u.identity.key for u in c.t2])
            run.t3_names.append(name)
            if store.task_info(name) and not any(k.startswith(("t1", "t2")) for k in dsk):
                continue
            dsk.setdefault(sel_key, (_selection, spec, pk[c.name], t3_sel, *t2_deps))
            dsk[f"t3-{name}"] = (tasks.run_t3, spec, pk[c.name], i, name, run_id, sel_key, root)
            run.sinks.append(f"t3-{name}")
    if not run.tasks:
        dsk.clear()  # only the plans: nothing to compute
    return run


def _stage(spec, key, run_id, n, *deps):
    """deps: ``n`` channel plans, their ``n`` states tables, then tasks that only have to finish first."""
    plans, states = deps[:n], deps[n : 2 * n]
    inputs = [(p.name, [u.identity.key for u in p.t2], s) for p, s in zip(plans, states)]
    return tasks.run_t2_stage(spec, key, run_id, inputs, _units(list(plans)))


def _pass(table, t0, plan, spec, key, shuffle, nbuckets):
    """Alerts of one partition that pass a history channel's T0, written by object bucket; counts go to
    a marker; returns the passing alerts' (stock, mjd) (small)."""
    from .store import open_store

    passing = tasks.passing_alerts(table, t0)
    tasks.write_buckets(passing, shuffle, "alerts", key, nbuckets)
    open_store(spec).mark_task(key, {"kind": "t0", "channel": plan.name, **tasks.t0_counts(t0, table.num_rows)})
    return passing.column("stock").to_numpy(), passing.column("mjd").to_numpy()


def _written(pieces: dict) -> int:
    return pieces["written"]


def _selection(spec, plan, state_names, *_after):
    from .store import open_store

    return tasks.selection(open_store(spec), plan, state_names)
