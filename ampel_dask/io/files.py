"""Files written atomically (temp file beside the target + rename) and made durable.

Every file ampel-dask writes goes through here: a reader never sees half a file, and a crash leaves at
most a ``.<name>.<token>.tmp`` beside it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write bytes to a temp file beside ``path`` and rename it into place.

    ``durable=False`` skips the per-file fsync (the rename is still atomic): for many small files whose
    writer calls :func:`sync` once at a checkpoint instead (a run's end, a live batch's commit).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that wants a file name (Arrow, pandas, matplotlib);
    renamed onto ``path`` when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sync() -> None:
    """Flush every file written so far to disk (one call instead of an fsync per file)."""
    os.sync()
