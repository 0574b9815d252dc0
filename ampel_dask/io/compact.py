"""Compaction: a night's small parts rewritten as parts of ``target_rows``, so that the archive's shape
does not depend on the order its alerts came in.

A stream that cycles through nights (per-alert files of many nights, a broker's dump, live
micro-batches) leaves one tiny part per night and chunk; runs on such an archive pay per part. The rule:
a night holding more than one part that is not full (``rows != target_rows``), or one above it, has
those parts merged: their rows (flat columns, histories) put in canonical order
(:func:`~.archive.sort_rows`) and cut into parts of exactly ``target_rows`` rows, the last one holding
the rest. Full parts are never rewritten. Cutouts are most of the bytes: a merged part references the
cutouts files of its sources that hold at least ``reference_bytes`` (a decode chunk's), read filtered
by its alert ids, and only smaller ones are rewritten into its own file. So
a night ends with ``ceil(n / target_rows)`` parts of ``target_rows`` rows (the last smaller) whatever the
input order, and a night ingested in one go (or first compacted after all its alerts came) gets the same
parts, byte for byte, from any order.

Three steps, so that the heavy one runs anywhere (a Dask worker) and only the last takes the lock:
:func:`plan` (nights to merge, from the index), :func:`merge` (read the parts, write new ones under a
scratch folder, durable) and :func:`commit` (under :meth:`Archive.publishing`: check that the parts are
still indexed, rename the new ones into place, ONE atomic index write replacing the old entries with the
new, for up to ``COMMIT_NIGHTS`` merged nights at a time, then retire the old files). A crash before the index write leaves the old parts indexed and the
renamed new files unindexed (swept as orphans by the next publish, the ``_publishing`` marker says so);
after it, the new parts. Never both, never neither.

Readers: after the swap, the replaced files are moved to ``ARCHIVE/_retired/`` (same relative paths;
listed in ``_retired.json`` with the time) and deleted by a later compaction once ``grace_seconds``
(default one hour) have passed. So a reader of the folders (``pyarrow.dataset``, DuckDB) never sees a
row twice, and a process that had a replaced file open goes on reading it; a run that read the index
before the swap and opens a replaced part after it fails with FileNotFoundError naming the file (a
re-run reads the new index) rather than reading anything twice. Live mode swaps with the store's lock
held, so never under one of its own runs (graph/compact.Background).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from .archive import REFERENCE_BYTES, RETIRED, ROW_ORDER, Archive, Partition, Staged, discard, stage
from .files import atomic_write
from .history import carry_coverage, live_files
from .locks import scratch_dir, sweep

TARGET_ROWS = 25_000
RETIRED_DIR = "_retired"  # replaced files wait here (same relative paths) for their grace period
#: bytes of source parts and pieces a merge holds in memory before it spills pieces to disk: spilling
#: every piece made a night of tiny parts (a stream cycling through nights) thousands of few-row files
HOLD_BYTES = 128 << 20
COMMIT_NIGHTS = 64  # merged nights swapped in per index write (one lock, one index fsync for all of them)


class CompactOptions(BaseModel):
    """What compaction aims for."""

    target_rows: int = Field(TARGET_ROWS, gt=0, description="rows per part written (a night with fewer becomes one part)")
    grace_seconds: float = Field(3600.0, ge=0, description="replaced files are kept this long for runs still reading them")
    reference_bytes: int = Field(REFERENCE_BYTES, ge=0, description="a cutouts file this large is referenced by the merged parts, not rewritten")


@dataclass(frozen=True)
class NightWork:
    """One night's parts to merge (none of them full)."""

    survey: str
    night: int
    parts: tuple[Partition, ...]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)


@dataclass
class CompactReport:
    nights: int = 0
    parts_before: int = 0  # in the whole archive (or the nights asked for)
    parts_after: int = 0
    replaced: int = 0  # parts merged away
    written: int = 0  # parts written
    skipped: int = 0  # nights changed by someone else meanwhile (left for the next compaction)
    deleted: list[str] = field(default_factory=list)  # retired files deleted after their grace period
    replaced_paths: set[str] = field(default_factory=set)  # index paths merged away
    new_parts: list[Partition] = field(default_factory=list)  # what they became
    seconds: float = 0.0

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("nights", "parts_before", "parts_after", "replaced", "written", "skipped", "seconds")}


