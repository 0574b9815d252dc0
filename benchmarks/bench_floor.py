"""A workflow's unit work as a plain loop in one process: what a run could reach with no framework.

    .venv/bin/python benchmarks/bench_floor.py --alerts 1000000 [--workflow F] [--loops 2] [--cpu] [--json]

The same batches (the graph's work units), the same units and the same state building as a run, in
order, in one Python process: read the T0 columns, run every channel's filters, decode the histories,
build packet states, join the history channels' archived datapoints (in the graph's 16 object buckets,
in memory), each T2 unit once over the distinct states of the channels that use it (with its
dependencies' results), then each channel's selection and T3 units. No Dask, no store, no provenance,
no journal, no shuffle files. It is the floor a run's time is measured against: a pipeline that takes
the floor's time spends nothing on being a framework.

``--loops 2`` runs two such loops at once (each over the whole archive, in its own process) and reports
their combined alerts/s: the most the same work can give on two cores of this host, which is less
than twice one loop when the cores share caches or a physical core.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.batches import read_partition, with_histories  # noqa: E402
from ampel_dask.graph.compile import work_units  # noqa: E402
from ampel_dask.graph.plan import ChannelPlan, plan_workflow, t2_units  # noqa: E402
from ampel_dask.graph.selection import left_join  # noqa: E402
from ampel_dask.graph.shuffle import stocks_of  # noqa: E402
from ampel_dask.graph.tasks import _dep_results, passing_alerts, run_t0  # noqa: E402
from ampel_dask.keys import bucket_of, id_values  # noqa: E402
from ampel_dask.graph.workflow import Workflow, load_workflow  # noqa: E402
from ampel_dask.io.archive import Archive  # noqa: E402
from ampel_dask.io.arrays import first_rows, order_by  # noqa: E402
from ampel_dask.graph.workers import worker_environ  # noqa: E402
from ampel_dask.tiers.base import T3Context  # noqa: E402
from ampel_dask.tiers.states import thinned_history  # noqa: E402

BUCKETS = 16  # as the graph's history join (compile_run's default)


class Clock:
    """Seconds per step, summed: wall-clock, or this process's CPU seconds with ``--cpu`` (steady on a
    host shared with other work, where wall-clock steps vary several-fold; the loop runs one thread)."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = defaultdict(float)
        self._now = time.process_time if os.environ.get("AMPEL_DASK_BENCH_CPU") else time.perf_counter
        self._t = self._now()

    def tick(self, step: str) -> None:
        now = self._now()
        self.steps[step] += now - self._t
        self._t = now


def plain_loop(wf: Workflow, plans: list[ChannelPlan], archive_root: str | Path) -> dict:
    """One pass of the workflow's unit work over the archive (see the module docstring); ``plans``:
    the workflow's channels, planned (units made, models loaded) before the clock starts."""
    arch = Archive(archive_root)
    root = str(arch.root)
    units = work_units(arch.partitions(), wf.batch_rows)
    columns = None if any(p.columns is None for p in plans) else sorted(set().union(*(p.columns for p in plans)))
    clock, t_start = Clock(), time.perf_counter()

    batches = []
    for u in units:
        table = read_partition(root, u.paths, columns)
        clock.tick("read T0 columns")
        batches.append((table, [run_t0(table, p) for p in plans]))
        clock.tick("T0 filters")
    hist_plans = [i for i, p in enumerate(plans) if p.history]
    passing = stocks_of([(t.column("stock").to_numpy()[v[i].verdict.accepted], t.column("mjd").to_numpy()[v[i].verdict.accepted])
                         for t, v in batches for i in hist_plans])  # fmt: skip

    states: dict[str, list[pa.Table]] = defaultdict(list)
    history, alerts = [], defaultdict(list)
    for table, verdicts in batches:
        full = with_histories(table)
        clock.tick("decode histories")
        for plan, v in zip(plans, verdicts):
            if not plan.history and v.verdict.accepted.any():
                states[plan.name].append(plan.t1.states(full.filter(pa.array(v.verdict.accepted)), plan.access))
        clock.tick("T1 packet states")
        if hist_plans:
            stock = table.column("stock").to_numpy()
            at = np.minimum(np.searchsorted(passing[0], stock), max(len(passing[0]) - 1, 0))
            keep = (passing[0][at] == stock) & (table.column("mjd").to_numpy() <= passing[1][at] + 1e-6) if len(passing[0]) else np.zeros(len(stock), bool)
            if keep.any():
                history.append(thinned_history(full.select(["alert_id", "stock", "mjd", "dps"]), keep))
            for i in hist_plans:
                alerts[plans[i].name].append(passing_alerts(table, verdicts[i]))
            clock.tick("history: thin the packets")
    if hist_plans and history:
        hist = _by_bucket(pa.concat_tables(history))
        for i in hist_plans:
            plan = plans[i]
            a = _by_bucket(pa.concat_tables(alerts[plan.name]))
            for b in range(BUCKETS):
                if a[b].num_rows:
                    states[plan.name].append(plan.t1.states(a[b], plan.access, hist[b]))
        clock.tick("history: join by object")

    results: dict[str, pa.Table] = {}
    computed = 0
    for unit in t2_units(plans):
        ukey = unit.identity.key
        pieces = [s for p in plans if any(u.identity.key == ukey for u in p.t2) for s in states[p.name]]
        if not pieces:
            continue
        batch = pa.concat_tables(pieces, promote_options="default")
        first = first_rows(id_values(batch.column("state_id")))
        if len(first) < batch.num_rows:  # a filter goes chunk by chunk (a take concatenates them first)
            mask = np.zeros(batch.num_rows, dtype=bool)
            mask[first] = True
            batch = batch.filter(pa.array(mask))
        deps = {d.name(): _dep_results(None, d, batch, results) for d in unit.dependencies()}
        out = unit.process(batch, deps)
        out = out if isinstance(out, pa.Table) else pa.Table.from_pylist(out)
        results[ukey] = out.append_column("state_id", batch.column("state_id"))
        computed += batch.num_rows
        clock.tick(f"T2 {unit.name()}")

    with tempfile.TemporaryDirectory() as tmp:
        for plan in plans:
            if not states[plan.name] or not plan.t3:
                continue
            sel = _selection(pa.concat_tables(states[plan.name], promote_options="default"), plan, results)
            clock.tick("T3 selection")
            for unit in plan.t3:
                out = Path(tmp) / plan.name / unit.name()
                out.mkdir(parents=True)
                unit.react(sel, T3Context(out_dir=out, run_id="floor", channel=plan.name, archive=arch))
                clock.tick(f"T3 {unit.name()}")
    seconds = time.perf_counter() - t_start
    n = sum(t.num_rows for t, _ in batches)
    return {"alerts": n, "seconds": round(seconds, 2), "alerts_per_s": round(n / seconds), "t2_computed": computed,
            "states": {p.name: sum(s.num_rows for s in states[p.name]) for p in plans},
            "steps": {k: round(v, 2) for k, v in clock.steps.items()}}  # fmt: skip


