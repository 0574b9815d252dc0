"""Live mode: Kafka micro-batches -> archive partitions -> the workflow graph -> commit, on one cluster.

Each batch: poll until ``interval`` s passed or ``max_batch`` messages wait; ingest them (the same parts,
de-duplication and quarantine as ``ingest``); run the workflow on the parts that hold the batch's alerts;
make everything durable; only then commit the offsets. A crash anywhere before the commit means the
batch is read again, and since part names and result keys are content hashes, the replay adds nothing
twice: alerts already archived count as duplicates, and the parts that hold them (found by alert id)
are run again unless the stream's record says their run completed; finished tasks are skipped.

The record (``live_record``) also lists the states the stream's T3 reads, so that T3 after the last
batch sees what one archive run over the same alerts sees (``t3_scope: stream``), provided each
object's alerts arrive in time order: an older alert arriving after a newer one gets its own state, but
the newer alert's state (built earlier, without it) is not rebuilt, which a history channel shows.
``batch`` gives T3 only the batch's objects (per-batch notifications). Stopping: ``live_control``.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..io.compact import CompactOptions
from .compact import Background
from .ingest import IngestOptions, ingest_packets
from ..io.kafka import Batch, LiveConsumer, consumer_config, wire_schema_ids
from ..io.kafka_auth import KafkaCredentials, Redactor
from ..io.schema_registry import SchemaRegistry
from .live_options import LiveOptions
from .live_control import CRASH_ENV, CRASH_POINTS, Abandon, StopFlag, crash, crash_during_run
from .live_metrics import LiveMetrics
from .live_record import StreamRecord
from ..keys import key_of
from ..io.locks import Busy
from ..io.stores import open_store
from .failures import RunFailed
from .plan import plan_workflow
from .runner import RunOptions, new_run_id, run_workflow
from .workflow import Workflow, WorkflowError

log = logging.getLogger("ampel_dask.live")


class BatchFailed(Exception):
    """A unit failed on a batch without recording it: the batch is not committed and live mode stops."""


@dataclass
class Totals:
    """Counts over this process's batches (what ``--json`` prints last)."""

    batches: int = 0
    empty_batches: int = 0
    alerts: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: int = 0
    channels: dict[str, dict[str, int]] = field(default_factory=dict)
    t2: dict[str, int] = field(default_factory=lambda: {"computed": 0, "reused": 0, "failed": 0, "recorded": 0})
    t3_outputs: int = 0
    commit_failures: int = 0
    latency_last: float | None = None
    latency_max: float | None = None
    committed: dict[str, int] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)


