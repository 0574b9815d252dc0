"""Kafka for live mode: a consumer that never commits on its own, micro-batches, messages -> packets.

A micro-batch is what was polled until ``interval`` seconds passed or ``max_batch`` messages were
waiting. Its messages become :class:`~ampel_dask.io.sources.Packet` s labelled with where they came from
(``kafka://topic/partition``, ``offset=N``), so a poison message lands in quarantine with its topic,
partition and offset. Offsets are committed only by :func:`commit`, which the live loop calls after
the batch's partition and results are durable.

Everything this module logs about the broker passes through the :class:`~.kafka_auth.Redactor` that
was given to it (librdkafka's own log lines and error callbacks included).
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .kafka_auth import KafkaCredentials, Redactor, check_properties
from .sources import Packet

log = logging.getLogger("ampel_dask.kafka")

# errors after which waiting is pointless: wrong credentials, no rights, a fatal client state
FATAL_CODES = {"_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED", "TOPIC_AUTHORIZATION_FAILED",
               "GROUP_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED", "_SSL", "_INVALID_ARG", "_FATAL"}  # fmt: skip


class KafkaFailure(RuntimeError):
    """A broker problem live mode cannot wait out (message already redacted)."""


def consumer_config(
    bootstrap: str,
    group: str,
    credentials: KafkaCredentials | None = None,
    properties: dict[str, str] | None = None,
    offset_reset: str = "earliest",
) -> dict[str, Any]:
    """librdkafka settings of a live consumer: manual commits only; extra ``properties`` (timeouts,
    fetch sizes) may not carry secrets, which come from ``credentials`` alone."""
    props = dict(properties or {})
    check_properties(props)
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "client.id": f"ampel-dask-live@{socket.gethostname()}",
        "auto.offset.reset": offset_reset,
        # a batch's run happens between polls: leave the group only after 10 minutes without one
        "max.poll.interval.ms": 600_000,
        **props,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        **(credentials.librdkafka() if credentials else {}),
    }


class _Throttle:
    """Log a repeated line once per ``every`` seconds (a broker that is down is retried many times a
    second), then with the number of repeats it left out."""

    def __init__(self, every: float = 30.0):
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}

    def __call__(self, level: int, text: str) -> None:
        key = re.sub(r"\d+(\.\d+)?\s*ms", "", re.sub(r"^%\d\|[\d.]+\|", "", text))
        now = time.monotonic()
        last, skipped = self._seen.get(key, (-1e18, 0))
        if now - last < self.every:
            self._seen[key] = (last, skipped + 1)
            return
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        log.log(level, "%s%s", text, f" (and {skipped} more like it since the last one shown)" if skipped else "")


class _KafkaLog:
    """librdkafka's log lines into Python logging, redacted and throttled (confluent-kafka calls ``.log``)."""

    def __init__(self, redactor: Redactor, throttle: _Throttle):
        self.redactor = redactor
        self.throttle = throttle

    def log(self, level: int, fmt: str, *args: Any) -> None:
        self.throttle(level, self.redactor(fmt % args if args else fmt))


