"""Live mode against a real Kafka-protocol broker in its own process, fed with real alerts as messages.

The topic holds the real ZTF packets of ../shared/data/ztf/pitt_google (one Avro container per message,
keyed by object and in time order, as ZTF streams them), Rubin's Confluent-framed messages of
lsst/wire_format, a few messages sent twice, and one poison message. ``ampel-dask live`` runs as a
subprocess; it is SIGKILLed at chosen points and restarted, stopped with SIGTERM, and given wrong
credentials. Every run must end with the results of one ``ampel-dask run`` over the same alerts.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ampel_dask.graph.live import CRASH_ENV, LiveOptions, run_live
from ampel_dask.graph.live_metrics import LiveMetrics
from ampel_dask.graph.runner import RunOptions, run_workflow
from ampel_dask.io.stores import ParquetStore
from ampel_dask.graph.workflow import Workflow, load_workflow
from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest_packets
from ampel_dask.io.kafka import consumer_config, producer
from ampel_dask.io.kafka_auth import CredentialsError, KafkaCredentials, Redactor, check_properties
from ampel_dask.io.sources import Packet
from tests.server_fixtures import kafka, new_topic  # noqa: F401  (fixtures)
from tests.test_units_t3 import hook  # noqa: F401  (the counting HTTP receiver)

from .failing_units import FAIL_ENV, GATE_ENV, units_env

from .test_graph import t2_rows
from .test_tiers import DECENT

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 8  # the mock keeps ~5 MiB per partition; 112 messages of up to 140 kB need a few
MAX_BATCH = 40
RESENT = 6  # messages the feed sends twice
PROPS = ["-X", "session.timeout.ms=3000", "-X", "heartbeat.interval.ms=500", "-X", "max.poll.interval.ms=10000"]
WORKFLOW = {
    "name": "live-test",
    "history_buckets": 2,
    "channels": [
        {"name": "DECENT", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "DecentFilter", "config": DECENT}],
         "t2": ["T2LightCurveSummary"], "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"]}}]},
        {"name": "FULLHIST", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 3"}}],
         "t1": {"unit": "T1Policy", "config": {"history": "archive"}}, "t2": ["T2LightCurveSummary"],
         "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"]}}]},
        {"name": "RUBIN", "access": ["LSST"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 1"}}],
         "t2": ["T2LightCurveSummary"], "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"]}}]},
    ],
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the stream, the reference archive run, and how a live process is run
# --------------------------------------------------------------------------------------------------


@dataclass
class Feed:
    topic: str
    packets: list[Packet]  # the alert messages, for the reference archive run
    ends: dict[int, int]  # partition -> end offset
    poison: tuple[int, int]  # (partition, offset) of the poison message

    @property
    def messages(self) -> int:
        return sum(self.ends.values())


@pytest.fixture(scope="module")
def workflow_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wf") / "live.yml"
    path.write_text(yaml.safe_dump(WORKFLOW, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def feed(kafka, data_dir) -> Feed:  # noqa: F811
    topic = kafka.create_topic(f"live-{uuid.uuid4().hex[:8]}", PARTITIONS)
    ztf = []
    for f in sorted((data_dir / "ztf" / "pitt_google").rglob("*.avro")):
        data = f.read_bytes()
        rec = next(fastavro.reader(io.BytesIO(data)))
        ztf.append((rec["candidate"]["jd"], rec["objectId"], data))
    ztf.sort()
    # Rubin's wire samples: one per alert id (pittgoogle's are one synthetic alert in nine schema versions)
    wire = [f.read_bytes() for f in sorted((data_dir / "lsst" / "wire_format").rglob("*.avro")) if f.parent.name != "pittgoogle_client" or f.stem == "lsst.v9_0"]
    lsst = [(str(dia_source(w)["diaObjectId"]), w) for w in wire]
    stream = [(o, d) for _, o, d in ztf[:50]] + [("poison", b"\x00\x00\x00\x00\x07 not an alert")] + [(o, d) for _, o, d in ztf[50:]]
    stream += lsst + [(o, d) for _, o, d in ztf[10:100:20]] + lsst[:1]  # re-sent messages: duplicates
    where: dict[int, tuple[int, int]] = {}
    p = producer(kafka.bootstrap)
    for i, (key, data) in enumerate(stream):
        p.produce(topic, key=key, value=data, on_delivery=lambda err, msg, i=i: where.__setitem__(i, (msg.partition(), msg.offset())))
        p.poll(0)
    assert p.flush(30) == 0
    ends = Counter(part for part, _ in where.values())
    packets = [Packet(f"msg{i}", None, d) for i, (k, d) in enumerate(stream) if k != "poison"]
    return Feed(topic, packets, {q: ends.get(q, 0) for q in range(PARTITIONS)}, where[50])


def dia_source(wire: bytes) -> dict:
    from ampel_dask.io.avro import SchemaCache, iter_packet

    (rec,) = iter_packet(wire, SchemaCache())
    return {**rec.value["diaSource"], "history": len(rec.value.get("prvDiaSources") or [])}


@dataclass
class Reference:
    archive: Path
    store: Path
    alerts: int


@pytest.fixture(scope="module")
def reference(feed, workflow_file, tmp_path_factory) -> Reference:
    """``ampel-dask run`` over the same alerts: ingested at once, one run over the whole archive."""
    root = tmp_path_factory.mktemp("reference")
    report = ingest_packets(feed.packets, root / "archive", IngestOptions(workers=0, progress=False))
    run_workflow(load_workflow(workflow_file), RunOptions(archive=str(root / "archive"), store=str(root / "store"), workers=0, progress=False))
    return Reference(root / "archive", root / "store", report.ingested)


def live_cmd(kafka, feed, workflow_file, group: str, base: Path, *extra: str, workers: int = 0) -> list[str]:  # noqa: F811
    return [sys.executable, "-m", "ampel_dask.cli", "live", str(workflow_file), "--bootstrap", kafka.bootstrap, "--topic", feed.topic,
            "--group", group, "--interval", "1.5", "--max-batch", str(MAX_BATCH), "--archive", str(base / "archive"),
            "--store", str(base / "store"), "--workers", str(workers), "--join-timeout", "30", *PROPS, "--json", *extra]  # fmt: skip


def run_cli(cmd: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def totals_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


NOT_COMMITTED = -1001  # librdkafka's RD_KAFKA_OFFSET_INVALID: what committed() gives a partition with no commit


def committed(kafka, topic: str, group: str) -> dict[int, int]:  # noqa: F811
    """The group's committed offsets per partition (:data:`NOT_COMMITTED`: nothing committed)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, q) for q in range(PARTITIONS)], timeout=10)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in tps}


