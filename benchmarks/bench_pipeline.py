"""Pipeline throughput of workflows/ztf_archive.yml on an archive of >= 1 M replicated real ZTF alerts.

    .venv/bin/python benchmarks/bench_pipeline.py --alerts 1000000 --workers 2 [--json]

First run (everything computed) and re-run (nothing to compute) on one LocalCluster, the number of graph
tasks, and the peak resident memory of each worker process (sampled every 50 ms with psutil). The
archive is made by benchmarks/make_archive.py (cached under .bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.runner import RunOptions, run_workflow  # noqa: E402
from ampel_dask.graph.workflow import Workflow, load_workflow  # noqa: E402
from benchmarks.make_archive import build  # noqa: E402

WORK = REPO / ".bench"
LSST_RATE = 10_000_000 / 32_000  # ~10 M alerts in a ~9 h night: ~312 alerts/s on average (as in python -m benchmarks)


class PeakMemory:
    """Peak RSS of each worker process of a LocalCluster, sampled in a thread."""

    def __init__(self, cluster):
        import psutil

        self.procs = [psutil.Process(w.process.process.pid) for w in cluster.workers.values()]
        self.peak = {p.pid: 0 for p in self.procs}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except Exception:
                    pass
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# what a long-lived worker (SLURM job, live mode) has imported after its first batch: ampel-dask's units,
# sklearn (the classifier; 1.5 s), matplotlib (the report), light-curve
WARM_MODULES = ("ampel_dask.tiers.units.t0_filters", "ampel_dask.tiers.units.t2_classifier", "sklearn.pipeline",
                "sklearn.ensemble", "matplotlib.figure", "matplotlib.backends.backend_agg", "light_curve", "astropy.coordinates")


def warm_imports() -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)


def run_once(wf, archive: Path, store: Path, workers: int) -> dict:
    from distributed import Client

    from ampel_dask.graph.workers import local_cluster

    warm_imports()  # the driver plans the workflow (imports its units' modules): once in its life, too
    with local_cluster(workers, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(warm_imports)  # a worker imports its libraries once in its life: not the pipeline's cost
        out = {}
        # "warm": another first run, on a fresh store, by processes that ran the workflow before (heaps
        # grown, lazy imports and first calls done): what the plain loop is measured as (bench_floor.py
        # warms its processes with one loop), and what a long-lived cluster (live mode, notebooks) does
        for label, where in (("first", store), ("rerun", store), ("warm", store.with_name(store.name + "-warm"))):
            if label == "warm":
                shutil.rmtree(where, ignore_errors=True)
            with PeakMemory(cluster) as mem:
                t = time.perf_counter()
                s = run_workflow(wf, RunOptions(archive=str(archive), store=str(where), client=client, progress=False))
                dt = time.perf_counter() - t
            if label == "warm":
                shutil.rmtree(where, ignore_errors=True)
            out[label] = {
                "seconds": round(dt, 2),
                "alerts": s["alerts"],
                "alerts_per_s": round(s["alerts"] / dt),
                "tasks": s["tasks"],
                "t2": s["t2"],
                "channels": s["channels"],
                "peak_worker_rss_mb": round(max(mem.peak.values()) / 2**20),
            }
        return out


def setup(description: str, store_name: str, extra=None) -> tuple[argparse.Namespace, Workflow, Path, Path]:
    """The command line shared by the pipeline benchmarks: the archive (built once, cached), an empty
    store, the workflow (``extra``: adds a script's own options to the parser)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--alerts", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workflow", default=str(REPO / "workflows" / "ztf_archive.yml"))
    ap.add_argument("--json", action="store_true")
    if extra:
        extra(ap)
    args = ap.parse_args()
    os.chdir(REPO)  # the workflow's model path is relative to the repository
    archive = build(WORK / f"pipeline-archive-{args.alerts}", args.alerts)
    store = WORK / store_name
    shutil.rmtree(store, ignore_errors=True)
    return args, load_workflow(args.workflow), archive, store


def main() -> None:
    args, wf, archive, store = setup(__doc__.split("\n")[0], "pipeline-store")
    res = run_once(wf, archive, store, args.workers)
    first, rerun = res["first"], res["rerun"]
    print(f"{wf.name} on {first['alerts']:,} replicated real ZTF alerts, {args.workers} workers")
    print(f"  first run: {first['seconds']:.1f} s, {first['alerts_per_s']:,} alerts/s = {first['alerts_per_s'] / LSST_RATE:,.0f}x the LSST average rate, "
          f"{first['tasks']} tasks, T2 computed {first['t2']['computed']}, peak worker RSS {first['peak_worker_rss_mb']} MB")
    warm = res["warm"]
    print(f"  first run by warm processes: {warm['seconds']:.1f} s, {warm['alerts_per_s']:,} alerts/s")
    print(f"  re-run:    {rerun['seconds']:.2f} s, {rerun['alerts_per_s']:,} alerts/s ({first['seconds'] / rerun['seconds']:.0f}x faster), "
          f"{rerun['tasks']} tasks, T2 computed {rerun['t2']['computed']}")
    if args.json:
        print(json.dumps({"workflow": wf.name, "workers": args.workers, **res}))


if __name__ == "__main__":
    main()