def _by_bucket(table: pa.Table) -> list[pa.Table]:
    """The rows of each object bucket (as the graph's shuffle files hold them), by one stable sort."""
    b = bucket_of(table.column("stock").to_numpy(), BUCKETS)
    order = np.argsort(b, kind="stable")
    table = table.combine_chunks().take(pa.array(order))
    bounds = np.searchsorted(b[order], np.arange(BUCKETS + 1))
    return [table.slice(bounds[k], bounds[k + 1] - bounds[k]) for k in range(BUCKETS)]


def _selection(states: pa.Table, plan: ChannelPlan, results: dict[str, pa.Table]) -> pa.Table:
    """Each object's latest state with its T2 results as columns (as the graph's selection)."""
    stock, mjd, alert = (states.column(c).to_numpy() for c in ("stock", "mjd", "alert_id"))
    order = order_by((stock, "ascending"), (mjd, "descending"), (alert, "descending"))
    sel = states.take(pa.array(order[np.r_[True, stock[order][1:] != stock[order][:-1]]]))
    for unit in plan.t2:
        res = results[unit.identity.key]
        sel = left_join(sel, res, prefix=f"{unit.name()}__")
    return sel


def _loop_in_process(wf_path: str, archive: str, ready, go, queue) -> None:
    """Plan, warm up with one loop (imports, first calls, the page cache: what a long-lived worker has
    behind it, as the pipeline benchmark warms its workers), then wait for the start and measure one.

    ``distributed`` is imported first, as in a worker: without it, Arrow's default (mimalloc) pool made
    the warm loop's T0 reads ~3x and its filters ~2.5x slower (3 M alerts: 2.5 s against 0.8 s), a
    floor 1.65x too low whenever the calling script had not imported it itself; with the system pool
    there is no difference (cause not found; benchmarks/README.md)."""
    import distributed  # noqa: F401

    wf = load_workflow(wf_path)
    plans = plan_workflow(wf)
    plain_loop(wf, plans, archive)
    ready.put(True)
    go.wait()
    queue.put(plain_loop(wf, plans, archive))


def plain_loops(wf_path: str | Path, archive: str | Path, loops: int) -> dict:
    """``loops`` plain loops started together, each in its own warmed-up process over the whole
    archive: their combined alerts/s."""
    ctx = mp.get_context("spawn")
    ready, go, queue = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_loop_in_process, args=(str(wf_path), str(archive), ready, go, queue)) for _ in range(loops)]
    saved = dict(os.environ)
    # the environment of the pipeline's workers: their allocator settings, and one thread in Arrow's and
    # BLAS's pools (distributed starts workers with OMP_NUM_THREADS=1; Arrow sizes its pool by it)
    os.environ.update({k: str(v) for k, v in worker_environ().items()})
    try:
        for p in procs:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for _ in procs:
        ready.get()
    t = time.perf_counter()
    go.set()
    runs = [queue.get() for _ in procs]
    wall = time.perf_counter() - t
    for p in procs:
        p.join()
    return {"loops": loops, "alerts": sum(r["alerts"] for r in runs), "seconds": max(r["seconds"] for r in runs),
            "alerts_per_s": round(sum(r["alerts"] for r in runs) / max(r["seconds"] for r in runs)), "wall_s": round(wall, 2), "runs": runs}  # fmt: skip


def main() -> None:
    from benchmarks.bench_pipeline import setup

    def options(ap) -> None:
        ap.add_argument("--loops", type=int, default=1)
        ap.add_argument("--cpu", action="store_true", help="steps in CPU seconds of the loop's process, not wall-clock")

    args, wf, archive, _ = setup(__doc__.split("\n")[0], "floor-store-unused", options)
    if args.cpu:
        os.environ["AMPEL_DASK_BENCH_CPU"] = "1"  # the loops' processes inherit it
    res = {"workflow": wf.name, "one_loop": plain_loops(args.workflow, archive, 1)}
    if args.loops > 1:
        res["loops"] = plain_loops(args.workflow, archive, args.loops)
    one = res["one_loop"]["runs"][0]
    print(f"{wf.name}: plain loop over {one['alerts']:,} alerts in {one['seconds']:.2f} s = {one['alerts_per_s']:,} alerts/s on one core")
    for step, s in one["steps"].items():
        print(f"  {step:32s} {s:6.2f} s")
    if "loops" in res:
        print(f"  {args.loops} loops at once: {res['loops']['alerts_per_s']:,} alerts/s together")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
