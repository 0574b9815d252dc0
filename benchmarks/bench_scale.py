"""A night at LSST design scale: 1 M, 3 M and 10 M replicated real alerts (ZTF or Rubin/LSST) through the same jobs.

    .venv/bin/python benchmarks/bench_scale.py --sizes 1000000 3000000 10000000 [--survey ztf|lsst] [--workers 2] [--nights 1] [--kept-history] [--tasks] [--json]

For each size, an archive of replicated real alerts (benchmarks/make_archive.py: new alert, object and
datapoint ids per replica, jittered photometry; ``--nights 1``: every replica's objects start on the
same night, so the run's alerts are one night and the objects' later alerts) and, on a fresh LocalCluster
(libraries imported in driver and workers, as bench_pipeline.py does), one first run on an empty store
of each job: the workflow's packet channels alone (ztf_archive.yml: the DecentFilter channel) and the
whole workflow. ``--survey ztf`` (default): real ZTF alerts through workflows/ztf_archive.yml;
``--survey lsst``: the real Rubin alerts (Fink v7.4, v9.0, LSSTCam v10) and ELAsTiCC 0.9 through
workflows/lsst_elasticc.yml, whose one channel reads the archived history: no packet-only job, only the
whole workflow. Reports seconds, microseconds per alert (linear time: the same at every
size), the peak RSS of each worker (sampled every 50 ms), and archive and store bytes per million alerts.
Issue #20 target 4 asks: per-alert time at 10 M within 10% of 1 M, worker RSS flat and < 1.5 GB, the
DECENT-type job < 60 s and the whole workflow < 3 min for 10 M alerts on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.runner import RunOptions, run_workflow  # noqa: E402
from ampel_dask.graph.workflow import Workflow, load_workflow  # noqa: E402
from benchmarks.bench_pipeline import PeakMemory, warm_imports  # noqa: E402
from benchmarks.make_archive import build  # noqa: E402

WORK = REPO / ".bench"
WORKFLOWS = {"ztf": REPO / "workflows" / "ztf_archive.yml", "lsst": REPO / "workflows" / "lsst_elasticc.yml"}


def tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root``, without a kept history (``survey=*/_history``, reported apart)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.parent.name != "_history")


def packet_only(wf: Workflow) -> Workflow | None:
    """The workflow without its history channels (ztf_archive.yml: the DECENT channel alone); None when
    every channel reads the archived history (lsst_elasticc.yml)."""
    keep = [c for c in wf.channels if (c.t1.config or {}).get("history", "packet") != "archive"]
    return wf.model_copy(update={"name": f"{wf.name}-packet-channels", "channels": keep}) if keep else None


def packet_workflow_file(wf: Workflow, exclude_defaults: bool = False) -> Path:
    """``packet_only(wf)`` written under ``.bench`` for processes that load it by path
    (``exclude_defaults``: fields at their defaults left out, so that an older checkout reads it)."""
    import yaml

    packets = packet_only(wf)
    path = WORK / f"{packets.name}{'-lean' if exclude_defaults else ''}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(packets.model_dump(mode="json", by_alias=True, exclude_defaults=exclude_defaults), sort_keys=False))
    return path


def decent_job(alerts: int, workflow: str | None = None, exclude_defaults: bool = False) -> tuple[Path, str]:
    """The replicated one-night ZTF archive of ``alerts`` alerts (built if missing), and ``workflow`` or,
    by default, the DECENT channel alone (:func:`packet_workflow_file` of ``ztf_archive.yml``)."""
    archive = build(WORK / f"scale-archive-{alerts}-1n", alerts, nights=1, survey="ztf")
    return archive, workflow or str(packet_workflow_file(load_workflow(WORKFLOWS["ztf"]), exclude_defaults))


def task_seconds(stream: list[dict]) -> dict[str, list]:
    """Dask's task stream summed by kind of task (the key's first word: ``t2`` a bucket's T1 + T2,
    ``sel`` a T3 selection, ``_scatter_t2`` a step it spread over the cluster, ...): [tasks, compute
    seconds over all workers], largest first. Where a size's extra time per alert goes."""
    out: dict[str, list] = {}
    for d in stream:
        key = d["key"] if isinstance(d["key"], str) else d["key"][0]
        mine = out.setdefault(key.split("-")[0], [0, 0.0])
        mine[0] += 1
        mine[1] += sum(s["stop"] - s["start"] for s in d["startstops"] if s["action"] == "compute")
    return {k: [n, round(t, 2)] for k, (n, t) in sorted(out.items(), key=lambda kv: -kv[1][1])}


