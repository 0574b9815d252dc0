"""Where the graph runs: a LocalCluster (default), SLURM through dask-jobqueue, or a running scheduler.

The same workflow and graph run unchanged on each; only this module knows the difference.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dask
import yaml
from distributed.diagnostics.plugin import WorkerPlugin

from .workers import QUIET, WORKER_MALLOC, local_cluster, quiet_environ
from .workflow import ClusterSpec, WorkflowError

try:  # dask-jobqueue installs a SIGINT handler at import, which only the main thread may do
    import dask_jobqueue  # noqa: F401
except (ImportError, ValueError):  # not installed, or this module was first imported off the main thread
    pass


# how often a fixed-size SLURM cluster looks for ended jobs to replace: adapt()'s default of 1 s cost ~5%
# of a 13 s run on 2 jobs (mean of 3 alternating runs each; 5 s: no difference left)
KEEP_INTERVAL = "5s"


class _TaskFailureNoise(logging.Filter):
    """Drops distributed's per-task "Compute Failed" record (a traceback for every failed task, all of
    one cause) and the cancellations that follow it: the run reports the failure itself, once, in one
    line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Compute Failed", "Async instruction for"))


def quiet_task_failures(worker: Any = None) -> None:
    """Install :class:`_TaskFailureNoise` on the worker loggers of this process (idempotent)."""
    for name in ("distributed.worker", "distributed.worker.state_machine"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _TaskFailureNoise) for f in log.filters):
            log.addFilter(_TaskFailureNoise())


class QuietTaskFailures(WorkerPlugin):
    """:func:`quiet_task_failures` on a worker when it joins."""

    name = "ampel-dask-quiet-task-failures"

    def setup(self, worker: Any) -> None:
        quiet_task_failures(worker)


class DurableOnExit(WorkerPlugin):
    """A worker that leaves (``--lifetime``, a scaled-down SLURM job) first makes what it wrote durable:
    the run's checkpoint (``io/files.py``) only reaches the workers still there at its end."""

    name = "ampel-dask-durable-on-exit"

    def teardown(self, worker: Any) -> None:
        from ..io.files import checkpoint

        checkpoint()


def _quiet(client: Any) -> None:
    """On every worker of our own clusters, now and later (SLURM replaces ended jobs): durable files on
    exit, and quiet task failures unless AMPEL_DASK_DEBUG asks for everything."""
    client.register_plugin(DurableOnExit())
    if not os.environ.get("AMPEL_DASK_DEBUG"):
        client.register_plugin(QuietTaskFailures())


@contextmanager
def make_cluster(spec: ClusterSpec, log_dir: str | Path | None = None) -> Iterator[Any]:
    """A client of the cluster ``spec`` describes (overrides applied: :meth:`ClusterSpec.overridden`);
    ``log_dir``: where SLURM worker jobs write their output when no log-directory is configured."""
    from distributed import Client

    kind, workers = spec.kind, spec.workers

    if kind == "address":
        if not spec.address:
            raise WorkflowError("cluster.kind is 'address' but cluster.address is not set")
        with Client(spec.address) as client:
            yield client
        return
    if kind == "slurm":
        size = slurm_size(spec)
        cluster = slurm_cluster(spec, log_dir)
        try:
            if "adaptive" in size:
                cluster.adapt(**size["adaptive"])
            else:  # submitted now (adapt's first look comes a second later), then kept by adapt(): a job that
                n = size["jobs"]  # ends (walltime, scancel, node failure) is replaced, where
                cluster.scale(jobs=n)  # scale() alone would leave the run short of workers for good
                cluster.adapt(minimum_jobs=n, maximum_jobs=n, interval=KEEP_INTERVAL)
            with Client(cluster) as client:
                _quiet(client)
                client.wait_for_workers(1, timeout=180)
                yield client
        finally:
            cluster.close()
        return
    from distributed import LocalCluster

    if workers == 0:  # no worker processes: threads in this process (debugging, tiny inputs)
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    else:
        cluster = local_cluster(workers, spec.memory_limit or "auto", profile=spec.profile)
    try:
        with Client(cluster) as client:
            _quiet(client)
            yield client
    finally:
        cluster.close()


