"""The MongoDB store against a real Mongo-wire server (SecantusDB), on real ZTF alerts: the same
workflow gives the same states and T2 results as the Parquet store; re-runs and repeated writes are
idempotent; the unique indexes exist; explain works; the store travels to worker processes."""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ampel_dask.graph.explain import explain
from ampel_dask.io.stores.mongo import MongoStore, uri_database
from ampel_dask.graph.runner import RunOptions, run_workflow
from ampel_dask.io.stores import ParquetStore, open_store
from ampel_dask.graph.workflow import Workflow
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.keys import ID_DTYPE

from .server_fixtures import mongo, mongo_db  # noqa: F401
from .test_graph import WORKFLOW

SOURCES = ["ztf/fink_ztf_public_20181129.tar.gz", "ztf/pitt_google"]  # pitt_google holds ZTF21abiuvdk
SKIP = ("run_id", "t2_key", "alert_id")  # provenance that depends on the run / which alert came first
TIMINGS: dict[str, float] = {}


def t2_rows(store) -> set[tuple]:
    out = set()
    for unit, key in store.t2_units():
        t = store.read_t2(unit, key)
        for r in t.select([c for c in t.column_names if c not in SKIP]).to_pylist():
            out.add((unit, key, tuple((k, None if isinstance(v, float) and np.isnan(v) else v) for k, v in sorted(r.items()))))
    return out


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by([("state_id", "ascending"), ("alert_id", "ascending")])


@pytest.fixture(scope="module")
def runs(mongo, tmp_path_factory, data_dir):  # noqa: F811
    """One ingest; the workflow once into a Parquet store, once into a fresh Mongo database."""
    from pymongo import MongoClient

    tmp = tmp_path_factory.mktemp("mongo_store")
    t = time.perf_counter()
    ingest([str(data_dir / s) for s in SOURCES], tmp / "archive", IngestOptions(workers=0, progress=False))
    TIMINGS["ingest"] = time.perf_counter() - t
    database = f"test_{uuid.uuid4().hex[:12]}"
    spec = {"kind": "mongo", "uri": mongo.uri, "database": database, "path": str(tmp / "mongo_files")}
    wf = Workflow.model_validate({**WORKFLOW, "store": spec | {"kind": "mongo"}})
    opts = RunOptions(archive=str(tmp / "archive"), store=None, workers=0, progress=False)
    t = time.perf_counter()
    parquet = run_workflow(Workflow.model_validate(WORKFLOW), RunOptions(archive=str(tmp / "archive"), store=str(tmp / "pq"), workers=0, progress=False))
    TIMINGS["parquet run"] = time.perf_counter() - t
    t = time.perf_counter()
    first = run_workflow(wf, opts)
    TIMINGS["mongo run"] = time.perf_counter() - t
    yield {"tmp": tmp, "wf": wf, "opts": opts, "parquet": parquet, "mongo": first, "pq": ParquetStore(tmp / "pq"),
           "store": open_store(spec), "spec": spec, "uri": mongo.uri.rstrip("/") + "/" + database}  # fmt: skip
    print("\ntimings: " + ", ".join(f"{k} {v:.2f} s" for k, v in TIMINGS.items()))
    with MongoClient(mongo.uri) as client:
        client.drop_database(database)


def test_same_channels_and_states_as_parquet(runs):
    pq_, mg = runs["pq"], runs["store"]
    assert runs["mongo"]["alerts"] == runs["parquet"]["alerts"] == 467
    assert runs["mongo"]["channels"] == runs["parquet"]["channels"]
    assert runs["mongo"]["rejections"] == runs["parquet"]["rejections"]
    assert runs["mongo"]["t2"] == runs["parquet"]["t2"] and runs["mongo"]["t2"]["computed"] > 200
    assert mg.channels() == pq_.channels() == ["BRIGHT", "DECENT", "FULLHIST"]
    for c in mg.channels():
        a, b = mg.read_states(c), pq_.read_states(c)
        assert a.schema.equals(b.schema), c  # int8 kind, float32 rb, nested list<struct> dps
        assert _sorted(a).equals(_sorted(b)), c
        light = mg.read_states(c, dps=False)  # without datapoints: the same rows, every other column
        assert light.column_names == [n for n in b.column_names if n != "dps"], c
        assert _sorted(light).equals(_sorted(b.drop_columns(["dps"]))), c
    assert mg.db.t1.count_documents({}) == sum(pq_.read_states(c).num_rows for c in pq_.channels())
    # objects: their channels and the run that touched them
    s = mg.read_states("DECENT").column("stock")[0].as_py()
    doc = mg.db.stock.find_one({"_id": s})
    assert "DECENT" in doc["channel"] and doc["run"] == [runs["mongo"]["run_id"]]
    assert mg.read_journal().num_rows == pq_.read_journal().num_rows == mg.db.journal.count_documents({})
    assert mg.manifests()[-1]["run_id"] == runs["mongo"]["run_id"]
    assert [Path(p).parent.parent.parent.parent for p in runs["mongo"]["t3_outputs"]] == [runs["tmp"] / "mongo_files"]
    assert all(Path(p).exists() for p in runs["mongo"]["t3_outputs"])
    objects = len(set(mg.read_states("DECENT").column("stock").to_pylist()))  # T3 sees each object's latest state
    assert mg.read_t3_objects().num_rows == pq_.read_t3_objects().num_rows == objects >= 1