def run_jobs(jobs: list[Workflow], archive: Path, workers: int, kept: dict | None = None, tasks: bool = False) -> list[dict]:
    """Each job on one LocalCluster; ``kept``: first keep the archive's object-bucketed history (what
    ``ampel-dask ingest`` does; make_archive.py writes Parquet directly) on a cluster of its own, as an
    ingest would (the workers' heaps after building it are not the run's), its seconds and MB put there.
    ``tasks``: each run's :func:`task_seconds` too."""
    from contextlib import nullcontext

    from distributed import Client, get_task_stream

    from ampel_dask.graph.history import update_history
    from ampel_dask.io import history as hs
    from ampel_dask.io.archive import Archive

    from ampel_dask.graph.workers import local_cluster

    if kept is not None:
        with local_cluster(workers, dashboard_address=None) as cluster, Client(cluster) as client:
            t = time.perf_counter()
            kept.update(update_history(Archive(archive), client), wall_seconds=round(time.perf_counter() - t, 2))
        live = [Path(p) for s in archive.glob("survey=*") for p in hs.segment_paths(archive, s.name.removeprefix("survey="))]
        kept.update(segments_live=len(live), mb_live=round(sum(p.stat().st_size for p in live) / 2**20))
    warm_imports()  # the driver plans the workflow: its unit modules are imported once in its life
    out = []
    with local_cluster(workers, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(warm_imports)
        for wf in jobs:
            store = WORK / "scale-store"
            shutil.rmtree(store, ignore_errors=True)
            with PeakMemory(cluster) as mem, (get_task_stream(client) if tasks else nullcontext()) as stream:
                t = time.perf_counter()
                s = run_workflow(wf, RunOptions(archive=str(archive), store=str(store), client=client, progress=False))
                dt = time.perf_counter() - t
            out.append({"workflow": wf.name, "alerts": s["alerts"], "seconds": round(dt, 2), "alerts_per_s": round(s["alerts"] / dt),
                        "us_per_alert": round(dt / s["alerts"] * 1e6 * workers, 3), "tasks": s["tasks"], "t2_computed": s["t2"]["computed"],
                        "peak_worker_rss_mb": sorted(round(v / 2**20) for v in mem.peak.values()),
                        "store_mb_per_million": round(tree_bytes(store) / 2**20 / (s["alerts"] / 1e6), 1)})  # fmt: skip
            if tasks:
                out[-1]["task_seconds"] = task_seconds(stream.data)
            shutil.rmtree(store, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--nights", type=int, default=1)
    ap.add_argument("--survey", choices=sorted(WORKFLOWS), default="ztf", help="whose real alerts are replicated")
    ap.add_argument("--workflow", help="default: workflows/ztf_archive.yml (ztf), workflows/lsst_elasticc.yml (lsst)")
    ap.add_argument("--keep", action="store_true", help="keep the archives under .bench/ (4.6 GB for 10 M alerts)")
    ap.add_argument("--kept-history", action="store_true", help="keep the archives' object-bucketed history first (as ingest does): history channels read it instead of shuffling")
    ap.add_argument("--tasks", action="store_true", help="also the compute seconds of each kind of task, summed over the workers (Dask's task stream)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.chdir(REPO)  # the workflow's model path is relative to the repository
    wf = load_workflow(args.workflow or WORKFLOWS[args.survey])
    packets = packet_only(wf)
    if packets is None:
        print(f"{wf.name}: every channel reads the archived history, so no packet-only job: the whole workflow only", flush=True)
    jobs = [packets, wf] if packets is not None else [wf]
    results = []
    for n in args.sizes:
        name = f"scale-archive-{n}-{args.nights}n" if args.survey == "ztf" else f"scale-archive-{args.survey}-{n}-{args.nights}n"
        target = WORK / name
        t = time.perf_counter()
        build(target, n, nights=args.nights, survey=args.survey)
        built = time.perf_counter() - t
        arch_mb = tree_bytes(target) / 2**20
        parts = json.loads((target / "_bench.json").read_text())["partitions"]
        print(f"{n:,} {args.survey} alerts: archive {arch_mb / (n / 1e6):,.0f} MB per million alerts, {parts} parts (made or found in {built:.0f} s)", flush=True)
        kept = {} if args.kept_history else None
        for r in run_jobs(jobs, target, args.workers, kept, args.tasks):
            r["archive_mb_per_million"] = round(arch_mb / (n / 1e6), 1)
            if kept is not None:
                r["kept_history"] = kept
                print(f"  history kept: {kept}", flush=True)
            results.append(r)
            print(f"  {r['workflow']}: {r['seconds']:.1f} s, {r['alerts_per_s']:,} alerts/s, {r['us_per_alert']:.2f} core-us per alert, "
                  f"peak worker RSS {r['peak_worker_rss_mb']} MB, store {r['store_mb_per_million']} MB per million alerts", flush=True)
            if "task_seconds" in r:
                print("    task seconds: " + ", ".join(f"{k} {t} ({n})" for k, (n, t) in r["task_seconds"].items()), flush=True)
        if not args.keep and n >= 3_000_000:
            shutil.rmtree(target, ignore_errors=True)
    base = {r["workflow"]: r for r in results if r["alerts"] == min(args.sizes)}
    print("per-alert time against the smallest size:")
    for r in results:
        print(f"  {r['workflow']} {r['alerts']:,}: {r['us_per_alert'] / base[r['workflow']]['us_per_alert']:.2f}x")
    if args.json:
        print(json.dumps({"survey": args.survey, "workers": args.workers, "nights": args.nights, "runs": results}))


if __name__ == "__main__":
    main()
