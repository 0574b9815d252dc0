#!/usr/bin/env python
"""Run the real ``ampel`` CLI (AMPEL from PyPI) for benchmarks, without a MongoDB server.

This file runs *inside the AMPEL venv* (``.bench/ampel-venv``); it imports nothing from
ampel-dask. ``run_ampel.py`` starts it as a subprocess::

    AMPEL_BENCH_REPORT=/tmp/r.json python ampel_mock.py job -config ampel_conf.yaml -schema job.yaml -no-conf-check

Database backend (``AMPEL_BENCH_DB``):

* ``mongomock`` (default): ``pymongo.MongoClient`` inside ``ampel.core.AmpelDB`` is replaced by a
  mongomock client, as AMPEL's own test fixture ``_patch_mongo`` (ampel/test/conftest.py) does, with two
  differences needed for a whole job: all clients share ONE mongomock ``ServerStore`` (AmpelDB opens one
  client per role, e.g. ``logger`` and ``writer``; by default each mongomock client has a private store,
  so T2Worker would never see what the T0 ingester wrote), and the ``storageEngine`` option of the
  ``log`` collection (unknown to mongomock) is dropped; like the fixture, codec options are not checked
  and bulk updates accept ``sort=None``.
* ``mongodb://host:port``: a real Mongo-wire server (e.g. SecantusDB). The URI replaces
  ``resource.mongo`` of the AMPEL config for every client AmpelDB opens.

Instrumentation (cheap, always on):

* every task (``AbsEventUnit.run``: AlertConsumer = T0, T2Worker = T2) is timed with
  ``time.perf_counter`` and ``time.process_time`` (+ the CPU time of the DB server if
  ``AMPEL_BENCH_SERVER_PID`` is set); lines ``AMPEL_BENCH task_start/task=...`` go to stderr;
* wall time inside DB client calls (mongomock or pymongo Collection/Database/Cursor methods) per task;
* ``FilterBlock.filter`` is wrapped to record which alert ids a channel accepted (one list append);
* every ``AMPEL_BENCH_PROGRESS_EVERY`` (500) alerts handed out by ZiAlertSupplier, a progress line;
* after the job, the data collections are counted (stock, t0, t1, t2 by code) and AMPEL's own
  ``event`` documents (which carry AMPEL's ``duration`` per task) are read back.

Everything is written as JSON to ``$AMPEL_BENCH_REPORT`` (if set).
"""
from __future__ import annotations

import json
import os
import sys
import time

_T_START = time.perf_counter()
_REPORT: dict = {"tasks": [], "accepted_ids": [], "filter_calls": 0}
_DB_SPEC = os.environ.get("AMPEL_BENCH_DB", "mongomock")

import pymongo  # noqa: E402

import ampel.core.AmpelDB  # noqa: E402

if _DB_SPEC == "mongomock":
    import mongomock
    import mongomock.codec_options
    import mongomock.collection
    import mongomock.database
    from mongomock.store import ServerStore

    _STORE = ServerStore()

    class SharedStoreMongoClient(mongomock.MongoClient):
        """mongomock client whose databases live in one process-wide store."""

        def __init__(self, *args, **kwargs):
            kwargs["_store"] = _STORE
            super().__init__(*args, **kwargs)

    _ClientClass = SharedStoreMongoClient
    ampel.core.AmpelDB.MongoClient = SharedStoreMongoClient

    # same workarounds as AMPEL's test fixture: DataLoader passes codec_options mongomock refuses
    mongomock.codec_options.is_supported = lambda *a, **k: None

    # bulk update ops carry sort=None (pymongo >= 4.9 signature); mongomock's add_update lacks it
    _orig_add_update = mongomock.collection.BulkOperationBuilder.add_update

    def _add_update(self, *args, sort=None, **kwargs):
        if sort is not None:
            raise NotImplementedError("sort in bulk updates is not implemented in mongomock")
        return _orig_add_update(self, *args, **kwargs)

    mongomock.collection.BulkOperationBuilder.add_update = _add_update

    # the var.log collection is created with storageEngine={wiredTiger: ...}
    _orig_create_collection = mongomock.database.Database.create_collection

    def _create_collection(self, name, **kwargs):
        kwargs.pop("storageEngine", None)
        return _orig_create_collection(self, name, **kwargs)

    mongomock.database.Database.create_collection = _create_collection

