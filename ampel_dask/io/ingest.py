"""Ingest, the library part: packets -> decoded chunks -> de-duplicated -> archive parts + index.

Chunks are decoded anywhere (``decode_chunk``: in this process, or on Dask workers — the driver that
spreads them is ``ampel_dask.graph.ingest``), staging parts under ``_tmp``; :func:`finalize` then walks
the staged parts in input order, drops alert ids already archived (or seen earlier in this ingest),
renames what is new into place and records it in the index in one atomic update. A crash leaves at most
orphaned staged files, never a half-written part or an index entry without its file.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from .archive import Archive, Partition, discard
from .arrays import contains
from .decode import ChunkResult, decode_chunk
from .limits import MiB, Limits
from .locks import scratch_dir, sweep
from .sources import Chunk, Packet, chunks, expand

log = logging.getLogger("ampel_dask")

#: decodes chunks (given the arguments of :func:`decode_chunk` after the chunk) and yields their results
Decoder = Callable[[Iterator[Chunk], tuple], Iterable[ChunkResult]]


class IngestOptions(BaseModel):
    """How an ingest runs; defaults suit a laptop and a nightly tarball alike."""

    workers: int | None = Field(None, ge=0, description="Dask worker processes (default: all cores, none for inputs under in_process_mb; 0 = no cluster)")
    # a local cluster costs ~5 s to start and stop (12 s on a busy 2-core machine) where decoding runs at ~10 MB/s
    # per core: with n workers it gains only above ~5 s x 10 MB/s x n/(n-1), i.e. 50-100 MB
    in_process_mb: float = Field(64.0, ge=0, description="with no --workers given, inputs smaller than this (MB on disk) are decoded in this process")
    chunk_mb: float = Field(32.0, gt=0, description="input MB per decode task")
    chunk_packets: int = Field(2000, gt=0, description="packets per decode task")
    schema_dirs: list[str] = Field(default_factory=list, description="extra Rubin schema folder (wire format)")
    progress: bool | None = Field(None, description="progress bar (default: on a terminal)")
    follow_links: bool = Field(False, description="follow symlinks that point out of the given sources")
    # what one input may cost (io/limits.py); past a limit, the input is quarantined with the reason
    max_file_mb: float = Field(256.0, gt=0, description="MiB of a packet file or tarball member, as read")
    max_packet_mb: float = Field(256.0, gt=0, description="MiB of a packet inflated (gunzipped, its Avro blocks together)")
    max_block_mb: float = Field(64.0, gt=0, description="MiB of one Avro block inflated")
    quarantine_keep_mb: float = Field(16.0, ge=0, description="MiB of a bad input's original bytes kept in quarantine")
    compact_rows: int = Field(25_000, ge=0, description="after publishing, merge the written nights' parts below this many rows into parts of this size (0: do not; io/compact.py)")
    history: bool = Field(True, description="after publishing (and compacting), add the new parts' datapoints to the archive's object-bucketed history (io/history.py), which history channels read")

    def limits(self) -> Limits:
        mib = lambda mb: max(1, int(mb * MiB))  # noqa: E731
        return Limits(file_bytes=mib(self.max_file_mb), packet_bytes=mib(self.max_packet_mb), block_bytes=mib(self.max_block_mb),
                      quarantine_bytes=int(self.quarantine_keep_mb * MiB))  # fmt: skip


@dataclass
class IngestReport:
    read: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: int = 0
    partitions: int = 0
    seconds: float = 0.0  # decoding and publishing, and the compaction after them (not a cluster's start)
    skipped_files: list[str] = field(default_factory=list)
    skipped_reasons: dict[str, str] = field(default_factory=dict)  # files not read, and why (special files, links out)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    new_partitions: list[Partition] = field(default_factory=list)
    # archived parts that already held this ingest's duplicates: with new_partitions, every part that
    # holds an alert of the input (live mode runs a replayed batch on them)
    duplicate_partitions: list[Partition] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)  # staging folders of killed ingests removed first
    compaction: dict = field(default_factory=dict)  # what compaction after publishing did (CompactReport.summary)
    history: dict = field(default_factory=dict)  # what keeping the object-bucketed history did (graph/history.update_history)

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("read", "ingested", "duplicates", "quarantined", "partitions", "seconds")}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["new_partitions"] = [p.path for p in self.new_partitions]
        d["duplicate_partitions"] = [p.path for p in self.duplicate_partitions]
        return d


def source_chunks(sources: list[str], opts: IngestOptions) -> tuple[Iterator[Chunk], IngestReport, int]:
    """The work of an ingest of files, folders, globs or tarballs: its chunks (lazy), a report that knows
    the files skipped (and why), and the input's bytes (for progress)."""
    inputs = expand(sources, opts.follow_links)
    report = IngestReport(skipped_files=inputs.skipped_files(), skipped_reasons=dict(inputs.refused))
    return chunks(inputs, int(opts.chunk_mb * 2**20), opts.chunk_packets, opts.limits()), report, inputs.total_bytes


