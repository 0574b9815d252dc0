"""Dask worker processes on this machine, started the same way by ingest, runs and benchmarks.

distributed's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` so that workers hand freed memory back to the
OS sooner. Setting it also pins glibc's mmap threshold at 128 KiB, so every larger numpy array becomes
a fresh mmap that is page-faulted in and zeroed. The ztf_archive graph on 1 M alerts, in one process:
~710k minor page faults and ~5.2 s of kernel time with that setting, ~165k and ~3.7 s with
:data:`WORKER_MALLOC`, which keeps arrays up to 32 MiB on the heap and still trims above 64 MiB of
free heap top.
"""

from __future__ import annotations

import os
from typing import Any

WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "67108864"}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


DISTRIBUTED_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "65536"}  # distributed's own pre-spawn value


def worker_environ() -> dict:
    """The nanny's ``pre-spawn-environ`` with :data:`WORKER_MALLOC`.

    distributed reads these variables from this process's environment over its config, and copies
    them into this environment when it starts workers: after a cluster started earlier in the process
    with distributed's own value, that value would win over ours. It is dropped from the environment
    here; any other value found there (the user's) is kept."""
    import dask
    import distributed  # noqa: F401  (its config defaults, read below)

    for k, v in DISTRIBUTED_MALLOC.items():
        if os.environ.get(k) == v:
            del os.environ[k]
    return {**(dask.config.get("distributed.nanny.pre-spawn-environ") or {}), **WORKER_MALLOC}


# distributed's defaults for interactive work that cost a batch pipeline time: each worker's profiler
# samples every thread's stack 100 times a second (the dashboard's Profile tab; it also takes the GIL
# from the task thread), and every server checks its event loop every 20 ms. On 1 M alerts with 2
# workers they were ~11% of the run (workers' CPU ~8.7 -> ~7.8 s each); idle, 1.8 core-s per 10 s.
# ``cluster.profile: true`` in a workflow keeps the profiler.
QUIET = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s"}


def quiet_environ(profile: bool = False) -> dict:
    """:data:`QUIET` as environment variables, for workers started elsewhere (SLURM jobs)."""
    return {} if profile else {"DASK_" + k.upper().replace(".", "__").replace("-", "_"): str(v) for k, v in QUIET.items()}


def local_cluster(workers: int | None = None, memory_limit: str | float | None = "auto", dashboard_address: str | None = ":0",
                  profile: bool = False) -> Any:  # fmt: skip
    """A LocalCluster of single-threaded worker processes (one per core by default), without the
    profiler unless asked (see :data:`QUIET`)."""
    import dask
    from distributed import LocalCluster

    # the nanny hands its config to the worker process; the scheduler reads the tick at start
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(), **({} if profile else QUIET)}):
        return LocalCluster(n_workers=workers or cores(), threads_per_worker=1, processes=True,
                            memory_limit=memory_limit, dashboard_address=dashboard_address)  # fmt: skip


def in_worker() -> bool:
    """Is this code running in a Dask worker?"""
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def cluster_map(fn: Any, items: list) -> list:
    """``[fn(x) for x in items]``, over the cluster when called inside a task (the calling task leaves
    its worker slot while it waits: ``worker_client``), else in turn: the mapper the framework hands
    to :class:`~ampel_dask.tiers.base.T3Context`."""
    if not in_worker():
        return [fn(x) for x in items]
    from distributed import worker_client

    with worker_client() as client:
        return client.gather(client.map(_Durable(fn), items, pure=False))


class _Durable:
    """``fn`` whose files are durable when it returns: each worker syncs what it wrote itself (the
    calling task's marker cannot do that for files written on another worker or node)."""

    def __init__(self, fn: Any):
        self.fn = fn
        from dask.utils import funcname

        self.__name__ = funcname(fn)  # task keys keep the function's name (the dashboard, tests)

    def __call__(self, item: Any) -> Any:
        from ..io.files import sync

        try:
            return self.fn(item)
        finally:
            sync()