def run_live(
    wf: Workflow,
    opts: LiveOptions,
    stop: StopFlag | None = None,
    on_batch: Callable[[dict], None] | None = None,
) -> dict:
    """Consume micro-batches until ``batches``/``until_idle``/a stop signal; returns the totals."""
    from .cluster import make_cluster, slurm_log_dir

    stop = stop or StopFlag()
    t_start = time.time()
    creds = KafkaCredentials.load(opts.secrets_file)
    redactor = Redactor(creds.secrets())
    if not (opts.archive or wf.archive.path):
        raise WorkflowError("no archive: give --archive or archive.path in the workflow")
    plan_workflow(wf)  # a unit config at fault (a variable it may not read, a missing model) fails before Kafka is touched
    archive = Path(opts.archive or wf.archive.path or "").resolve()
    spec = wf.store.resolve(opts.store)
    store = open_store(spec)
    group = opts.group or f"ampel-dask-{wf.name}"
    schema_dirs, registry = list(opts.schema_dirs), None
    if opts.schema_registry:
        folder = archive / "_schemas" / key_of(redactor(opts.schema_registry))
        password = creds.schema_registry_password.get_secret_value() if creds.schema_registry_password else None
        registry = SchemaRegistry(opts.schema_registry, folder, creds.schema_registry_username, password, redactor)
        schema_dirs.insert(0, str(folder))
    totals = Totals(channels={c.name: {"passed": 0, "rejected": 0} for c in wf.channels})
    # the consumer first: a wrong setting or credential fails before a cluster is started
    consumer = LiveConsumer(consumer_config(opts.bootstrap, group, creds, opts.properties, opts.offset_reset), opts.topics, redactor)
    metrics = LiveMetrics(opts.metrics_file, opts.metrics_port, opts.metrics_host)
    metrics.flush()
    record = StreamRecord(Path(store.root), group, opts.topics, wf)
    ctx = _Context(wf, opts, archive, store, group, record, schema_dirs, registry, metrics, totals, on_batch,
                   compactor=Background(archive, opts.compact_every, CompactOptions(target_rows=opts.compact_rows), store))
    log.info("live %s: topics %s, group %s, %s, brokers %s; batches every %g s or %d messages; archive %s, store %s%s",
             wf.name, ",".join(opts.topics), group, creds.describe(), redactor(opts.bootstrap), opts.interval, opts.max_batch,
             archive, store.root, f"; metrics on http://{opts.metrics_host}:{metrics.port}/metrics" if metrics.port is not None else "")  # fmt: skip
    stopped = "signal"
    try:
        with make_cluster(wf.cluster.overridden(opts.cluster, opts.workers, opts.jobs), slurm_log_dir(store.root)) as client:
            ctx.client = client
            stopped = _loop(ctx, consumer, stop)
    except Abandon:
        stopped = "abandoned"
        log.warning("batch %d abandoned: nothing of it committed; it is read again at the next start", totals.batches + 1)
    finally:
        consumer.close()
        metrics.close()
        ctx.compactor.close()
    out = _summary(totals, store, archive, group, opts)
    out["compactions"] = [r.summary() for r in ctx.compactor.reports]
    if ctx.compactor.errors:
        out["compaction_errors"] = ctx.compactor.errors
    out.update(stopped=stopped, seconds=round(time.time() - t_start, 3))
    if metrics.port is not None:
        out["metrics_port"] = metrics.port
    return out


@dataclass
class _Context:
    wf: Workflow
    opts: LiveOptions
    archive: Path
    store: Any
    group: str
    record: StreamRecord
    schema_dirs: list[str]
    registry: SchemaRegistry | None
    metrics: LiveMetrics
    totals: Totals
    on_batch: Callable[[dict], None] | None
    compactor: Background
    client: Any = None


def _loop(ctx: _Context, consumer: LiveConsumer, stop: StopFlag) -> str:
    opts, totals = ctx.opts, ctx.totals
    pending: Batch | None = consumer.wait_assignment(opts.join_timeout, stop.requested, opts.max_batch)
    while True:
        batch = consumer.poll_batch(opts.max_batch, opts.interval, stop.requested, pending)
        pending = None
        if stop.requested() and not batch:
            return "signal"
        n = totals.batches + 1
        info = _process(ctx, consumer, batch, n) if batch else _empty(ctx, batch, n)
        if ctx.on_batch is not None:
            ctx.on_batch(info)
        if stop.requested():
            return "signal"
        if not batch and opts.until_idle:
            consumer.confirm_idle()
            return "idle"
        if opts.batches and totals.batches >= opts.batches:
            return "batches"


def _empty(ctx: _Context, batch: Batch, n: int) -> dict:
    ctx.totals.batches += 1
    ctx.totals.empty_batches += 1
    ctx.metrics.add("batches_total")
    ctx.metrics.add("empty_batches_total")
    ctx.metrics.flush()
    log.info("batch %d: empty (no messages in %.1f s)", n, batch.closed - batch.opened)
    return {"batch": n, "messages": 0, "alerts": 0}


def _process(ctx: _Context, consumer: LiveConsumer, batch: Batch, n: int) -> dict:
    """The batch with the store held (one run per store at a time: an archive run on the same store
    makes the batch wait, ``store_wait``), from its ingest to its commit."""
    run_id = f"live-{new_run_id()}"
    with ExitStack() as held:
        try:
            held.enter_context(ctx.store.locked(run_id, 0))
        except Busy as exc:
            log.warning("batch %d waits: %s", n, exc)
            held.enter_context(ctx.store.locked(run_id, ctx.opts.store_wait))
        return _process_held(ctx, consumer, batch, n, run_id)


