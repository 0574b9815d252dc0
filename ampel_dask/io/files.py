"""Files written atomically (temp file beside the target + rename) and made durable by their writer.

Every file ampel-dask writes goes through here: a reader never sees half a file, and a crash leaves at
most a ``.<name>.<token>.tmp`` beside it.

Durable means the file's bytes *and* its name (the folder entry the rename made) survive a power cut.
Only the process that wrote a file can do that for it: an ``os.sync()`` on the driver does nothing for
files a SLURM worker on another node wrote (and on a shared machine flushes every other user's dirty
pages too). So every process keeps a list of what it wrote, and makes it durable itself, in three
grades (the ``durable`` argument):

- ``True``: now (fsync of the file, then of its folder): indexes, manifests, delivery journals.
- ``False``: the file's bytes at this process's next :func:`sync`, or before the task's marker is
  written (:func:`commit`, the store's ``mark_task``): a marker never survives a crash its results did
  not. The marker is written by a background thread after those fsyncs, so the task need not wait.
- ``"checkpoint"``: at this process's next :func:`checkpoint`: task markers and journal rows, whose loss
  in a crash costs only a re-run of the task. Folders of the files above are made durable there too.

:func:`checkpoint` runs in every worker (and the driver) before a run manifest is written or live
offsets are committed. It makes everything listed durable with one ``syncfs`` per filesystem (Linux;
one journal commit instead of an fsync per small file), else with an fsync per file and folder.

Order, not only durability: a task's files are fsync'ed before its marker is written, and a journaling
filesystem (ext4, XFS) or NFS (renames are synchronous on the server) keeps renames in the order they
were made, so a marker that survives a crash has its task's files with it.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

Durable = bool | Literal["checkpoint"]

_PENDING: set[Path] = set()  # files renamed into place by this process, bytes not fsync'ed yet (sync)
_LATER: set[Path] = set()  # files and folders made durable at the next checkpoint
_LOCK = threading.Lock()  # a worker process runs tasks in threads


def atomic_write(path: Path, data: bytes, durable: Durable = True) -> None:
    """Write bytes (or any bytes-like object: an Arrow buffer) to a temp file beside ``path`` and rename
    it into place; durable now, at the next :func:`sync` (``False``) or the next :func:`checkpoint`
    (``"checkpoint"``), see the module docstring."""
    made = make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable is True:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    _made_durable(path, made, durable)


@contextmanager
def atomic_target(path: Path, durable: Durable = False, scratch: bool = False) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that wants a file name (Arrow, pandas, matplotlib);
    renamed onto ``path`` when the block succeeds, removed when it fails. Durable as :func:`atomic_write`
    says, or never (``scratch``: files a run removes when it ends, such as its shuffle)."""
    made = make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        if durable is True:
            fsync_file(tmp)
        os.replace(tmp, path)
        if not scratch:
            _made_durable(path, made, durable)
    finally:
        if tmp.exists():
            tmp.unlink()


def _made_durable(path: Path, made: list[Path], durable: Durable) -> None:
    if durable is True:
        fsync_dirs([path.parent, *made])
    elif durable is False:
        written(path)
        later(*made)
    else:
        later(path, path.parent, *made)


