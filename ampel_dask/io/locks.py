"""Advisory locks on files: one run per store at a time, and scratch folders that say whether their
owner still lives.

A lock is a POSIX record lock (``fcntl.lockf``) on a small file, which NFS (v3 through its lock manager,
v4 natively) and Lustre (mounted with ``flock``) honour across nodes, and which the kernel releases when
its process dies however it dies: a lock is never stale. The holder writes who it is (pid, host, run id,
since) into the file, so that a second run can say whom it waits for.

POSIX locks belong to a process, not to a file descriptor: a second ``lockf`` from the same process
succeeds, and closing *any* descriptor of the file drops the lock. So this module keeps the locks of
this process in a registry: a lock taken again by the thread that holds it is re-entrant, by another
thread of the process it waits, and the file is never opened twice by its holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


class Busy(RuntimeError):
    """The lock is held by another run (``holder``: what it wrote about itself)."""

    def __init__(self, what: str, holder: dict | None, waited: float):
        self.holder = holder or {}
        self.waited = waited
        super().__init__(f"{what} is in use by {describe(self.holder)}" + (f" (waited {waited:g} s)" if waited else ""))


def describe(holder: dict) -> str:
    """'run R (pid P on host H since T)' from a lock's holder record."""
    if not holder:
        return "another process (it has not said who it is yet)"
    who = f"run {holder['run_id']}" if holder.get("run_id") else holder.get("what", "a process")
    return f"{who} (pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')})"


def identity(**extra: object) -> dict:
    """What a holder writes about itself."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}


@dataclass
class _Held:
    fd: int
    thread: int
    count: int
    info: dict


_HELD: dict[str, _Held] = {}  # real path -> this process's lock on it
_REGISTRY = threading.Condition()


def _key(path: Path) -> str:
    return os.path.realpath(path)


@contextmanager
def file_lock(path: Path, info: dict | None = None, wait: float | None = 0, what: str | None = None, poll: float = 0.2) -> Iterator[dict]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; yields the holder record.

    ``wait``: seconds to wait for another holder (0: not at all, None: for ever); then :class:`Busy`
    names the holder. Re-entrant for the thread that holds it (the outer holder record stays)."""
    key = _key(path)
    me = threading.get_ident()
    deadline = None if wait is None else time.monotonic() + wait
    start = time.monotonic()
    with _REGISTRY:
        while key in _HELD and _HELD[key].thread != me:  # another thread of this process holds it
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Busy(what or str(path), _HELD[key].info, round(time.monotonic() - start, 1))
            _REGISTRY.wait(left)
        if key in _HELD:
            _HELD[key].count += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield _HELD[key].info
        finally:
            with _REGISTRY:
                _HELD[key].count -= 1
        return
    record = identity(**(info or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:  # EACCES / EAGAIN: another process holds it
                if deadline is not None and time.monotonic() >= deadline:
                    raise Busy(what or str(path), holder(path), round(time.monotonic() - start, 1)) from None
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        with _REGISTRY:
            _HELD[key] = _Held(fd, me, 1, record)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield record
    finally:
        with _REGISTRY:
            _HELD[key].count -= 1
            if _HELD[key].count == 0:
                del _HELD[key]
                try:
                    os.ftruncate(fd, 0)  # no stale holder record for the next reader
                finally:
                    os.close(fd)  # releases the lock
            _REGISTRY.notify_all()


def holder(path: Path) -> dict | None:
    """What the holder of ``path`` wrote about itself (read by another process: never by the holder,
    whose lock a close of the file would drop)."""
    with _REGISTRY:
        if _key(path) in _HELD:
            return dict(_HELD[_key(path)].info)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return None


def is_held(path: Path) -> bool:
    """Does a live process (this one included) hold the lock on ``path``? A missing file is not held."""
    with _REGISTRY:
        if _key(path) in _HELD:
            return True
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:  # not ours to probe (read-only): take it as held, never sweep what we cannot tell
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock
    return False


LOCK_SUFFIX = ".lock"


@contextmanager
def scratch_dir(folder: Path, info: dict | None = None) -> Iterator[Path]:
    """A scratch folder owned by this process for the block: ``<folder>`` with ``<folder>.lock`` held
    beside it, so that :func:`sweep` elsewhere can tell it from one a killed process left. Removed
    (both) when the block ends."""
    lock = folder.with_name(folder.name + LOCK_SUFFIX)
    with file_lock(lock, info, wait=None):  # only a sweep's momentary probe can hold a fresh name
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)


def sweep(parent: Path) -> list[str]:
    """Remove the scratch folders under ``parent`` whose owners are dead: each ``<name>`` whose
    ``<name>.lock`` no process holds, and lock files left without their folder. Folders without a lock
    file (not made by :func:`scratch_dir`) are left alone. Returns the names removed."""
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return []
    removed = []
    for e in sorted(entries, key=lambda e: e.name):
        if not e.name.endswith(LOCK_SUFFIX):
            continue
        lock = Path(e.path)
        if is_held(lock):
            continue
        folder = lock.with_name(e.name[: -len(LOCK_SUFFIX)])
        shutil.rmtree(folder, ignore_errors=True)
        lock.unlink(missing_ok=True)
        removed.append(folder.name)
    return removed


__all__ = ["Busy", "file_lock", "holder", "is_held", "scratch_dir", "sweep", "describe", "identity"]
