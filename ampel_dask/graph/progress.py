"""The one loop that waits for Dask futures, with a progress bar on a terminal: ingest and run share it.

``as_finished`` yields futures as they complete; given thunks instead of futures it submits them lazily,
keeping at most ``window`` in flight (an ingest's chunks carry their packets: submitting a whole night at
once would hold it all in memory).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any


def on_terminal(flag: bool | None) -> bool:
    """Progress shown? ``None``: when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


class Progress:
    """A tqdm bar on stderr, or nothing (``enabled`` False)."""

    def __init__(self, enabled: bool | None, total: int, desc: str, unit: str = "task", unit_scale: bool = False):
        self.bar = None
        if on_terminal(enabled):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(refresh=False, **postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_finished(work: Iterable[Any], window: int | None = None) -> Iterator[Any]:
    """Futures in the order they finish. ``work``: futures, or thunks that submit one each (called
    lazily, at most ``window`` futures pending at a time)."""
    from distributed import as_completed

    pending = as_completed()
    for item in work:
        pending.add(item() if callable(item) else item)
        while window is not None and pending.count() >= window:
            yield next(pending)
    yield from pending