def _process_held(ctx: _Context, consumer: LiveConsumer, batch: Batch, n: int, run_id: str) -> dict:
    """Ingest, run, make durable, commit: the order that makes results exactly-once."""
    opts = ctx.opts
    t0 = time.time()
    packets = batch.packets()
    if ctx.registry is not None:
        ctx.registry.ensure(wire_schema_ids(packets))
    # compacted in the background after the commit (graph/compact.Background), not within the batch
    iopts = IngestOptions(schema_dirs=ctx.schema_dirs, progress=False, chunk_packets=opts.chunk_packets, compact_rows=0, history=opts.history)
    report = ingest_packets(packets, ctx.archive, iopts, client=ctx.client)
    t_ingest = time.time()
    crash("after_ingest", n)
    # the parts holding the batch's alerts: new ones, and archived ones whose run never completed
    # (a replay after a crash); parts this stream finished are not run again
    done = ctx.record.done_parts()
    parts = sorted({p.path for p in report.new_partitions} | {p.path for p in report.duplicate_partitions if p.path not in done})
    summary: dict | None = None
    if parts:
        extra = {"live": {"batch": n, "group": ctx.group, "topics": opts.topics, "offsets": batch.ranges(),
                          "ingest": report.summary(), "t3_scope": opts.t3_scope}}  # fmt: skip
        ropts = RunOptions(archive=str(ctx.archive), store=opts.store, client=ctx.client, partitions=parts, progress=False,
                           run_id=run_id, manifest_extra=extra, t3_states=stream_states(ctx.record, ctx.store) if opts.t3_scope == "stream" else None)  # fmt: skip
        with crash_during_run(n, Path(ctx.store.root)):
            try:
                summary = run_workflow(ctx.wf, ropts)
            except RunFailed as exc:  # unrecorded failures: nothing of the batch is committed
                raise BatchFailed(f"batch {n} failed, nothing of it committed (it is read again at the next start): {exc}") from None
        ctx.record.add(summary["state_names"], parts, report.read)
    t_run = time.time()
    ctx.store.sync()  # the partition and every result file on disk before the offsets move
    crash("before_commit", n)
    committed = consumer.commit(batch)
    crash("after_commit", n)
    if committed:
        ctx.compactor.after_batch(p.night for p in report.new_partitions)
    t_done = time.time()
    ts = batch.timestamps()
    latency = round(t_done - ts[0], 3) if ts else None
    info = {"batch": n, "messages": len(batch), "alerts": report.read, "ingested": report.ingested, "duplicates": report.duplicates,
            "quarantined": report.quarantined, "partitions": len(parts), "offsets": batch.ranges(), "committed": committed,
            "seconds": round(t_done - t0, 3), "ingest_seconds": round(t_ingest - t0, 3),
            "run_seconds": round(t_run - t_ingest, 3), "commit_seconds": round(t_done - t_run, 3), "latency": latency, "polled_seconds": round(batch.closed - batch.opened, 3),
            "run_id": summary["run_id"] if summary else None,
            "channels": summary["channels"] if summary else {}, "t2": summary["t2"] if summary else {"computed": 0, "reused": 0},
            "t3_outputs": summary["t3"]["outputs"] if summary else 0}  # fmt: skip
    _account(ctx, batch, info, committed)
    for (topic, part), behind in consumer.lag().items():
        ctx.metrics.set("lag_messages", behind, topic=topic, partition=str(part))
    ctx.metrics.flush()
    log.info(_line(info, ts, t_done))
    return info


def stream_states(record: StreamRecord, store: Any) -> dict[str, list[str]]:
    """The state sets the stream's T3 reads, as they are now: an archive run on the same store may have
    replaced some (a night or history rewritten under new keys, the old sets pruned); those names are
    followed to the sets that hold their alerts now (``current_states``), and the record is updated, so
    that no object drops out of the stream's T3. A set gone without a successor is an error, not a gap."""
    recorded = record.states()
    now = {ch: store.current_states(ch, names) for ch, names in recorded.items()}
    if now != recorded:
        log.info("the stream's T3 follows %d state set(s) an archive run replaced", sum(len(set(v) - set(now[c])) for c, v in recorded.items()))
        record.replace_states(now)
    return now