def make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p``; returns the folders whose entries it changed (the parents of the folders it made),
    which must be made durable too for a file in a new folder to be."""
    if folder.is_dir():
        return []
    made, p = [], folder
    while not p.exists():
        made.append(p.parent)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def written(*paths: Path) -> None:
    """Files whose bytes the next :func:`sync` of this process fsyncs (their folders: the checkpoint)."""
    with _LOCK:
        _PENDING.update(Path(p) for p in paths)


def later(*paths: Path) -> None:
    """Files or folders (e.g. after renames into them) the next :func:`checkpoint` makes durable."""
    with _LOCK:
        _LATER.update(Path(p) for p in paths)


def sync() -> int:
    """fsync the bytes of every file this process wrote with ``durable=False`` (a task, before it marks
    itself done); their folders wait for the checkpoint. Returns how many; cheap with nothing pending."""
    with _LOCK:
        if not _PENDING:
            return 0
        pending = list(_PENDING)
        _PENDING.clear()
    try:
        for p in pending:
            try:
                fsync_file(p)
            except FileNotFoundError:  # replaced or removed since (pruned, swept): nothing left to keep
                pass
    except BaseException:
        written(*pending)  # not synced: still pending
        raise
    later(*{p.parent for p in pending})
    return len(pending)


class _Committer:
    """This process's background writer of task markers: each after the bytes of every file the process
    wrote before it are fsync'ed. A task hands its marker over and returns; the fsyncs (I/O waits) overlap
    the next task's work instead of delaying it. :func:`checkpoint` waits for it to finish; an error it
    met is raised there (a run whose files did not become durable writes no manifest)."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.pid: int | None = None
        self.error: BaseException | None = None

    def submit(self, files: list[Path], path: Path, data: bytes) -> None:
        with _LOCK:
            if self.pid != os.getpid():  # first use in this process (or a forked child: no thread there yet)
                self.queue, self.pid, self.error = queue.Queue(), os.getpid(), None
                threading.Thread(target=self._run, args=(self.queue,), name="ampel-dask-committer", daemon=True).start()
        self.queue.put((files, path, data))

    def _run(self, q: queue.Queue) -> None:
        while True:
            files, path, data = q.get()
            try:
                for f in files:
                    try:
                        fsync_file(f)
                    except FileNotFoundError:  # replaced or removed since: nothing left to keep
                        pass
                later(*{f.parent for f in files})
                atomic_write(path, data, durable="checkpoint")
            except BaseException as exc:  # kept for the checkpoint: never lost in a thread
                self.error = self.error or exc
            finally:
                q.task_done()

    def drain(self) -> None:
        if self.pid == os.getpid():
            self.queue.join()
            if self.error is not None:
                exc, self.error = self.error, None
                raise OSError(f"a task's files could not be made durable: {exc}") from exc


_COMMITTER = _Committer()


def commit(path: Path, data: bytes) -> None:
    """Write ``path`` (a task's marker: the task is done) once the bytes of every file this process wrote
    with ``durable=False`` are fsync'ed, in the background, in order; durable at the next checkpoint."""
    with _LOCK:
        files = list(_PENDING)
        _PENDING.clear()
    _COMMITTER.submit(files, path, data)


def settle() -> None:
    """Wait until the markers this process handed to :func:`commit` are written (a reader in the same
    process then sees them; cheap when there are none)."""
    _COMMITTER.drain()


def checkpoint() -> int:
    """Make everything this process wrote durable, files and folders: before a run manifest is written or
    offsets are committed (every worker runs it; see the module docstring). Returns how many paths."""
    _COMMITTER.drain()
    sync()
    with _LOCK:
        if not _LATER:
            return 0
        paths = list(_LATER)
        _LATER.clear()
    try:
        _make_durable(paths)
    except BaseException:
        later(*paths)
        raise
    return len(paths)


def _make_durable(paths: list[Path]) -> None:
    """One syncfs per filesystem where the C library has it, else an fsync per file and folder."""
    by_fs: dict[int, Path] = {}
    alive = []
    for p in paths:
        try:
            by_fs.setdefault(os.stat(p).st_dev, p)
            alive.append(p)
        except FileNotFoundError:  # removed since: nothing to keep
            pass
    if _SYNCFS is not None:
        for p in by_fs.values():
            fd = os.open(p, os.O_RDONLY)
            try:
                if _SYNCFS(fd) != 0:
                    raise OSError(ctypes.get_errno(), f"syncfs failed on {p}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
        return
    for p in sorted(alive):
        if p.is_dir():
            fsync_dir(p)
        else:
            fsync_file(p)


def _syncfs():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux (or no syncfs in this C library)
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_SYNCFS = _syncfs() if os.environ.get("AMPEL_DASK_NO_SYNCFS") is None else None


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
    """How many files and folders wait for :func:`sync` or :func:`checkpoint` in this process."""
    with _LOCK:
        return len(_PENDING) + len(_LATER)
