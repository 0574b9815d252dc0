"""Workflow + archive partitions -> a Dask graph whose keys are content hashes.

Per work unit (content hash h): ``read-h`` -> ``t0-<filters, access, h>`` per distinct filter chain ->
``t1-<chain, policy, h>`` per channel (one ``t1`` task does all three for a workflow's only channel);
per group of work units of one month (``stage_groups``), one ``t2-...`` stage for all T2 units of all
channels (states de-duplicated across channels, stored states skipped; a finished unit's states come
from the store, ``stored-...``). Channels whose T1 policy joins the
archived history get a shuffle by object: passing alerts, and their objects' packets from every
archive part as flat datapoints (one copy each) -> ``t1h`` per object bucket -> a T2 stage per
bucket. T3 runs per channel and unit after its channel's T2 stages. Identical work has identical keys, so it collapses within a run; finished
work has a marker in the store, so a re-run leaves it out of the graph entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..io.archive import Archive, Partition
from ..io.stores import ResultStore
from ..keys import BUCKET_STAGES, HIST, HIST_WRITTEN, PASS, PLAN, READ, ROWS, SELECTION, STOCKS, STORED, T0, T1, T1H, T2, T3, key_of, stage_of, task_key
from ..tiers.states import HISTORY_RULE
from . import batches, shuffle, tasks
from .history import history_segments
from .plan import ChannelPlan, t2_units


HISTORY_UNIT_ROWS = 250_000  # alerts per hist task over the archive's parts outside the run


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
    # T3 of channels with a max_pass_ratio: a graph of its own (selection + T3 tasks and their channel
    # plans), run only once the T0 counts are known to be within the limit (graph/guard.py)
    held: dict = field(default_factory=dict)
    held_sinks: list[str] = field(default_factory=list)
    held_selections: dict[str, str] = field(default_factory=dict)  # channel -> its selection task in ``held``

    @property
    def tasks(self) -> int:
        """Graph tasks (the channel plans are data keys, not tasks)."""
        return sum(1 for v in self.graph.values() if isinstance(v, tuple))


@dataclass(frozen=True)
class WorkUnit:
    """One part, or several small parts of the same survey and month read as one batch."""

    parts: tuple[Partition, ...]

    @property
    def key(self) -> str:
        return key_of([p.content_hash for p in self.parts])

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

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


def stage_groups(units: list[WorkUnit], max_rows: int) -> list[list[WorkUnit]]:
    """The work units whose packet states one T2 stage computes: runs of consecutive units (in the
    order :func:`work_units` gives) of one survey and month (night // 100), of up to ``max_rows`` alerts
    each (a larger unit alone). Deterministic and local, as the work units are: adding a night changes
    at most its month's last group.

    A stage costs ~20 ms besides its units' work (three result files, the done-ids check, journal,
    marker, a call of each unit): one per 47,000-alert part was 40% of the DECENT channel's T2 time at
    3 M ZTF alerts, and its result files slowed the T3 selection (benchmarks/README.md). A stage holds
    its units' states at once: a channel that passes every ZTF alert has ~1.7 KB per state."""
    out: list[list[WorkUnit]] = []
    month = None
    for u in units:
        p = u.parts[0]
        here = (p.survey, p.night // 100)
        if out and here == month and sum(x.rows for x in out[-1]) + u.rows <= max_rows:
            out[-1].append(u)
        else:
            out.append([u])
        month = here
    return out


def compile_run(plans: list[ChannelPlan], archive: Archive, parts: list[Partition], store: ResultStore, run_id: str, history_buckets: int = 16,
                batch_rows: int = 10_000, t3_states: dict[str, list[str]] | None = None, hold_t3: frozenset[str] = frozenset(),
                kept_buckets: int | None = None, stage_rows: int = 400_000) -> CompiledRun:  # fmt: skip
    """``t3_states``: per channel, states of earlier runs that T3 reads besides this run's (live mode's
    selection so far), so that T3 after the last micro-batch sees what one archive run would see.
    ``hold_t3``: channels whose T3 goes to ``held`` instead of the graph (their max_pass_ratio).
    ``kept_buckets``: the history join's buckets when it reads the kept history (else ``history_buckets``).
    ``stage_rows``: alerts per T2 stage of the packet channels, at most (:func:`stage_groups`)."""
    b = _Builder(plans, archive, parts, store, run_id, history_buckets, batch_rows, kept_buckets, stage_rows)
    b.packet_channels()
    packet_stages = [k for k in b.dsk if stage_of(k) == T2]
    for c in b.hist:  # their T2 stages run after the packet stages, so a state both reach is computed once
        b.history_channel(c, packet_stages)
    b.t3(t3_states or {}, hold_t3)
    if not b.run.tasks:
        b.run.graph.clear()  # only the plans: nothing to compute
    return b.run


class _Builder:
    """The stages of one run's graph, each a method; keys are ``task_key(STAGE, content key)``."""

    def __init__(self, plans: list[ChannelPlan], archive: Archive, parts: list[Partition], store: ResultStore, run_id: str, buckets: int, batch_rows: int,
                 kept_buckets: int | None = None, stage_rows: int = 400_000):  # fmt: skip
        self.run = CompiledRun(partitions=parts, t1_names={p.name: [] for p in plans}, count_names={p.name: [] for p in plans})
        self.dsk = self.run.graph
        self.plans, self.archive, self.parts, self.store, self.run_id = plans, archive, parts, store, run_id
        self.spec, self.root, self.buckets = store.spec, str(archive.root), buckets
        self.packet = [p for p in plans if not p.history]
        self.hist = [p for p in plans if p.history]
        self.units = work_units(parts, batch_rows)
        self.batch_rows, self.stage_rows = batch_rows, stage_rows
        self.t1_of_unit: dict[str, list[tuple[str, str]]] = {}  # work unit -> its packet channels' (T1, T0) tasks
        # the history channels' archive: every part of the run's surveys, read from the object-bucketed
        # history ingest keeps when it covers them all (graph/history.py), else shuffled by this run
        self.sources = archive.partitions(sorted({p.survey for p in parts})) if self.hist else []
        self.segments = history_segments(archive, self.sources) if self.hist else None
        if self.segments is not None and kept_buckets:
            self.buckets = kept_buckets
        # each channel plan (units, models, catalogs) is one graph key, shipped once per worker and
        # referenced by the tasks, instead of being pickled into every task
        self.pk = {c.name: task_key(PLAN, key_of(c.name, c.t1_key, [u.identity.key for u in [*c.t2, *c.t3]])) for c in plans}
        for c in plans:
            self.dsk[self.pk[c.name]] = c
        self.columns = sorted(set().union(*(c.columns for c in plans))) if all(c.columns is not None for c in plans) else None

    def read_t0(self, unit: WorkUnit, chans: list[ChannelPlan]) -> dict[str, str]:
        """The unit's read task and each channel's T0 task (shared by channels with the same filters)."""
        read = task_key(READ, unit.key)
        self.dsk.setdefault(read, (batches.read_partition, self.root, unit.paths, self.columns))
        out = {}
        for c in chans:
            name = key_of(c.t0_key, unit.key)
            k = task_key(T0, name)
            self.dsk.setdefault(k, (tasks.run_t0, read, self.pk[c.name], name))
            out[c.name] = k
        return out

    def packet_channels(self) -> None:
        """Channels on the packet's own history: read -> t0 -> t1 per channel, per work unit; one T2 stage
        per group of work units (:func:`stage_groups`)."""
        dsk, run, packet = self.dsk, self.run, self.packet
        if not packet:
            return
        stage_units = t2_units(packet)
        for group in stage_groups(self.units, self.stage_rows):
            # a T1 task writes its channel's states: the channel is part of its key (two channels with
            # the same filters and policy share T0, never T1)
            names = [{c.name: key_of(c.name, c.t1_key, u.key) for c in packet} for u in group]
            for per in names:
                for c in packet:
                    run.t1_names[c.name].append(per[c.name])
                    run.count_names[c.name].append(per[c.name])
            inputs = [(c, per[c.name]) for per in names for c in packet]
            stage = key_of("t2", sorted(n for _, n in inputs), [u.identity.key for u in stage_units]) if stage_units else None
            if stage:
                run.t2_names.append(stage)
            if all(self.store.task_info(n) for _, n in inputs) and (stage is None or self.store.task_info(stage)):
                run.skipped_partitions += sum(len(u.parts) for u in group)
                continue
            states = {}  # T1 name -> the task giving its states to the stage
            for unit, per in zip(group, names):
                h = unit.key
                if all(self.store.task_info(per[c.name]) for c in packet):  # built before: the stage reads them
                    for c in packet if stage else ():
                        states[per[c.name]] = task_key(STORED, per[c.name])
                        dsk[states[per[c.name]]] = (tasks.stored_states, self.spec, c.name, per[c.name])
                    run.skipped_partitions += 0 if stage else len(unit.parts)
                    continue
                if len(packet) == 1 and not self.hist:  # the only channel: one task per work unit
                    c = packet[0]
                    states[per[c.name]] = t1 = task_key(T1, per[c.name])
                    dsk[t1] = (tasks.read_t0_t1, self.root, unit.paths, self.columns, self.pk[c.name], key_of(c.t0_key, h), self.spec, per[c.name], self.run_id)
                    continue
                t0 = self.read_t0(unit, packet)
                rows = task_key(READ, h)
                if self.hist and self.segments is None:  # T1 waits for the history channels' hist task: keep only the rows it needs meanwhile
                    rows = task_key(ROWS, h)
                    dsk[rows] = (tasks.waiting_rows, task_key(READ, h), *t0.values())
                for c in packet:
                    t1 = task_key(T1, per[c.name])
                    dsk[t1] = (tasks.run_t1, rows, t0[c.name], self.pk[c.name], self.spec, per[c.name], self.run_id)
                    states[per[c.name]] = t1
                    self.t1_of_unit.setdefault(h, []).append((t1, t0[c.name]))
            if stage:
                t2 = task_key(T2, stage)
                dsk[t2] = (tasks.t2_stage, self.spec, stage, self.run_id, frozenset(), len(inputs), *[self.pk[c.name] for c, _ in inputs],
                           *[states[n] for _, n in inputs])  # fmt: skip
                run.sinks.append(t2)
            else:
                run.sinks += list(states.values())
            for c, n in inputs:
                done_by = task_key(T2, stage) if stage else states.get(n)
                if done_by and done_by not in run.produced_by.setdefault(c.name, []):
                    run.produced_by[c.name].append(done_by)

    def history_channel(self, c: ChannelPlan, packet_stages: list[str]) -> None:
        """A channel joining each object's archived history: pass (per work unit) -> stocks -> hist (per
        archive work unit) -> shuffle by object bucket -> t1h -> T2 stage, per bucket."""
        dsk, run, spec, nb = self.dsk, self.run, self.spec, self.buckets
        sel_id = key_of([p.content_hash for p in self.parts])
        sources = self.sources
        run.history_partitions = sources
        hist_id = key_of([p.content_hash for p in sources])
        names = [key_of("t1h", HISTORY_RULE, c.name, c.t1_key, sel_id, hist_id, b, nb) for b in range(nb)]
        stages = [key_of("t2h", n, [u.identity.key for u in c.t2]) if c.t2 else None for n in names]
        counts = [key_of("t0c", c.t0_key, u.key) for u in self.units]
        run.t1_names[c.name] += names
        run.count_names[c.name] += counts
        run.t2_names += [s for s in stages if s]
        if all(self.store.task_info(k) for k in names + counts + [s for s in stages if s]):
            return
        shuffle_dir = str(self.store.shuffle_dir(self.run_id, key_of(c.t1_key, sel_id, hist_id)))
        run.shuffle_dirs.append(shuffle_dir)
        pass_keys = []
        for unit, ck in zip(self.units, counts):
            t0 = self.read_t0(unit, [c])[c.name]
            # after the unit's Waiting rows (when packet channels run beside): the scheduler then takes them
            # (and the packet channels' T0) on the way to the hist tasks, and the batch read for them is
            # let go; left for later, every unit's batch waited in memory for them
            after = [task_key(ROWS, unit.key)] if task_key(ROWS, unit.key) in dsk else []
            dsk[task_key(PASS, ck)] = (tasks.pass_to_shuffle, task_key(READ, unit.key), t0, self.pk[c.name], spec, ck, shuffle_dir, nb, *after)
            pass_keys.append(task_key(PASS, ck))
        if self.segments is not None:  # no hist tasks: each bucket reads its objects' rows of the archive's history
            self.store_buckets(c, names, stages, shuffle_dir, pass_keys, packet_stages)
            return
        stocks_key = task_key(STOCKS, key_of(c.t0_key, sel_id))
        dsk[stocks_key] = (shuffle.stocks_of, pass_keys)
        hist_keys = []
        for q in self.history_units(sources):
            hk = key_of(c.t0_key, sel_id, q.key, nb)
            # a unit the run read: its histories are decoded once, here, for its packet channels' T1 too
            t1s = self.t1_of_unit.pop(q.key, [])
            dsk[task_key(HIST, hk)] = (shuffle.history_pieces, self.root, q.paths, stocks_key, shuffle_dir, hk, nb, [t0 for _, t0 in t1s], c.access)
            # the t1h tasks wait for every hist task; they get its row count, not the histories it carries to T1
            dsk[task_key(HIST_WRITTEN, hk)] = (tasks.written, task_key(HIST, hk))
            hist_keys.append(task_key(HIST_WRITTEN, hk))
            for k, _ in t1s:
                dsk[k] = (*dsk[k], task_key(HIST, hk))
        self.bucket_tasks(c, names, stages, [(tasks.run_t1_history, shuffle_dir, b, self.pk[c.name], spec, n, self.run_id, hist_keys) for b, n in enumerate(names)], packet_stages)

    def store_buckets(self, c: ChannelPlan, names: list[str], stages: list[str | None], shuffle_dir: str, pass_keys: list[str], packet_stages: list[str]) -> None:
        """A history channel's buckets on an archive whose history ingest keeps: each t1h reads its
        passing alerts from the shuffle and their objects' datapoints from the segments."""
        t1hs = [(tasks.run_t1_history, shuffle_dir, b, self.pk[c.name], self.spec, n, self.run_id, pass_keys, self.segments) for b, n in enumerate(names)]
        self.bucket_tasks(c, names, stages, t1hs, packet_stages)

    def bucket_tasks(self, c: ChannelPlan, names: list[str], stages: list[str | None], t1hs: list[tuple], packet_stages: list[str]) -> None:
        dsk, run, spec = self.dsk, self.run, self.spec
        # each bucket's stage skips the other buckets' results in its done check (their objects are others)
        bucket_stages = frozenset(s for s in stages if s)
        siblings = task_key(BUCKET_STAGES, key_of(sorted(bucket_stages)))
        if bucket_stages:
            dsk[siblings] = bucket_stages
        for n, s, t1h in zip(names, stages, t1hs):
            if s:  # one task with its T2 stage: the bucket's states (each object's whole light curve) never
                # wait in a worker's memory for a stage the scheduler may place on the other worker
                # (3 M LSST alerts: two or three buckets' states held per worker, ~0.4 GB)
                dsk[task_key(T2, s)] = (tasks.t2_stage, spec, s, self.run_id, siblings, 1, self.pk[c.name], t1h, *packet_stages)
                run.sinks.append(task_key(T2, s))
            else:
                dsk[task_key(T1H, n)] = t1h
                run.sinks.append(task_key(T1H, n))
            run.produced_by.setdefault(c.name, []).append(task_key(T2, s) if s else task_key(T1H, n))

    def history_units(self, sources: list[Partition]) -> list[WorkUnit]:
        """The work units the history join reads: the run's own units (their histories are then decoded
        once, in the hist task, for the packet channels' T1 too), and the archive's other parts grouped
        in units of up to :data:`HISTORY_UNIT_ROWS` (most of them hold no passing object and cost a read
        of five small columns: a task each was mostly its own overhead, ~5 ms, one per 25,000-alert part of
        an archive of years). Grouping the archive's parts by itself instead would put a part the run reads
        (a new night, a live micro-batch) into another unit than the run's, decoded once for T1 and again
        here. The grouping does not change what the join gives (``first_copies`` is a total order)."""
        mine = {p.path for u in self.units for p in u.parts}
        return [*self.units, *work_units([p for p in sources if p.path not in mine], max(self.batch_rows, HISTORY_UNIT_ROWS))]

    def t3(self, t3_states: dict[str, list[str]], hold: frozenset[str] = frozenset()) -> None:
        """T3 per channel and unit, after the tasks that write the channel's states and T2 results (not
        every channel's: one channel's report can be drawn while another's history join still runs); the
        channel's selection is one task, shared by its T3 units. A held channel's T3 goes to a graph of
        its own (``run.held``), run after the main one."""
        run = self.run
        computing = any(stage_of(k) in (T1, T1H, T2) for k in self.dsk)
        for c in self.plans:
            held = c.name in hold
            dsk, sinks = (run.held, run.held_sinks) if held else (self.dsk, run.sinks)
            t2_deps = [] if held else run.produced_by.get(c.name, [])
            t3_sel = sorted(set(run.t1_names[c.name]) | set(t3_states.get(c.name, [])))
            sel_key = task_key(SELECTION, key_of("sel", c.name, t3_sel, [u.identity.key for u in c.t2]))
            for i, unit in enumerate(c.t3):
                name = key_of("t3", unit.identity.key, c.name, t3_sel, [u.identity.key for u in c.t2])
                run.t3_names.append(name)
                if self.store.task_info(name) and not computing:
                    continue
                if held:
                    dsk.setdefault(self.pk[c.name], c)
                    run.held_selections[c.name] = sel_key
                if sel_key not in dsk:
                    scratch = str(self.store.shuffle_dir(self.run_id, key_of("sel", sel_key)))  # a large selection's batches
                    run.shuffle_dirs.append(scratch)
                    dsk[sel_key] = (tasks.selection_task, self.spec, self.pk[c.name], t3_sel, scratch, *t2_deps)
                dsk[task_key(T3, name)] = (tasks.run_t3, self.spec, self.pk[c.name], i, name, self.run_id, sel_key, self.root, t3_sel)
                sinks.append(task_key(T3, name))
