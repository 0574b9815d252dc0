"""Live mode on this machine: latency of a 10,000-alert burst (one LSST visit) from produce to committed
results, and sustained alerts/s, through a real Kafka-protocol broker.

    .venv/bin/python benchmarks/bench_live.py [--workers 2] [--bursts 3] [--sustained 50000] [--json]

The broker is librdkafka's mock cluster in its own process (``ampel_dask.testing.kafka_broker``); a
producer process sends the alerts as fast as it can; this process runs the live loop (``run_live``,
the code behind ``ampel-dask live``) with a LocalCluster of ``--workers`` processes that lives across
batches. Alerts are real ones from ../shared/data, replicated with new ids:

- ``rubin``: Rubin's lsst.v9_0 alerts (Fink's sample), re-encoded as Confluent wire messages (0x00 +
  schema id 900 + schemaless Avro) without cutouts (Rubin sends cutouts; they would add ~100 kB per
  message of transfer but no processing: cutouts never enter the hot path).
- ``elasticc``: ELAsTiCC alerts (LSST-like, with up to a year of previous sources each), one Avro
  container per message: the history-heavy case.

Each replica is moved in time (trigger and history by the same shift) to one visit, so a burst is one
night, as a real visit is (the samples span years, which would make a thousand one-night parts).

A burst is ``max_batch`` = 10,000 messages, so the batch closes when the last one arrives; latency is
from the first message produced to the batch's offsets being committed (after its archive partition,
T1/T2/T3 results and manifest are on disk). The first burst pays the workers' imports (cold); later
ones show the steady state. Sustained: ``--sustained`` messages produced back to back, processed in
batches of 10,000; alerts/s = messages / (last commit - first produce).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import struct
import sys
import tarfile
import threading
import time
from pathlib import Path

import fastavro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.live import LiveOptions, StopFlag, run_live  # noqa: E402
from ampel_dask.graph.workflow import Workflow  # noqa: E402
from ampel_dask.io.avro import Record, SchemaCache, iter_packet  # noqa: E402

DATA = REPO.parent / "shared" / "data"
WORK = REPO / ".bench" / "live"
BURST = 10_000
STEP = 10**12  # replica k adds k * STEP to source and object ids (unique, and an object id never equals a source id)
WORKFLOW = {
    "name": "bench-live-lsst",
    "history_buckets": 4,
    "channels": [
        {"name": "QUALITY", "access": ["LSST"], "filters": [{"unit": "LSSTQualityFilter", "config": {"min_snr": 5}}],
         "t2": ["T2LightCurveSummary", {"unit": "T2LightCurveFeatures", "config": {"bands": ["u", "g", "r", "i", "z", "y"], "value": "flux", "kinds": ["detection", "forced"], "min_points": 3}}],
         "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"]}}]},
        {"name": "HISTORY", "access": ["LSST"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 2"}}],
         "t1": {"unit": "T1Policy", "config": {"history": "archive", "kinds": ["detection", "forced"]}}, "t2": ["T2LightCurveSummary"]},
    ],
}  # fmt: skip
PROPS = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000", "max.poll.interval.ms": "300000",
         "fetch.max.bytes": "104857600", "max.partition.fetch.bytes": "10485760", "queued.max.messages.kbytes": "262144"}  # fmt: skip


# --- alerts ---------------------------------------------------------------------------------------

VISIT_MJD = 61000.1  # every replica is moved (with its whole history) to one visit: one night, as a real burst


def _at_visit(rec: dict, time_field: str) -> dict:
    """The alert with its trigger at VISIT_MJD: the same shift for every source and limit it carries."""
    delta = VISIT_MJD - rec["diaSource"][time_field]
    out = dict(rec)
    for key in ("prvDiaSources", "prvDiaForcedSources", "prvDiaNondetectionLimits"):
        if out.get(key):
            out[key] = [{**x, time_field: x[time_field] + delta} if x.get(time_field) is not None else x for x in out[key]]
    out["diaSource"] = {**rec["diaSource"], time_field: VISIT_MJD}
    return out


def rubin_messages(n: int, start: int = 0) -> list[bytes]:
    """Rubin lsst.v9_0 wire messages without cutouts, replicas ``start`` .. of the real Fink sample."""
    cache = SchemaCache()
    schema = cache.from_id(900).parsed
    base = []
    with tarfile.open(DATA / "lsst" / "rubin_fink_v9_0.tar.gz") as tar:
        for m in tar:
            if m.isfile():
                base += [r.value for r in iter_packet(tar.extractfile(m).read(), cache) if isinstance(r, Record)]
    out = []
    for i in range(start, start + n):
        k, v = divmod(i, len(base))
        rec = _at_visit(base[v], "midpointMjdTai")
        src, obj = dict(rec["diaSource"]), rec.get("diaObject") and dict(rec["diaObject"])
        src["diaSourceId"] += (k + 1) * STEP
        if src.get("diaObjectId") is not None:
            src["diaObjectId"] += (k + 1) * STEP + 1
            if obj:
                obj["diaObjectId"] = src["diaObjectId"]
        rec.update(diaSourceId=src["diaSourceId"], diaSource=src, diaObject=obj, cutoutDifference=None, cutoutScience=None, cutoutTemplate=None)
        buf = io.BytesIO()
        buf.write(struct.pack(">bI", 0, 900))
        fastavro.schemaless_writer(buf, schema, rec)
        out.append(buf.getvalue())
    return out


def elasticc_messages(n: int) -> list[bytes]:
    """ELAsTiCC alerts (with history), one Avro container per message, replicated with new ids."""
    base = []
    with tarfile.open(DATA / "lsst" / "elasticc_v0_9_alerce.tar.gz") as tar:
        for m in tar:
            if m.isfile():
                r = fastavro.reader(io.BytesIO(tar.extractfile(m).read()))
                base += [(r.writer_schema, rec) for rec in r]
    parsed = fastavro.parse_schema(base[0][0])
    out = []
    for i in range(n):
        k, v = divmod(i, len(base))
        rec = _at_visit(base[v][1], "midPointTai")
        src, obj = dict(rec["diaSource"]), dict(rec["diaObject"])
        src["diaSourceId"] += (k + 1) * STEP
        src["diaObjectId"] += (k + 1) * STEP + 1
        obj["diaObjectId"] = src["diaObjectId"]
        rec.update(alertId=rec["alertId"] + (k + 1) * STEP, diaSource=src, diaObject=obj,
                   prvDiaSources=[{**p, "diaObjectId": src["diaObjectId"]} for p in rec.get("prvDiaSources") or []])  # fmt: skip
        buf = io.BytesIO()
        fastavro.writer(buf, parsed, [rec], codec="null", sync_marker=b"0123456789abcdef")
        out.append(buf.getvalue())
    return out


# --- producer (a process of its own: it must not share this process's GIL) ------------------------


def _produce(bootstrap: str, topic: str, path: str, conn) -> None:
    from ampel_dask.io.kafka import producer

    data = Path(path).read_bytes()
    msgs, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        msgs.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    p = producer(bootstrap, **{"linger.ms": 20, "batch.size": 1_000_000, "queue.buffering.max.messages": 1_000_000})
    conn.recv()  # go
    t0 = time.time()
    for i, m in enumerate(msgs):
        while True:
            try:
                p.produce(topic, key=str(i).encode(), value=m)
                break
            except BufferError:
                p.poll(0.01)
        if i % 1000 == 0:
            p.poll(0)
    left = p.flush(120)
    conn.send((t0, time.time(), len(msgs), left))


class Producer:
    def __init__(self, bootstrap: str, topic: str, messages: list[bytes], name: str):
        path = WORK / f"{name}.msgs"
        with open(path, "wb") as fh:
            for m in messages:
                fh.write(struct.pack(">I", len(m)) + m)
        self.bytes = sum(len(m) for m in messages)
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_produce, args=(bootstrap, topic, str(path), child), daemon=True)
        self.proc.start()

    def go(self) -> None:
        self.conn.send("go")

    def result(self) -> tuple[float, float, int, int]:
        out = self.conn.recv()
        self.proc.join(30)
        return out


# --- the live loop, driven from here --------------------------------------------------------------


class Live:
    """run_live in a thread; batches reported through a queue-like list; ready once partitions are assigned."""

    def __init__(self, opts: LiveOptions):
        self.stop = StopFlag()
        self.batches: list[dict] = []
        self.assigned = threading.Event()
        self.cond = threading.Condition()
        handler = _Signal(self.assigned)
        logging.getLogger("ampel_dask.kafka").addHandler(handler)
        logging.getLogger("ampel_dask.kafka").setLevel(logging.INFO)
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, args=(opts,), daemon=True)
        self.thread.start()

    def _run(self, opts: LiveOptions) -> None:
        self.result = run_live(Workflow.model_validate(WORKFLOW), opts, self.stop, self._on_batch)

    def _on_batch(self, info: dict) -> None:
        info["finished"] = time.time()
        with self.cond:
            self.batches.append(info)
            self.cond.notify_all()

    def wait_alerts(self, n: int, since: int, timeout: float = 600) -> list[dict]:
        """Batches after index ``since`` until they hold ``n`` alerts."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while sum(b["alerts"] for b in self.batches[since:]) < n:
                if not self.cond.wait(timeout=max(0.1, deadline - time.monotonic())) and time.monotonic() > deadline:
                    raise TimeoutError(f"only {sum(b['alerts'] for b in self.batches[since:])} of {n} alerts processed")
            return self.batches[since:]

    def close(self) -> dict:
        self.stop.request()
        self.thread.join(120)
        return self.result


