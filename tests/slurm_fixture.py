"""Session fixture ``slurm``: the project's one-node SLURM (slurm/start_slurm.sh) for tests.

Use from tests/conftest.py with ``from .slurm_fixture import slurm  # noqa: F401`` (tests/ is a package).
If SLURM is not installed the tests that use it are skipped, or fail when the env var CI is set.
SLURM is started with SLURM_FAKE_CPUS=8 (unless set) so that 3+ one-core jobs run at once on a 2-core box.
If SLURM was already running (same AMPEL_DASK_SLURM_DIR), it is used and left running; otherwise it is
stopped at the end of the session (stop_slurm.sh: cancel jobs, kill the daemons by PID). Set
AMPEL_DASK_SLURM_KEEP=1 to leave it running for faster repeated local runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = ROOT / "slurm"
DEFAULT_DIR = "/tmp/ampel-dask-slurm"


@dataclass
class SlurmNode:
    """A running one-node SLURM: where its files are, and small squeue helpers."""

    dir: Path  # state, spool, logs, pid files (AMPEL_DASK_SLURM_DIR)
    conf: Path  # slurm.conf (also exported as SLURM_CONF for the session)
    started_here: bool  # False if it was already running before the session
    start_output: str

    def squeue(self, *args: str) -> str:
        out = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=30, check=True)
        return out.stdout

    def job_ids(self) -> list[str]:
        """Ids of all jobs SLURM still lists (pending, running, completing)."""
        return self.squeue("-o", "%A").split()

    def running_job_ids(self) -> list[str]:
        """Ids of the jobs in state RUNNING."""
        return self.squeue("-t", "RUNNING", "-o", "%A").split()

    def wait_jobs_gone(self, ids, timeout: float = 30.0) -> list[str]:
        """Wait until none of ``ids`` is listed any more; returns those still listed at the timeout."""
        ids = {str(i) for i in ids}
        deadline = time.monotonic() + timeout
        while True:
            left = sorted(ids & set(self.job_ids()))
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def log_tail(self, n: int = 20) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.dir / "log" / name
            if p.exists():
                parts.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(parts)


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide SLURM: run slurm/install.sh in .ci/run)", pytrace=False)
    pytest.skip(reason)


def _run(script: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM_SCRIPTS / script)], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def slurm():
    missing = [b for b in ("sinfo", "squeue", "sbatch", "slurmctld", "slurmd", "munged") if shutil.which(b) is None]
    if missing:
        _unavailable(f"SLURM not installed (missing {', '.join(missing)}): run slurm/install.sh as root")
    if os.geteuid() != 0:
        _unavailable("starting the one-node SLURM (slurmd, munged) needs root")

    env = dict(os.environ)
    env.setdefault("AMPEL_DASK_SLURM_DIR", DEFAULT_DIR)
    env.setdefault("SLURM_FAKE_CPUS", "8")
    state_dir = Path(env["AMPEL_DASK_SLURM_DIR"])
    try:
        res = _run("start_slurm.sh", env, timeout=180)
    except subprocess.TimeoutExpired as exc:
        _run("stop_slurm.sh", env, timeout=120)
        pytest.fail(f"slurm/start_slurm.sh did not finish in {exc.timeout} s", pytrace=False)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        pytest.fail(f"slurm/start_slurm.sh failed (exit {res.returncode}):\n{out}", pytrace=False)

    node = SlurmNode(
        dir=state_dir,
        conf=state_dir / "slurm.conf",
        started_here="status=started" in res.stdout,
        start_output=out,
    )
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(node.conf)  # sbatch/squeue/scancel from this process and dask-jobqueue
    try:
        yield node
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if node.started_here and not os.environ.get("AMPEL_DASK_SLURM_KEEP"):
            res = _run("stop_slurm.sh", env, timeout=120)
            if res.returncode != 0:
                pytest.fail(f"slurm/stop_slurm.sh failed:\n{res.stdout}{res.stderr}", pytrace=False)