elif _DB_SPEC.startswith(("mongodb://", "mongodb+srv://")):

    class UriMongoClient(pymongo.MongoClient):
        """Ignore the URI of the AMPEL config (resource.mongo) and connect to AMPEL_BENCH_DB."""

        def __init__(self, host=None, *args, **kwargs):
            super().__init__(_DB_SPEC, *args, **kwargs)

    _ClientClass = UriMongoClient
    ampel.core.AmpelDB.MongoClient = UriMongoClient
else:
    sys.exit(f"AMPEL_BENCH_DB must be 'mongomock' or a mongodb:// URI, not {_DB_SPEC!r}")


# --- instrumentation -------------------------------------------------------------------------
import inspect  # noqa: E402
import threading  # noqa: E402

# Time spent inside the database client API (mongomock: the whole in-process "database"; pymongo: the
# client side plus waiting for the server). Only the outermost call is counted (re-entrancy guard), so
# T0 seconds minus DB seconds is what AMPEL itself spends (supplier, filter, shaping, ingest logic).
_DB_TIME = {"main": 0.0, "other": 0.0, "calls": 0}
_tl = threading.local()


def _wrap_db(fn):
    def wrapper(*args, **kwargs):
        if getattr(_tl, "depth", 0):
            return fn(*args, **kwargs)
        _tl.depth = 1
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _tl.depth = 0
            key = "main" if threading.current_thread() is threading.main_thread() else "other"
            _DB_TIME[key] += time.perf_counter() - t
            _DB_TIME["calls"] += 1
    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", "db_call")
    return wrapper


def _instrument(cls) -> None:
    for name, attr in list(vars(cls).items()):
        if (name.startswith("_") and name != "__next__") or name in ("with_options", "codec_options"):
            continue
        if inspect.isfunction(attr):
            setattr(cls, name, _wrap_db(attr))


if _DB_SPEC == "mongomock":
    import mongomock.command_cursor
    _db_classes = [mongomock.collection.Collection, mongomock.collection.Cursor,
                   mongomock.database.Database, mongomock.command_cursor.CommandCursor]
else:
    import pymongo.collection
    import pymongo.command_cursor
    import pymongo.cursor
    import pymongo.database
    _db_classes = [pymongo.collection.Collection, pymongo.cursor.Cursor, pymongo.database.Database,
                   pymongo.command_cursor.CommandCursor]
for _c in _db_classes:
    _instrument(_c)

from ampel.abstract.AbsEventUnit import AbsEventUnit  # noqa: E402
from ampel.alert.FilterBlock import FilterBlock  # noqa: E402

_orig_run = AbsEventUnit.run


_SERVER_PID = os.environ.get("AMPEL_BENCH_SERVER_PID")
_CLK = os.sysconf("SC_CLK_TCK")


