"""Files written atomically (temp file beside the target + rename) and made durable by their writer.

Every file ampel-dask writes goes through here: a reader never sees half a file, and a crash leaves at
most a ``.<name>.<token>.tmp`` beside it.

Durable means the file's bytes *and* its name (the folder entry the rename made) survive a power cut:
an fsync of the file and one of its folder. Only the process that wrote a file can do that for it (an
``os.sync()`` on the driver does nothing for files a SLURM worker on another node wrote, and on a
shared machine it flushes every other user's dirty pages too). So a writer either makes each file
durable at once (``durable=True``), or defers it (``durable=False``): the file is remembered in this
process, and :func:`sync` makes every remembered file and folder durable in one pass. Task bodies call
it (through the store's ``mark_task`` / ``sync``) before they report done, so whatever a task wrote is
durable before the driver writes a manifest or commits offsets.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

_PENDING: set[Path] = set()  # files renamed into place by this process, not fsync'ed yet
_PENDING_LOCK = threading.Lock()  # a worker process runs tasks in threads


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write bytes to a temp file beside ``path`` and rename it into place.

    ``durable=False`` defers the fsyncs (the rename is still atomic) to this process's next :func:`sync`:
    for the many small files of one task, made durable together when the task ends.
    """
    made = make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dirs([path.parent, *made])
    else:
        written(path, *made)


@contextmanager
def atomic_target(path: Path, durable: bool = False, scratch: bool = False) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that wants a file name (Arrow, pandas, matplotlib);
    renamed onto ``path`` when the block succeeds, removed when it fails. Made durable at once
    (``durable``), at this process's next :func:`sync` (default), or never (``scratch``: files a run
    removes when it ends, such as its shuffle)."""
    made = make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_dirs([path.parent, *made])
        elif not scratch:
            written(path, *made)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p``; returns the folders whose entries it changed (the parents of the folders it made),
    which must be synced too for a file in a new folder to be durable."""
    if folder.is_dir():
        return []
    made, p = [], folder
    while not p.exists():
        made.append(p.parent)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def written(*paths: Path) -> None:
    """Remember files (or folders whose entries changed, e.g. by a rename) for the next :func:`sync`."""
    with _PENDING_LOCK:
        _PENDING.update(Path(p) for p in paths)


def sync() -> int:
    """Make every file this process wrote without an fsync durable: each file, then each folder that
    holds one (a rename is durable only with its folder). Returns how many were synced; cheap when
    there is nothing pending."""
    with _PENDING_LOCK:
        if not _PENDING:
            return 0
        pending = list(_PENDING)
        _PENDING.clear()
    try:
        folders = set()
        for p in pending:
            if p.is_dir():
                folders.add(p)
                continue
            try:
                fsync_file(p)
            except FileNotFoundError:  # replaced or removed since (pruned, swept): nothing left to keep
                pass
            folders.add(p.parent)
        fsync_dirs(folders)
    except BaseException:
        written(*pending)  # not synced: still pending
        raise
    return len(pending)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that the names created, renamed or removed in it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:  # removed since (a run's scratch): nothing to keep
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[Path]) -> None:
    for d in sorted(set(paths)):
        fsync_dir(d)


def pending() -> int:
    """How many files wait for :func:`sync` in this process (tests and diagnostics)."""
    with _PENDING_LOCK:
        return len(_PENDING)