def packet_chunks(packets: list[Packet], opts: IngestOptions) -> Iterator[Chunk]:
    """Packets already in memory (e.g. Kafka messages; ``source``/``member`` say where each came from,
    for quarantine), chunked in the given order, so the same packets give the same parts."""
    max_bytes, max_packets = int(opts.chunk_mb * 2**20), opts.chunk_packets
    cur = Chunk(0)
    for p in packets:
        cur.packets.append(p)
        cur.nbytes += len(p.data or b"")
        if cur.nbytes >= max_bytes or len(cur.packets) >= max_packets:
            yield cur
            cur = Chunk(cur.index + 1)
    if cur.packets:
        yield cur


def in_process(work: Iterator[Chunk], args: tuple) -> Iterator[ChunkResult]:
    """The :data:`Decoder` without a cluster: each chunk decoded here, in turn."""
    for ch in work:
        yield decode_chunk(ch, *args)


def run_ingest(work: Iterator[Chunk], archive: str | Path | Archive, opts: IngestOptions, report: IngestReport, decode: Decoder = in_process,
               on_result: Callable[[ChunkResult, int], None] | None = None) -> IngestReport:  # fmt: skip
    """Decode ``work`` with ``decode``, then publish what is new; ``on_result(result, alerts so far)``
    after each chunk (progress)."""
    t0 = time.perf_counter()
    arch = archive if isinstance(archive, Archive) else Archive(archive)
    arch.create()
    report.swept = sweep(arch.tmp_dir)  # staging folders of ingests that were killed (their lock is free)
    if report.swept:
        log.warning("removed %d staging folder(s) under %s left by killed ingests", len(report.swept), arch.tmp_dir)
    run_tmp = arch.tmp_dir / uuid.uuid4().hex
    args = (str(run_tmp), str(arch.quarantine_dir), opts.schema_dirs, opts.limits())
    results: dict[int, ChunkResult] = {}
    read = 0
    with scratch_dir(run_tmp, {"what": "ingest"}):  # held while it lives: a later sweep leaves it alone
        for res in decode(work, args):
            results[res.index] = res
            read += res.read
            if on_result is not None:
                on_result(res, read)
        _finalize(arch, [results[i] for i in sorted(results)], report)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _finalize(arch: Archive, results: list[ChunkResult], report: IngestReport) -> None:
    """De-duplicate staged parts in input order and publish them; one index update at the end."""
    with arch.publishing():  # from the duplicate check to the index update: concurrent ingests take turns
        _publish(arch, results, report)
    for res in results:  # anything a failed publish left behind
        for staged in res.staged:
            discard(staged)


@dataclass
class _Known:
    """Alert ids already taken, by range: an archived part's (read when a staged part's range overlaps
    it) or a staged part's kept ones (``path`` ""): a staged part is checked against those whose range
    overlaps its own, a sorted-array search each, not alert by alert."""

    survey: str
    lo: int
    hi: int
    path: str
    ids: np.ndarray | None = None  # sorted; None until read (an archived part)


def _publish(arch: Archive, results: list[ChunkResult], report: IngestReport) -> None:
    """Each staged part without the alerts archived before, met earlier in this ingest, or repeated
    within it (the first copy stays), published; the archived parts that held such alerts are listed
    (``duplicate_partitions``: a live run takes their states again)."""
    archived = arch.partitions()
    by_path = {p.path: p for p in archived}
    known = [_Known(p.survey, p.min_alert_id, p.max_alert_id, p.path) for p in archived]
    dup_paths: set[str] = set()
    new: list[Partition] = []
    try:
        for res in results:
            report.read += res.read
            report.quarantined += res.quarantined
            for reason, n in res.reasons.items():
                report.quarantine_reasons[reason] = report.quarantine_reasons.get(reason, 0) + n
            for staged in res.staged:
                ids = np.asarray(staged.alert_ids, dtype=np.int64)
                lo, hi = int(ids.min()), int(ids.max())
                keep = np.zeros(len(ids), dtype=bool)
                keep[np.unique(ids, return_index=True)[1]] = True  # the first copy of an alert repeated here
                for k in known:
                    if k.survey == staged.survey and k.hi >= lo and k.lo <= hi:
                        if k.ids is None:
                            k.ids = np.sort(arch.read(by_path[k.path], ["alert_id"]).column("alert_id").to_numpy())
                        hit = contains(k.ids, ids)
                        if hit.any():
                            keep &= ~hit
                            if k.path:
                                dup_paths.add(k.path)
                report.duplicates += int((~keep).sum())
                report.ingested += int(keep.sum())
                if keep.any():
                    kept = np.sort(ids[keep])
                    known.append(_Known(staged.survey, int(kept[0]), int(kept[-1]), "", kept))
                part = arch.publish(staged, keep)
                if part is not None:
                    new.append(part)
    finally:  # what was renamed into place is indexed even if a later part fails
        arch.add_partitions(new)
    report.partitions = len(new)
    report.new_partitions = new
    report.duplicate_partitions = [by_path[p] for p in sorted(dup_paths)]