def _account(ctx: _Context, batch: Batch, info: dict, committed: bool) -> None:
    t, m = ctx.totals, ctx.metrics
    t.batches += 1
    for k in ("alerts", "ingested", "duplicates", "quarantined"):
        setattr(t, k, getattr(t, k) + info[k])
        m.add(f"{k}_total", info[k])
    for ch, c in info["channels"].items():
        agg = t.channels.setdefault(ch, {"passed": 0, "rejected": 0})
        agg["passed"] += c["passed"]
        agg["rejected"] += c["rejected"]
        m.add("passed_total", c["passed"], channel=ch)
    for k in ("computed", "reused", "failed", "recorded"):
        t.t2[k] += info["t2"].get(k, 0)
        m.add(f"t2_{k}_total", info["t2"].get(k, 0))
    t.t3_outputs += info["t3_outputs"]
    if info["run_id"]:
        t.runs.append(info["run_id"])
    if committed:
        t.committed.update({k: last + 1 for k, (_, last) in batch.ranges().items()})
    else:
        t.commit_failures += 1
        m.add("commit_failures_total")
    if info["latency"] is not None:
        t.latency_last = info["latency"]
        t.latency_max = max(t.latency_max or 0.0, info["latency"])
        m.set("latency_seconds", info["latency"])
        m.set("latency_seconds_max", t.latency_max)
    m.add("batches_total")
    m.set("last_batch_alerts", info["alerts"])
    m.set("last_batch_seconds", info["seconds"])
    m.set("last_batch_timestamp_seconds", time.time())
    m.flush()


def _line(info: dict, ts: tuple[float, float] | None, t_done: float) -> str:
    passed = ", ".join(f"{ch} {c['passed']}" for ch, c in info["channels"].items()) or "no run"
    lat = f"latency {info['latency']:.2f} s (oldest message) / {t_done - ts[1]:.2f} s (newest)" if ts else "no message timestamps"
    commit = "committed" if info["committed"] else "COMMIT FAILED (batch will be replayed)"
    return (f"batch {info['batch']}: {info['alerts']} alerts (ingested {info['ingested']}, duplicates {info['duplicates']}, "
            f"quarantined {info['quarantined']}) from {len(info['offsets'])} partition(s); passed {passed}; "
            f"T2 computed {info['t2'].get('computed', 0)}, reused {info['t2'].get('reused', 0)}"
            f"{_failed(info['t2'])}; T3 outputs {info['t3_outputs']}; "
            f"{info['seconds']:.2f} s (ingest {info['ingest_seconds']:.2f}, run {info['run_seconds']:.2f}, sync+commit "
            f"{info['commit_seconds']:.2f}), {lat}; {commit}")  # fmt: skip


def _failed(t2: dict) -> str:
    """", failed N (recorded, retried by the next run)" when some states failed (only recorded ones
    reach a committed batch)."""
    return f", failed {t2['failed']} (recorded, retried by the next run)" if t2.get("failed") else ""


def _summary(t: Totals, store: Any, archive: Path, group: str, opts: LiveOptions) -> dict:
    return {
        "alerts": t.alerts,
        "batches": t.batches,
        "empty_batches": t.empty_batches,
        "ingested": t.ingested,
        "duplicates": t.duplicates,
        "quarantined": t.quarantined,
        "channels": t.channels,
        "t2": dict(t.t2),
        "t3": {"outputs": t.t3_outputs},
        "latency_s": {"last": t.latency_last, "max": t.latency_max},
        "commit_failures": t.commit_failures,
        "committed": t.committed,
        "runs": len(t.runs),
        "group": group,
        "topics": opts.topics,
        "store": str(store.root),
        "archive": str(archive),
    }


__all__ = ["LiveOptions", "run_live", "stream_states", "StopFlag", "Abandon", "BatchFailed", "StreamRecord", "CRASH_ENV", "CRASH_POINTS"]