def test_t2_results_identical_to_parquet(runs):
    pq_, mg = runs["pq"], runs["store"]
    assert mg.t2_units() == pq_.t2_units()
    (unit, key), = mg.t2_units()
    a, b = mg.read_t2(unit, key), pq_.read_t2(unit, key)
    assert a.schema.equals(b.schema)  # body columns come back with their types
    assert t2_rows(mg) == t2_rows(pq_)
    done = mg.done_state_ids(unit, key)  # 128-bit ids, sorted by (first lane, second lane) as unsigned numbers
    lanes = [(int.from_bytes(bytes(i)[:8], "little"), int.from_bytes(bytes(i)[8:], "little")) for i in done]
    assert done.dtype == ID_DTYPE and all(x < y for x, y in zip(lanes, lanes[1:]))
    assert [bytes(i) for i in done] == sorted(b.column("state_id").to_pylist(), key=lambda i: (int.from_bytes(i[:8], "little"), int.from_bytes(i[8:], "little")))
    some = done[::7]
    assert sorted(mg.read_t2(unit, key, some).column("state_id").to_pylist()) == sorted(bytes(i) for i in some)


def test_a_selection_in_batches_from_mongo_is_the_parquet_stores(runs, tmp_path):
    """A selection too large for one table (here: more than 4 objects), read in batches from the Mongo
    store (its T2 results come as one piece, cut by the server), equals the Parquet store's selection
    read whole. Oracle: the Parquet store (tests/test_graph.py checks it against plain Python)."""
    from ampel_dask.graph.plan import plan_workflow
    from ampel_dask.graph.selection import Batches, selection, selection_in_batches

    pq_, mg = runs["pq"], runs["store"]
    batched = 0
    for plan in plan_workflow(runs["wf"]):
        keys = sorted(p.stem for p in (runs["tmp"] / "pq" / "states" / plan.name).glob("*.parquet"))
        got = selection_in_batches(mg, plan, keys, tmp_path / plan.name, rows=4)
        want = selection(pq_, plan, keys)
        assert isinstance(got, Batches) == (want.num_rows > 4), plan.name
        batched += isinstance(got, Batches)
        assert t2_rows_of(got.whole() if isinstance(got, Batches) else got) == t2_rows_of(want), plan.name
    assert batched >= 2


def t2_rows_of(sel: pa.Table) -> list:
    """A selection's rows, NaN as None (Arrow's equals treats NaN != NaN)."""
    return [{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()} for r in sel.drop_columns(["dps"] if "dps" in sel.column_names else []).to_pylist()]


def test_rerun_against_mongo_computes_nothing(runs):
    mg = runs["store"]
    before = {c: mg.db[c].count_documents({}) for c in ("t1", "t2", "journal", "t3", "tasks", "stock")}
    t = time.perf_counter()
    again = run_workflow(runs["wf"], runs["opts"])
    TIMINGS["mongo re-run"] = time.perf_counter() - t
    assert again["t2"]["computed"] == 0 and again["t2"]["reused"] == runs["mongo"]["t2"]["computed"] + runs["mongo"]["t2"]["reused"]
    assert again["tasks"] == 0 and "nothing to compute" in again["note"]
    assert again["channels"] == runs["mongo"]["channels"]
    assert {c: mg.db[c].count_documents({}) for c in before} == before


def test_unique_indexes(runs):
    db = runs["store"].db
    want = {
        "t1": [("channel", 1), ("key", 1), ("state_id", 1), ("alert_id", 1)],
        "t2": [("unit_key", 1), ("state_id", 1)],
        "journal": [(f, 1) for f in ("stock", "run_id", "tier", "channel", "unit", "action", "alert_id", "state_id")],
        "t3": [("stock", 1), ("channel", 1), ("t3_key", 1), ("state_id", 1)],
    }
    for col, keys in want.items():
        info = db[col].index_information()
        assert any(i.get("unique") and list(i["key"]) == keys for i in info.values()), (col, info)
    for col in ("tasks", "runs", "stock"):
        assert "_id_" in db[col].index_information()


