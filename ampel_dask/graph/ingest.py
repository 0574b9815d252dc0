"""Ingest on a Dask cluster: the driver that spreads decode tasks over workers, with progress.

The library part (chunking, decoding, de-duplication, publishing) is ``ampel_dask.io.ingest``; this
module only decides where chunks are decoded: in this process (``workers=0``, or by default for inputs
under ``in_process_mb``), on a given client, or on a LocalCluster started for the ingest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from ..io.archive import Archive
from ..io.decode import ChunkResult, decode_chunk
from ..io.ingest import Decoder, IngestOptions, IngestReport, in_process, packet_chunks, run_ingest, source_chunks
from ..io.sources import Chunk, Packet
from ..io.compact import CompactOptions
from .compact import compact
from .history import update_history
from .progress import Progress, as_finished
from .workers import local_cluster

log = logging.getLogger(__name__)


def ingest(sources: list[str], archive: str | Path | Archive, options: IngestOptions | None = None, client=None) -> IngestReport:
    """Ingest alert packets (files, folders, globs, nightly tarballs) into an archive; see
    :class:`~ampel_dask.io.ingest.IngestReport` for the reconciled counts."""
    opts = options or IngestOptions()
    work, report, total = source_chunks(sources, opts)
    return _ingest(work, archive, opts, client, report, total)


def ingest_packets(packets: list[Packet], archive: str | Path | Archive, options: IngestOptions | None = None, client=None) -> IngestReport:
    """Ingest packets already in memory (e.g. Kafka messages), chunked in the given order."""
    opts = options or IngestOptions()
    return _ingest(packet_chunks(packets, opts), archive, opts, client, IngestReport(), sum(len(p.data or b"") for p in packets))


def _ingest(work: Iterator[Chunk], archive, opts: IngestOptions, client, report: IngestReport, total_bytes: int) -> IngestReport:
    workers = opts.workers
    if workers is None and client is None and total_bytes < opts.in_process_mb * 2**20:
        workers = 0  # a small input: decoding it here is done before a cluster would have started
    if client is None and workers != 0:  # one cluster for the decoding and the compaction after it
        from distributed import Client

        with local_cluster(workers, dashboard_address=None) as cluster, Client(cluster) as own:
            return _ingest(work, archive, opts, own, report, total_bytes)
    with Progress(opts.progress, total_bytes, "ingest", unit="B", unit_scale=True) as bar:
        report = run_ingest(work, archive, opts, report, _decoder(workers, client), lambda res, read: bar.update(res.nbytes, alerts=read))
    if opts.compact_rows and report.new_partitions:
        # the nights this ingest wrote to whose parts (new and archived) are not in shape are merged, so
        # that the archive's shape does not depend on the input's order (io/compact.py); a night that
        # came in one chunk has one part, and nothing is done for it
        nights = sorted({p.night for p in report.new_partitions})
        fresh = [p.path for p in report.new_partitions]
        done = compact(archive, CompactOptions(target_rows=opts.compact_rows), nights, client=client, fresh=fresh)
        report.compaction = done.summary()
        report.seconds = round(report.seconds + done.seconds, 3)  # the ingest's time includes the shaping of what it wrote
        # parts merged away are named by what they became (still every part holding an alert of the input)
        gone = done.replaced_paths
        if gone:
            report.new_partitions = [p for p in report.new_partitions if p.path not in gone] + done.new_parts
            report.duplicate_partitions = [p for p in report.duplicate_partitions if p.path not in gone]
    if opts.history and report.new_partitions:
        arch = archive if isinstance(archive, Archive) else Archive(archive)
        t = time.perf_counter()
        try:
            report.history = update_history(arch, client, sorted({p.survey for p in report.new_partitions}))
        except Exception as exc:  # the alerts are archived and indexed: runs shuffle their histories until an ingest covers them
            report.history = {"error": f"{type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - t, 3)}
            log.warning("the archive's history was not updated (%s); history channels shuffle the parts it does not cover, and the next ingest adds them", report.history["error"])
        report.seconds = round(report.seconds + report.history["seconds"], 3)
    return report


def _decoder(workers: int | None, client) -> Decoder:
    """Decode chunks in this process (workers=0, no client) or on a Dask cluster, keeping a bounded queue."""
    if client is None and workers == 0:
        return in_process

    def on_cluster(work: Iterator[Chunk], args: tuple) -> Iterator[ChunkResult]:
        from distributed import Client

        own = client is None
        cluster = local_cluster(workers, dashboard_address=None) if own else None
        c = Client(cluster) if own else client
        try:
            nworkers = max(1, len(c.scheduler_info()["workers"]))

            def submit(ch: Chunk):
                # tarball members travel with the chunk: scatter them straight to a worker, not via the
                # scheduler, and unhashed (tokenizing 32 MB of packets took 0.9 s of the driver per chunk)
                arg = c.scatter(ch, direct=True, hash=False) if any(p.data is not None for p in ch.packets) else ch
                return c.submit(decode_chunk, arg, *args, pure=False)

            for fut in as_finished((lambda ch=ch: submit(ch) for ch in work), window=2 * nworkers):
                yield fut.result()
        finally:
            if own:
                c.close()
                cluster.close()

    return on_cluster


__all__ = ["ingest", "ingest_packets", "IngestOptions", "IngestReport"]