def manifests(store: Path) -> list[dict]:
    return sorted(ParquetStore(store).manifests(), key=lambda m: (m["live"]["batch"], m["started"]))


def exports(store: Path) -> dict[str, pa.Table]:
    """Each channel's latest T3 export (after the last batch: everything the stream processed)."""
    out = {}
    for m in sorted(ParquetStore(store).manifests(), key=lambda m: m["started"]):
        for path in m["t3_outputs"]:
            out[Path(path).parts[-3]] = pq.read_table(path)
    return {ch: t.sort_by([("stock", "ascending"), ("alert_id", "ascending")]) for ch, t in out.items()}


def rows(table: pa.Table) -> list[tuple]:
    """Rows with NaN as None (NaN != NaN would make equal tables differ)."""
    return [tuple(None if isinstance(v, float) and math.isnan(v) else v for v in r.values()) for r in table.to_pylist()]


def assert_same_results(base: Path, ref: Reference) -> None:
    """T2 and T3 as one archive run gives them; no alert archived twice, no T2 row or recorded state twice."""
    store = base / "store"
    assert t2_rows(store) == t2_rows(ref.store)
    live_exports, ref_exports = exports(store), exports(ref.store)
    assert set(live_exports) == set(ref_exports) == {"DECENT", "FULLHIST", "RUBIN"}
    for ch, table in ref_exports.items():
        assert live_exports[ch].schema == table.schema and rows(live_exports[ch]) == rows(table), ch
    ids = pa.concat_tables([Archive(base / "archive").read(p, ["alert_id"]) for p in Archive(base / "archive").partitions()]).column("alert_id")
    assert len(ids) == len(set(ids.to_pylist())) == ref.alerts
    s = ParquetStore(store)
    for unit, key in s.t2_units():
        sids = [i for f in s.t2_files(unit, key) for i in pq.read_table(f, columns=["state_id"]).column("state_id").to_pylist()]
        assert len(sids) == len(set(sids)), f"duplicate T2 rows of {unit}"
    (record,) = [json.loads(p.read_text()) for p in (store / "live").glob("*.json")]
    for ch, names in record["states"].items():
        states = s.read_states(ch, names)
        alerts = states.column("alert_id").to_pylist() if states is not None else []
        assert len(alerts) == len(set(alerts)), f"an alert has two recorded states in {ch}"


# --------------------------------------------------------------------------------------------------
# an uninterrupted live run: micro-batches, the poison message, metrics, parity with the archive run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(kafka, feed, workflow_file, tmp_path_factory) -> tuple[Path, dict, str]:  # noqa: F811
    base = tmp_path_factory.mktemp("uninterrupted")
    group = f"whole-{uuid.uuid4().hex[:6]}"
    proc = run_cli(live_cmd(kafka, feed, workflow_file, group, base, "--until-idle", "--metrics-file", str(base / "live.prom"), workers=2))
    return base, totals_of(proc), proc.stderr + f"\nGROUP {group}"


