"""A run's tasks and the plain loop in one process: what the framework's own work costs, without a cluster.

    env MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=67108864 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/bench_inprocess.py [--alerts 3000000] [--workflow F] [--rounds 2]

The compiled graph of a first run is executed serially in this process (``dask.get``, an empty store
each time), with user and system CPU seconds per kind of task (``getrusage``), and the plain loop of
``bench_floor`` runs in the same process after it: the same code on the same heap, one after the
other, ``--rounds`` times after one warm-up of each. The environment above is the workers' (allocator
settings, one Arrow and BLAS thread: ``graph.workers.worker_environ``). The archive is the replicated
one of ``bench_scale.py``; the default workflow the packet channels of ``workflows/ztf_archive.yml``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / ".bench"


def _usage() -> tuple[float, float, int, float]:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime, u.ru_minflt, time.perf_counter()


def main() -> None:
    import distributed  # noqa: F401  (as in a worker: see bench_floor._loop_in_process)
    import dask

    from ampel_dask.graph.compile import compile_run
    from ampel_dask.graph.plan import plan_workflow
    from ampel_dask.graph.workflow import load_workflow
    from ampel_dask.io.archive import Archive
    from ampel_dask.io.stores import open_store
    from benchmarks.bench_floor import plain_loop
    from benchmarks.bench_scale import decent_job

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alerts", type=int, default=3_000_000)
    ap.add_argument("--workflow", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    archive, args.workflow = decent_job(args.alerts, args.workflow)
    wf = load_workflow(args.workflow)
    plans = plan_workflow(wf)
    arch = Archive(archive)
    tasks: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def timed(kind: str, fn):
        def call(*a, **kw):
            u0 = _usage()
            out = fn(*a, **kw)
            u1 = _usage()
            tasks[kind][0] += u1[0] - u0[0]
            tasks[kind][1] += u1[1] - u0[1]
            return out

        return call

    def graph(run_id: str) -> None:
        store_path = WORK / "inprocess-store"
        shutil.rmtree(store_path, ignore_errors=True)
        store = open_store(wf.store.resolve(str(store_path)))
        store.check_format(create=True)
        run = compile_run(plans, arch, arch.partitions(), store, run_id, wf.buckets_for(args.alerts), wf.batch_rows,
                          kept_buckets=wf.buckets_for(args.alerts, kept=True), stage_rows=wf.stage_rows)  # fmt: skip
        dsk = {k: (timed(k.split("-")[0], v[0]), *v[1:]) if isinstance(v, tuple) and callable(v[0]) else v for k, v in run.graph.items()}
        tasks.clear()
        u0 = _usage()
        dask.get(dsk, run.sinks)
        u1 = _usage()
        shutil.rmtree(store_path, ignore_errors=True)
        per = ", ".join(f"{k} {v[0]:.2f}+{v[1]:.2f}" for k, v in sorted(tasks.items(), key=lambda kv: -sum(kv[1])))
        print(f"  graph, serially: {u1[3] - u0[3]:.2f} s (user {u1[0] - u0[0]:.2f}, sys {u1[1] - u0[1]:.2f}, minor faults {u1[2] - u0[2]:,}); user+sys per task kind: {per}")

    def loop() -> None:
        u0 = _usage()
        res = plain_loop(wf, plans, arch.root)
        u1 = _usage()
        print(f"  plain loop:      {u1[3] - u0[3]:.2f} s (user {u1[0] - u0[0]:.2f}, sys {u1[1] - u0[1]:.2f}, minor faults {u1[2] - u0[2]:,}); steps: {res['steps']}")

    print(f"{wf.name} on {args.alerts:,} alerts, one process; warm-up:")
    graph("warm")
    loop()
    for r in range(args.rounds):
        print(f"round {r + 1}:")
        graph(f"r{r}")
        loop()


if __name__ == "__main__":
    main()