def test_repeated_writes_leave_the_same_documents(runs):
    """A task run twice (lost worker, racing tasks) writes what is there already: counts do not change."""
    mg = runs["store"]
    (unit, key), = mg.t2_units()
    t2 = mg.read_t2(unit, key)
    n = mg.db.t2.count_documents({})
    t = time.perf_counter()
    mg.write_t2(unit, key, "another-stage", t2)
    mg.write_t2(unit, key, "another-stage", t2)
    TIMINGS[f"2 x {t2.num_rows} T2 rows again"] = time.perf_counter() - t
    assert mg.db.t2.count_documents({}) == n and mg.db.t2.count_documents({"task": "another-stage"}) == 0
    assert t2_rows(mg) == t2_rows(runs["pq"])
    states = mg.read_states("DECENT")
    k = mg.db.t1.find_one({"channel": "DECENT"})["key"]
    part = mg.read_states("DECENT", [k])
    n1 = mg.db.t1.count_documents({})
    mg.write_states("DECENT", k, part)
    assert mg.db.t1.count_documents({}) == n1 and mg.read_states("DECENT").num_rows == states.num_rows
    journal = mg.read_journal()
    stock_docs = list(mg.db.stock.find().sort("_id", 1))
    mg.write_journal(runs["mongo"]["run_id"], "again", journal)
    assert mg.db.journal.count_documents({}) == journal.num_rows
    assert list(mg.db.stock.find().sort("_id", 1)) == stock_docs
    mark = mg.task_info(next(iter(mg.db.tasks.distinct("_id"))))
    assert mark is not None and json.loads(json.dumps(mark)) == mark


