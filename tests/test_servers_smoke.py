"""Smoke tests of the real test servers (ampel_dask.testing): what later integration tests rely on.

- Kafka: Confluent-framed Avro messages in a 2-partition topic, a consumer group with manual commits,
  a consumer process SIGKILLed before it commits, and a successor that gets exactly what was not committed.
- Mongo wire: a unique compound index, upserts, DuplicateKeyError, a 1000-operation bulk_write.
- Both: a server stops cleanly (process gone, port closed), and SecantusDB reopens its data directory.
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.server_fixtures import (  # noqa: F401  (fixtures)
    assert_stopped,
    kafka,
    mongo,
    mongo_db,
    new_topic,
    require,
)

N_MESSAGES, N_COMMITTED = 50, 20
SCHEMA_ID = 7

ALERT_SCHEMA = {
    "type": "record",
    "name": "alert",
    "namespace": "test",
    "fields": [
        {"name": "objectId", "type": "string"},
        {"name": "candid", "type": "long"},
        {"name": "payload", "type": "bytes"},
    ],
}


def frame(record: dict) -> bytes:
    """Confluent wire format: magic byte 0, 4-byte schema id, schemaless Avro."""
    import fastavro

    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, SCHEMA_ID))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(ALERT_SCHEMA), record)
    return buf.getvalue()


def unframe(data: bytes) -> dict:
    import fastavro

    magic, schema_id = struct.unpack(">bI", data[:5])
    assert (magic, schema_id) == (0, SCHEMA_ID)
    return fastavro.schemaless_reader(io.BytesIO(data[5:]), fastavro.parse_schema(ALERT_SCHEMA))


def consumer_conf(bootstrap: str, group: str) -> dict:
    # A member that dies without leaving holds the group until its session times out: keep that short.
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 3000,
        "heartbeat.interval.ms": 500,
        "max.poll.interval.ms": 10000,
    }


# The consumer that is SIGKILLed: reads N messages of the group's topic, reports each, commits nothing.
KILLED_CONSUMER = r"""
import json, sys, time
from confluent_kafka import Consumer
conf, topic, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = Consumer(conf)
c.subscribe([topic])
got = 0
while got < n:
    m = c.poll(0.5)
    if m is None or m.error():
        continue
    got += 1
    print(m.partition(), m.offset(), flush=True)
