"""``submit``: run a whole workflow inside a SLURM allocation (so the user can log out); ``status``.

The driver job runs ``ampel-dask run`` with a run id chosen at submission, so the submission, the SLURM
job and the run manifest can be tied together: ``STORE/submissions/<run id>.json`` records the job,
``STORE/runs/<run id>.json`` appears when the run is done.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..io.files import atomic_write
from .runner import new_run_id


class SlurmError(RuntimeError):
    pass


def _sbatch_script(command: list[str], job_name: str, log: Path, opts: dict) -> str:
    lines = ["#!/usr/bin/env bash", f"#SBATCH -J {job_name}", f"#SBATCH -o {log}", f"#SBATCH -e {log}"]
    if opts.get("partition"):
        lines.append(f"#SBATCH -p {opts['partition']}")
    lines += [f"#SBATCH -t {opts.get('time', '04:00:00')}", f"#SBATCH --cpus-per-task={opts.get('cpus', 1)}",
              f"#SBATCH --mem={opts.get('mem', '2G')}", "#SBATCH --export=ALL"]  # fmt: skip
    lines += [f"#SBATCH {x}" for x in opts.get("extra", [])]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}", 'echo "ampel-dask driver job $SLURM_JOB_ID on $(hostname)"',
              "exec " + " ".join(shlex.quote(c) for c in command)]  # fmt: skip
    return "\n".join(lines) + "\n"


def submit(workflow: str, store: str, archive: str | None = None, cluster: str | None = None, jobs: int | None = None,
           workers: int | None = None, sbatch: dict | None = None) -> dict:  # fmt: skip
    """Write and sbatch the driver job; returns {job_id, run_id, script, log}."""
    run_id = new_run_id()
    store_dir = Path(store).resolve()
    sub_dir = store_dir / "submissions"
    sub_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ampel_dask.cli", "run", str(Path(workflow).resolve()), "--store", str(store_dir), "--run-id", run_id, "--no-progress", "--json"]
    if archive:
        cmd += ["--archive", str(Path(archive).resolve())]
    if cluster:
        cmd += ["--cluster", cluster]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    log = sub_dir / f"{run_id}.log"
    script = sub_dir / f"{run_id}.sbatch"
    atomic_write(script, _sbatch_script(cmd, f"ampel-dask-{run_id}", log, sbatch or {}).encode())
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: is this a SLURM login node? (slurm/start_slurm.sh starts a one-node SLURM)") from None
    if out.returncode != 0:
        raise SlurmError(f"sbatch failed: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    record = {"run_id": run_id, "job_id": job_id, "workflow": str(Path(workflow).resolve()), "script": str(script), "log": str(log),
              "submitted": datetime.now(timezone.utc).isoformat(), "command": cmd}  # fmt: skip
    atomic_write(sub_dir / f"{run_id}.json", json.dumps(record, indent=1).encode())
    return record


def slurm_state(job_id: str) -> str:
    """PENDING / RUNNING / COMPLETED / FAILED / CANCELLED ... (scontrol knows recent jobs; sacct, if
    accounting is configured, older ones)."""
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True, timeout=30)
    if out.returncode == 0 and "JobState=" in out.stdout:
        return out.stdout.split("JobState=")[1].split()[0]
    acct = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True, timeout=30)
    if acct.returncode == 0 and acct.stdout.strip():
        return acct.stdout.split()[0]
    return "UNKNOWN (no longer known to SLURM)"


def status(run_id: str, store: str) -> dict:
    store_dir = Path(store)
    sub = store_dir / "submissions" / f"{run_id}.json"
    manifest_path = store_dir / "runs" / f"{run_id}.json"
    info: dict = {"run_id": run_id}
    if sub.exists():
        record = json.loads(sub.read_text())
        info.update(job_id=record["job_id"], submitted=record["submitted"], log=record["log"])
        try:
            info["slurm_state"] = slurm_state(record["job_id"])
        except FileNotFoundError:
            info["slurm_state"] = "UNKNOWN (no scontrol here)"
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        # a unit failed (the manifest says which: ``failures``), or a channel's max_pass_ratio stopped its T3
        state = {"failed": "failed", "stopped": "stopped"}.get(m.get("status"), "finished")
        info.update(state=state, alerts=m["alerts"], channels=m["channels"], t2=m["t2"], t3=m["t3"], seconds=m["seconds"], tasks=m["tasks"],
                    workers=m.get("workers"), failures=m.get("failures", []), **({"stopped": m["stopped"]} if m.get("stopped") else {}))  # fmt: skip
    elif sub.exists():
        st = info.get("slurm_state", "")
        info["state"] = "running" if st.startswith(("RUNNING", "PENDING", "CONFIGURING", "COMPLETING")) else f"not finished ({st})"
    else:
        raise FileNotFoundError(f"no run or submission {run_id} in {store_dir}")
    return info
