"""Where a workflow run's time goes: busy core-seconds and time span per kind of graph task.

    .venv/bin/python benchmarks/bench_phases.py --alerts 1000000 --workers 2 [--workflow F] [--json]

One first run on a LocalCluster (workers warmed as in bench_pipeline.py), recorded with Dask's task
stream; task keys start with their kind (read, t0, t1, pass, hist, t1h, t2, t3, ...). Busy seconds are
summed over workers, so with 2 workers a phase can be busy for up to twice its span.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.runner import RunOptions, run_workflow  # noqa: E402
from benchmarks.bench_pipeline import setup, warm_imports  # noqa: E402


def phases(task_stream: list[dict], t0: float) -> dict[str, dict]:
    """Per task kind: number of tasks, busy seconds (summed over workers), first start, last end."""
    out: dict[str, dict] = defaultdict(lambda: {"tasks": 0, "busy_s": 0.0, "start_s": float("inf"), "end_s": 0.0})
    for rec in task_stream:
        key = rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"]
        p = out[str(key).split("-")[0]]
        p["tasks"] += 1
        for ss in rec["startstops"]:
            if ss["action"] == "compute":
                p["busy_s"] += ss["stop"] - ss["start"]
                p["start_s"] = min(p["start_s"], ss["start"] - t0)
                p["end_s"] = max(p["end_s"], ss["stop"] - t0)
    return {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in sorted(out.items(), key=lambda kv: kv[1]["start_s"]) if v["busy_s"] > 0}


def main() -> None:
    from distributed import Client, get_task_stream

    from ampel_dask.graph.workers import local_cluster

    args, wf, archive, store = setup(__doc__.split("\n")[0], "phases-store")
    with local_cluster(args.workers, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(warm_imports)
        with get_task_stream(client) as ts:
            t0 = time.time()
            summary = run_workflow(wf, RunOptions(archive=str(archive), store=str(store), client=client, progress=False))
            wall = time.time() - t0
        res = {"workflow": wf.name, "workers": args.workers, "alerts": summary["alerts"], "seconds": round(wall, 2),
               "alerts_per_s": round(summary["alerts"] / wall), "phases": phases(ts.data, t0)}  # fmt: skip
    shutil.rmtree(store, ignore_errors=True)
    print(f"{wf.name}: {res['alerts']:,} alerts in {wall:.2f} s ({res['alerts_per_s']:,} alerts/s), {args.workers} workers")
    print(f"  {'task kind':10s} {'tasks':>6s} {'busy s':>8s} {'from s':>7s} {'to s':>7s}")
    for kind, p in res["phases"].items():
        print(f"  {kind:10s} {p['tasks']:6d} {p['busy_s']:8.2f} {p['start_s']:7.2f} {p['end_s']:7.2f}")
    total = sum(p["busy_s"] for p in res["phases"].values())
    print(f"  busy {total:.2f} core-s of {wall * args.workers:.2f} available")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
