"""What a history channel costs, and how it grows with an archive of other objects (issue #20 target 3).

    .venv/bin/python benchmarks/bench_history.py --alerts 300000 --other-nights 10 [--repeat 2] [--json]

Archives of replicated real ZTF alerts (benchmarks/make_archive.py):

* A: ``--alerts`` alerts whose objects start on one night (their later alerts on the nights after);
* B: A's parts plus ``--other-nights`` nights of as many alerts each of other objects (other replicas:
  new object, alert and datapoint ids), indexed together (hard links, no copy).

Runs, each a first run on an empty store, on one LocalCluster warmed by a run first, best of
``--repeat``: the DecentFilter channel of workflows/ztf_archive.yml (its filters and T2 units) over the
first night only, with ``history: packet`` (states from the alert packets) and ``history: archive``
(states from every archived datapoint of the objects: the history join), on A and on B. The history
join runs twice: from the object-bucketed history ingest keeps (``archive``; built here for A and B,
as ``ampel-dask ingest`` would have, timed) and with the run's own shuffle (``archive-shuffle``: the
history's manifests moved aside, as on an archive without one). Target 3 asks
for a history run on B within 10% of the same run on A, and a history channel <= 2x the packet channel
on the same selection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.history import update_history  # noqa: E402
from ampel_dask.graph.runner import RunOptions, run_workflow  # noqa: E402
from ampel_dask.graph.workflow import Workflow, load_workflow  # noqa: E402
from ampel_dask.io.archive import Archive  # noqa: E402
from ampel_dask.io.layout import night_of  # noqa: E402
from benchmarks.bench_pipeline import warm_imports  # noqa: E402
from benchmarks.make_archive import NIGHT0, build  # noqa: E402

WORK = REPO / ".bench"


def combined(a: Path, c: Path, target: Path) -> Path:
    """An archive holding the parts of ``a`` and ``c`` (hard links; one index)."""
    if (target / "_index.parquet").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    parts = []
    for src in (a, c):
        arch = Archive(src)
        for p in arch.partitions():
            for rel in p.files:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(src / rel, target / rel)
            parts.append(p)
    out = Archive(target)
    out.create()
    out.add_partitions(parts)
    return target


@contextmanager
def without_history(archive: Path):
    """The archive as one without an object-bucketed history (its manifests moved aside meanwhile)."""
    moved = [(m, m.with_name("_manifest.aside")) for m in archive.glob("survey=*/_history/_manifest.json")]
    for m, aside in moved:
        m.rename(aside)
    try:
        yield
    finally:
        for m, aside in moved:
            aside.rename(m)


def variants(wf: Workflow, night: int) -> dict[str, Workflow]:
    """The DECENT channel alone over one night, with its states from the packets or the archive."""
    decent = next(c for c in wf.channels if c.name == "DECENT")
    out = {}
    for history in ("packet", "archive"):
        t1 = decent.t1.model_copy(update={"config": {**(decent.t1.config or {}), "history": history}})
        ch = decent.model_copy(update={"t1": t1, "t3": []})
        arch = wf.archive.model_copy(update={"nights": [night]})
        out[history] = wf.model_copy(update={"name": f"decent-{history}", "channels": [ch], "archive": arch})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alerts", type=int, default=300_000)
    ap.add_argument("--other-nights", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.chdir(REPO)
    n, m = args.alerts, args.other_nights
    a = build(WORK / f"hist-a-{n}", n, nights=1)
    # other objects: replicas numbered after A's (A uses fewer than 10,000), starting on the nights after A's first
    c = build(WORK / f"hist-c-{n}-{m}", n * m, nights=m, first_replica=10_000, night0=NIGHT0 + 1)
    b = combined(a, c, WORK / f"hist-b-{n}-{m}")
    night = int(night_of([NIGHT0 + 0.5], "ztf")[0])
    jobs = variants(load_workflow(REPO / "workflows" / "ztf_archive.yml"), night)

    from distributed import Client

    from ampel_dask.graph.workers import local_cluster

    warm_imports()
    results = []
    with local_cluster(args.workers, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(warm_imports)
        store = WORK / "hist-store"

        def once(wf: Workflow, archive: Path) -> tuple[float, dict]:
            shutil.rmtree(store, ignore_errors=True)
            t = time.perf_counter()
            s = run_workflow(wf, RunOptions(archive=str(archive), store=str(store), client=client, progress=False))
            return time.perf_counter() - t, s

        built = {}
        for label, archive in (("A", a), ("B", b)):
            t = time.perf_counter()
            done = update_history(Archive(archive), client)
            built[label] = {**done, "wall_seconds": round(time.perf_counter() - t, 3),
                            "mb": round(sum(f.stat().st_size for f in archive.glob("survey=*/_history/seg-*.arrow")) / 1e6, 1)}
            print(f"history of {label} kept: {built[label]}", flush=True)
        once(jobs["archive"], a)  # warm: heaps, first calls (the plain loop is measured warm too)
        jobs["archive-shuffle"] = jobs["archive"]
        for label, archive in (("A", a), ("B", b)):
            for history, wf in jobs.items():
                aside = without_history(archive) if history == "archive-shuffle" else nullcontext()
                with aside:
                    runs = [once(wf, archive) for _ in range(args.repeat)]
                dt, s = min(runs, key=lambda r: r[0])
                ch = s["channels"]["DECENT"]
                results.append({"archive": label, "archive_alerts": sum(p.rows for p in Archive(archive).partitions()), "history": history,
                                "seconds": round(dt, 3), "all_seconds": [round(r[0], 3) for r in runs], "alerts": s["alerts"],
                                "passed": ch["passed"], "t2_computed": s["t2"]["computed"], "tasks": s["tasks"]})  # fmt: skip
                r = results[-1]
                print(f"archive {label} ({r['archive_alerts']:,} alerts), night {night}, history: {history}: {r['seconds']:.2f} s "
                      f"(runs {r['all_seconds']}), {r['alerts']:,} alerts, {r['passed']:,} passed, {r['tasks']} tasks", flush=True)  # fmt: skip
        shutil.rmtree(store, ignore_errors=True)
    by = {(r["archive"], r["history"]): r["seconds"] for r in results}
    print(f"history run on B / on A: {by[('B', 'archive')] / by[('A', 'archive')]:.2f} (target < 1.10)")
    print(f"history channel / packet channel, same selection, on A: {by[('A', 'archive')] / by[('A', 'packet')]:.2f}, "
          f"on B: {by[('B', 'archive')] / by[('B', 'packet')]:.2f} (target <= 2)")
    print(f"with the run's own shuffle instead: B / A {by[('B', 'archive-shuffle')] / by[('A', 'archive-shuffle')]:.2f}, "
          f"history / packet on B {by[('B', 'archive-shuffle')] / by[('B', 'packet')]:.2f}")
    if args.json:
        print(json.dumps({"alerts": n, "other_nights": m, "night": night, "history_kept": built, "runs": results}))


if __name__ == "__main__":
    main()
