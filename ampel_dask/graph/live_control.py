"""Stopping live mode: on a signal (finish the batch, or abandon it uncommitted), or, in tests, by a
SIGKILL at a chosen point of a chosen batch, exactly as a crash would."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .workflow import WorkflowError

log = logging.getLogger("ampel_dask.live")
CRASH_ENV = "AMPEL_DASK_LIVE_CRASH_AT"  # test hook: "<point>[:<batch>]", point in CRASH_POINTS
CRASH_POINTS = ("after_ingest", "during_run", "before_commit", "after_commit")


class Abandon(BaseException):
    """Raised by a second stop signal: leave the batch uncommitted and exit now."""


class StopFlag:
    """First SIGTERM/SIGINT: finish the current batch, commit it, stop. Second: abandon it (no commit)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._abandoned = False

    def requested(self) -> bool:
        return self.signal is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signal = signum

    def handler(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            log.info("%s: finishing the current batch, then stopping (again to abandon it)", signal.Signals(signum).name)
        elif not self._abandoned:
            self._abandoned = True
            log.warning("%s again: abandoning the current batch (nothing of it is committed)", signal.Signals(signum).name)
            raise Abandon()

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        try:  # dask-jobqueue sets SIGINT to sys.exit() when first imported: that must come before ours
            import dask_jobqueue  # noqa: F401
        except ImportError:
            pass
        old = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _crash_spec() -> tuple[str, int] | None:
    value = os.environ.get(CRASH_ENV)
    if not value:
        return None
    point, _, batch = value.partition(":")
    if point not in CRASH_POINTS:
        raise WorkflowError(f"{CRASH_ENV}={value!r}: the point is one of {', '.join(CRASH_POINTS)}")
    return point, int(batch or 1)


def _die(point: str, n: int) -> None:
    log.warning("%s: SIGKILL at %s of batch %d (test hook)", CRASH_ENV, point, n)
    for h in logging.getLogger().handlers + logging.getLogger("ampel_dask").handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def crash(point: str, n: int) -> None:
    if _crash_spec() == (point, n):
        _die(point, n)


@contextmanager
def crash_during_run(n: int, store_root: Path) -> Iterator[None]:
    """With the hook at ``during_run``: die as soon as the run has finished its first task."""
    if _crash_spec() != ("during_run", n):
        yield
        return
    tasks = store_root / "tasks"
    before = set(tasks.glob("*.json")) if tasks.exists() else set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if tasks.exists() and set(tasks.glob("*.json")) - before:
                _die("during_run", n)
            time.sleep(0.005)

    threading.Thread(target=watch, name="crash-during-run", daemon=True).start()
    try:
        yield
    finally:
        done.set()
