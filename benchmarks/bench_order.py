"""Does the archive's shape depend on input order? Parts and run speed before and after compaction.

    .venv/bin/python benchmarks/bench_order.py --alerts 200000 --workers 2 [--json]

Input: replicated real ZTF alerts (benchmarks/replicate.py) as per-alert Avro files in one folder, in
replica order, so that the stream cycles over the real alerts' nights (a folder of per-alert files from
many nights, a replayed stream). It is ingested without compaction (what the code before compaction
gave), compacted (``ampel-dask compact``), and the DecentFilter job (benchmarks/ampel_job.yml) is run on
the archive before and after. The same files hard-linked into one folder per night (the order of a
nightly tarball) are ingested with and without compaction, for what compaction costs an ingest that
comes in night order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.compact import compact  # noqa: E402
from ampel_dask.graph.ingest import IngestOptions, ingest  # noqa: E402
from ampel_dask.graph.workflow import load_workflow  # noqa: E402
from ampel_dask.io.archive import Archive  # noqa: E402
from ampel_dask.io.compact import CompactOptions  # noqa: E402
from ampel_dask.io.layout import night_of  # noqa: E402
from benchmarks.bench_pipeline import run_once  # noqa: E402
from benchmarks.replicate import base_packets, replicas  # noqa: E402

WORK = REPO / ".bench"


def build_mixed(target: Path, n: int) -> tuple[Path, Path]:
    """n per-alert files in replica order (``mixed/``), and the same files by night (``by_night/``)."""
    import numpy as np

    marker = target / "_order.json"
    mixed, by_night = target / "mixed", target / "by_night"
    if marker.exists() and json.loads(marker.read_text()).get("alerts") == n:
        return mixed, by_night
    shutil.rmtree(target, ignore_errors=True)
    mixed.mkdir(parents=True)
    by_night.mkdir()
    for i, (candid, jd, data) in enumerate(replicas(base_packets(), n)):
        f = mixed / f"{i:07d}-{candid}.avro"
        f.write_bytes(data)
        night = by_night / f"night_{int(night_of(np.array([jd - 2400000.5]), 'ztf')[0])}"
        night.mkdir(exist_ok=True)
        os.link(f, night / f.name)
    marker.write_text(json.dumps({"alerts": n}))
    return mixed, by_night


def shape(root: Path) -> dict:
    parts = Archive(root).partitions()
    rows = [p.rows for p in parts]
    return {"parts": len(parts), "nights": len({(p.survey, p.night) for p in parts}), "median_rows": statistics.median(rows), "max_rows": max(rows)}


def ingest_into(src: Path, root: Path, workers: int, compact_rows: int) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    r = ingest([str(src)], root, IngestOptions(workers=workers, progress=False, compact_rows=compact_rows))
    dt = time.perf_counter() - t
    assert r.quarantined == 0 and r.duplicates == 0, r.summary()
    return {"seconds": round(dt, 2), "alerts_per_s": round(r.ingested / dt), "compaction": r.compaction, **shape(root)}


def job(root: Path, workers: int, name: str) -> dict:
    store = WORK / f"order-store-{name}"
    shutil.rmtree(store, ignore_errors=True)
    out = run_once(load_workflow(str(REPO / "benchmarks" / "ampel_job.yml")), root, store, workers)["first"]
    shutil.rmtree(store, ignore_errors=True)
    return {k: out[k] for k in ("seconds", "alerts", "alerts_per_s", "tasks", "peak_worker_rss_mb")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alerts", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--target-rows", type=int, default=25_000)
    ap.add_argument("--no-night-order", action="store_true", help="skip the night-ordered ingests")
    ap.add_argument("--night-order-only", action="store_true", help="only the night-ordered ingests")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.chdir(REPO)
    mixed, by_night = build_mixed(WORK / f"order-{args.alerts}", args.alerts)
    for p in mixed.iterdir():  # page cache warm for every ingest alike
        p.read_bytes()
    res: dict = {"alerts": args.alerts, "workers": args.workers, "target_rows": args.target_rows}
    root = WORK / "order-archive-mixed"
    if not args.night_order_only:
        res["mixed_ingest_no_compaction"] = ingest_into(mixed, root, args.workers, 0)
        res["job_before"] = job(root, args.workers, "before")
        t = time.perf_counter()
        c = compact(root, CompactOptions(target_rows=args.target_rows))
        res["compact"] = {"seconds": round(time.perf_counter() - t, 2), **c.summary(), **shape(root)}
        res["job_after"] = job(root, args.workers, "after")
        res["job_speedup"] = round(res["job_after"]["alerts_per_s"] / res["job_before"]["alerts_per_s"], 2)
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_night_order:
        n_root = WORK / "order-archive-nights"
        res["night_order_ingest_no_compaction"] = ingest_into(by_night, n_root, args.workers, 0)
        res["night_order_ingest_compaction"] = ingest_into(by_night, n_root, args.workers, args.target_rows)
        res["night_order_slowdown"] = round(res["night_order_ingest_compaction"]["seconds"] / res["night_order_ingest_no_compaction"]["seconds"], 3)
        shutil.rmtree(n_root, ignore_errors=True)
    print(json.dumps(res, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
