"""One command for the benchmark table: ``python -m benchmarks [--quick] [--ampel] [--slurm]``.

Measured side by side in one session on this machine:

* ingest: alerts/s against the fastavro decode ceiling (bench_ingest);
* pipeline: workflows/ztf_archive.yml over replicated real ZTF alerts, first run and re-run, 1 and 2
  workers (LocalCluster; with --slurm also 1 and 2 SLURM worker jobs), tasks, peak worker memory, and the
  multiple of the LSST average alert rate;
* with --ampel: the same ZTF job (DecentFilter with the same cuts -> T2LightCurveSummary) run by real
  AMPEL 0.10 from PyPI (benchmarks/ampel_baseline, its own venv, mongomock) and by ampel-dask, on the same
  alerts, T0 and T2 counted separately.

Writes benchmarks/results/<timestamp>.json and latest.json, the PNG benchmarks/throughput.png, and the
table between the markers in benchmarks/README.md. ``--quick`` (< 2 min) runs small sizes and compares
with the recorded figures (benchmarks/results/recorded.json), warning below 0.8x; it never fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BENCH = REPO / "benchmarks"
WORK = REPO / ".bench"
RESULTS = BENCH / "results"
DATA = REPO.parent / "shared" / "data"
LSST_RATE = 10_000_000 / 32_000  # ~10 M alerts in a ~9 h night: ~312 alerts/s on average
AMPEL_TARS = ["ampel_core_real_201712.tar.gz", "fink_ztf_public_20181129.tar.gz", "fink_basic_alerts_2023_2025.tar.gz"]
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("ampel-dask", "dask", "distributed", "pyarrow", "fastavro", "numpy", "light-curve", "dask-jobqueue"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            pass
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}"


# --- ingest -------------------------------------------------------------------------------------
def bench_ingest(n: int) -> dict:
    from benchmarks.bench_ingest import ceiling, ceiling_parallel, run_ingest
    from benchmarks.replicate import build_stream

    stream = build_stream(WORK / f"stream-{n}", n)
    files = sorted(stream.rglob("*.avro"))
    for p in files:
        p.read_bytes()
    sample = files[:: max(1, len(files) // 20_000)]
    ceil = ceiling(sample)
    runs = [run_ingest(stream, 1, "1 worker"), run_ingest(stream, 2, "2 workers")]
    ceil = (ceil + ceiling(sample)) / 2
    ceil_all = ceiling_parallel(sample, 2)
    for r in runs:
        r["ratio_to_ceiling"] = round(r["alerts_per_s"] / ceil, 2)
        r["ratio_to_same_cores_ceiling"] = round(r["alerts_per_s"] / (ceil if r["workers"] == 1 else ceil_all), 2)
    return {"alerts": len(files), "ceiling_alerts_per_s": round(ceil), "ceiling_2_cores_alerts_per_s": round(ceil_all), "runs": runs}


# --- pipeline -----------------------------------------------------------------------------------
def bench_pipeline(n: int) -> dict:
    from ampel_dask.graph.workflow import load_workflow
    from benchmarks.bench_pipeline import run_once
    from benchmarks.make_archive import build

    os.chdir(REPO)
    archive = build(WORK / f"pipeline-archive-{n}", n)
    wf = load_workflow(REPO / "workflows" / "ztf_archive.yml")
    out = {"alerts": n, "workflow": wf.name, "runs": []}
    for workers in (1, 2):
        store = WORK / "pipeline-store"
        shutil.rmtree(store, ignore_errors=True)
        log(f"pipeline: {n} alerts, LocalCluster {workers} worker(s)")
        res = run_once(wf, archive, store, workers)
        out["runs"].append({"cluster": f"LocalCluster, {workers} worker(s)", "workers": workers, **res})
        log(f"  {json.dumps(res, default=str)[:400]}")
    # the same unit work as a plain loop (no Dask, no store): what is left of a run's time is the framework's
    from benchmarks.bench_floor import plain_loops

    for loops in (1, 2):
        log(f"pipeline: the same unit work as {loops} plain loop(s), no framework")
        f = plain_loops(REPO / "workflows" / "ztf_archive.yml", archive, loops)
        out.setdefault("plain_loop", {})[loops] = {k: v for k, v in f.items() if k != "runs"} | {"steps": f["runs"][0]["steps"]}
        log(f"  {json.dumps(out['plain_loop'][loops], default=str)[:400]}")
    out["packet_only"] = bench_packet_channels(wf, archive)
    return out


def bench_packet_channels(wf, archive: Path) -> dict:
    """The same workflow without its history channels (for ztf_archive.yml: the DECENT channel alone, the
    job of DESIGN.md's reference loop), first run on 2 workers and as two plain loops: what the history
    join costs."""
    import yaml

    from ampel_dask.graph.workflow import load_workflow
    from benchmarks.bench_floor import plain_loops
    from benchmarks.bench_pipeline import run_once
    from benchmarks.bench_scale import packet_only

    keep = packet_only(wf).channels
    path = WORK / f"{wf.name}-packet-channels.yml"
    path.write_text(yaml.safe_dump(packet_only(wf).model_dump(mode="json", by_alias=True), sort_keys=False))
    packet = load_workflow(path)
    store = WORK / "pipeline-store"
    shutil.rmtree(store, ignore_errors=True)
    log(f"pipeline: {packet.name} (channels {', '.join(c.name for c in keep)}), LocalCluster 2 workers and 2 plain loops")
    res = run_once(packet, archive, store, 2)
    loops = plain_loops(path, archive, 2)
    out = {"workflow": packet.name, "channels": [c.name for c in keep], "first": res["first"], "warm": res["warm"], "plain_loops_alerts_per_s": loops["alerts_per_s"]}
    log(f"  {json.dumps(out, default=str)[:400]}")
    return out


def slurm_ready() -> None:
    """Stop before anything is measured when no SLURM controller answers: the SLURM rows come last, and a
    run of ~20 min used to end there with a worker-start timeout."""
    import subprocess

    try:
        ok = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"--slurm: sinfo did not run ({exc}); start SLURM first (../shared/recipes/start_slurm.sh)") from None
    if ok.returncode != 0:
        raise SystemExit(f"--slurm: no SLURM controller answers ({ok.stderr.strip()}); start it first (../shared/recipes/start_slurm.sh)")


def bench_pipeline_slurm(wf, archive: Path) -> list[dict]:
    from ampel_dask.graph.runner import RunOptions, run_workflow

    rows = []
    for jobs in (1, 2):
        store = WORK / "pipeline-store-slurm"
        shutil.rmtree(store, ignore_errors=True)
        cluster = {"kind": "slurm", "config_file": str(REPO / "slurm" / "jobqueue.yaml"), "jobs": jobs,
                   "jobqueue": {"log-directory": str(WORK / "slurm-logs"), "scheduler-options": {"dashboard_address": ":0"}}}  # fmt: skip
        w = wf.model_copy(update={"cluster": wf.cluster.model_validate(cluster)})
        log(f"pipeline: SLURM, {jobs} worker job(s)")
        res = {}
        for label in ("first", "rerun"):
            t = time.perf_counter()
            s = run_workflow(w, RunOptions(archive=str(archive), store=str(store), progress=False))
            dt = time.perf_counter() - t
            res[label] = {"seconds": round(dt, 2), "alerts": s["alerts"], "alerts_per_s": round(s["alerts"] / dt), "tasks": s["tasks"], "t2": s["t2"]}
            log(f"  {label}: {res[label]}")
        rows.append({"cluster": f"SLURM, {jobs} worker job(s) (incl. job start)", "workers": jobs, **res})
    return rows


# --- AMPEL side by side -------------------------------------------------------------------------
def bench_ampel(replicate: int | None, repeat: int) -> dict:
    tars = [str(DATA / "ztf" / t) for t in AMPEL_TARS]
    cmd = [sys.executable, str(BENCH / "ampel_baseline" / "run_ampel.py"), "--repeat", str(repeat), "--json"]
    for t in tars:
        cmd += ["--tar", t]
    if replicate:
        cmd += ["--replicate", str(replicate)]
    log(f"AMPEL: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=6 * 3600)
    if proc.returncode != 0:
        raise SystemExit(f"run_ampel.py failed:\n{proc.stderr[-3000:]}")
    ampel = json.loads(proc.stdout.strip().splitlines()[-1])
    inputs = tars
    if replicate:
        sys.path.insert(0, str(BENCH / "ampel_baseline"))
        import run_ampel  # the same replicated tarball AMPEL read

        inputs = [str(run_ampel.replicated_tarball(tars, replicate))]
    ours = {w: ours_same_job(inputs, w) for w in (1, 2)}
    return {"ampel": ampel, "ours": ours, "alerts": ampel["alerts"]}


def ours_same_job(inputs: list[str], workers: int) -> dict:
    """ampel-dask on AMPEL's job: ingest the tarballs, then the same filter + T2 unit (timed apart)."""
    from distributed import Client

    from ampel_dask.graph.workers import local_cluster

    from ampel_dask.graph.runner import RunOptions, run_workflow
    from ampel_dask.graph.workflow import load_workflow
    from ampel_dask.graph.ingest import IngestOptions, ingest

    wf = load_workflow(BENCH / "ampel_job.yml")
    arch, store = WORK / "ampel-cmp-archive", WORK / "ampel-cmp-store"
    for d in (arch, store):
        shutil.rmtree(d, ignore_errors=True)
    with local_cluster(workers, dashboard_address=None) as cl, Client(cl) as client:
        client.run(lambda: __import__("ampel_dask.tiers.units.t0_filters"))
        t = time.perf_counter()
        rep = ingest(inputs, arch, IngestOptions(progress=False), client=client)
        ingest_s = time.perf_counter() - t
        runs = []
        for _ in range(2):  # the second run re-processes the archive with a fresh store
            shutil.rmtree(store, ignore_errors=True)
            t = time.perf_counter()
            s = run_workflow(wf, RunOptions(archive=str(arch), store=str(store), client=client, progress=False))
            run_s = time.perf_counter() - t
            t2_s = sum(json.loads(p.read_text()).get("seconds", 0) for p in (store / "tasks").glob("*.json") if '"kind": "t2"' in p.read_text())
            runs.append((run_s, t2_s, s))
    (run_s, t2_s, s) = min(runs, key=lambda r: r[0])
    alerts = rep.ingested + rep.duplicates
    t0_from_archive = max(run_s - t2_s, 1e-9)
    return {
        "workers": workers,
        "alerts": alerts,
        "accepted": s["channels"]["DECENT"]["passed"],
        "ingest_seconds": round(ingest_s, 3),
        "run_seconds": round(run_s, 3),
        "t2_seconds": round(t2_s, 4),
        "t2_states": s["t2"]["computed"],
        "t0_from_tarballs_alerts_per_s": round(alerts / (ingest_s + t0_from_archive)),
        "t0_from_archive_alerts_per_s": round(alerts / t0_from_archive),
        "t2_states_per_s": round(s["t2"]["computed"] / t2_s) if t2_s else None,
    }


# --- report -------------------------------------------------------------------------------------
RUN_LABELS = {"first": "first", "warm": "first, warm processes", "rerun": "rerun"}  # warm: bench_pipeline.run_once


def table(res: dict) -> str:
    lines = [f"Measured {res['date']} on {res['machine']} with `{res['command']}`.", ""]
    v = res["versions"]
    lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".")
    lines.append("")
    if "ingest" in res:
        ing = res["ingest"]
        lines += [f"**Ingest** ({ing['alerts']:,} real ZTF packets replicated with new candids, one per file; "
                  f"fastavro.reader ceiling on one core: {ing['ceiling_alerts_per_s']:,} alerts/s"
                  + (f"; two such loops at once on the 2 cores: {ing['ceiling_2_cores_alerts_per_s']:,} alerts/s" if "ceiling_2_cores_alerts_per_s" in ing else "") + ")", "",
                  "| configuration | alerts/s | x fastavro ceiling | x ceiling per core | x ceiling on the same cores |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in ing["runs"]:
            same = f"{r['ratio_to_same_cores_ceiling']:.2f}" if "ratio_to_same_cores_ceiling" in r else "-"
            lines.append(f"| ingest, {r['label']} | {r['alerts_per_s']:,.0f} | {r['ratio_to_ceiling']:.2f} | {r['ratio_to_ceiling'] / r['workers']:.2f} | {same} |")
        lines.append("")
    if "pipeline" in res:
        pl = res["pipeline"]
        lines += [f"**Pipeline**: `workflows/{pl['workflow']}.yml` on {pl['alerts']:,} replicated real ZTF alerts "
                  f"(LSST average rate: {LSST_RATE:,.0f} alerts/s)", "",
                  "| cluster | run | seconds | alerts/s | x LSST rate | x decode ceiling, same cores | x plain loop, same cores | tasks | T2 computed | peak RSS / worker |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        # the host moves between sessions (and its second core with its neighbours): the fastavro loops
        # measured in this run on as many cores as the row uses make the rows comparable across runs
        ing = res.get("ingest", {})
        ceilings = {1: ing.get("ceiling_alerts_per_s"), 2: ing.get("ceiling_2_cores_alerts_per_s")}
        floors = {int(k): v for k, v in pl.get("plain_loop", {}).items()}
        for r in pl["runs"]:
            for label in [k for k in ("first", "warm", "rerun") if k in r]:
                x = r[label]
                mem = f"{x['peak_worker_rss_mb']} MB" if "peak_worker_rss_mb" in x else "-"
                ceil = ceilings.get(r.get("workers"))
                xc = f"{x['alerts_per_s'] / ceil:,.0f}" if ceil and label != "rerun" else "-"
                fl = floors.get(r.get("workers"))
                xf = f"{x['alerts_per_s'] / fl['alerts_per_s']:.2f}" if fl and label != "rerun" else "-"
                lines.append(f"| {r['cluster']} | {RUN_LABELS[label]} | {x['seconds']:.2f} | {x['alerts_per_s']:,} | {x['alerts_per_s'] / LSST_RATE:,.0f} | {xc} | {xf} | {x['tasks']} | {x['t2']['computed']} | {mem} |")
        for k, fl in sorted(floors.items()):
            lines.append(f"| plain loop of the same unit work, {k} process(es) at once (`bench_floor.py`; no Dask, no store) | first, warm processes | {fl['seconds']:.2f} | {fl['alerts_per_s']:,} | "
                         f"{fl['alerts_per_s'] / LSST_RATE:,.0f} | - | 1.00 | - | - | - |")
        if "packet_only" in pl:
            po = pl["packet_only"]
            for label in [k for k in ("first", "warm") if k in po]:
                x = po[label]
                lines.append(f"| LocalCluster, 2 worker(s), **without the history channel** ({', '.join(po['channels'])} only) | {RUN_LABELS[label]} | {x['seconds']:.2f} | {x['alerts_per_s']:,} | "
                             f"{x['alerts_per_s'] / LSST_RATE:,.0f} | - | {x['alerts_per_s'] / po['plain_loops_alerts_per_s']:.2f} | {x['tasks']} | {x['t2']['computed']} | {x['peak_worker_rss_mb']} MB |")
            lines.append(f"| plain loop of that unit work, 2 process(es) at once | first, warm processes | - | {po['plain_loops_alerts_per_s']:,} | {po['plain_loops_alerts_per_s'] / LSST_RATE:,.0f} | - | 1.00 | - | - | - |")
        if 1 in floors:
            steps = ", ".join(f"{k} {v:.2f}" for k, v in floors[1]["steps"].items())
            lines += ["", f"Plain loop, one process, seconds per step: {steps}."]
        lines.append("")
    if "ampel" in res:
        a, o = res["ampel"]["ampel"], res["ampel"]["ours"]
        lines += [f"**Same job as real AMPEL {a['ampel_versions'].get('ampel-core', '')}** (DecentFilter, same cuts -> "
                  f"T2LightCurveSummary) on {a['alerts']:,} ZTF alerts; AMPEL with {a['backend']} (in-process MongoDB stand-in), "
                  "one process; T0 and T2 timed apart", "",
                  "| measure | AMPEL | ampel-dask 1 worker | ratio | ampel-dask 2 workers | ratio |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        def row(name, av, key):
            o1, o2 = o[1][key] or 0, o[2][key] or 0
            return f"| {name} | {av:,.0f} | {o1:,.0f} | {o1 / av:,.1f}x | {o2:,.0f} | {o2 / av:,.1f}x |"
        lines.append(row("T0 alerts/s from the tarballs (decode + filter + states; AMPEL: + its DB ingest)", a["t0_alerts_per_s"], "t0_from_tarballs_alerts_per_s"))
        lines.append(row("T0 alerts/s re-processing (ampel-dask: from its Parquet archive; AMPEL re-reads Avro)", a["t0_alerts_per_s"], "t0_from_archive_alerts_per_s"))
        lines.append(row(f"T2 states/s (T2LightCurveSummary; {a['t2_states']} states)", a["t2_states_per_s"], "t2_states_per_s"))
        lines.append("")
        lines.append(f"Accepted by DecentFilter: AMPEL {a['accepted']}, ampel-dask {o[1]['accepted']}.")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for r in res.get("ingest", {}).get("runs", []):
        bars.append((f"ingest {r['label']}", r["alerts_per_s"]))
    if "ingest" in res:
        bars.append(("fastavro ceiling (1 core)", res["ingest"]["ceiling_alerts_per_s"]))
    for r in res.get("pipeline", {}).get("runs", []):
        bars.append((f"{res['pipeline']['workflow']} {r['cluster']} first", r["first"]["alerts_per_s"]))
        bars.append((f"{res['pipeline']['workflow']} {r['cluster']} re-run", r["rerun"]["alerts_per_s"]))
    for k, fl in sorted(res.get("pipeline", {}).get("plain_loop", {}).items()):
        bars.append((f"plain loop of the same unit work, {k} process(es)", fl["alerts_per_s"]))
    if "packet_only" in res.get("pipeline", {}):
        po = res["pipeline"]["packet_only"]
        bars.append((f"{po['workflow']} LocalCluster, 2 worker(s) first", po["first"]["alerts_per_s"]))
    if "ampel" in res:
        bars.append(("AMPEL T0 (same job)", res["ampel"]["ampel"]["t0_alerts_per_s"]))
        bars.append(("ampel-dask T0 (same job, archive)", res["ampel"]["ours"][2]["t0_from_archive_alerts_per_s"]))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.5))
    names, vals = zip(*bars)
    ax.barh(range(len(bars)), vals, color="#4477aa")
    ax.set_yticks(range(len(bars)), names, fontsize=8)
    ax.set_xscale("log")
    ax.axvline(LSST_RATE, color="#cc3311", ls="--", label=f"LSST average rate ({LSST_RATE:.0f} alerts/s)")
    ax.set_xlabel("alerts per second (log)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"ampel-dask throughput, {res['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(text: str) -> None:
    readme = BENCH / "README.md"
    body = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{MARK_START}\n{MARK_END}\n"
    if MARK_START not in body:
        body += f"\n{MARK_START}\n{MARK_END}\n"
    head, rest = body.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    readme.write_text(f"{head}{MARK_START}\n{text}\n![throughput](throughput.png)\n{MARK_END}{tail}")


def compare_quick(res: dict) -> None:
    """Like with like: this quick run against the recorded quick run (same sizes). Ingest figures are
    multiples of the fastavro ceiling measured in their own run; pipeline figures are multiples of the
    plain loop of the same unit work on the same cores measured in their own run (numpy/Arrow work like
    the pipeline's, so a faster or slower host moves both alike; the fastavro ceiling does not: it was 2.1x
    apart between two hosts whose pipelines ran equally fast), or of the fastavro ceiling when the
    recorded run has no plain loop. Seconds are printed beside them."""
    rec_path = RESULTS / "recorded-quick.json"
    if not rec_path.exists():
        log(f"no recorded quick figures yet ({rec_path}; make them with --quick --record): nothing to compare")
        return
    rec = json.loads(rec_path.read_text())
    pairs = []
    for a, b in zip(res.get("ingest", {}).get("runs", []), rec.get("ingest", {}).get("runs", [])):
        pairs.append((f"ingest {a['label']}, x fastavro ceiling", a["ratio_to_ceiling"], b["ratio_to_ceiling"], a["seconds"], b["seconds"]))
    ceil_now, ceil_then = res["ingest"]["ceiling_alerts_per_s"], rec["ingest"]["ceiling_alerts_per_s"]
    loops_now, loops_then = res["pipeline"].get("plain_loop", {}), rec["pipeline"].get("plain_loop", {})
    for a, b in zip(res.get("pipeline", {}).get("runs", []), rec.get("pipeline", {}).get("runs", [])):
        w = str(a.get("workers"))
        if w in loops_now and w in loops_then:
            name, now, then = "x plain loop, same cores", loops_now[w]["alerts_per_s"], loops_then[w]["alerts_per_s"]
        else:  # the one-core ceiling for every row: one yardstick per run
            name, now, then = "x one-core fastavro ceiling", ceil_now, ceil_then
        pairs.append((f"pipeline {a['cluster']} first run, {name}", a["first"]["alerts_per_s"] / now, b["first"]["alerts_per_s"] / then,
                      a["first"]["seconds"], b["first"]["seconds"]))  # fmt: skip
    print(f"compared with the quick run of {rec['date']} ({rec_path.name})")
    if rec.get("machine") != res.get("machine"):
        print(f"  (another host: recorded on {rec.get('machine')}, now {res.get('machine')}: seconds are not comparable, ratios are)")
    for name, now, then, s_now, s_then in pairs:
        ratio = now / then if then else float("nan")
        flag = "  WARNING: below 0.8x of the recorded figure" if ratio < 0.8 else ""
        print(f"{name}: now {now:,.2f}, recorded {then:,.2f} -> {ratio:.2f}x (seconds: now {s_now:.2f}, recorded {s_then:.2f}){flag}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (< 2 min), compared with the recorded figures")
    ap.add_argument("--ampel", action="store_true", help="also run real AMPEL on the same job (installs it into .bench/)")
    ap.add_argument("--ampel-replicate", type=int, default=10_000, help="alerts for the AMPEL comparison (replicated real alerts)")
    ap.add_argument("--slurm", action="store_true", help="also run the pipeline on SLURM worker jobs (needs a running SLURM)")
    ap.add_argument("--ingest-alerts", type=int, default=None)
    ap.add_argument("--pipeline-alerts", type=int, default=None)
    ap.add_argument("--record", action="store_true", help="store these figures as the reference (with --quick: the reference of later --quick runs)")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only re-render the README table and plot from a saved run (no measuring)")
    args = ap.parse_args()
    if args.slurm:
        slurm_ready()
    if args.render:
        res = json.loads(Path(args.render).read_text())
        if "ampel" in res:  # JSON made its worker-count keys strings
            res["ampel"]["ours"] = {int(k): v for k, v in res["ampel"]["ours"].items()}
        plot(res, BENCH / "throughput.png")
        update_readme(table(res))
        print(table(res))
        return
    n_ingest = args.ingest_alerts or (3_000 if args.quick else 100_000)
    n_pipe = args.pipeline_alerts or (50_000 if args.quick else 1_000_000)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), "versions": versions(),
           "command": "python -m benchmarks " + " ".join(sys.argv[1:])}  # fmt: skip
    partial = WORK / "partial.json"  # each phase's figures as soon as it ends: a later hang loses nothing

    def keep(phase: str, value: dict) -> None:
        res[phase] = value
        WORK.mkdir(exist_ok=True)
        partial.write_text(json.dumps(res, indent=1, default=str))
        log(f"{phase} done; figures so far in {partial}")

    keep("ingest", bench_ingest(n_ingest))
    keep("pipeline", bench_pipeline(n_pipe))
    if args.ampel:
        keep("ampel", bench_ampel(args.ampel_replicate, repeat=1 if args.quick else 3))
    if args.slurm:  # last: worker jobs depend on a scheduler outside this process
        from ampel_dask.graph.workflow import load_workflow
        from benchmarks.make_archive import build

        wf = load_workflow(REPO / "workflows" / "ztf_archive.yml")
        runs = bench_pipeline_slurm(wf, build(WORK / f"pipeline-archive-{n_pipe}", n_pipe))
        keep("pipeline", {**res["pipeline"], "runs": res["pipeline"]["runs"] + runs})
    text = table(res)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = res["date"].replace(":", "").replace("-", "")
    (RESULTS / f"{'quick-' if args.quick else ''}{stamp}.json").write_text(json.dumps(res, indent=1, default=str))
    if args.quick:
        compare_quick(res)
        if args.record:
            (RESULTS / "recorded-quick.json").write_text(json.dumps(res, indent=1, default=str))
        return
    (RESULTS / "latest.json").write_text(json.dumps(res, indent=1, default=str))
    if args.record:
        (RESULTS / "recorded.json").write_text(json.dumps(res, indent=1, default=str))
    plot(res, BENCH / "throughput.png")
    update_readme(text)


if __name__ == "__main__":
    main()
