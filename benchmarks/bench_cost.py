"""The framework's cost (issue #20 target 1): first runs on 2 workers against 2 plain loops, alternating.

    .venv/bin/python benchmarks/bench_cost.py --alerts 3000000 --rounds 3 [--json]

One run of ``python -m benchmarks`` compares a ~2 s first run with its plain loops once, and these move
by +-25% between runs. Here each round runs, in turn, a first run on a fresh store by a warm LocalCluster
of 2 workers and 2 plain loops (``bench_floor.plain_loops``: the same unit work, no framework, each loop
in its own warmed-up process) of the same workflow, for ``workflows/ztf_archive.yml`` and for its packet
channels alone (the DECENT channel); the ratio is reported per round and as the median of the rounds.
The archive is the replicated one of ``bench_scale.py`` (one night and the objects' later alerts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.runner import RunOptions, run_workflow  # noqa: E402
from ampel_dask.graph.workflow import load_workflow  # noqa: E402
from benchmarks.bench_floor import plain_loops  # noqa: E402
from benchmarks.bench_pipeline import warm_imports  # noqa: E402
from benchmarks.bench_scale import packet_workflow_file  # noqa: E402
from benchmarks.make_archive import build  # noqa: E402

WORK = REPO / ".bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alerts", type=int, default=3_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from distributed import Client

    from ampel_dask.graph.workers import local_cluster

    archive = WORK / f"scale-archive-{args.alerts}-1n"
    build(archive, args.alerts, nights=1, survey="ztf")
    wf = load_workflow(REPO / "workflows" / "ztf_archive.yml")
    packet_path = packet_workflow_file(wf)
    jobs = {"ztf_archive.yml": (wf, REPO / "workflows" / "ztf_archive.yml"), "DECENT channel alone": (load_workflow(packet_path), packet_path)}
    rows: dict[str, list[dict]] = {name: [] for name in jobs}
    warm_imports()
    with local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(warm_imports)
        for name, (w, _) in jobs.items():  # a first run each, not counted: heaps grown, first calls done
            store = WORK / "cost-store"
            shutil.rmtree(store, ignore_errors=True)
            run_workflow(w, RunOptions(archive=str(archive), store=str(store), client=client, progress=False))
        for r in range(args.rounds):
            for name, (w, path) in jobs.items():
                store = WORK / "cost-store"
                shutil.rmtree(store, ignore_errors=True)
                t = time.perf_counter()
                s = run_workflow(w, RunOptions(archive=str(archive), store=str(store), client=client, progress=False))
                run_s = s["alerts"] / (time.perf_counter() - t)
                shutil.rmtree(store, ignore_errors=True)
                loop_s = plain_loops(path, archive, 2)["alerts_per_s"]
                rows[name].append({"round": r + 1, "run_alerts_per_s": round(run_s), "loops_alerts_per_s": loop_s, "ratio": round(run_s / loop_s, 3)})
                print(f"round {r + 1}, {name}: run {run_s:,.0f} alerts/s, 2 plain loops {loop_s:,} alerts/s, ratio {run_s / loop_s:.2f}", flush=True)
    summary = {name: statistics.median(x["ratio"] for x in v) for name, v in rows.items()}
    for name, m in summary.items():
        print(f"{name}: median ratio {m:.2f} over {args.rounds} rounds (target 1: >= 0.85)")
    if args.json:
        print(json.dumps({"alerts": args.alerts, "rounds": rows, "median_ratio": summary}))


if __name__ == "__main__":
    main()
