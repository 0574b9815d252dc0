"""Ingest throughput against the fastavro decode ceiling, measured side by side in one run.

    .venv/bin/python benchmarks/bench_ingest.py --alerts 100000 [--json]

The stream is >= 100k real ZTF packets (replicas of ../shared/data/ztf with new candids, one alert per
file, as ZTF distributes them). The ceiling is a plain ``fastavro.reader`` loop over the same files on one
core; ours is the full ingest (decode, normalise, write Parquet parts + cutouts, de-duplicate, index) in
this process, on a 1-worker and on an all-core Dask LocalCluster. Ratios > 1 are possible: the ceiling
re-parses each file's writer schema, which the ingest parses once per schema and process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import fastavro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ampel_dask.graph.ingest import IngestOptions, ingest  # noqa: E402
from benchmarks.replicate import build_stream  # noqa: E402

WORK = Path(__file__).resolve().parents[1] / ".bench"


def ceiling(files: list[Path]) -> float:
    """Alerts/s of a plain fastavro.reader loop (file read + decode, nothing kept), one core."""
    n = 0
    t = time.perf_counter()
    for p in files:
        with open(p, "rb") as fh:
            for _ in fastavro.reader(fh):
                n += 1
    return n / (time.perf_counter() - t)


def _ceiling_worker(files: list[Path], start, out) -> None:
    start.wait()
    t = time.perf_counter()
    n = sum(1 for p in files for _ in fastavro.reader(open(p, "rb")))
    out.put((n, time.perf_counter() - t))


def ceiling_parallel(files: list[Path], processes: int) -> float:
    """Alerts/s of ``processes`` plain fastavro.reader loops running at once on disjoint slices: what the
    machine's cores give together (shared caches, memory bandwidth, SMT siblings), the fair 2-core bar."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_ceiling_worker, args=(files[i::processes], start, out)) for i in range(processes)]
    for pr in procs:
        pr.start()
    res = [out.get() for _ in procs]
    for pr in procs:
        pr.join()
    return sum(n for n, _ in res) / max(sec for _, sec in res)


def tarball_ceiling(tarball: Path) -> float:
    """Alerts/s of one core reading a nightly tarball as plainly as it can: tarfile's gzip stream, then
    fastavro.reader over each member (what target 5 of issue #20 measures ingest against)."""
    import io
    import tarfile

    t, n = time.perf_counter(), 0
    with tarfile.open(tarball, "r|gz") as tf:
        for m in tf:
            if m.isfile():
                n += sum(1 for _ in fastavro.reader(io.BytesIO(tf.extractfile(m).read())))
    return n / (time.perf_counter() - t)


