"""Two versions of the code side by side: a workflow's first runs, alternating between checkouts.

    .venv/bin/python benchmarks/bench_versions.py --repo . --repo /tmp/old-worktree [--alerts 3000000] [--rounds 2] [--runs 3] [--workflow F]

Each round starts, for each checkout in turn, a process that imports that checkout's ``ampel_dask``,
starts a 2-worker LocalCluster (workers warmed as in ``bench_pipeline``), and times one cold and
``--runs`` warm first runs (an empty store each) of the workflow on the replicated archive of
``bench_scale.py`` (``.bench/scale-archive-<alerts>-1n``, built if missing). The host's speed drifts
within minutes; alternating checkouts puts both under the same drift. Default workflow: the packet
channels of ``workflows/ztf_archive.yml`` (the DECENT channel alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".bench"


def _one(repo: str, workflow: str, archive: str, runs: int) -> None:
    """In a process importing ``repo``'s code: one cold and ``runs`` warm runs; prints JSON."""
    import shutil
    import time

    sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = repo  # the workers import the same checkout
    import ampel_dask
    from distributed import Client

    from ampel_dask.graph.runner import RunOptions, run_workflow
    from ampel_dask.graph.workers import local_cluster
    from ampel_dask.graph.workflow import load_workflow
    from benchmarks.bench_pipeline import warm_imports

    assert ampel_dask.__file__.startswith(repo), ampel_dask.__file__
    wf = load_workflow(workflow)
    warm_imports()
    os.chdir(repo)
    store = WORK / "versions-store"
    out = []
    with local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(warm_imports)
        for _ in range(runs + 1):
            shutil.rmtree(store, ignore_errors=True)
            t = time.perf_counter()
            run_workflow(wf, RunOptions(archive=archive, store=str(store), client=client, progress=False))
            out.append(round(time.perf_counter() - t, 2))
    shutil.rmtree(store, ignore_errors=True)
    print(json.dumps({"repo": repo, "cold_s": out[0], "warm_s": out[1:]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", action="append", default=[], help="a checkout (give two or more)")
    ap.add_argument("--alerts", type=int, default=3_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workflow", default=None)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: repo workflow archive
    args = ap.parse_args()
    if args.one:
        _one(*args.one, args.runs)
        return
    if not args.repo:
        ap.error("give the checkouts to compare with --repo (two or more)")
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_scale import decent_job

    archive, workflow = decent_job(args.alerts, args.workflow, exclude_defaults=True)  # an older checkout may not know newer fields
    for r in range(args.rounds):
        for repo in args.repo:
            repo = str(Path(repo).resolve())
            proc = subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--one", repo, str(Path(workflow).resolve()), str(archive)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})  # fmt: skip
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}, {repo}: cold {res['cold_s']} s, warm {res['warm_s']} s", flush=True)


if __name__ == "__main__":
    main()