def _server_cpu() -> float | None:
    """utime+stime (s) of the DB server process (run_ampel.py passes its PID), None if unknown."""
    if not _SERVER_PID:
        return None
    try:
        with open(f"/proc/{_SERVER_PID}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / _CLK
    except OSError:
        return None


def _timed_run(self, *args, **kwargs):
    print(f"AMPEL_BENCH task_start unit={type(self).__name__} t={time.perf_counter() - _T_START:.4f}",
          file=sys.stderr, flush=True)
    s0 = _server_cpu()
    d0 = dict(_DB_TIME)
    c0 = time.process_time()
    t0 = time.perf_counter()
    ret = _orig_run(self, *args, **kwargs)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    s1 = _server_cpu()
    db = {k: _DB_TIME[k] - d0[k] for k in _DB_TIME}
    unit = type(self).__name__
    _REPORT["tasks"].append({
        "unit": unit, "seconds": dt, "return": ret if isinstance(ret, (int, float, type(None))) else str(ret),
        "started_at_s": t0 - _T_START, "cpu_seconds": cpu,
        "server_cpu_seconds": (s1 - s0) if s0 is not None and s1 is not None else None,
        "db_seconds": db["main"], "db_seconds_other_threads": db["other"], "db_calls": db["calls"],
    })
    print(f"AMPEL_BENCH task={unit} seconds={dt:.4f} return={ret} started_at={t0 - _T_START:.4f}",
          file=sys.stderr, flush=True)
    return ret


AbsEventUnit.run = _timed_run

_orig_filter = FilterBlock.filter


def _recording_filter(self, alert):
    res = _orig_filter(self, alert)
    _REPORT["filter_calls"] += 1
    if res[1]:
        _REPORT["accepted_ids"].append(alert.id)
    return res


FilterBlock.filter = _recording_filter

# progress curve: perf_counter every PROGRESS_EVERY alerts handed out by the supplier, to see whether the
# T0 rate drops as documents accumulate in the database
from ampel.ztf.alert.ZiAlertSupplier import ZiAlertSupplier  # noqa: E402

_PROGRESS_EVERY = int(os.environ.get("AMPEL_BENCH_PROGRESS_EVERY", "500"))
_REPORT["progress"] = []  # [alerts supplied so far, seconds since process start]
_orig_next = ZiAlertSupplier.__next__
_n_supplied = 0


def _counting_next(self):
    global _n_supplied
    alert = _orig_next(self)
    _n_supplied += 1
    if _n_supplied % _PROGRESS_EVERY == 0:
        _REPORT["progress"].append([_n_supplied, round(time.perf_counter() - _T_START, 4)])
        # also streamed, so a run killed by a timeout still tells how far it got
        print(f"AMPEL_BENCH progress alerts={_n_supplied} t={_REPORT['progress'][-1][1]}", file=sys.stderr, flush=True)
    return alert


ZiAlertSupplier.__next__ = _counting_next


def _collect_db_stats(prefix: str) -> dict:
    """Count what the job left in the database (same backend, same store)."""
    out: dict = {}
    client = _ClientClass()
    try:
        out["databases"] = {d: sorted(client[d].list_collection_names()) for d in client.list_database_names()}
        names = client.list_database_names()

        def db(role: str):  # AmpelDB uses "<prefix>_<role>", or one database "<prefix>" (one_db mode)
            return client[f"{prefix}_{role}" if f"{prefix}_{role}" in names else prefix]

        data = db("data")
        out["stock"] = data["stock"].count_documents({})
        out["t0"] = data["t0"].count_documents({})
        out["t1"] = data["t1"].count_documents({})
        out["t2"] = data["t2"].count_documents({})
        codes: dict = {}
        for doc in data["t2"].find({}, {"code": 1}):
            codes[str(doc.get("code"))] = codes.get(str(doc.get("code")), 0) + 1
        out["t2_by_code"] = codes
        events = []
        for doc in db("var")["event"].find({}):
            events.append({k: doc.get(k) for k in ("process", "tier", "code", "duration", "run")})
        out["events"] = events
        out["log_docs"] = db("var")["log"].count_documents({})
    finally:
        client.close()
    return out


def _write_report(exit_code) -> None:
    path = os.environ.get("AMPEL_BENCH_REPORT")
    _REPORT["exit_code"] = exit_code
    _REPORT["db"] = _DB_SPEC
    _REPORT["process_seconds"] = time.perf_counter() - _T_START
    prefix = os.environ.get("AMPEL_BENCH_PREFIX", "AmpelBench")
    try:
        _REPORT["db_stats"] = _collect_db_stats(prefix)
    except Exception as e:  # report, never mask the job's own outcome
        _REPORT["db_stats_error"] = f"{type(e).__name__}: {e}"
    try:
        from importlib.metadata import version
        _REPORT["versions"] = {p: version(p) for p in (
            "ampel-ztf", "ampel-alerts", "ampel-core", "ampel-interface", "ampel-photometry",
            "mongomock", "pymongo", "fastavro")}
    except Exception as e:
        _REPORT["versions_error"] = str(e)
    if path:
        with open(path, "w") as fh:
            json.dump(_REPORT, fh, default=str)


if __name__ == "__main__":
    from ampel.cli.main import main

    sys.argv[0] = "ampel"
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code = 1
        _write_report(code)
        raise
    _write_report(code)
    sys.exit(code)