def plan(arch: Archive, target_rows: int = TARGET_ROWS, nights: Iterable[int] | None = None, surveys: list[str] | None = None,
         fresh: Iterable[str] = ()) -> list[NightWork]:  # fmt: skip
    """Nights not in shape, from the index alone (no file is read): more than one part that is not
    full (``rows != target_rows``), or one part above the target (an ingest chunk larger than it).
    ``fresh``: paths of parts an ingest just wrote, never taken as full (a chunk may hold exactly
    ``target_rows`` of a night without being a canonical cut of it)."""
    wanted = set(nights) if nights is not None else None
    fresh = set(fresh)
    loose: dict[tuple[str, int], list[Partition]] = defaultdict(list)
    for p in arch.partitions(surveys):
        if (p.rows != target_rows or p.path in fresh) and (wanted is None or p.night in wanted):
            loose[(p.survey, p.night)].append(p)
    return [NightWork(s, n, tuple(sorted(ps, key=lambda p: p.path))) for (s, n), ps in sorted(loose.items())
            if len(ps) > 1 or ps[0].rows > target_rows]  # fmt: skip


def merge(root: str | Path, work: NightWork, target_rows: int, tmp_dir: str | Path, reference_bytes: int = REFERENCE_BYTES) -> list[Staged]:
    """Read a night's parts and stage their rows as canonical parts of ``target_rows`` (durable; no lock
    taken: :func:`commit` checks that the parts were not replaced meanwhile).

    Memory: about :data:`HOLD_BYTES` of source parts and pieces (and one source part and one output
    part beyond it). The canonical position of every row is found from the sort keys; each source part
    is then split into the output parts' pieces. Whenever the pieces in memory pass the budget, the
    largest output part's go to disk as one uncompressed Arrow file under ``tmp_dir``. Parts read whole
    for their keys while under the budget are kept, not read again. Cutouts files of ``reference_bytes``
    or more are referenced by the output parts that get their alerts, not read."""
    arch, tmp = Archive(root), Path(tmp_dir) / uuid.uuid4().hex
    spill_dir = tmp / "spill"
    spill_dir.mkdir(parents=True, exist_ok=True)
    if work.rows <= target_rows:  # one output part (the usual case): no sort-key pass, nothing spilled
        tables = [arch.read(p) for p in work.parts]
        refs, cuts = set(), []
        for p in work.parts:
            kept, cut = _cutouts(arch, p, reference_bytes)
            refs |= kept
            if cut is not None:
                cuts.append(cut)
        table = pa.concat_tables(tables, promote_options="permissive")
        staged = [stage(table, pa.concat_tables(cuts, promote_options="permissive") if cuts else None, tmp)]
        staged[0].cutout_refs = tuple(sorted(refs))
        shutil.rmtree(spill_dir, ignore_errors=True)
        return staged
    keys, held, used = [], {}, 0  # held: source parts read whole while under the budget (``used`` bytes)
    sort_columns = [name for name, _ in ROW_ORDER]
    for j, part in enumerate(work.parts):
        if used < HOLD_BYTES:
            held[j] = arch.read(part)
            used += held[j].get_total_buffer_size()
        k = held[j].select(sort_columns) if j in held else arch.read(part, sort_columns)
        keys.append(k.append_column("src", pa.array(np.full(k.num_rows, j, dtype=np.int32))).append_column("row", pa.array(np.arange(k.num_rows, dtype=np.int64))))
    order = pa.concat_tables(keys).sort_by(ROW_ORDER)
    n = order.num_rows
    slot = np.empty(n, dtype=np.int64)  # output part of each row, per source part
    out_of = np.arange(n) // target_rows
    src, row = order.column("src").to_numpy(), order.column("row").to_numpy()
    offsets = np.concatenate([[0], np.cumsum([p.rows for p in work.parts])])
    slot[offsets[src] + row] = out_of
    nout = max(1, math.ceil(n / target_rows))
    pieces: dict[int, list] = defaultdict(list)  # output part -> its (rows, cutouts) pieces, in source order
    in_memory: dict[int, int] = defaultdict(int)  # output part -> bytes of its pieces still in memory
    refs: dict[int, set[str]] = defaultdict(set)
    for j, part in enumerate(work.parts):
        if j in held:  # its bytes now count as the pieces cut from it
            table = held.pop(j)
            used -= table.get_total_buffer_size()
        else:
            table = arch.read(part)
        kept, cut = _cutouts(arch, part, reference_bytes)
        mine = slot[offsets[j] : offsets[j + 1]]
        rows, cuts = _by_slot(table, cut, mine)
        row_bytes = table.get_total_buffer_size() / max(1, table.num_rows)  # a piece's share of the part's buffers
        cut_bytes = cut.get_total_buffer_size() / max(1, cut.num_rows) if cut is not None else 0
        for k in np.unique(mine):
            refs[int(k)] |= kept
            t, c = rows[k], cuts.get(k, cut.slice(0, 0)) if cut is not None else None
            size = int(t.num_rows * row_bytes + (c.num_rows * cut_bytes if c is not None else 0))
            pieces[int(k)].append((t, c))
            in_memory[int(k)] += size
            used += size
            while used > HOLD_BYTES and in_memory:  # the largest output part's pieces in memory go to disk, as one file
                big = max(in_memory, key=in_memory.__getitem__)
                used -= in_memory.pop(big)
                pieces[big] = _spill_pieces(spill_dir, big, pieces[big])
    staged = []
    for k in range(nout):
        ts = [_unspill(t) for t, _ in pieces[k]]
        cs = [_unspill(c) for _, c in pieces[k] if c is not None]
        table = pa.concat_tables(ts, promote_options="permissive")
        cutouts = pa.concat_tables(cs, promote_options="permissive") if cs else None
        staged.append(stage(table, cutouts, tmp))  # durable: fsync'ed here, by the process that wrote them
        staged[-1].cutout_refs = tuple(sorted(refs[k]))
        pieces.pop(k)
    shutil.rmtree(spill_dir, ignore_errors=True)
    return staged


