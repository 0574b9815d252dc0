"""Fail a run whose cluster has no worker able to work, instead of waiting for ever.

A SLURM worker job that reaches its walltime or is cancelled leaves the scheduler without workers (a fixed
number of jobs is not resubmitted), and a worker above 80% of its memory limit pauses until memory is
freed, which may never happen. Either way the run's futures would wait silently. The watchdog looks at
the scheduler every few seconds; after ``timeout`` seconds without a worker in the ``running`` state it
cancels the run's futures and keeps the reason, which the runner raises.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class StalledRun(RuntimeError):
    """No Dask worker could run tasks for longer than the configured stall timeout."""


class Watchdog:
    def __init__(self, client: Any, futures: list, timeout: float | None, interval: float | None = None):
        self.client, self.futures, self.timeout = client, futures, timeout
        self.interval = interval or min(5.0, max((timeout or 0) / 4, 0.2))
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ampel-dask-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.timeout:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)

    def workers_state(self) -> tuple[int, dict[str, int]]:
        """(workers able to run tasks, count of workers by status) as the scheduler sees them now."""
        try:
            info = self.client.scheduler_info(n_workers=-1)  # distributed >= 2025.4 lists only 5 by default
        except TypeError:
            info = self.client.scheduler_info()
        workers = info.get("workers", {})
        by_status: dict[str, int] = {}
        for w in workers.values():
            s = str(w.get("status", "running"))
            by_status[s] = by_status.get(s, 0) + 1
        return by_status.get("running", 0), by_status

    def _watch(self) -> None:
        since = None
        while not self._stop.wait(self.interval):
            try:
                running, by_status = self.workers_state()
            except Exception:  # scheduler busy or closing: look again later
                continue
            if running:
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since >= self.timeout:
                seen = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "no workers at all"
                self.reason = (
                    f"run stalled: no Dask worker able to run tasks for {self.timeout:.0f} s ({seen}). "
                    "Worker jobs may have reached their walltime or been cancelled, or workers paused "
                    "because they are near their memory limit (raise `memory` in the jobqueue settings); "
                    "cluster.stall_timeout sets this limit"
                )
                self.client.cancel([f for f in self.futures if not f.done()])
                return


__all__ = ["StalledRun", "Watchdog"]
