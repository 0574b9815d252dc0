#!/usr/bin/env python3
"""AMPEL-side baseline benchmark: real AMPEL (from PyPI) on the same ZTF alert tarballs as ampel-dask.

    python benchmarks/ampel_baseline/run_ampel.py --tar A.tar.gz [--tar B.tar.gz ...] [--repeat 3] \
        [--no-filter] [--backend mongomock|secantus|both] [--replicate N] --json

Standard library only: it runs under any python3 (also the project's .venv). AMPEL itself runs in its
own venv (.bench/ampel-venv, created on first use; see setup_ampel.sh) as a subprocess:
``ampel_mock.py job -config .bench/ampel_conf.yaml -schema <rendered job_decent.yaml>``.

Per repeat, one ``ampel job`` process runs both tasks on a fresh database:
  task 0  AlertConsumer: tarball -> ZiAlertSupplier -> DecentFilter -> ingest (t0, T1 state, T2 ticket)
  task 1  T2Worker: T2LightCurveSummary (or --t2-unit) on every state
Each task's ``run()`` is timed inside the process (perf_counter around AbsEventUnit.run):
  t0_alerts_per_s = alerts read by the T0 task / T0 task seconds
  t2_states_per_s = T2 documents computed by the T2Worker / T2 task seconds
Medians over --repeat runs. The last line of stdout is one JSON object (with --json).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BENCH = Path(os.environ.get("AMPEL_BENCH_DIR", REPO / ".bench"))
AMPEL_VENV = BENCH / "ampel-venv"
AMPEL_PY = AMPEL_VENV / "bin" / "python"
AMPEL_CONF = BENCH / "ampel_conf.yaml"
AMPEL_CONF_STAMP = BENCH / "ampel_conf.stamp.json"
SECANTUS_VENV = BENCH / "secantus-venv"
RUNS_DIR = BENCH / "runs"
# derived alert tarballs (concatenation, replicas) are not kept in the repository tree
DATA_DIR = Path(os.environ.get("AMPEL_BENCH_DATA", "/tmp/ampel-bench-data"))

# The last stable releases that work together (a plain "pip install ampel-ztf" mixes versions and the
# T0 task dies with "'ZiMongoMuxer' object has no attribute 'updates_buffer'").
AMPEL_PINS = {
    "ampel-ztf": "0.10.2",
    "ampel-alerts": "0.10.1",
    "ampel-core": "0.10.4.post0",
    "ampel-interface": "0.10.4.post2",
    "ampel-photometry": "0.10.1",
}
EXTRA_PACKAGES = ["mongomock"]
SECANTUS_PIN = "secantusdb==0.7.0b3"
REQUIRED_UNITS = ["AlertConsumer", "ZiAlertSupplier", "TarAlertLoader", "DecentFilter", "ZiMongoMuxer",
                  "ZiT1Combiner", "T2Worker", "ZiDataPointShaper"]


def log(msg: str) -> None:
    print(f"[run_ampel {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- setup
def _installed_versions(py: Path, names) -> dict:
    code = ("import json,importlib.metadata as m,sys\n"
            "out={}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n]=m.version(n)\n"
            "    except m.PackageNotFoundError: out[n]=None\n"
            "print(json.dumps(out))")
    r = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def _pip_install(venv: Path, reqs: list[str], timeout: int = 1800) -> None:
    log(f"pip install {' '.join(reqs)} into {venv}")
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *reqs], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-5000:] + r.stderr[-5000:])
        raise SystemExit(f"pip install failed in {venv}")


def ensure_ampel(force_config: bool = False) -> dict:
    """Idempotent: venv with the pinned AMPEL set + mongomock, and the built AMPEL config."""
    BENCH.mkdir(parents=True, exist_ok=True)
    if not AMPEL_PY.exists():
        log(f"creating venv {AMPEL_VENV}")
        subprocess.run([sys.executable if sys.version_info >= (3, 10) else "python3", "-m", "venv",
                        str(AMPEL_VENV)], check=True)
    names = [*AMPEL_PINS, *EXTRA_PACKAGES]
    have = _installed_versions(AMPEL_PY, names)
    missing = [f"{n}=={v}" for n, v in AMPEL_PINS.items() if have.get(n) != v]
    missing += [n for n in EXTRA_PACKAGES if not have.get(n)]
    if missing:
        _pip_install(AMPEL_VENV, [f"{n}=={v}" for n, v in AMPEL_PINS.items()] + EXTRA_PACKAGES)
        have = _installed_versions(AMPEL_PY, names)
        bad = {n: have.get(n) for n, v in AMPEL_PINS.items() if have.get(n) != v}
        if bad:
            raise SystemExit(f"AMPEL pins not satisfied after install: {bad}")
    else:
        log("AMPEL venv up to date: " + ", ".join(f"{n} {have[n]}" for n in names))

    stamp = {"versions": have}
    conf_ok = (AMPEL_CONF.exists() and AMPEL_CONF_STAMP.exists() and not force_config
               and json.loads(AMPEL_CONF_STAMP.read_text()) == stamp)
    if conf_ok:
        log(f"AMPEL config up to date: {AMPEL_CONF}")
    else:
        log("building AMPEL config (ampel config build, 30 s - 2 min) ...")
        t = time.time()
        tmp = AMPEL_CONF.with_suffix(".tmp.yaml")
        r = subprocess.run([str(AMPEL_VENV / "bin" / "ampel"), "config", "build", "-out", str(tmp),
                            "-stop-on-errors", "1", "-hide-module-not-found-errors"],
                           capture_output=True, text=True, timeout=1800, cwd=str(BENCH))
        (BENCH / "ampel_config_build.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0 or not tmp.exists():
            sys.stderr.write((r.stdout + r.stderr)[-5000:])
            raise SystemExit("ampel config build failed (log: .bench/ampel_config_build.log)")
        text = tmp.read_text()
        absent = [u for u in REQUIRED_UNITS if f"\n  {u}:" not in text]
        if absent:
            raise SystemExit(f"AMPEL config lacks units {absent}")
        tmp.replace(AMPEL_CONF)
        AMPEL_CONF_STAMP.write_text(json.dumps(stamp))
        log(f"AMPEL config built in {time.time() - t:.0f} s: {AMPEL_CONF}")
    return have


def ensure_secantus() -> Path:
    exe = SECANTUS_VENV / "bin" / "secantusd-py"
    if not exe.exists():
        log(f"creating venv {SECANTUS_VENV} ({SECANTUS_PIN})")
        subprocess.run(["python3", "-m", "venv", str(SECANTUS_VENV)], check=True)
        _pip_install(SECANTUS_VENV, [SECANTUS_PIN])
    return exe


class SecantusServer:
    """A SecantusDB (Mongo wire protocol) server on loopback with a fresh data dir; stopped by its PID."""

    def __init__(self, exe: Path, workdir: Path):
        self.exe, self.workdir = exe, workdir
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = Path(tempfile.mkdtemp(prefix="secantus-", dir=self.workdir))
        self.logf = open(self.workdir / f"secantus-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [str(self.exe), "--host", "127.0.0.1", "--port", str(self.port), "--storage-path", str(self.data),
             "--standalone", "--log-level", "WARNING"], stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SecantusDB exited with {self.proc.returncode} (log {self.logf.name})")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("SecantusDB did not open its port in 60 s")
        self.uri = f"mongodb://127.0.0.1:{self.port}/"
        return self

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        shutil.rmtree(self.data, ignore_errors=True)


# ---------------------------------------------------------------------------------------- inputs
def _fingerprint(paths, extra="") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:12]


def concat_tarballs(paths: list[str]) -> Path:
    """One plain tar whose members are the given .tar.gz files (AMPEL's TarAlertLoader reads nested
    *.tar.gz members in order), so several tarballs are one alert stream without re-encoding anything."""
    for p in paths:
        if not p.endswith(".tar.gz"):
            raise SystemExit(f"--tar {p}: concatenation needs .tar.gz inputs (or use --layout each)")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    out = DATA_DIR / f"concat-{len(paths)}-{_fingerprint(paths)}.tar"
    if not out.exists():
        tmp = out.with_suffix(".part")
        with tarfile.open(tmp, "w") as tar:
            for i, p in enumerate(paths):
                tar.add(p, arcname=f"{i:02d}-{Path(p).name}")
        tmp.replace(out)
        log(f"concatenated {len(paths)} tarballs -> {out}")
    return out


def replicated_tarball(paths: list[str], n: int) -> Path:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    out = DATA_DIR / f"replicated-{n}-{_fingerprint(paths, str(n))}.tar.gz"
    if not out.exists():
        log(f"building {n} replicated alerts from {len(paths)} tarball(s) -> {out}")
        cmd = [str(AMPEL_PY), str(HERE / "replicate_alerts.py"), "--n", str(n), "--out", str(out)]
        for p in paths:
            cmd += ["--tar", p]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            sys.stderr.write(r.stdout + r.stderr)
            raise SystemExit("replicate_alerts.py failed")
        log(r.stdout.strip())
    return out


# --------------------------------------------------------------------------------------- running
def render_job(tar: Path, no_filter: bool, t2_unit: str, dest: Path, log_profile: str = "default") -> Path:
    text = (HERE / "job_decent.yaml").read_text()
    if no_filter:
        lines, keep = [], True
        for line in text.splitlines(keepends=True):
            if line.startswith("# >>> filter"):
                keep = False
            elif line.startswith("# <<< filter"):
                keep = True
            elif keep:
                lines.append(line)
        text = "".join(lines)
    text = (text.replace("${ALERT_TAR}", json.dumps(str(tar)))
                .replace("${T2_UNIT}", t2_unit)
                .replace("${ITER_MAX}", str(10**12))
                .replace("${LOG_PROFILE}", log_profile))
    if "${" in text:
        raise SystemExit("unrendered placeholder in job template")
    dest.write_text(text)
    return dest


def run_once(tar: Path, db: str, no_filter: bool, t2_unit: str, rundir: Path, timeout: int,
             server_pid: int | None = None, log_profile: str = "default", progress_every: int = 500) -> dict:
    rundir.mkdir(parents=True, exist_ok=True)
    job = render_job(tar, no_filter, t2_unit, rundir / "job.yaml", log_profile)
    report = rundir / "report.json"
    env = dict(os.environ, AMPEL_BENCH_DB=db, AMPEL_BENCH_REPORT=str(report), AMPEL_BENCH_PREFIX="AmpelBench",
               AMPEL_BENCH_PROGRESS_EVERY=str(progress_every), PYTHONUNBUFFERED="1")
    if server_pid:
        env["AMPEL_BENCH_SERVER_PID"] = str(server_pid)
    cmd = [str(AMPEL_PY), str(HERE / "ampel_mock.py"), "job", "-config", str(AMPEL_CONF), "-schema", str(job),
           "-no-conf-check"]
    load0 = os.getloadavg()
    t = time.perf_counter()
    with open(rundir / "stdout.log", "w") as so, open(rundir / "stderr.log", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=str(rundir))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # AMPEL's AlertConsumer traps SIGTERM (finishes the alert, then goes on to the next task): SIGKILL
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - t
    if rc is None:
        return _timed_out_run(rundir, timeout, wall, load0)
    if rc != 0 or not report.exists():
        tail = (rundir / "stderr.log").read_text()[-3000:]
        raise SystemExit(f"ampel job failed (rc={rc}); logs in {rundir}\n{tail}")
    r = json.loads(report.read_text())
    tasks = {x["unit"]: x for x in r["tasks"]}
    if "AlertConsumer" not in tasks or "T2Worker" not in tasks:
        raise SystemExit(f"missing task timings in {report}")
    t0, t2 = tasks["AlertConsumer"], tasks["T2Worker"]
    alerts = int(t0["return"] or 0)
    accepted = alerts if no_filter else len(r["accepted_ids"])
    return {
        "alerts": alerts, "t0_seconds": t0["seconds"], "accepted": accepted,
        "t2_states": int(t2["return"] or 0), "t2_seconds": t2["seconds"],
        # CPU seconds of the task: the ampel process, plus the DB server process for SecantusDB
        "t0_cpu_seconds": t0["cpu_seconds"] + (t0.get("server_cpu_seconds") or 0),
        "t2_cpu_seconds": t2["cpu_seconds"] + (t2.get("server_cpu_seconds") or 0),
        "t0_server_cpu_seconds": t0.get("server_cpu_seconds"), "t2_server_cpu_seconds": t2.get("server_cpu_seconds"),
        # wall seconds inside DB client calls (mongomock: the in-process DB itself; pymongo: client + server wait)
        "t0_db_seconds": t0.get("db_seconds", 0.0), "t2_db_seconds": t2.get("db_seconds", 0.0),
        "process_wall_s": wall, "loadavg_before": [round(x, 2) for x in load0],
        "t0_started_at_s": t0.get("started_at_s"),
        "accepted_ids": r["accepted_ids"], "db_stats": r.get("db_stats"), "progress": r.get("progress"),
        "filter_calls": r.get("filter_calls"), "versions": r.get("versions"), "rundir": str(rundir),
    }


def _segment_rates(run: dict) -> list | None:
    """alerts/s between consecutive progress marks of the T0 task (first repeat): a falling rate on
    replicated input (same alerts again, new ids) shows the database slowing down as it fills."""
    prog, start = run.get("progress"), run.get("t0_started_at_s")
    if not prog or start is None:
        return None
    out, n0, t0 = [], 0, start
    for n, t in prog:
        out.append([n, round((n - n0) / (t - t0), 1) if t > t0 else None])
        n0, t0 = n, t
    return out


def _timed_out_run(rundir: Path, timeout: int, wall: float, load0) -> dict:
    """What a run killed at --timeout got done, from the lines ampel_mock.py streams to stderr."""
    tasks, progress, starts = {}, [], {}
    for line in (rundir / "stderr.log").read_text(errors="replace").splitlines():
        if line.startswith("AMPEL_BENCH task_start"):
            f = dict(x.split("=", 1) for x in line.split()[2:])
            starts[f["unit"]] = float(f["t"])
        elif line.startswith("AMPEL_BENCH task="):
            f = dict(x.split("=", 1) for x in line.split()[1:])
            tasks[f["task"]] = f
        elif line.startswith("AMPEL_BENCH progress"):
            f = dict(x.split("=", 1) for x in line.split()[2:])
            progress.append([int(f["alerts"]), float(f["t"])])
    out = {"timed_out": True, "timeout_s": timeout, "process_wall_s": wall, "rundir": str(rundir),
           "loadavg_before": [round(x, 2) for x in load0], "progress": progress,
           "t0_started_at_s": starts.get("AlertConsumer")}
    if "AlertConsumer" in tasks:
        out["t0_finished"] = {"alerts": int(tasks["AlertConsumer"]["return"]),
                              "seconds": float(tasks["AlertConsumer"]["seconds"])}
    log(f"  TIMED OUT after {timeout} s; T0 {'finished' if 't0_finished' in out else 'unfinished'}; "
        f"progress {progress[-3:]}")
    return out


def summarize_timed_out(runs: list[dict], backend: str) -> dict:
    r = next(x for x in runs if x.get("timed_out"))
    res = {"backend": backend, "timed_out": True, "timeout_s": r["timeout_s"], "rundirs": [r["rundir"]],
           "t0_progress": r["progress"], "loadavg_before_all": [r["loadavg_before"]]}
    if "t0_finished" in r:
        f = r["t0_finished"]
        res.update(alerts=f["alerts"], t0_seconds=round(f["seconds"], 4),
                   t0_alerts_per_s=round(f["alerts"] / f["seconds"], 2), t2_states=None, t2_seconds=None,
                   t2_states_per_s=None, note="T0 finished, T2 did not finish within the timeout")
    elif r["progress"]:
        n, t = r["progress"][-1]
        t -= r.get("t0_started_at_s") or 0.0
        res.update(alerts=None, t0_seconds=None, t0_alerts_per_s=None,
                   t0_alerts_done=n, t0_alerts_per_s_so_far=round(n / t, 2),
                   note=f"T0 did not finish: {n} alerts supplied after {t:.0f} s of T0")
    res["t0_rate_by_segment"] = _segment_rates(r)
    return res


def summarize(runs: list[dict], backend: str, no_filter: bool) -> dict:
    if any(x.get("timed_out") for x in runs):
        return summarize_timed_out(runs, backend)
    first = runs[0]
    for key in ("alerts", "accepted", "t2_states"):
        vals = {x[key] for x in runs}
        if len(vals) != 1:
            raise SystemExit(f"{backend}: {key} differs between repeats: {sorted(vals)}")
    t0s = statistics.median(x["t0_seconds"] for x in runs)
    t2s = statistics.median(x["t2_seconds"] for x in runs)
    stats = first.get("db_stats") or {}
    ev = {e.get("tier"): e.get("duration") for e in stats.get("events", [])}
    return {
        "backend": backend,
        "alerts": first["alerts"],
        "t0_seconds": round(t0s, 4),
        "t0_alerts_per_s": round(first["alerts"] / t0s, 2) if t0s else None,
        "accepted": first["accepted"],
        "t2_states": first["t2_states"],
        "t2_seconds": round(t2s, 4),
        "t2_states_per_s": round(first["t2_states"] / t2s, 2) if t2s else None,
        # CPU-time view (less sensitive to other load on the machine than wall time)
        "t0_cpu_seconds": round(t0c := statistics.median(x["t0_cpu_seconds"] for x in runs), 4),
        "t0_alerts_per_cpu_s": round(first["alerts"] / t0c, 2) if t0c else None,
        "t2_cpu_seconds": round(t2c := statistics.median(x["t2_cpu_seconds"] for x in runs), 4),
        "t2_states_per_cpu_s": round(first["t2_states"] / t2c, 2) if t2c else None,
        # AMPEL's own time: task wall time minus time inside DB calls (median over repeats)
        "t0_db_seconds": round(t0d := statistics.median(x["t0_db_seconds"] for x in runs), 4),
        "t0_alerts_per_s_excl_db": round(first["alerts"] / (t0s - t0d), 2) if t0s > t0d else None,
        "t2_db_seconds": round(t2d := statistics.median(x["t2_db_seconds"] for x in runs), 4),
        "t2_states_per_s_excl_db": round(first["t2_states"] / (t2s - t2d), 2) if t2s > t2d else None,
        "t0_seconds_all": [round(x["t0_seconds"], 4) for x in runs],
        "t2_seconds_all": [round(x["t2_seconds"], 4) for x in runs],
        "process_wall_s_all": [round(x["process_wall_s"], 2) for x in runs],
        "loadavg_before_all": [x["loadavg_before"] for x in runs],
        "filter": not no_filter,
        "db_counts": {k: stats.get(k) for k in ("stock", "t0", "t1", "t2", "t2_by_code", "log_docs")},
        "ampel_event_duration_s": {"t0": ev.get(0), "t2": ev.get(2)},
        "t0_progress": first.get("progress"),
        "t0_rate_by_segment": _segment_rates(first),
        "rundirs": [x["rundir"] for x in runs],
    }


def reference_check(ref_csv: Path, tar_paths: list[str], accepted_ids: list) -> dict | None:
    """Compare accepted alert ids with the reference DecentFilter decisions of the same tarballs."""
    if not ref_csv.exists():
        return None
    names = {Path(p).name for p in tar_paths}
    rows = [r for r in csv.DictReader(ref_csv.open()) if r["tarball"] in names]
    if not rows or {r["tarball"] for r in rows} != names:
        return None
    ref_acc = {int(r["candid"]) for r in rows if r["accepted"] == "1"}
    got = {int(x) for x in accepted_ids}
    return {"reference": str(ref_csv), "reference_alerts": len(rows), "reference_accepted": len(ref_acc),
            "accepted": len(got), "same_ids": got == ref_acc,
            "only_here": sorted(got - ref_acc)[:20], "only_reference": sorted(ref_acc - got)[:20]}


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tar", action="append", default=[], help="ZTF alert tarball (repeatable)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-filter", action="store_true", help="no DecentFilter: every alert is ingested")
    ap.add_argument("--backend", choices=["mongomock", "secantus", "both"], default="mongomock")
    ap.add_argument("--layout", choices=["concat", "each"], default="concat",
                    help="several --tar: one concatenated stream (default) or one job per tarball, summed")
    ap.add_argument("--replicate", type=int, metavar="N",
                    help="run on N alerts made by replicating the --tar alerts under new candids/objectIds")
    ap.add_argument("--t2-unit", default="T2LightCurveSummary")
    ap.add_argument("--log-profile", default="default",
                    help="AMPEL logging profile of both tasks (default: 'default', what `ampel job` uses; "
                         "'prod' logs less to the console)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="reference decisions CSV (default: <tar dir>/../reference/ampel_decentfilter_decisions.csv)")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per ampel job process")
    ap.add_argument("--progress-every", type=int, default=500, help="record T0 progress every N alerts")
    ap.add_argument("--setup-only", action="store_true", help="create venv(s) and config, then exit")
    ap.add_argument("--rebuild-config", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on the last stdout line")
    a = ap.parse_args(argv)

    backends = ["mongomock", "secantus"] if a.backend == "both" else [a.backend]
    versions = ensure_ampel(force_config=a.rebuild_config)
    secantus_exe = ensure_secantus() if ("secantus" in backends or a.setup_only) else None
    if a.setup_only:
        return 0
    if not a.tar:
        ap.error("--tar is required")
    tars = [str(Path(p).resolve()) for p in a.tar]
    for p in tars:
        if not Path(p).is_file():
            ap.error(f"no such file: {p}")

    if a.replicate:
        inputs = [replicated_tarball(tars, a.replicate)]
        input_desc = {"replicated_from": tars, "replicated_alerts": a.replicate, "tarball": str(inputs[0])}
    elif len(tars) > 1 and a.layout == "concat":
        inputs = [concat_tarballs(tars)]
        input_desc = {"tarballs": tars, "concatenated": str(inputs[0])}
    else:
        inputs = [Path(p) for p in tars]
        input_desc = {"tarballs": tars, "layout": "each" if len(tars) > 1 else "single"}

    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for backend in backends:
        runs = []
        for rep in range(a.repeat):
            parts = []
            for i, tar in enumerate(inputs):
                rundir = RUNS_DIR / stamp / backend / f"rep{rep}" / f"input{i}"
                log(f"{backend} repeat {rep + 1}/{a.repeat}: {tar.name}")
                if backend == "secantus":
                    with SecantusServer(secantus_exe, rundir.parent) as srv:
                        parts.append(run_once(tar, srv.uri, a.no_filter, a.t2_unit, rundir, a.timeout,
                                              server_pid=srv.proc.pid, log_profile=a.log_profile,
                                              progress_every=a.progress_every))
                else:
                    parts.append(run_once(tar, "mongomock", a.no_filter, a.t2_unit, rundir, a.timeout,
                                          log_profile=a.log_profile, progress_every=a.progress_every))
                p = parts[-1]
                if p.get("timed_out"):
                    break
                log(f"  T0 {p['alerts']} alerts in {p['t0_seconds']:.2f} s ({p['alerts'] / p['t0_seconds']:.0f}/s, "
                    f"cpu {p['t0_cpu_seconds']:.1f} s, in DB calls {p['t0_db_seconds']:.1f} s), "
                    f"accepted {p['accepted']}; T2 {p['t2_states']} states in {p['t2_seconds']:.2f} s "
                    f"(in DB calls {p['t2_db_seconds']:.2f} s); "
                    f"process {p['process_wall_s']:.1f} s")
            if any(x.get("timed_out") for x in parts):
                runs.append(next(x for x in parts if x.get("timed_out")))
                break  # no further repeats after a timeout
            run = dict(parts[0])
            if len(parts) > 1:  # --layout each: sum over tarballs (one fresh DB per tarball)
                for k in ("alerts", "t0_seconds", "accepted", "t2_states", "t2_seconds", "process_wall_s",
                          "t0_cpu_seconds", "t2_cpu_seconds", "t0_db_seconds", "t2_db_seconds"):
                    run[k] = sum(x[k] for x in parts)
                run["accepted_ids"] = [i for x in parts for i in x["accepted_ids"]]
                run["rundir"] = str(Path(parts[0]["rundir"]).parent)
            runs.append(run)
        res = summarize(runs, backend, a.no_filter)
        if not a.no_filter and not a.replicate and not res.get("timed_out"):
            ref = a.reference or Path(tars[0]).parent.parent / "reference" / "ampel_decentfilter_decisions.csv"
            res["reference_check"] = reference_check(ref, tars, runs[0]["accepted_ids"])
        results[backend] = res

    # top level = the first backend that finished (mongomock with --backend both, unless it timed out)
    primary = next((r for r in results.values() if not r.get("timed_out")), results[backends[0]])
    out = {k: primary.get(k) for k in ("backend", "alerts", "t0_seconds", "t0_alerts_per_s", "accepted",
                                   "t2_states", "t2_seconds", "t2_states_per_s")}
    out["ampel_versions"] = versions
    out["backend_versions"] = {"mongomock": versions.get("mongomock")}
    if secantus_exe:
        out["backend_versions"]["secantusdb"] = _installed_versions(SECANTUS_VENV / "bin" / "python",
                                                                    ["secantusdb"]).get("secantusdb")
    out["t2_unit"] = a.t2_unit
    out["log_profile"] = a.log_profile
    out["repeats"] = a.repeat
    out["input"] = input_desc
    out.update({k: v for k, v in primary.items() if k not in out})
    if len(results) > 1:
        out["by_backend"] = results
    out["machine"] = {"nproc": os.cpu_count(), "python": sys.version.split()[0]}
    if a.json:
        print(json.dumps(out))
    else:
        for r in results.values():
            if r.get("timed_out"):
                print(f"{r['backend']:>9}: timed out ({r.get('note')})")
                continue
            print(f"{r['backend']:>9}: {r['alerts']} alerts, T0 {r['t0_seconds']:.2f} s = {r['t0_alerts_per_s']} alerts/s, "
                  f"accepted {r['accepted']}; T2 {r['t2_states']} states in {r['t2_seconds']:.3f} s = "
                  f"{r['t2_states_per_s']} states/s")
            if r.get("reference_check"):
                print(f"           reference check: {r['reference_check']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