def _by_slot(table: pa.Table, cut: pa.Table | None, slot: np.ndarray) -> tuple[dict, dict]:
    """A source part's rows and cutouts cut into their output parts' pieces (``slot``: each row's
    output part), in source order within a piece, as zero-copy slices (a filter per piece costs a few
    compute calls, which tiny parts pay hundreds of times). A cutout goes with its alert's row (one
    ``index_in``); cutouts of alerts not in the part are left out."""
    rows = _slices(table, slot)
    if cut is None:
        return rows, {}
    at = pc.index_in(cut.column("alert_id"), value_set=table.column("alert_id")).to_numpy(zero_copy_only=False)
    mine = np.flatnonzero(~np.isnan(at))  # nulls (alerts of other parts) come back as NaN
    return rows, _slices(cut if len(mine) == cut.num_rows else cut.take(mine), slot[at[mine].astype(np.int64)])


def _slices(table: pa.Table, slot: np.ndarray) -> dict[int, pa.Table]:
    """``table``'s rows by ``slot``, in their order within each: zero-copy slices when the slots do not
    decrease (a part's rows are in canonical order, so its output parts follow one another)."""
    if len(slot) > 1 and np.any(slot[1:] < slot[:-1]):
        order = np.argsort(slot, kind="stable")
        table, slot = table.take(order), slot[order]
    keys, starts = np.unique(slot, return_index=True)
    ends = [*starts[1:], len(slot)]
    return {int(k): table.slice(a, b - a) for k, a, b in zip(keys, starts, ends)}


def _cutouts(arch: Archive, part: Partition, reference_bytes: int) -> tuple[set[str], pa.Table | None]:
    """A source part's cutouts files to reference (those of ``reference_bytes`` or more), and the rest
    of its cutouts, read to be rewritten."""
    files = part.cutout_files
    kept = {f for f in files if (arch.root / f).stat().st_size >= reference_bytes}
    rest = tuple(f for f in files if f not in kept)
    return kept, arch.read_cutouts(part, files=rest) if rest else None


def _spill_pieces(spill_dir: Path, k: int, pieces: list[tuple]) -> list[tuple]:
    """Output part ``k``'s pieces with those in memory (after those spilled before) written as one rows
    file and one cutouts file."""
    on_disk = [p for p in pieces if isinstance(p[0], Path)]
    stem = spill_dir / f"{k}-{len(on_disk)}"
    rows = pa.concat_tables([t for t, _ in pieces[len(on_disk) :]], promote_options="permissive")
    cuts = [c for _, c in pieces[len(on_disk) :] if c is not None]
    cut = _spill(stem.with_suffix(".cut.arrow"), pa.concat_tables(cuts, promote_options="permissive")) if cuts else None
    return [*on_disk, (_spill(stem.with_suffix(".arrow"), rows), cut)]


def _spill(path: Path, table: pa.Table) -> Path:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return path


def _unspill(x: pa.Table | Path) -> pa.Table:
    if isinstance(x, pa.Table):
        return x
    with pa.memory_map(str(x)) as src:
        return pa.ipc.open_file(src).read_all()


def commit(arch: Archive, work: NightWork, staged: list[Staged]) -> list[Partition] | None:
    """Swap a night's merged parts in (see the module doc); None if its parts changed meanwhile."""
    return commit_many(arch, [(work, staged)])[0]