def run_ingest(stream: Path, workers: int, label: str, compact_rows: int | None = None, client=None, history: bool = True) -> dict:
    """One ingest (its own cluster of ``workers``, or ``client``'s); seconds from its report: decoding,
    publishing, compaction and keeping the object-bucketed history, not a cluster's start."""
    archive = WORK / f"archive-{label}"
    shutil.rmtree(archive, ignore_errors=True)
    extra = ({} if compact_rows is None else {"compact_rows": compact_rows}) | {"history": history}
    report = ingest([str(stream)], archive, IngestOptions(workers=None if client else workers, progress=False, **extra), client=client)
    assert report.quarantined == 0 and report.duplicates == 0, report.summary()
    shutil.rmtree(archive, ignore_errors=True)
    return {"label": label, "workers": workers, "alerts": report.ingested, "seconds": report.seconds, "alerts_per_s": report.ingested / report.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alerts", type=int, default=100_000)
    ap.add_argument("--ceiling-sample", type=int, default=20_000, help="files timed for the ceiling")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tarball", type=Path, help="measure ingest of this nightly tarball against its one-core tarfile+fastavro ceiling instead")
    ap.add_argument("--rounds", type=int, default=3, help="--tarball: runs of each configuration, alternating (median reported)")
    args = ap.parse_args()
    if args.tarball:
        return tarball_main(args)

    stream = build_stream(WORK / f"stream-{args.alerts}", args.alerts)
    files = sorted(stream.rglob("*.avro"))
    # warm the page cache so both sides read from memory
    for p in files:
        p.read_bytes()
    sample = files[:: max(1, len(files) // args.ceiling_sample)]
    ceil = ceiling(sample)
    rows = [
        run_ingest(stream, 0, "in-process"),
        run_ingest(stream, 1, "dask-1-worker"),
        run_ingest(stream, args.workers, f"dask-{args.workers}-workers"),
    ]
    ceil2 = ceiling(sample)  # again after, to see drift
    ceil = (ceil + ceil2) / 2
    ceil_all = ceiling_parallel(sample, args.workers)
    for r in rows:
        r["ratio_to_ceiling"] = round(r["alerts_per_s"] / ceil, 2)
        r["ratio_per_core"] = round(r["alerts_per_s"] / ceil / max(1, r["workers"]), 2)
        r["ratio_to_parallel_ceiling"] = round(r["alerts_per_s"] / (ceil_all if r["workers"] > 1 else ceil), 2)
    result = {
        "alerts": len(files),
        "ceiling_alerts_per_s": round(ceil, 1),
        "ceiling_all_cores_alerts_per_s": round(ceil_all, 1),
        "runs": rows,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "fastavro": fastavro.__version__,
    }
    print(f"stream: {len(files)} real-ZTF alerts ({stream})")
    print(f"fastavro.reader ceiling (1 core): {ceil:,.0f} alerts/s; {args.workers} loops at once: {ceil_all:,.0f} alerts/s")
    print(f"{'run':<18}{'alerts/s':>12}{'x ceiling':>11}{'x per core':>12}{'x same-cores ceiling':>22}")
    for r in rows:
        print(f"{r['label']:<18}{r['alerts_per_s']:>12,.0f}{r['ratio_to_ceiling']:>11.2f}{r['ratio_per_core']:>12.2f}{r['ratio_to_parallel_ceiling']:>22.2f}")
    if args.json:
        print(json.dumps(result))


def tarball_main(args: argparse.Namespace) -> None:
    """On one LocalCluster, after an untimed ingest that warms its workers: each configuration
    ``--rounds`` times, alternating, the median reported. Seconds are the whole ingest's (decode,
    publish, compaction), not the cluster's start."""
    import statistics

    from distributed import Client

    from ampel_dask.graph.workers import local_cluster

    args.tarball.read_bytes()  # page cache
    ceil = tarball_ceiling(args.tarball)
    w = args.workers
    configs = [(f"tarball-{w}-workers", None, True), (f"tarball-{w}-workers-no-history", None, False), (f"tarball-{w}-workers-no-compaction-no-history", 0, False)]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    with local_cluster(args.workers, dashboard_address=None) as cluster, Client(cluster) as client:
        run_ingest(args.tarball, args.workers, "warm-up", client=client)
        for _ in range(args.rounds):
            for label, rows_, history in configs:
                runs[label].append(run_ingest(args.tarball, args.workers, label, rows_, client, history))
    ceil = (ceil + tarball_ceiling(args.tarball)) / 2  # again after, to see drift
    print(f"tarball: {args.tarball}; tarfile + fastavro.reader ceiling (1 core): {ceil:,.0f} alerts/s")
    rows = []
    for label, _, _ in configs:
        r = dict(runs[label][0], seconds=statistics.median(x["seconds"] for x in runs[label]), rounds=[x["seconds"] for x in runs[label]])
        r["alerts_per_s"] = r["alerts"] / r["seconds"]
        r["ratio_to_ceiling"] = round(r["alerts_per_s"] / ceil, 2)
        rows.append(r)
        print(f"{label:<42}{r['alerts_per_s']:>10,.0f} alerts/s{r['ratio_to_ceiling']:>8.2f}x ceiling  (median of {r['rounds']} s)")
    if args.json:
        print(json.dumps({"tarball": str(args.tarball), "ceiling_alerts_per_s": round(ceil, 1), "runs": rows}))


if __name__ == "__main__":
    main()