def test_micro_batches_commit_after_results(uninterrupted, feed, kafka):  # noqa: F811
    base, totals, stderr = uninterrupted
    n_batches = -(-feed.messages // MAX_BATCH)
    assert totals["batches"] == n_batches + 1 and totals["empty_batches"] == 1 and totals["stopped"] == "idle"
    assert totals["alerts"] == feed.messages and totals["quarantined"] == 1
    assert totals["alerts"] == totals["ingested"] + totals["duplicates"] + totals["quarantined"]
    assert totals["duplicates"] == RESENT
    group = stderr.rsplit("GROUP ", 1)[1].strip()
    assert committed(kafka, feed.topic, group) == feed.ends
    assert {int(k.rsplit("/", 1)[1]): v for k, v in totals["committed"].items()} == {q: e for q, e in feed.ends.items() if e}
    runs = manifests(base / "store")
    assert [m["live"]["batch"] for m in runs] == list(range(1, n_batches + 1))
    assert sum(m["live"]["ingest"]["read"] for m in runs) == feed.messages
    for i in range(1, n_batches + 1):  # a log line per batch: alerts, passed per channel, T2, latency
        line = next(ln for ln in stderr.splitlines() if f"batch {i}: " in ln)
        assert "passed DECENT" in line and "FULLHIST" in line and "T2 computed" in line and "latency" in line and "committed" in line
    assert f"batch {n_batches + 1}: empty" in stderr
    assert totals["latency_s"]["max"] > 0 and totals["t2"]["computed"] > 0


def test_poison_message_is_quarantined_and_its_batch_processed(uninterrupted, feed):
    base, _, _ = uninterrupted
    part, offset = feed.poison
    (q,) = [json.loads(p.read_text()) for p in (base / "archive" / "quarantine").glob("*.json")]
    assert q["source"] == f"kafka://{feed.topic}/{part}" and q["member"] == f"offset={offset}"
    assert "schema id" in q["reason"]
    def covers(m: dict) -> bool:
        first, last = m["live"]["offsets"].get(f"{feed.topic}/{part}", [-1, -2])
        return first <= offset <= last

    (run,) = [m for m in manifests(base / "store") if covers(m)]
    assert run["live"]["ingest"]["quarantined"] == 1 and run["live"]["ingest"]["ingested"] > 10 and run["alerts"] > 10


def test_live_gives_the_results_of_an_archive_run(uninterrupted, reference):
    base, totals, _ = uninterrupted
    assert_same_results(base, reference)
    ref = ParquetStore(reference.store).manifests()[0]
    assert totals["channels"] == ref["channels"]  # the same alerts passed each channel, batch by batch


def test_metrics_file_is_prometheus_text(uninterrupted, feed):
    base, totals, _ = uninterrupted
    text = (base / "live.prom").read_text()
    values = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    assert int(values["ampel_dask_live_alerts_total"]) == feed.messages
    assert int(values["ampel_dask_live_quarantined_total"]) == 1
    assert int(values["ampel_dask_live_batches_total"]) == totals["batches"]
    assert int(values['ampel_dask_live_passed_total{channel="FULLHIST"}']) == totals["channels"]["FULLHIST"]["passed"]
    assert float(values["ampel_dask_live_latency_seconds_max"]) == totals["latency_s"]["max"]
    assert values["ampel_dask_live_up"] == "0" and "# TYPE ampel_dask_live_alerts_total counter" in text


# --------------------------------------------------------------------------------------------------
# crashes: SIGKILL at chosen points of the second batch, then a restart
# --------------------------------------------------------------------------------------------------


CRASH_POINTS = ["after_ingest", "during_run", "before_commit"]


def crash_and_restart(point: str, kafka, feed, workflow_file, base: Path) -> dict:  # noqa: F811
    """Kill the live process at ``point`` of batch 2, note what was left behind, restart it."""
    group = f"crash-{point}-{uuid.uuid4().hex[:6]}"
    cmd = live_cmd(kafka, feed, workflow_file, group, base, "--until-idle")
    first = run_cli(cmd, env={CRASH_ENV: f"{point}:2"})
    left = {"returncode": first.returncode, "stderr": first.stderr, "committed": committed(kafka, feed.topic, group),
            "runs": manifests(base / "store"), "archived": sum(p.rows for p in Archive(base / "archive").partitions()),
            "record": json.loads(next((base / "store" / "live").glob("*.json")).read_text())}  # fmt: skip
    second = run_cli(cmd)
    return {"left": left, "second": second, "committed": committed(kafka, feed.topic, group)}


@pytest.fixture(scope="module")
def crashes(kafka, feed, workflow_file, tmp_path_factory) -> dict[str, tuple[Path, dict]]:  # noqa: F811
    """The three crash scenarios, run side by side (each with its own group, archive and store)."""
    from concurrent.futures import ThreadPoolExecutor

    bases = {p: tmp_path_factory.mktemp(f"crash-{p}") for p in CRASH_POINTS}
    with ThreadPoolExecutor(len(CRASH_POINTS)) as pool:
        futures = {p: pool.submit(crash_and_restart, p, kafka, feed, workflow_file, bases[p]) for p in CRASH_POINTS}
        return {p: (bases[p], f.result()) for p, f in futures.items()}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_and_restarted_gives_the_uninterrupted_results(point, crashes, feed, reference, uninterrupted):
    base, out = crashes[point]
    left = out["left"]
    assert left["returncode"] == -signal.SIGKILL, left["stderr"][-3000:]
    assert f"SIGKILL at {point} of batch 2" in left["stderr"]
    runs, record = left["runs"], left["record"]
    batch1 = {int(k.rsplit("/", 1)[1]): last + 1 for k, (_, last) in runs[0]["live"]["offsets"].items()}
    assert {q: o for q, o in left["committed"].items() if o != NOT_COMMITTED} == batch1  # batch 2 was never committed
    if point == "after_ingest":  # its partition is in the archive, its run never started
        assert len(runs) == 1 and record["batches"] == 1 and left["archived"] > runs[0]["live"]["ingest"]["ingested"]
    elif point == "during_run":  # some of its tasks finished, the run did not
        assert len(runs) == 1 and record["batches"] == 1
    else:  # results durable and recorded, offsets not committed
        assert len(runs) == 2 and record["batches"] == 2

    second = totals_of(out["second"])
    assert second["stopped"] == "idle" and second["duplicates"] > 0  # the uncommitted batch was read again
    assert out["committed"] == feed.ends
    assert_same_results(base, reference)
    assert t2_rows(base / "store") == t2_rows(uninterrupted[0] / "store")


# --------------------------------------------------------------------------------------------------
# webhook pushes: a replayed batch posts nothing new; the stream posts only objects whose state changed
# --------------------------------------------------------------------------------------------------


def latest_states(store: Path, channel: str, names: list[str]) -> dict[int, tuple]:
    """Each object's latest state among the named state sets, by (mjd, alert id), in plain Python."""
    t = ParquetStore(store).read_states(channel, sorted(set(names)), columns=["stock", "mjd", "alert_id", "state_id"])
    out: dict[int, tuple] = {}
    for r in (t.to_pylist() if t is not None else []):
        if r["stock"] not in out or (r["mjd"], r["alert_id"]) > out[r["stock"]][:2]:
            out[r["stock"]] = (r["mjd"], r["alert_id"], r["state_id"])
    return out


def test_a_replayed_batch_posts_nothing_new_and_the_stream_posts_only_changed_states(kafka, feed, tmp_path, hook):  # noqa: F811
    rec, url = hook
    wf = {"name": "live-push", "channels": [{"name": "PUSH", "access": ["ZTF_ALL"], "t3": [{"unit": "T3Webhook", "config": {"url": url, "batch_size": 10}}]}]}
    wf_file = tmp_path / "push.yml"
    wf_file.write_text(yaml.safe_dump(wf))
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    group = f"push-{uuid.uuid4().hex[:6]}"
    cmd = live_cmd(kafka, feed, wf_file, group, tmp_path, "--until-idle")
    store = tmp_path / "store"
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, CRASH_ENV: "before_commit:2"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    # as if killed right after batch 2's pushes were acknowledged and journalled, before T3's marker and the
    # stream's record: the restart replays batch 2 and runs its T3 again
    (m1, m2) = sorted(ParquetStore(store).manifests(), key=lambda m: m["started"])
    for marker in (store / "tasks").glob("*.json"):
        if json.loads(marker.read_text())["kind"] == "t3":
            marker.unlink()
    (record_file,) = (store / "live").glob("*.json")
    record = json.loads(record_file.read_text())
    record["parts"] = sorted(set(record["parts"]) - {i["path"] for i in m2["inputs"]})
    record_file.write_text(json.dumps(record))
    posted_before_restart = len(rec.requests)
    assert posted_before_restart > 0
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert totals_of(second)["stopped"] == "idle" and committed(kafka, feed.topic, group) == feed.ends

    runs = sorted(ParquetStore(store).manifests(), key=lambda m: m["started"])
    restart = runs[2:]  # batch 2's messages again (uncommitted), then the rest of the topic
    assert {i["path"] for m in restart for i in m["inputs"]} >= {i["path"] for i in m2["inputs"]}  # batch 2's parts ran again ...
    objects = [(r["body"]["run_id"], o) for r in rec.requests for o in r["body"]["objects"]]
    keys = [o["idempotency_key"] for _, o in objects]
    assert len(keys) == len(set(keys)), "an object state was posted twice"
    by_run: dict[str, set] = {}
    for run_id, o in objects:
        by_run.setdefault(run_id, set()).add((o["stock"], o["mjd"]))
    again = set().union(*(by_run.get(m["run_id"], set()) for m in restart))
    assert by_run[m2["run_id"]] and not by_run[m2["run_id"]] & again  # ... and re-posted none of it
    # each batch posts exactly the objects whose latest state over the stream so far changed with it
    names: list[str] = []
    before: dict[int, tuple] = {}
    for m in runs:
        names += m["state_names"]["PUSH"]
        now = latest_states(store, "PUSH", names)
        changed = {(s, v[0]) for s, v in now.items() if before.get(s) != v}
        assert by_run.get(m["run_id"], set()) == changed, m["live"]["batch"]
        before = now
    assert len(runs) >= 4 and sum(len(v) for v in by_run.values()) == len(objects) >= len(before)  # every object once at least


# --------------------------------------------------------------------------------------------------
# SIGTERM: the batch in hand is finished and committed, nothing unfinished is committed
# --------------------------------------------------------------------------------------------------


class Watched:
    """A live subprocess whose stderr lines are collected as they come."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.lines: list[str] = []
        self._t = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        self._t.start()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(self.lines)[-3000:]
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> tuple[int, dict]:
        self.proc.wait(timeout)
        self._t.join(5)
        out = self.proc.stdout.read()
        assert out.strip(), "".join(self.lines)[-3000:]
        return self.proc.returncode, json.loads(out.strip().splitlines()[-1])


def test_sigterm_finishes_the_batch_in_hand_then_stops(kafka, feed, workflow_file, reference, tmp_path):  # noqa: F811
    group = f"term-{uuid.uuid4().hex[:6]}"
    cmd = live_cmd(kafka, feed, workflow_file, group, tmp_path, "--metrics-file", str(tmp_path / "m.prom"))
    live = Watched(cmd)
    live.wait_for("batch 1: ")
    live.proc.send_signal(signal.SIGTERM)  # during batch 2 (polled at once: the topic is full)
    code, totals = live.finish()
    assert code == 0 and totals["stopped"] == "signal" and 1 <= totals["batches"] <= 2
    got = committed(kafka, feed.topic, group)
    assert sum(o for o in got.values() if o > 0) == totals["alerts"] < feed.messages  # exactly what was processed
    assert {q: o for q, o in got.items() if o != NOT_COMMITTED} == {int(k.rsplit("/", 1)[1]): v for k, v in totals["committed"].items()}
    assert len(manifests(tmp_path / "store")) == totals["batches"]

    again = Watched(cmd)  # no --batches, no --until-idle: drains the rest, then only a signal stops it
    deadline = time.monotonic() + 90
    while committed(kafka, feed.topic, group) != feed.ends:
        assert again.proc.poll() is None and time.monotonic() < deadline, "".join(again.lines)[-3000:]
        time.sleep(0.3)
    again.wait_for(": empty (no messages")
    again.proc.send_signal(signal.SIGTERM)  # while it waits for messages
    code, totals2 = again.finish(timeout=20)
    assert code == 0 and totals2["stopped"] == "signal"
    assert totals["alerts"] + totals2["alerts"] == feed.messages
    assert_same_results(tmp_path, reference)


def test_ctrl_c_finishes_the_batch_in_hand_too(kafka, feed, workflow_file, tmp_path):  # noqa: F811
    """SIGINT as SIGTERM (dask-jobqueue, imported on the way, used to replace the handler with exit 0)."""
    group = f"int-{uuid.uuid4().hex[:6]}"
    live = Watched(live_cmd(kafka, feed, workflow_file, group, tmp_path))
    live.wait_for("batch 1: ")
    live.proc.send_signal(signal.SIGINT)
    code, totals = live.finish()
    assert code == 0 and totals["stopped"] == "signal", "".join(live.lines)[-3000:]
    assert any("SIGINT: finishing the current batch" in ln for ln in live.lines)
    got = committed(kafka, feed.topic, group)
    assert sum(o for o in got.values() if o > 0) == totals["alerts"] < feed.messages


@pytest.mark.parametrize("case", ["unreachable broker", "misspelt topic"])
def test_until_idle_does_not_mistake_a_missing_broker_or_topic_for_a_drained_topic(case, kafka, feed, workflow_file, tmp_path):  # noqa: F811
    cmd = live_cmd(kafka, feed, workflow_file, f"idle-{uuid.uuid4().hex[:6]}", tmp_path, "--until-idle")
    if case == "unreachable broker":
        cmd[cmd.index("--bootstrap") + 1] = "127.0.0.1:1"
    else:
        cmd[cmd.index("--topic") + 1] = feed.topic + "-nosuch"
    cmd[cmd.index("--join-timeout") + 1] = "3"
    proc = run_cli(cmd)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ("brokers do not answer" if case == "unreachable broker" else "no such topic") in proc.stderr.splitlines()[-1]


def test_second_sigterm_abandons_the_batch_uncommitted(kafka, feed, tmp_path):  # noqa: F811
    """The abandon path alone: batch 1 is held inside its T2 stage (a test unit waits at a gate) when the
    two signals come, so it can neither finish nor be committed; it is read again at the next start."""
    gate = tmp_path / "gate"
    gate.mkdir()
    env = units_env(tmp_path / "site", **{GATE_ENV: str(gate)})
    workflow = tmp_path / "gate.yml"
    workflow.write_text(yaml.safe_dump({**WORKFLOW, "channels": [{"name": "ALL", "access": ["ZTF_PUB", "ZTF_PRIV", "LSST"],
                                        "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 1"}}], "t2": ["T2Gate"]}]}))  # fmt: skip
    group = f"abandon-{uuid.uuid4().hex[:6]}"
    cmd = live_cmd(kafka, feed, workflow, group, tmp_path)
    live = Watched(cmd, env=env)
    deadline = time.monotonic() + 90
    while not (gate / "entered").exists():  # batch 1's run is in progress and cannot end
        assert live.proc.poll() is None and time.monotonic() < deadline, "".join(live.lines)[-3000:]
        time.sleep(0.05)
    live.proc.send_signal(signal.SIGTERM)
    live.wait_for("SIGTERM: finishing the current batch")
    live.proc.send_signal(signal.SIGTERM)
    live.wait_for("SIGTERM again: abandoning the current batch")  # raised in the main thread, the batch still held
    (gate / "open").touch()  # let the held task end, so that the cluster's threads can stop
    code, totals = live.finish()
    assert code == 0 and totals["stopped"] == "abandoned" and totals["batches"] == 0 and totals["alerts"] == 0
    assert any("batch 1 abandoned: nothing of it committed" in ln for ln in live.lines)
    assert not any("batch 1: " in ln for ln in live.lines)  # no batch line: it never finished
    assert all(o < 0 for o in committed(kafka, feed.topic, group).values())  # nothing committed
    assert not list((tmp_path / "store").glob("runs/*.json")) and not list((tmp_path / "store").glob("live/*.json"))

    again = run_cli(cmd + ["--batches", "1"], env=env)  # the gate is open now
    totals = totals_of(again)
    (m,) = manifests(tmp_path / "store")
    ranges = {int(k.rsplit("/", 1)[1]): v for k, v in m["live"]["offsets"].items()}
    assert totals["batches"] == 1 and all(first == 0 for first, _ in ranges.values())  # read again from the start
    assert {q: o for q, o in committed(kafka, feed.topic, group).items() if o >= 0} == {q: last + 1 for q, (_, last) in ranges.items()}


# --------------------------------------------------------------------------------------------------
# a unit that raises: the batch is not committed (on_error: fail), or committed with its failures recorded
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fragile_topic(kafka, data_dir) -> tuple[str, list[int]]:  # noqa: F811
    """One partition: 28 real ZTF alerts in time order, and the two alerts of POISON at offsets 20 and 25
    (never in the first batch of at most MAX_FRAGILE messages)."""
    others, poison = [], []
    for f in sorted((data_dir / "ztf" / "pitt_google").rglob("*.avro")):
        data = f.read_bytes()
        rec = next(fastavro.reader(io.BytesIO(data)))
        (poison if rec["objectId"] == POISON else others).append((rec["candidate"]["jd"], rec["objectId"], data))
    stream = sorted(others)[:28]
    assert len(poison) == 2
    stream[20:20] = [poison[0]]
    stream[25:25] = [poison[1]]
    topic = kafka.create_topic(f"fragile-{uuid.uuid4().hex[:8]}", 1)
    where: dict[int, int] = {}
    p = producer(kafka.bootstrap)
    for i, (_, key, data) in enumerate(stream):
        p.produce(topic, key=key, value=data, on_delivery=lambda err, msg, i=i: where.__setitem__(i, msg.offset()))
        p.poll(0)
    assert p.flush(30) == 0 and len(where) == 30
    return topic, [where[i] for i, (_, key, _) in enumerate(stream) if key == POISON]


POISON = "ZTF21abvawaj"
MAX_FRAGILE = 15


def fragile_run(kafka, topic: str, base: Path, on_error: str, *extra: str) -> subprocess.CompletedProcess:  # noqa: F811
    from ampel_dask.io.layout import ztf_stock

    t2 = {"unit": "T2Fragile", "on_error": on_error}
    spec = {"name": f"fragile-{on_error}", "channels": [{"name": "ALL", "access": ["ZTF_PUB", "ZTF_PRIV"],
            "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 1"}}], "t2": [t2]}]}  # fmt: skip
    (base / "wf.yml").write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "ampel_dask.cli", "live", str(base / "wf.yml"), "--bootstrap", kafka.bootstrap, "--topic", topic, "--group",
           f"fragile-{on_error}-{uuid.uuid4().hex[:6]}", "--interval", "1.5", "--max-batch", str(MAX_FRAGILE), "--archive", str(base / "archive"),
           "--store", str(base / "store"), "--workers", "0", "--join-timeout", "30", *PROPS, "--json", "--until-idle", *extra]  # fmt: skip
    env = units_env(base / "site", **{FAIL_ENV: str(ztf_stock(POISON))})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    proc.group = cmd[cmd.index("--group") + 1]  # type: ignore[attr-defined]
    return proc


def test_a_failing_unit_stops_live_mode_before_the_commit(kafka, fragile_topic, tmp_path):  # noqa: F811
    from ampel_dask.io.layout import ztf_stock

    topic, poison = fragile_topic
    proc = fragile_run(kafka, topic, tmp_path, "fail")
    assert proc.returncode == 1, proc.stderr[-3000:]
    runs = manifests(tmp_path / "store")
    ok, (bad,) = runs[:-1], runs[-1:]
    assert [m["status"] for m in ok] == ["ok"] * len(ok) and ok and bad["status"] == "failed"
    first, last = bad["live"]["offsets"][f"{topic}/0"]
    assert first <= poison[0] <= last  # the batch holding the first poison alert failed ...
    assert committed(kafka, topic, proc.group)[0] == first > 0  # ... and the broker has the batches before it only
    states = [pq.read_table(f, columns=["state_id", "stock"]) for f in (tmp_path / "store" / "states" / "ALL").glob("*.parquet")]
    (hit,) = [t for t in states if ztf_stock(POISON) in t.column("stock").to_pylist()]
    n = len(set(hit.column("state_id").to_pylist()))  # the states of the failing stage
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: batch {bad['live']['batch']} failed, nothing of it committed (it is read again at the next start): T2 unit T2Fragile "
        f"(channel ALL) failed on {n} states: ValueError: fragile: {n} states, one of stocks {ztf_stock(POISON)} among them")  # fmt: skip
    record = json.loads(next((tmp_path / "store" / "live").glob("*.json")).read_text())
    assert record["batches"] == len(ok)  # the failed batch's parts are not marked done: a restart runs them again


def test_recorded_failures_are_committed_and_retried_by_the_next_run(kafka, fragile_topic, tmp_path):  # noqa: F811
    from ampel_dask.io.layout import ztf_stock

    topic, poison = fragile_topic
    proc = fragile_run(kafka, topic, tmp_path, "record")
    totals = totals_of(proc)
    assert committed(kafka, topic, proc.group)[0] == 30 and totals["stopped"] == "idle"
    states = [pq.read_table(f, columns=["state_id", "stock"]) for f in (tmp_path / "store" / "states" / "ALL").glob("*.parquet")]
    sids = {(s, i) for t in states for s, i in zip(t.column("stock").to_pylist(), t.column("state_id").to_pylist())}
    bad = {i for s, i in sids if s == ztf_stock(POISON)}
    assert len(bad) == len(poison) == 2  # one state per poison alert
    assert totals["t2"]["failed"] == totals["t2"]["recorded"] == 2 and totals["t2"]["computed"] == len({i for _, i in sids}) - 2
    assert "failed 2 (recorded 2)" in next(ln for ln in proc.stderr.splitlines() if ln.startswith("live: "))
    failed = [int(m.group(1)) for ln in proc.stderr.splitlines() if "; committed" in ln and (m := re.search(r"failed (\d+) \(recorded, retried", ln))]
    assert sum(failed) == 2  # said in the line of each batch that had them, and those batches were committed

    env = units_env(tmp_path / "site")  # the unit fixed: an archive run over what the stream archived
    again = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "run", str(tmp_path / "wf.yml"), "--archive", str(tmp_path / "archive"),
                            "--store", str(tmp_path / "store"), "--workers", "0", "--json"], capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out["t2_units"]["T2Fragile"] == {"computed": 2, "reused": len({i for _, i in sids}) - 2, "failed": 0, "recorded": 0}
    info = json.loads(subprocess.run([sys.executable, "-m", "ampel_dask.cli", "explain", POISON, "--store", str(tmp_path / "store"), "--json"],
                                     capture_output=True, text=True, env=env, cwd=ROOT).stdout.strip().splitlines()[-1])  # fmt: skip
    assert sorted(t["code"] for t in info["t2"]) == [0, 0] and info["stock"] == ztf_stock(POISON)


# --------------------------------------------------------------------------------------------------
# credentials: environment or secrets file, never the workflow; never in logs, manifests or errors
# --------------------------------------------------------------------------------------------------


def all_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


def test_wrong_credentials_fail_fast_and_the_password_never_shows(kafka, feed, workflow_file, tmp_path):  # noqa: F811
    secret = f"pw-{uuid.uuid4().hex}"
    env = {"AMPEL_DASK_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "AMPEL_DASK_KAFKA_SASL_MECHANISM": "PLAIN",
           "AMPEL_DASK_KAFKA_SASL_USERNAME": "alice", "AMPEL_DASK_KAFKA_SASL_PASSWORD": secret}  # fmt: skip
    base = tmp_path / "run"
    cmd = live_cmd(kafka, feed, workflow_file, "auth", base, "--batches", "1", "--metrics-file", str(base / "m.prom"))
    proc = run_cli(cmd, env=env, timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "_AUTHENTICATION" in proc.stderr and "SASL_PLAINTEXT PLAIN user alice" in proc.stderr
    assert secret not in proc.stdout + proc.stderr and secret not in all_text(base)

    secrets = tmp_path / "kafka-secrets.yaml"  # a secrets file; TLS with a CA file that does not exist
    secrets.write_text(yaml.safe_dump({"kafka": {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "bob",
                                                 "sasl.password": secret, "ssl.ca.location": str(tmp_path / "missing-ca.pem")}}))  # fmt: skip
    proc = run_cli(cmd + ["--secrets", str(secrets)], timeout=60)
    assert proc.returncode == 1 and "cannot create the Kafka consumer" in proc.stderr and "ssl.ca.location" in proc.stderr
    assert secret not in proc.stdout + proc.stderr and secret not in all_text(base)

    proc = run_cli(cmd + ["-X", f"sasl.password={secret}"], timeout=60)  # never on the command line
    assert proc.returncode == 2 and "sasl.password" in proc.stderr and secret not in proc.stderr


def test_credentials_sources_and_redaction(tmp_path):
    import logging

    secret = f"s3cr3t-{uuid.uuid4().hex[:8]}"
    env = {"AMPEL_DASK_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AMPEL_DASK_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "AMPEL_DASK_KAFKA_SASL_USERNAME": "rubin", "AMPEL_DASK_KAFKA_SASL_PASSWORD": secret, "AMPEL_DASK_KAFKA_BOOTSTRAP": "h:9092"}  # fmt: skip
    creds = KafkaCredentials.load(env=env)
    conf = consumer_config("h:9092", "g", creds, {"fetch.max.bytes": "1000000"})
    assert conf["sasl.password"] == secret and conf["security.protocol"] == "SASL_SSL" and conf["enable.auto.commit"] is False
    assert secret not in repr(creds) + str(creds.model_dump()) + creds.describe()
    for name, text in [("k.yaml", f"kafka:\n  sasl.password: {secret}\n  sasl.username: u\n"), ("k.json", json.dumps({"sasl_password": secret})),
                       ("k.env", f"export AMPEL_DASK_KAFKA_SASL_PASSWORD='{secret}'\n# comment\n")]:  # fmt: skip
        (tmp_path / name).write_text(text)
        assert KafkaCredentials.load(tmp_path / name, env={}).librdkafka()["sasl.password"] == secret
    overridden = KafkaCredentials.load(tmp_path / "k.yaml", env={"AMPEL_DASK_KAFKA_SASL_USERNAME": "v"})
    assert overridden.sasl_username == "v" and overridden.librdkafka()["sasl.password"] == secret  # environment wins
    for bad in ({"AMPEL_DASK_KAFKA_SECURITY_PROTOCOL": f"X{secret}"}, {"AMPEL_DASK_KAFKA_SASL_PASWORD": secret}):
        with pytest.raises(CredentialsError) as err:
            KafkaCredentials.load(env=bad)
        assert secret not in str(err.value)
    with pytest.raises(CredentialsError, match="sasl.password"):
        check_properties({"sasl.password": secret})
    with pytest.raises(CredentialsError, match="auto.commit"):
        check_properties({"enable.auto.commit": "true"})
    with pytest.raises(Exception) as err:  # a workflow file has no place for credentials
        Workflow.model_validate({**WORKFLOW, "kafka": {"sasl_password": secret}})
    assert "kafka" in str(err.value)
    assert not any("password" in f or "sasl" in f for f in LiveOptions.model_fields)

    red = Redactor(creds.secrets())
    assert red(f"auth failed for rubin:{secret}") == "auth failed for rubin:***"
    assert red("https://user:hunter2@registry:8081/x") == "https://user:***@registry:8081/x"
    handler = logging.StreamHandler(stream := io.StringIO())
    handler.addFilter(red.filter())
    lg = logging.getLogger("ampel_dask.test_redaction")
    lg.addHandler(handler)
    try:
        lg.error("connect with %s", secret)
        try:
            raise RuntimeError(f"bad password {secret}")
        except RuntimeError:
            lg.exception("failed")
    finally:
        lg.removeHandler(handler)
    assert secret not in stream.getvalue() and stream.getvalue().count("***") >= 2


def test_metrics_endpoint_serves_prometheus_text(tmp_path):
    m = LiveMetrics(tmp_path / "m.prom", port=0)
    m.add("alerts_total", 5)
    m.add("passed_total", 2, channel='A"1')
    m.set("lag_messages", 3, topic="t", partition="0")
    m.flush()
    body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5).read().decode()
    assert "ampel_dask_live_alerts_total 5" in body and 'ampel_dask_live_passed_total{channel="A\\"1"} 2' in body
    assert 'ampel_dask_live_lag_messages{partition="0",topic="t"} 3' in body and body == (tmp_path / "m.prom").read_text()
    m.close()
    assert "ampel_dask_live_up 0" in (tmp_path / "m.prom").read_text()


# --------------------------------------------------------------------------------------------------
# Rubin messages whose schema ids only a schema registry knows
# --------------------------------------------------------------------------------------------------


def test_rubin_wire_messages_with_a_schema_registry(kafka, new_topic, data_dir, tmp_path):  # noqa: F811
    import struct

    from ampel_dask.io.avro import SchemaCache

    files = sorted((data_dir / "lsst" / "wire_format").rglob("*.avro"))
    originals = sorted({struct.unpack(">I", f.read_bytes()[1:5])[0] for f in files})
    registry = {5000 + i: SchemaCache().from_id(sid).key for i, sid in enumerate(originals)}
    asked: list[int] = []

    class Registry(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            sid = int(self.path.rsplit("/", 1)[1])
            asked.append(sid)
            body = json.dumps({"schema": registry[sid]}).encode() if sid in registry else b'{"error_code": 40403}'
            self.send_response(200 if sid in registry else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    topic = new_topic(partitions=2)
    p = producer(kafka.bootstrap)
    by_original = {sid: rid for rid, sid in zip(registry, originals)}
    for f in files:  # re-framed with the registry's ids, which no local schema file is named after
        raw = f.read_bytes()
        p.produce(topic, value=b"\x00" + struct.pack(">I", by_original[struct.unpack(">I", raw[1:5])[0]]) + raw[5:])
    p.produce(topic, value=b"\x00" + struct.pack(">I", 4242) + files[0].read_bytes()[5:])  # an id the registry lacks
    assert p.flush(15) == 0
    wf = Workflow.model_validate({**WORKFLOW, "channels": [WORKFLOW["channels"][2]]})
    opts = LiveOptions(bootstrap=kafka.bootstrap, topics=[topic], group="registry", interval=1.0, until_idle=True, workers=0,
                       archive=str(tmp_path / "archive"), store=str(tmp_path / "store"), schema_registry=f"http://127.0.0.1:{server.server_port}",
                       properties=dict(a.split("=") for a in PROPS[1::2]))  # fmt: skip
    try:
        totals = run_live(wf, opts)
    finally:
        server.shutdown()
    assert totals["alerts"] == len(files) + 1 and totals["quarantined"] == 1
    assert totals["ingested"] == 9 and totals["duplicates"] == len(files) - 9
    assert sorted(asked) == sorted([*registry, 4242])  # each id asked once, then cached
    (q,) = [json.loads(x.read_text()) for x in (tmp_path / "archive" / "quarantine").glob("*.json")]
    assert "schema id 4242" in q["reason"] and q["source"].startswith(f"kafka://{topic}/")
    assert totals["channels"]["RUBIN"]["passed"] > 0 and totals["t2"]["computed"] > 0


def test_reingest_names_the_parts_that_hold_the_duplicates(feed, tmp_path):
    """What a replayed batch runs on: re-ingested alerts are not written again, and the archived parts
    that hold them are named (exactly those)."""
    opts = IngestOptions(workers=0, progress=False, chunk_packets=25, compact_rows=0)  # parts as chunked, not merged

    def ids(archive: Path, parts) -> dict[str, set[int]]:
        return {p.path: set(Archive(archive).read(p, ["alert_id"]).column("alert_id").to_pylist()) for p in parts}

    first = ingest_packets(feed.packets[:60], tmp_path / "a", opts)
    assert first.ingested == 60 and first.partitions > 2 and not first.duplicate_partitions
    replay = set().union(*ids(tmp_path / "b", ingest_packets(feed.packets[40:70], tmp_path / "b", opts).new_partitions).values())
    again = ingest_packets(feed.packets[40:70], tmp_path / "a", opts)
    assert again.ingested == 10 and again.duplicates == 20
    held = ids(tmp_path / "a", first.new_partitions)
    assert {p.path for p in again.duplicate_partitions} == {path for path, a in held.items() if a & replay}
    assert again.as_dict()["duplicate_partitions"] == sorted(p.path for p in again.duplicate_partitions)