def test_explain_reads_mongo(runs):
    from click.testing import CliRunner

    from ampel_dask.cli import main

    assert uri_database(runs["uri"]) == runs["spec"]["database"]
    t = time.perf_counter()
    mg = explain("ZTF21abiuvdk", runs["uri"])
    TIMINGS["explain"] = time.perf_counter() - t
    pq_ = explain("ZTF21abiuvdk", runs["tmp"] / "pq")
    assert len(mg["alerts"]) == len(pq_["alerts"]) == 34
    strip = lambda rows: sorted(json.dumps({k: v for k, v in r.items() if k not in ("runs", "run_id", "outputs")}, sort_keys=True, default=str) for r in rows)  # noqa: E731
    assert strip(mg["states"]) == strip(pq_["states"]) and len(mg["states"]) > 10
    assert all(s["runs"] == [runs["mongo"]["run_id"]] for s in mg["states"] if s["channel"] != "FULLHIST")
    t2 = lambda info: sorted((t["state_id"], json.dumps({k: None if isinstance(v, float) and np.isnan(v) else v for k, v in t["body"].items() if k not in SKIP}, sort_keys=True)) for t in info["t2"])  # noqa: E731
    assert t2(mg) == t2(pq_) and mg["t2"]
    assert [(t["channel"], t["state_id"]) for t in mg["t3"]] == [(t["channel"], t["state_id"]) for t in pq_["t3"]]
    out = CliRunner().invoke(main, ["explain", "ZTF21abiuvdk", "--store", runs["uri"], "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["stock"] == mg["stock"]


def _done_in_child(store: MongoStore, unit: str, key: str) -> list[bytes]:
    return [bytes(i) for i in store.done_state_ids(unit, key)]


def test_store_pickles_and_reconnects_in_another_process(runs):
    mg = runs["store"]
    copy = pickle.loads(pickle.dumps(mg))
    assert copy.spec == mg.spec == open_store(mg.spec).spec and len(pickle.dumps(mg)) < 500  # arguments only
    (unit, key), = mg.t2_units()
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        ids = pool.submit(_done_in_child, mg, unit, key).result(timeout=60)
    assert ids == [bytes(i) for i in mg.done_state_ids(unit, key)]


def test_fresh_database_is_empty(mongo, mongo_db, tmp_path):  # noqa: F811
    store = MongoStore(mongo.uri, mongo_db.name, tmp_path)
    assert store.channels() == [] and store.t2_units() == [] and store.manifests() == []
    assert store.read_states("X") is None and store.read_journal() is None and store.task_info("nope") is None
    assert mongo_db.list_collection_names() == []  # reading (explain) creates nothing
    store.write_states("EMPTY", "k", pa.table({"state_id": pa.array([], pa.int64())}))  # as Parquet: nothing stored
    assert store.channels() == [] and store.read_states("EMPTY") is None
    assert store.done_state_ids("U", "k").dtype == ID_DTYPE and store.t3_dir("C", "k") == tmp_path / "t3" / "C" / "k"


@pytest.mark.parametrize("kind", ["parquet", "mongo"])
def test_prune_states_removes_only_work_units_whose_alerts_all_have_newer_states(kind, mongo, mongo_db, tmp_path):  # noqa: F811
    store = MongoStore(mongo.uri, mongo_db.name, tmp_path) if kind == "mongo" else ParquetStore(tmp_path / "pq")

    def states(ids: list[int]) -> pa.Table:
        from ampel_dask.io.layout import DATAPOINT

        return pa.table({"state_id": pa.array([i * 10 for i in ids], pa.int64()), "stock": pa.array(ids, pa.int64()), "alert_id": pa.array(ids, pa.int64()),
                         "dps": pa.array([[] for _ in ids], pa.list_(DATAPOINT))})  # fmt: skip

    for key, ids in (("old", [1, 2]), ("new", [1, 2, 3]), ("other_night", [9])):
        store.write_states("C", key, states(ids))
        store.mark_task(key, {"kind": "t1"})
    assert store.prune_states("C", ["new"]) == 1
    assert sorted(store.read_states("C").column("alert_id").to_pylist()) == [1, 2, 3, 9]
    assert store.task_info("old") is None and store.task_info("new") and store.task_info("other_night")
    assert store.prune_states("C", ["new"]) == 0
    # the pruned set's alerts are in "new" now: a reader holding the old name follows it (live mode's T3)
    assert store.current_states("C", ["old"]) == ["new"]
    assert store.current_states("C", ["old", "other_night"]) == ["new", "other_night"]
    store.mark_task("empty", {"kind": "t1", "states": 0})  # a work unit where nothing passed: no states, no error
    assert store.current_states("C", ["empty", "new"]) == ["new"]
    from ampel_dask.io.stores import StatesGone

    with pytest.raises(StatesGone, match=r"1 state set\(s\) of channel C are gone .* not superseded by a run: never_written"):
        store.current_states("C", ["new", "never_written"])


@pytest.mark.parametrize("kind", ["parquet", "mongo"])
def test_one_run_holds_the_store_and_a_second_is_told_who(kind, mongo, mongo_db, tmp_path):  # noqa: F811
    """The lock is re-entrant in its thread; another thread (as another process) waits or gets Busy
    naming the holder's run id, pid and host; it gets the store once the holder lets go."""
    import socket
    import threading

    from ampel_dask.io.locks import Busy

    def open_it():
        return MongoStore(mongo.uri, mongo_db.name, tmp_path) if kind == "mongo" else ParquetStore(tmp_path / "pq")

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        store = open_it()
        with store.locked("run-A"), store.locked("run-A-inner"):  # re-entrant: the inner one does not wait
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    with pytest.raises(Busy) as err:
        with open_it().locked("run-B", wait=0):
            pass
    assert err.value.holder["run_id"] == "run-A" and err.value.holder["pid"] == os.getpid()
    assert f"run run-A (pid {os.getpid()} on host {socket.gethostname()} since " in str(err.value)
    threading.Timer(0.5, release.set).start()
    t0 = time.monotonic()
    with open_it().locked("run-B", wait=30) as me:  # waits for the holder, then has it
        assert me["run_id"] == "run-B" and time.monotonic() - t0 >= 0.4
    t.join(10)


def test_a_mongo_lock_whose_holder_stopped_beating_is_taken_over(mongo, mongo_db, tmp_path):  # noqa: F811
    from ampel_dask.io.stores.mongo import LOCK_STALE

    store = MongoStore(mongo.uri, mongo_db.name, tmp_path)
    mongo_db.locks.insert_one({"_id": "store", "token": "dead", "run_id": "run-dead", "pid": 1, "host": "elsewhere", "heartbeat": time.time() - LOCK_STALE - 5})
    with store.locked("run-new", wait=0):
        assert mongo_db.locks.find_one({"_id": "store"})["run_id"] == "run-new"
    assert mongo_db.locks.find_one({"_id": "store"}) is None  # released


def test_mongo_delivery_journal(mongo, mongo_db, tmp_path):  # noqa: F811
    journal = MongoStore(mongo.uri, mongo_db.name, tmp_path).deliveries("C", "unit")
    journal.record("req1", ["a" * 32, "b" * 32], [1, 2], "run-1", 200)
    journal.record("req1", ["a" * 32], [1], "run-2", 200)  # recorded again (a crash before the record): still one
    assert journal.delivered(["a" * 32, "c" * 32, "b" * 32]).tolist() == [True, False, True]
    assert mongo_db.deliveries.count_documents({}) == 2