class _Signal(logging.Handler):
    def __init__(self, event: threading.Event):
        super().__init__()
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("assigned") and "nothing" not in record.getMessage():
            self.event.set()


def burst(live: Live, bootstrap: str, topic: str, messages: list[bytes], name: str) -> dict:
    prod = Producer(bootstrap, topic, messages, name)
    since = len(live.batches)
    time.sleep(1.0)  # the producer process has started and loaded its messages
    prod.go()
    t0, t1, n, left = prod.result()
    assert left == 0, f"{left} messages not delivered"
    batches = [b for b in live.wait_alerts(len(messages), since) if b["alerts"]]
    done = max(b["finished"] for b in batches)
    return {
        "alerts": sum(b["alerts"] for b in batches),
        "batches": len(batches),
        "mb": round(prod.bytes / 1e6, 1),
        "produce_s": round(t1 - t0, 2),
        "latency_s": round(done - t0, 2),
        "after_last_produced_s": round(done - t1, 2),
        "ingest_s": round(sum(b["ingest_seconds"] for b in batches), 2),
        "run_s": round(sum(b["run_seconds"] for b in batches), 2),
        "commit_s": round(sum(b["commit_seconds"] for b in batches), 2),
        "process_s": round(sum(b["seconds"] for b in batches), 2),
        "t2_computed": sum(b["t2"].get("computed", 0) for b in batches),
        "passed": {ch: sum(b["channels"].get(ch, {}).get("passed", 0) for b in batches) for ch in ("QUALITY", "HISTORY")},
        "alerts_per_s": round(len(messages) / (done - t0), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bursts", type=int, default=3, help="Rubin bursts of 10,000 (the first is cold)")
    ap.add_argument("--elasticc", type=int, default=1, help="ELAsTiCC bursts of 10,000")
    ap.add_argument("--sustained", type=int, default=50_000, help="alerts produced back to back (0: skip)")
    ap.add_argument("--no-history", action="store_true", help="do not keep the archive's object-bucketed history (history channels shuffle)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from ampel_dask.testing.kafka_broker import start_kafka

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    print("building messages ...", file=sys.stderr)
    rubin = rubin_messages(BURST * a.bursts + a.sustained)
    elasticc = elasticc_messages(BURST) if a.elasticc else []
    server = start_kafka({"rubin": 32, "elasticc": 32, "sustained": 128})
    out: dict = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(), "load_avg_start": os.getloadavg()},
                 "workers": a.workers, "bursts": [], "elasticc": [], "sustained": None}  # fmt: skip
    live = Live(LiveOptions(bootstrap=server.bootstrap, topics=["rubin", "elasticc", "sustained"], group="bench", interval=300,
                            max_batch=BURST, workers=a.workers, archive=str(WORK / "archive"), store=str(WORK / "store"),
                            properties=PROPS, chunk_packets=1250, metrics_file=str(WORK / "live.prom"), history=not a.no_history))  # fmt: skip
    try:
        if not live.assigned.wait(120):
            raise TimeoutError("the live consumer got no partitions")
        for i in range(a.bursts):
            r = burst(live, server.bootstrap, "rubin", rubin[i * BURST : (i + 1) * BURST], f"rubin{i}")
            out["bursts"].append(r)
            print(f"rubin burst {i + 1} ({'cold' if i == 0 else 'warm'}): {r}", file=sys.stderr)
        for i in range(a.elasticc):
            r = burst(live, server.bootstrap, "elasticc", elasticc, f"elasticc{i}")
            out["elasticc"].append(r)
            print(f"elasticc burst: {r}", file=sys.stderr)
        if a.sustained:
            r = burst(live, server.bootstrap, "sustained", rubin[a.bursts * BURST :], "sustained")
            out["sustained"] = r
            print(f"sustained: {r}", file=sys.stderr)
    finally:
        totals = live.close()
        server.stop()
    out["totals"] = {k: totals.get(k) for k in ("alerts", "batches", "quarantined", "t2", "latency_s")}
    out["machine"]["load_avg_end"] = os.getloadavg()
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
