"""Where a run's time goes on the cluster: Dask's task stream of warm first runs, per kind of task.

    .venv/bin/python benchmarks/bench_task_stream.py [--alerts 3000000] [--workflow F] [--runs 2]

A 2-worker LocalCluster (workers warmed as in ``bench_pipeline``) runs the workflow once untimed, then
``--runs`` first runs (an empty store each) inside ``distributed.get_task_stream``. Per run: wall
seconds; the driver's time before the first task and after the last; the seconds the workers spent in
tasks (busy core-seconds, against 2 x the tasks' span); and per kind of task (the key's prefix: read,
t0, t1, t2, sel, t3, ...) the count, the summed compute seconds and when the first started and the
last ended. Default workflow: the packet channels of ``workflows/ztf_archive.yml`` (the DECENT channel
alone) on the replicated archive of ``bench_scale.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / ".bench"


def summary(records: list[dict], t0: float, t1: float) -> str:
    """The lines printed for one run's task stream (``t0``, ``t1``: the run's start and end)."""
    computes = [s for r in records for s in r["startstops"] if s["action"] == "compute"]
    first, last = min(s["start"] for s in computes), max(s["stop"] for s in computes)
    kinds: dict[str, list] = defaultdict(lambda: [0, 0.0, float("inf"), 0.0])
    for r in records:
        key = r["key"] if isinstance(r["key"], str) else str(r["key"][0])
        for s in r["startstops"]:
            k = kinds[f"{key.split('-')[0]} {s['action']}"]
            k[0] += 1
            k[1] += s["stop"] - s["start"]
            k[2], k[3] = min(k[2], s["start"]), max(k[3], s["stop"])
    busy = sum(s["stop"] - s["start"] for s in computes)
    lines = [f"run {t1 - t0:.2f} s: before the first task {first - t0:.2f} s, tasks' span {last - first:.2f} s, after the last "
             f"{t1 - last:.2f} s; busy {busy:.2f} core-s of {2 * (last - first):.2f}"]  # fmt: skip
    for name, (n, secs, a, b) in sorted(kinds.items(), key=lambda x: x[1][2]):
        lines.append(f"  {name:18s} n={n:4d}  {secs:6.2f} s  from {a - t0:6.2f} to {b - t0:6.2f} s")
    return "\n".join(lines)


def main() -> None:
    from distributed import Client, get_task_stream

    from ampel_dask.graph.runner import RunOptions, run_workflow
    from ampel_dask.graph.workers import local_cluster
    from ampel_dask.graph.workflow import load_workflow
    from benchmarks.bench_pipeline import warm_imports
    from benchmarks.bench_scale import decent_job

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alerts", type=int, default=3_000_000)
    ap.add_argument("--workflow", default=None)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    archive, workflow = decent_job(args.alerts, args.workflow)
    wf = load_workflow(workflow)
    store = WORK / "task-stream-store"
    warm_imports()
    with local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(warm_imports)
        for i in range(args.runs + 1):
            shutil.rmtree(store, ignore_errors=True)
            with get_task_stream(client) as ts:
                t0 = time.time()
                run_workflow(wf, RunOptions(archive=str(archive), store=str(store), client=client, progress=False))
                t1 = time.time()
            if i:
                print(summary(ts.data, t0, t1), flush=True)
    shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