def commit_many(arch: Archive, merged: list[tuple[NightWork, list[Staged]]]) -> list[list[Partition] | None]:
    """Swap several nights' merged parts in with one index write (one lock, one fsync of the index);
    a night whose parts changed meanwhile is discarded (None)."""
    out: list[list[Partition] | None] = []
    with arch.publishing():
        before = arch.partitions()
        indexed = {p.path for p in before}
        gone, new_all, old, moved = [], [], set(), []
        for work, staged in merged:
            if not all(p.path in indexed for p in work.parts):
                for s in staged:
                    discard(s)
                out.append(None)
                continue
            new = [arch.publish(s) for s in staged]
            out.append(new)
            gone += [p.path for p in work.parts]
            new_all += new
            moved.append(([(p.survey, p.content_hash) for p in work.parts], [(p.survey, p.content_hash) for p in new]))
            old |= {f for p in work.parts for f in p.files}
        if new_all:
            replaced = set(gone)
            live = {f for p in before if p.path not in replaced for f in p.files}  # files other parts share
            retired = sorted(old - live - {f for p in new_all for f in p.files})
            arch.retire(retired)  # before the swap: an entry for a file still indexed is never acted on
            arch.replace_partitions(gone, new_all)
            carry_coverage(arch.root, moved)  # same rows: the history store covers the new parts as it did the old
            for f in retired:  # out of the folders: dataset readers of survey=*/night=* never see a row twice
                dest = arch.root / RETIRED_DIR / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(arch.root / f, dest)
    return out


def delete_retired(arch: Archive, grace_seconds: float) -> list[str]:
    """Delete the replaced files older than ``grace_seconds`` that the index does not name."""
    with arch.locked():
        journal = arch.retired()
        if not journal:
            return []
        known = {f for p in arch.partitions() for f in p.files} | live_files(arch.root)  # a name written again is live
        now, deleted = time.time(), []
        for f, since in sorted(journal.items()):
            if f in known:
                journal.pop(f)  # written again by a later merge (same bytes, same name): live again
                (arch.root / RETIRED_DIR / f).unlink(missing_ok=True)
            elif now - since >= grace_seconds:
                (arch.root / RETIRED_DIR / f).unlink(missing_ok=True)
                (arch.root / f).unlink(missing_ok=True)  # a crash between the swap and the move left it here
                journal.pop(f)
                deleted.append(f)
        atomic_write(arch.root / RETIRED, json.dumps(journal, sort_keys=True).encode())
    return deleted


#: merges the given nights somewhere (here, or on a cluster) and yields (work, staged) as they finish
Merger = Callable[[list[NightWork], str, CompactOptions, str], Iterable[tuple[NightWork, list[Staged]]]]


def merge_here(works: list[NightWork], root: str, opts: CompactOptions, tmp: str) -> Iterable[tuple[NightWork, list[Staged]]]:
    for w in works:
        yield w, merge(root, w, opts.target_rows, tmp, opts.reference_bytes)


def compact(archive: str | Path | Archive, options: CompactOptions | None = None, nights: Iterable[int] | None = None,
            surveys: list[str] | None = None, merger: Merger = merge_here, fresh: Iterable[str] = (),
            guard: Callable[[], AbstractContextManager] | None = None) -> CompactReport:  # fmt: skip
    """Compact the nights that need it (all, or those given); first delete retired files past their grace.
    ``guard``: held around each index swap (live mode: the store's lock, so that no run of its own reads
    parts while they move)."""
    t0 = time.perf_counter()
    opts = options or CompactOptions()
    arch = archive if isinstance(archive, Archive) else Archive(archive)
    nights = None if nights is None else sorted(set(nights))
    report = CompactReport(parts_before=len(arch.partitions(surveys, nights)) if nights != [] else 0)
    if not arch.exists() or nights == []:
        return report
    report.deleted = delete_retired(arch, opts.grace_seconds)
    works = plan(arch, opts.target_rows, nights, surveys, fresh)
    if works:
        sweep(arch.tmp_dir)
        run_tmp = arch.tmp_dir / uuid.uuid4().hex
        with scratch_dir(run_tmp, {"what": "compact"}):
            pending: list[tuple[NightWork, list[Staged]]] = []
            for i, done in enumerate(merger(works, str(arch.root), opts, str(run_tmp))):
                pending.append(done)
                if len(pending) >= COMMIT_NIGHTS or i == len(works) - 1:
                    with guard() if guard is not None else nullcontext():
                        swapped = commit_many(arch, pending)
                    for (work, _), new in zip(pending, swapped):
                        if new is None:
                            report.skipped += 1
                            continue
                        report.nights += 1
                        report.replaced += len(work.parts)
                        report.written += len(new)
                        report.replaced_paths |= {p.path for p in work.parts} - {p.path for p in new}
                        report.new_parts += new
                    pending = []
    report.parts_after = len(arch.partitions(surveys, nights))
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


__all__ = ["CompactOptions", "CompactReport", "NightWork", "compact", "commit", "commit_many", "delete_retired", "merge", "plan", "TARGET_ROWS"]