print("CONSUMED", flush=True)
time.sleep(300)  # killed here, without commit or close
"""


def test_kafka_group_resumes_after_consumer_is_killed(kafka, new_topic):  # noqa: F811
    from confluent_kafka import Consumer, Producer, TopicPartition

    topic = new_topic(partitions=2)
    group = f"g-{topic}"
    p = Producer({"bootstrap.servers": kafka.bootstrap, "enable.idempotence": True})
    for i in range(N_MESSAGES):
        p.produce(topic, key=f"ZTF{i % 7}", value=frame({"objectId": f"ZTF{i % 7}", "candid": i, "payload": os.urandom(64)}))
    assert p.flush(15) == 0
    parts = [TopicPartition(topic, 0), TopicPartition(topic, 1)]

    # 1. consume 20 with manual commit, then close
    c1 = Consumer(consumer_conf(kafka.bootstrap, group))
    c1.subscribe([topic])
    first: dict[tuple[int, int], int] = {}
    deadline = time.monotonic() + 20
    while len(first) < N_COMMITTED and time.monotonic() < deadline:
        m = c1.poll(0.5)
        if m is not None and not m.error():
            first[(m.partition(), m.offset())] = unframe(m.value())["candid"]
    assert len(first) == N_COMMITTED
    c1.commit(asynchronous=False)
    committed = c1.committed(parts, timeout=10)
    assert sum(max(tp.offset, 0) for tp in committed) == N_COMMITTED
    c1.close()

    # every message, by (partition, offset)
    everything = set()
    wm = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"wm-{topic}"})
    for tp in parts:
        low, high = wm.get_watermark_offsets(tp, timeout=10)
        everything |= {(tp.partition, o) for o in range(low, high)}
    wm.close()
    assert len(everything) == N_MESSAGES
    uncommitted = everything - set(first)

    # 2. a consumer in another process reads the rest, commits nothing, and is SIGKILLed
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONSUMER, json.dumps(consumer_conf(kafka.bootstrap, group)), topic,
         str(len(uncommitted))],
        stdout=subprocess.PIPE, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in child.stdout] + [lines.put(None)], daemon=True).start()
    second = set()
    try:
        deadline = time.monotonic() + 30
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"consumer process exited with {child.poll()}"
            if line == "CONSUMED":
                break
            part, off = map(int, line.split())
            second.add((part, off))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert second == uncommitted

    # 3. the next member of the group gets exactly what was not committed
    c3 = Consumer(consumer_conf(kafka.bootstrap, group))
    c3.subscribe([topic])
    third: dict[tuple[int, int], int] = {}
    deadline = time.monotonic() + 30
    while len(third) < len(uncommitted) and time.monotonic() < deadline:
        m = c3.poll(0.5)
        if m is not None and not m.error():
            key = (m.partition(), m.offset())
            assert key not in third, f"{key} delivered twice"
            third[key] = unframe(m.value())["candid"]
    extra = [c3.poll(0.5) for _ in range(3)]  # nothing more arrives
    assert [m for m in extra if m is not None and not m.error()] == []
    assert set(third) == uncommitted
    assert sorted(list(first.values()) + list(third.values())) == list(range(N_MESSAGES))
    c3.commit(asynchronous=False)
    assert sum(max(tp.offset, 0) for tp in c3.committed(parts, timeout=10)) == N_MESSAGES
    c3.close()


def test_mongo_unique_index_upsert_bulk(mongo_db):  # noqa: F811
    from pymongo import ASCENDING, UpdateOne
    from pymongo.errors import DuplicateKeyError

    col = mongo_db["t2"]
    col.create_index([("unit", ASCENDING), ("config", ASCENDING), ("state", ASCENDING)], unique=True)
    key = {"unit": "T2LightCurveSummary", "config": 1234567890123, "state": "a1b2c3"}
    doc = {"$set": {"body": {"ndet": 5}, "code": 0}, "$setOnInsert": {"created": 1}}

    r1 = col.update_one(key, doc, upsert=True)
    r2 = col.update_one(key, doc, upsert=True)
    assert r1.upserted_id is not None and r2.upserted_id is None and r2.matched_count == 1
    assert col.count_documents({}) == 1
    assert col.find_one(key, {"_id": 0, "body": 1, "created": 1}) == {"body": {"ndet": 5}, "created": 1}

    with pytest.raises(DuplicateKeyError):
        col.insert_one(dict(key, body={}))

    ops = [UpdateOne({"unit": "U", "config": 1, "state": f"s{i}"}, {"$set": {"i": i}}, upsert=True) for i in range(1000)]
    res = col.bulk_write(ops, ordered=False)
    assert (res.upserted_count, res.matched_count) == (1000, 0)
    res = col.bulk_write(ops[:100], ordered=False)  # again: matched, nothing new
    assert (res.upserted_count, res.matched_count) == (0, 100)
    assert col.count_documents({}) == 1001
    assert col.count_documents({"unit": "U", "i": {"$gte": 500}}) == 500


def test_servers_stop_cleanly_and_mongo_reopens_its_data(tmp_path):
    """Own instances (the session's are checked at teardown): stop() leaves no process and no listener;
    SecantusDB started again on the same directory finds what it wrote."""
    require("confluent_kafka", "confluent-kafka")
    require("pymongo", "pymongo")
    require("secantus", "secantusdb==0.7.0b3")
    from confluent_kafka import Producer
    from pymongo import MongoClient

    from ampel_dask.testing.kafka_broker import start_kafka
    from ampel_dask.testing.mongo_server import start_mongo

    k = start_kafka({"x": 1}, brokers=2)
    try:
        assert len(k.bootstrap.split(",")) == 2
        md = Producer({"bootstrap.servers": k.bootstrap}).list_topics(timeout=10)
        assert len(md.brokers) == 2 and len(md.topics["x"].partitions) == 1
    finally:
        assert k.stop() == 0
    assert_stopped(k, k.bootstrap)

    m = start_mongo(tmp_path / "db")
    try:
        with MongoClient(m.uri) as client:
            client.app.results.insert_one({"_id": "kept", "v": 1})
    finally:
        assert m.stop() == 0
    assert_stopped(m, m.uri)

    m2 = start_mongo(tmp_path / "db")  # the same directory, now that the first server has exited
    try:
        with MongoClient(m2.uri) as client:
            assert client.app.results.find_one({"_id": "kept"}) == {"_id": "kept", "v": 1}
    finally:
        assert m2.stop() == 0
    assert_stopped(m2, m2.uri)
