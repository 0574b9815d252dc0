"""Compaction on a cluster: each night's merge is a Dask task, the index swap stays in this process.

The library part (which nights, merging, the atomic swap) is ``ampel_dask.io.compact``; this module
only decides where merges run: on a given client (one task per night, committed as each finishes) or
here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from ..io.archive import Archive, Staged
from ..io.compact import CompactOptions, CompactReport, Merger, NightWork, compact as compact_here, merge, merge_here


def cluster_merger(client) -> Merger:
    """Merge nights as tasks on ``client`` (the workers must see the archive's filesystem)."""

    def on_cluster(works: list[NightWork], root: str, opts: CompactOptions, tmp: str) -> Iterator[tuple[NightWork, list[Staged]]]:
        from distributed import as_completed

        futs = {client.submit(merge, root, w, opts.target_rows, tmp, opts.reference_bytes, pure=False): w for w in works}
        for fut in as_completed(list(futs)):
            yield futs[fut], fut.result()

    return on_cluster


def compact(archive: str | Path | Archive, options: CompactOptions | None = None, nights: Iterable[int] | None = None,
            surveys: list[str] | None = None, client=None, night_range: tuple[int, int] | None = None, fresh: Iterable[str] = ()) -> CompactReport:  # fmt: skip
    """Compact an archive's nights that hold more than one part below the target (see io/compact.py);
    ``night_range``: only nights from..to (inclusive)."""
    if night_range is not None:
        arch = archive if isinstance(archive, Archive) else Archive(archive)
        lo, hi = night_range
        nights = sorted({p.night for p in arch.partitions(surveys) if lo <= p.night <= hi} & (set(nights) if nights is not None else {p.night for p in arch.partitions(surveys)}))
    merger = merge_here if client is None else cluster_merger(client)
    return compact_here(archive, options, nights, surveys, merger, fresh)


__all__ = ["compact", "CompactOptions", "CompactReport"]


class Background:
    """Live mode's compaction: every ``every`` committed batches, the nights they wrote to are compacted
    in a thread of this process, so the next batches do not wait for it (only for the index swap, done
    with the store's lock held, between batches). Started only after a batch's offsets are
    committed: compaction moves rows between parts but never adds or drops one, so a replayed batch
    finds its alerts archived as duplicates either way (and runs on the merged parts that hold them).
    """

    def __init__(self, archive: str | Path, every: int, options: CompactOptions | None = None, store=None):
        import threading

        self.archive, self.every, self.options = Path(archive), every, options or CompactOptions()
        self.store = store  # its lock is held around each index swap: never while a batch runs
        self.nights: set[int] = set()
        self.batches = 0
        self.thread: threading.Thread | None = None
        self.reports: list[CompactReport] = []
        self.errors: list[str] = []

    def after_batch(self, nights: Iterable[int]) -> None:
        import threading

        if not self.every:
            return
        self.nights |= set(nights)
        self.batches += 1
        if self.batches < self.every or not self.nights or (self.thread is not None and self.thread.is_alive()):
            return
        todo, self.nights, self.batches = sorted(self.nights), set(), 0
        self.thread = threading.Thread(target=self._run, args=(todo,), name="ampel-dask-compact", daemon=True)
        self.thread.start()

    def _run(self, nights: list[int]) -> None:
        try:
            guard = None if self.store is None else (lambda: self.store.locked("live-compaction", None))
            self.reports.append(compact_here(self.archive, self.options, nights, guard=guard))
        except Exception as exc:  # the archive stays consistent (old parts); the next round tries again
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self.nights |= set(nights)

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join()
