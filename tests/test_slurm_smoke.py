"""Smoke test: dask-jobqueue's SLURMCluster configured by slurm/jobqueue.yaml, on the one-node SLURM.

Needs SLURM (slurm/install.sh); skipped without it, failing in CI. About 10 s.
"""

from __future__ import annotations

import inspect
import os
import textwrap
import time
from pathlib import Path

import dask
import pytest
import yaml

from .slurm_fixture import slurm  # noqa: F401  (the session fixture; harmless if conftest imports it too)

JOBQUEUE_YAML = Path(__file__).resolve().parents[1] / "slurm" / "jobqueue.yaml"


def load_jobqueue_yaml(path: Path = JOBQUEUE_YAML) -> tuple[dict, dict]:
    """(dotted dask-config keys for jobqueue.slurm, the ampel_dask.slurm section)."""
    doc = yaml.safe_load(path.read_text())
    flat = {f"jobqueue.slurm.{k}": v for k, v in doc["jobqueue"]["slurm"].items()}
    return flat, doc.get("ampel_dask", {}).get("slurm", {})


def _settings(tmp_path: Path) -> tuple[dict, dict]:
    flat, ours = load_jobqueue_yaml()
    flat["jobqueue.slurm.log-directory"] = str(tmp_path / "logs")  # keep job logs with the test
    flat["jobqueue.slurm.local-directory"] = str(tmp_path / "scratch")
    flat["jobqueue.slurm.walltime"] = "00:05:00"
    flat["jobqueue.slurm.scheduler-options"] = {"dashboard_address": ":0"}  # no fixed port in tests
    return flat, ours


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def test_jobqueue_yaml_is_accepted(tmp_path):
    """Every key is one dask-jobqueue knows (it ignores unknown ones silently); the job script it renders."""
    from dask_jobqueue import SLURMCluster
    from distributed.deploy.adaptive import Adaptive

    flat, ours = _settings(tmp_path)
    known = set(dask.config.get("jobqueue.slurm"))
    unknown = {k.rsplit(".", 1)[1] for k in flat} - known
    assert not unknown, f"keys dask-jobqueue does not know: {unknown}"

    # ampel-dask's own section is read (graph/cluster.slurm_size; tests/test_cluster_settings.py): one of
    # jobs and adaptive; the commented adaptive alternative names only arguments adapt() takes
    assert set(ours) == {"jobs"} and ours["jobs"] >= 1
    section = JOBQUEUE_YAML.read_text().split("ampel_dask:", 1)[1].splitlines()
    commented = yaml.safe_load(textwrap.dedent("\n".join(ln.replace("#", " ", 1) for ln in section if ln.strip().startswith(("# adaptive:", "#   ")))))
    adapt_ok = {"minimum_jobs", "maximum_jobs"} | set(inspect.signature(Adaptive.__init__).parameters)
    assert commented["adaptive"] and set(commented["adaptive"]) <= adapt_ok
    assert commented["adaptive"]["minimum_jobs"] <= commented["adaptive"]["maximum_jobs"]

    with dask.config.set(flat), SLURMCluster() as cluster:  # no arguments: everything from the yaml
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")  # interface lo
    for line in ("#SBATCH -J ampel-dask-worker", "#SBATCH -p debug", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --mem=2G", "#SBATCH -t 00:05:00", "#SBATCH --export=ALL"):
        assert line in script, f"{line!r} not in job script:\n{script}"
    assert "--interface lo" in script and "--nthreads 1" in script and "--memory-limit 1.86GiB" in script


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slurm_cluster_workers_are_jobs(slurm, tmp_path):  # noqa: F811
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    flat, ours = _settings(tmp_path)
    n_jobs = ours["jobs"]
    t0 = time.monotonic()
    with dask.config.set(flat), SLURMCluster() as cluster:
        cluster.scale(jobs=n_jobs)
        with Client(cluster) as client:
            try:
                client.wait_for_workers(n_jobs, timeout=60)
            except TimeoutError:
                pytest.fail(f"{n_jobs} workers not up in 60 s\nsqueue:\n{slurm.squeue()}\n{slurm.log_tail()}")
            t_up = time.monotonic() - t0
            workers = sorted(client.scheduler_info()["workers"])
            futs = {w: client.submit(_job_id, workers=[w], allow_other_workers=False, pure=False) for w in workers}
            ids = {w: f.result(timeout=30) for w, f in futs.items()}
            running = slurm.running_job_ids()
        submitted = {job.job_id for job in cluster.workers.values()}

    assert all(ids.values()), f"a worker has no SLURM_JOB_ID: {ids}"
    assert len(set(ids.values())) == n_jobs, f"workers do not run in distinct jobs: {ids}"
    assert set(ids.values()) <= set(running), f"job ids {ids} not RUNNING in squeue ({running})"
    assert set(ids.values()) == submitted, f"job ids {ids} are not the ones dask-jobqueue submitted {submitted}"
    # closing the cluster cancels its jobs
    left = slurm.wait_jobs_gone(ids.values(), timeout=30)
    assert not left, f"jobs still in squeue after cluster.close(): {left}"
    print(f"{n_jobs} SLURM worker jobs up in {t_up:.1f} s: {sorted(ids.values())}")