class LiveConsumer:
    """A subscribed consumer that knows its assignment and polls micro-batches."""

    def __init__(self, conf: dict[str, Any], topics: list[str], redactor: Redactor):
        from confluent_kafka import Consumer, KafkaException

        self.redactor = redactor
        self.topics = list(topics)
        self.assigned: set[tuple[str, int]] = set()
        self.fatal: str | None = None
        self._batch: Batch | None = None
        self._throttle = _Throttle()
        conf = {**conf, "error_cb": self._on_error, "logger": _KafkaLog(redactor, self._throttle)}
        try:
            self.consumer = Consumer(conf)
            self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)
        except (KafkaException, ValueError, TypeError) as exc:
            raise KafkaFailure(f"cannot create the Kafka consumer: {redactor(exc)}") from None

    # --- callbacks (run inside consume()) ---
    def _on_error(self, err) -> None:
        text = self.redactor(err.str())
        if err.fatal() or err.name() in FATAL_CODES:
            self.fatal = f"{err.name()}: {text}"
            log.error("kafka: %s", self.fatal)
        else:
            self._throttle(logging.WARNING, f"kafka: {err.name()}: {text}")

    def _on_assign(self, consumer, partitions) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("assigned %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions) or "nothing")

    def _on_revoke(self, consumer, partitions) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self.assigned -= gone
        if self._batch is not None:  # their next owner reads them again: do not process them here
            self._batch.drop(gone)
        log.info("revoked %s", ", ".join(f"{t}/{p}" for t, p in sorted(gone)) or "nothing")

    def _check(self) -> None:
        if self.fatal:
            raise KafkaFailure(self.fatal)

    def confirm_idle(self, timeout: float = 10.0) -> None:
        """An empty poll means a drained topic only if the brokers answer and the topics exist: raise
        (an unreachable broker or a misspelt topic must not look like a finished drain)."""
        from confluent_kafka import KafkaException

        try:
            meta = self.consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise KafkaFailure(f"the brokers do not answer: {self.redactor(exc)}") from None
        missing = [t for t in self.topics if t not in meta.topics or meta.topics[t].error is not None or not meta.topics[t].partitions]
        if missing:
            raise KafkaFailure(f"no such topic on the brokers: {', '.join(missing)}")
        if not self.assigned:
            raise KafkaFailure(f"no partition of {', '.join(self.topics)} was assigned to this consumer (group rebalancing, or more consumers than partitions)")

    # --- polling ---
    def wait_assignment(self, timeout: float, stop: Callable[[], bool], max_batch: int) -> Batch:
        """Poll until the group gives this member partitions (the first batch's clock starts then);
        whatever arrives meanwhile starts that batch."""
        batch = Batch(opened=time.time())
        self._batch = batch
        deadline = time.monotonic() + timeout
        while not self.assigned and time.monotonic() < deadline and not stop() and len(batch.messages) < max_batch:
            self._take(batch, self.consumer.consume(num_messages=max_batch - len(batch.messages), timeout=0.2))
            self._check()
        self._batch = None
        if not self.assigned:
            log.warning("no partitions assigned after %.0f s; polling anyway", timeout)
        batch.opened = time.time()
        return batch

    def poll_batch(self, max_batch: int, interval: float, stop: Callable[[], bool], batch: Batch | None = None) -> Batch:
        """Messages until ``interval`` s passed or ``max_batch`` are waiting (or ``stop()``)."""
        batch = batch or Batch(opened=time.time())
        self._batch = batch
        deadline = time.monotonic() + interval
        while len(batch.messages) < max_batch and not stop():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._take(batch, self.consumer.consume(num_messages=min(max_batch - len(batch.messages), 5000), timeout=min(left, 0.5)))
            self._check()
        self._batch = None
        batch.closed = time.time()
        return batch

    def _take(self, batch: Batch, messages: list) -> None:
        for m in messages:
            err = m.error()
            if err is None:
                batch.messages.append(m)
            elif err.fatal() or err.name() in FATAL_CODES:
                self.fatal = f"{err.name()}: {self.redactor(err.str())}"
            else:
                self._throttle(logging.WARNING, f"kafka: {err.name()}: {self.redactor(err.str())}")

    def commit(self, batch: Batch) -> bool:
        """Commit the batch's next offsets synchronously; False when the group took the partitions
        meanwhile (their next owner replays the batch: harmless, results are content-addressed)."""
        from confluent_kafka import KafkaException

        offsets = batch.offsets()
        if not offsets:
            return True
        try:
            done = self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("commit failed (%s); the batch will be read again, results stay exactly-once", self.redactor(exc))
            return False
        failed = [tp for tp in done or [] if tp.error]
        if failed:
            log.warning("commit failed for %s; those messages will be read again", ", ".join(f"{tp.topic}/{tp.partition}" for tp in failed))
        return not failed

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind the high watermark per assigned partition (from the last fetch; no request)."""
        from confluent_kafka import TopicPartition

        out = {}
        try:
            positions = self.consumer.position([TopicPartition(t, p) for t, p in sorted(self.assigned)])
            for tp in positions:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and tp.offset >= 0:
                    out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        except Exception:  # lag is a metric, never a reason to stop
            pass
        return out

    def close(self) -> None:
        """Leave the group without committing anything (uncommitted work is read again by the next member)."""
        try:
            self.consumer.close()
        except Exception as exc:  # closing a consumer whose broker is gone
            log.warning("closing the consumer: %s", self.redactor(exc))


@dataclass
class Batch:
    """One micro-batch of messages and what it covers."""

    opened: float  # wall clock (s) when polling began
    closed: float = 0.0
    messages: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)

    def drop(self, partitions: set[tuple[str, int]]) -> None:
        self.messages = [m for m in self.messages if (m.topic(), m.partition()) not in partitions]

    def packets(self) -> list[Packet]:
        """In (topic, partition, offset) order: the same messages always make the same archive parts,
        however the broker interleaved partitions when they were polled."""
        ordered = sorted(self.messages, key=lambda m: (m.topic(), m.partition(), m.offset()))
        return [message_packet(m) for m in ordered]

    def ranges(self) -> dict[str, list[int]]:
        """``topic/partition`` -> [first offset, last offset] of the batch (provenance)."""
        out: dict[str, list[int]] = {}
        for m in self.messages:
            r = out.setdefault(f"{m.topic()}/{m.partition()}", [m.offset(), m.offset()])
            r[0], r[1] = min(r[0], m.offset()), max(r[1], m.offset())
        return dict(sorted(out.items()))

    def offsets(self) -> list:
        """What to commit: per partition, the offset after the batch's last message."""
        from confluent_kafka import TopicPartition

        return [TopicPartition(k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]), last + 1) for k, (_, last) in self.ranges().items()]

    def timestamps(self) -> tuple[float, float] | None:
        """(oldest, newest) message timestamps in epoch seconds, when the messages carry them."""
        ts = [m.timestamp()[1] / 1000.0 for m in self.messages if m.timestamp()[0] != 0 and m.timestamp()[1] > 0]
        return (min(ts), max(ts)) if ts else None


def message_packet(m: Any) -> Packet:
    """A Kafka message as a packet; a null value (tombstone) becomes an empty packet (quarantined)."""
    return Packet(source=f"kafka://{m.topic()}/{m.partition()}", member=f"offset={m.offset()}", data=m.value() or b"")


def wire_schema_ids(packets: Iterable[Packet]) -> set[int]:
    """Confluent schema ids of the wire-framed packets (0x00 + 4-byte id + schemaless Avro)."""
    return {struct.unpack(">I", p.data[1:5])[0] for p in packets if p.data and len(p.data) > 5 and p.data[0] == 0}


def producer(bootstrap: str, credentials: KafkaCredentials | None = None, **props: Any):
    """A producer for feeding topics (tests, benchmarks, replays of archived alerts)."""
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, **props,
                     **(credentials.librdkafka() if credentials else {})})  # fmt: skip