def _config_file(spec: ClusterSpec) -> dict:
    if not spec.config_file:
        return {}
    try:
        data = yaml.safe_load(Path(spec.config_file).read_text()) or {}
    except OSError as exc:
        raise WorkflowError(f"cluster.config_file {spec.config_file}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"cluster.config_file {spec.config_file}: not a mapping (jobqueue:, ampel_dask:)")
    return data


def jobqueue_settings(spec: ClusterSpec, log_dir: str | Path | None = None) -> dict:
    """dask-jobqueue ``jobqueue.slurm`` settings: the config file's (e.g. slurm/jobqueue.yaml), then the
    workflow's ``cluster.jobqueue`` on top; keys as in dask-jobqueue's own yaml (``log-directory``).

    Worker jobs' output goes to the configured ``log-directory`` (here or in dask's config); without
    one, to ``log_dir``: SLURM would otherwise write ``slurm-<job>.out`` files into the directory the
    user ran the command from."""
    settings: dict = {"cores": 1, "memory": "1GB", "scheduler-options": {"dashboard_address": ":0"}}
    settings.update((_config_file(spec).get("jobqueue") or {}).get("slurm") or {})
    settings.update({k.replace("_", "-"): v for k, v in spec.jobqueue.items()})
    if settings.get("log-directory") is None and dask.config.get("jobqueue.slurm.log-directory", None) is None and log_dir is not None:
        settings["log-directory"] = str(log_dir)
    return settings


def slurm_log_dir(store_root: str | Path) -> Path:
    """Where a run's SLURM worker jobs write their output when no log-directory is configured."""
    return Path(store_root).resolve() / "logs" / "slurm"


SIZE_KEYS = {"jobs", "adaptive"}


def slurm_size(spec: ClusterSpec) -> dict:
    """How many SLURM worker jobs: ``{"jobs": n}`` (a fixed number, ended jobs replaced) or
    ``{"adaptive": {...}}`` (``cluster.adapt`` arguments). The workflow's ``cluster.jobs`` /
    ``cluster.adaptive`` (or ``--jobs``) first; else the config file's ``ampel_dask: slurm:`` section
    (one of ``jobs`` and ``adaptive``); else one job."""
    if spec.jobs:
        return {"jobs": spec.jobs}
    if spec.adaptive:
        return {"adaptive": dict(spec.adaptive)}
    own = (_config_file(spec).get("ampel_dask") or {}).get("slurm") or {}
    where = f"cluster.config_file {spec.config_file}: ampel_dask.slurm"
    if not isinstance(own, dict):
        raise WorkflowError(f"{where} is a mapping with jobs or adaptive, not {own!r}")
    if set(own) - SIZE_KEYS:
        raise WorkflowError(f"{where} takes jobs or adaptive, not {', '.join(sorted(set(own) - SIZE_KEYS))}")
    if own.get("jobs") is not None and own.get("adaptive") is not None:
        raise WorkflowError(f"{where} gives both jobs and adaptive: give one (a fixed number of jobs, or adapt() arguments)")
    if own.get("adaptive") is not None:
        if not isinstance(own["adaptive"], dict):
            raise WorkflowError(f"{where}.adaptive is a mapping of adapt() arguments, e.g. {{minimum_jobs: 1, maximum_jobs: 4}}")
        return {"adaptive": dict(own["adaptive"])}
    jobs = own.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise WorkflowError(f"{where}.jobs is a number of worker jobs >= 1, not {jobs!r}")
    return {"jobs": jobs}


def slurm_cluster(spec: ClusterSpec, log_dir: str | Path | None = None):
    """A SLURMCluster from those settings (as keyword arguments: dask-jobqueue reads its config again
    whenever it makes a job, so a temporary config would be gone by then)."""
    from dask_jobqueue import SLURMCluster

    kwargs = {("job_name" if k == "name" else k.replace("-", "_")): v for k, v in jobqueue_settings(spec, log_dir).items() if v is not None}
    # the job's nanny takes these from its environment over its config (see WORKER_MALLOC, QUIET)
    exports = " ".join(f"{k}={v}" for k, v in {**WORKER_MALLOC, **quiet_environ(spec.profile)}.items())
    kwargs["job_script_prologue"] = [f"export {exports}", *(kwargs.get("job_script_prologue") or [])]
    with dask.config.set({} if spec.profile else QUIET):  # this process runs the scheduler
        return SLURMCluster(**kwargs)
