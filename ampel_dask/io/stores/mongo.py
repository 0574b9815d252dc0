"""MongoDB result store: the same interface and semantics as :class:`~.parquet.ParquetStore`, AMPEL-like.

Collections (one database per store)::

    stock     one doc per object: _id = stock, channel (channels it entered), run (run ids that touched it)
    t1        T1 states: channel, key (the T1 task), state_id, stock, object_id, alert_id, mjd, ra, dec, dps
              unique (channel, key, state_id, alert_id)
    t2        T2 results: unit, unit_key, state_id, stock, alert_id, code, run_id, unit_version,
              config_hash, t2_key, task (the stage that computed it), body {the unit's columns}
              unique (unit_key, state_id)
    t2_failed recorded T2 failures (on_error: record): as t2, with ``failure`` (the error) and code -1;
              apart from t2 so that they never count as done; unique (unit_key, task, state_id)
    t2point   T2PointUnit results: unit, unit_key, point_id, dp_id, stock, code, run_id, unit_version,
              config_hash, t2_key, task, body; unique (unit_key, point_id)
    t2point_failed  recorded T2PointUnit failures: as t2_failed, by point_id; unique (unit_key, task, point_id)
    journal   one doc per (stock, run_id, tier, channel, unit, action, alert_id, state_id), unique on all
    t3        objects of T3 outputs: stock, channel, t3_key, state_id, object_id, unit, run_id
              unique (stock, channel, t3_key, state_id)
    tasks     finished-task markers: _id = task key, the task's counts
    meta      _id "format": the key format the store was written with (``keys.KEY_FORMAT``)
    runs      run manifests: _id = run id
    schemas   the Arrow schemas the tables were written with (_id = "<collection>:<group>"), so what is
              read back has the written types (int8, float32, nested list<struct> datapoints, ...)
    superseded  T1 work units a run replaced: _id = "<channel>:<key>", by (the keys that replaced it)
    deliveries  what push units (webhooks) delivered: _id = idempotency key, channel, unit_key, stock, ...
    locks     the run holding the store: _id = "store", pid, host, run_id, since, heartbeat (see locked)

State and point ids are 128-bit content ids, stored as 16-byte BinData.

Results, states, journal and T3 objects are immutable records keyed by content: they are written as
unordered bulk inserts, and a duplicate-key error (the record exists: a task run twice, racing tasks)
is the idempotent outcome, not an error. That is an upsert with ``$setOnInsert`` in effect, without its
read-before-write (2-3x faster on SecantusDB, and no upsert race on a real replica set). Task markers and
manifests are replaced by ``_id``; ``stock`` docs grow by ``$addToSet``. A store made twice from the same
data holds the same documents.

T3 outputs are files: :meth:`MongoStore.t3_dir` is a local folder under ``path`` (default ``store``);
only the objects and task markers go to MongoDB.

The store pickles as its spec; the ``MongoClient`` is made lazily, one per process and URI (a forked or
spawned Dask worker makes its own), and the indexes are ensured once per process before its first use.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ...keys import ID_DTYPE, KEY_FORMAT, id_values
from ..arrays import first_rows, sorted_unique
from ..files import checkpoint, sync as sync_files
from ..locks import Busy, identity
from .base import POINT_PROVENANCE, PROVENANCE, StatesGone, StoreFormatError

log = logging.getLogger("ampel_dask")
LOCK_STALE = 90.0  # seconds without a heartbeat after which a lock document's holder counts as dead
HEARTBEAT = 10.0  # seconds between the holder's heartbeats

JOURNAL_IDENTITY = ("stock", "run_id", "tier", "channel", "unit", "action", "alert_id", "state_id")
WRITE_BATCH = 1000  # rows converted to documents and sent per bulk_write
READ_BATCH = 10_000  # documents converted to Arrow at a time; also the size of $in chunks
DUPLICATE_KEY = 11000

INDEXES: dict[str, list[tuple[list[tuple[str, int]], dict]]] = {
    "t1": [([("channel", 1), ("key", 1), ("state_id", 1), ("alert_id", 1)], {"unique": True, "name": "t1_identity"}),
           ([("stock", 1)], {"name": "t1_stock"})],
    "t2": [([("unit_key", 1), ("state_id", 1)], {"unique": True, "name": "t2_identity"}),
           ([("stock", 1)], {"name": "t2_stock"})],
    "t2_failed": [([("unit_key", 1), ("task", 1), ("state_id", 1)], {"unique": True, "name": "t2_failed_identity"}),
                  ([("stock", 1)], {"name": "t2_failed_stock"})],
    "t2point": [([("unit_key", 1), ("point_id", 1)], {"unique": True, "name": "t2point_identity"}),
                ([("stock", 1)], {"name": "t2point_stock"})],
    "t2point_failed": [([("unit_key", 1), ("task", 1), ("point_id", 1)], {"unique": True, "name": "t2point_failed_identity"}),
                       ([("stock", 1)], {"name": "t2point_failed_stock"})],
    "journal": [([(f, 1) for f in JOURNAL_IDENTITY], {"unique": True, "name": "journal_identity"})],
    "t3": [([("stock", 1), ("channel", 1), ("t3_key", 1), ("state_id", 1)], {"unique": True, "name": "t3_identity"})],
    "schemas": [([("collection", 1), ("group", 1)], {"name": "schemas_group"})],
}  # fmt: skip

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[int, str], Any] = {}  # (pid, uri) -> MongoClient: one per process
_INDEXED: set[tuple[int, str, str]] = set()  # (pid, uri, database) whose indexes this process ensured
_HELD: dict[tuple[str, str], dict] = {}  # (uri, database) -> this process's run lock on it (thread, count, info)


def is_mongo_uri(location: str | os.PathLike | None) -> bool:
    return isinstance(location, str) and location.startswith(("mongodb://", "mongodb+srv://"))


def uri_database(uri: str, default: str = "ampel_dask") -> str:
    """The database named in a URI's path (``mongodb://host:port/DB?opts``), else ``default``.
    Parsed by hand: pymongo's parser resolves ``mongodb+srv`` names through DNS."""
    rest = re.sub(r"^mongodb(\+srv)?://", "", uri)
    _, slash, path = rest.partition("/")
    name = path.split("?", 1)[0] if slash else ""
    return name or default


def redact(uri: str) -> str:
    """The URI without its password (for manifests and messages)."""
    return re.sub(r"^(mongodb(?:\+srv)?://[^:/@]+):[^@/]*@", r"\1:***@", uri)


def _client(uri: str):
    from pymongo import MongoClient

    key = (os.getpid(), uri)
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = MongoClient(uri, serverSelectionTimeoutMS=30_000)
        return client


class MongoStore:
    kind = "mongo"

    def __init__(self, uri: str, database: str = "ampel_dask", path: str | os.PathLike | None = None):
        self.uri = uri
        self.database = database
        self.root = Path(path or "store").resolve()  # local folder for T3 output files
        self._schemas_seen: set[tuple[str, bytes]] = set()  # (schema doc id, schema) registered by this process

    def __reduce__(self):  # pickles as its arguments: no client, no cache crosses a process boundary
        return (MongoStore, (self.uri, self.database, str(self.root)))

    def __repr__(self) -> str:
        return f"MongoStore({redact(self.uri)!r}, {self.database!r}, {str(self.root)!r})"

    @property
    def spec(self) -> dict:
        return {"kind": "mongo", "uri": self.uri, "database": self.database, "path": str(self.root)}

    @property
    def db(self):
        """The database, its indexes ensured (once per process): what writes and the T2 skip check use."""
        db = self._rdb
        key = (os.getpid(), self.uri, self.database)
        if key not in _INDEXED:
            for name, indexes in INDEXES.items():
                for keys, opts in indexes:
                    db[name].create_index(keys, **opts)
            _INDEXED.add(key)
        return db

    @property
    def _rdb(self):
        """The database for reading only (explain of a mistyped database name creates nothing)."""
        return _client(self.uri)[self.database]

    def sync(self) -> None:
        """The database needs nothing: every write returned after the server acknowledged it (durability
        is the write concern of the URI, e.g. ``?w=majority&journal=true``); the local files (T3 outputs)
        this process wrote are made durable."""
        checkpoint()

    @contextmanager
    def locked(self, run_id: str, wait: float | None = 0, poll: float = 0.5) -> Iterator[dict]:
        """Hold the store for one run: a lock document (``locks``, _id "store") with the holder's pid, host,
        run id and a heartbeat every :data:`HEARTBEAT` s; a holder silent for :data:`LOCK_STALE` s is taken
        for dead (its document is taken over). :class:`~ampel_dask.io.locks.Busy` names the holder when
        the store does not come free within ``wait`` seconds (None: wait for ever). Re-entrant in the
        thread that holds it."""
        from pymongo.errors import DuplicateKeyError

        key = (self.uri, self.database)
        me = threading.get_ident()
        with _LOCK:
            held = _HELD.get(key)
            if held is not None and held["thread"] == me:
                held["count"] += 1
        if held is not None and held["thread"] == me:
            try:
                yield held["info"]
            finally:
                with _LOCK:
                    held["count"] -= 1
            return
        locks = self.db.locks
        token = uuid.uuid4().hex
        info = identity(run_id=run_id, store=f"{redact(self.uri)} database {self.database}")
        start = time.monotonic()
        while True:
            now = time.time()
            doc = {"_id": "store", "token": token, **info, "heartbeat": now}
            try:
                locks.insert_one(doc)
                break
            except DuplicateKeyError:
                pass
            old = locks.find_one_and_update({"_id": "store", "heartbeat": {"$lt": now - LOCK_STALE}}, {"$set": doc})
            if old is not None:
                log.warning("store %s: took over the lock of %s, silent for %.0f s", self.database, old.get("run_id"), now - old["heartbeat"])
                break
            waited = time.monotonic() - start
            if wait is not None and waited >= wait:
                holder = locks.find_one({"_id": "store"}) or {}
                raise Busy(f"store {redact(self.uri)} database {self.database}", holder, round(waited, 1))
            time.sleep(poll if wait is None else max(0.0, min(poll, wait - waited)))
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT):
                try:
                    if locks.update_one({"_id": "store", "token": token}, {"$set": {"heartbeat": time.time()}}).matched_count == 0:
                        log.error("store %s: the run lock was taken over by another run", self.database)
                        return
                except Exception as exc:  # a server that does not answer for a while: try again
                    log.warning("store %s: lock heartbeat failed: %s", self.database, exc)

        thread = threading.Thread(target=beat, name="ampel-dask-store-lock", daemon=True)
        thread.start()
        with _LOCK:
            _HELD[key] = {"thread": me, "count": 1, "info": info}
        try:
            yield info
        finally:
            with _LOCK:
                _HELD.pop(key, None)
            stop.set()
            thread.join()
            locks.delete_one({"_id": "store", "token": token})

    def check_format(self, create: bool = False) -> None:
        """As :meth:`ParquetStore.check_format`: the ``meta`` document "format", or runs without it (64-bit era)."""
        doc = self._rdb.meta.find_one({"_id": "format"})
        where = f"{redact(self.uri)} (database {self.database})"
        if doc is not None:
            if doc.get("keys") != KEY_FORMAT:
                raise StoreFormatError(f"{where}: a store written with {doc.get('keys')!r}, not {KEY_FORMAT!r}: use a new database")
        elif self._rdb.runs.find_one({}, {"_id": 1}) is not None:
            raise StoreFormatError(f"{where}: a store written by an earlier ampel-dask (64-bit state ids and keys), whose results "
                                   "cannot be reused or joined with new ones: use a new database (or drop this one)")  # fmt: skip
        elif create:
            self.db.meta.replace_one({"_id": "format"}, {"keys": KEY_FORMAT}, upsert=True)

    # --- task markers ---
    def task_info(self, key: str) -> dict | None:
        doc = self._rdb.tasks.find_one({"_id": key})
        if doc is None:
            return None
        doc.pop("_id")
        return doc

    def mark_task(self, key: str, info: dict) -> None:
        sync_files()  # the task's local files (T3 outputs) are durable before its marker
        doc = json.loads(json.dumps(info, sort_keys=True))  # the same values the Parquet store's JSON keeps
        self.db.tasks.replace_one({"_id": key}, doc, upsert=True)

    # --- T1 states ---
    def write_states(self, channel: str, key: str, table: pa.Table) -> None:
        if not table.num_rows:  # as in the Parquet store: nothing stored for a work unit where nothing passed
            return
        _reserved(table, ("_id", "channel", "key"), "states")
        self._register("t1", channel, table.schema)
        self._insert("t1", ({"channel": channel, "key": key, **row} for row in _rows(table)))

    def read_states(self, channel: str, keys: list[str] | None = None, columns: list[str] | None = None, stock: int | None = None,
                    dps: bool = True) -> pa.Table | None:
        schema = self._schema("t1", channel)
        if schema is None:
            return None
        if columns is not None or not dps:
            schema = pa.schema([schema.field(c) for c in (columns if columns is not None else schema.names) if c in schema.names and (dps or c != "dps")])
        query: dict = {"channel": channel}
        if stock is not None:
            query["stock"] = int(stock)
        projection = {"_id": 0, **{f: 1 for f in schema.names}}
        if keys is None:
            docs = self._rdb.t1.find(query, projection, batch_size=READ_BATCH)
            return _table(docs, schema)
        return _table((d for part in _chunks(list(keys)) for d in self._rdb.t1.find({**query, "key": {"$in": part}}, projection, batch_size=READ_BATCH)), schema)

    def prune_states(self, channel: str, current: list[str]) -> int:
        """As :meth:`ParquetStore.prune_states`: drop the channel's work units whose every alert has a
        state in the ones this run made current, each leaving a ``superseded`` document naming the units
        that replaced it. Returns how many work units were dropped."""
        names = set(current)
        old = [k for k in self.db.t1.distinct("key", {"channel": channel}) if k not in names]
        if not old:
            return 0
        now: dict[str, set] = {}
        for part in _chunks(sorted(names)):
            for d in self.db.t1.find({"channel": channel, "key": {"$in": part}}, {"_id": 0, "alert_id": 1, "key": 1}):
                now.setdefault(d["key"], set()).add(d["alert_id"])
        covered = set().union(*now.values()) if now else set()
        removed = 0
        for key in old:
            ids = {d["alert_id"] for d in self.db.t1.find({"channel": channel, "key": key}, {"_id": 0, "alert_id": 1})}
            if ids <= covered:
                by = sorted(k for k, a in now.items() if a & ids)
                self.db.superseded.replace_one({"_id": f"{channel}:{key}"}, {"channel": channel, "key": key, "by": by}, upsert=True)
                self.db.tasks.delete_one({"_id": key})  # planned again, it runs again
                self.db.t1.delete_many({"channel": channel, "key": key})
                removed += 1
        return removed

    def current_states(self, channel: str, names: list[str]) -> list[str]:
        """As :meth:`ParquetStore.current_states`: names followed through ``superseded`` to the work
        units that hold their alerts now; :class:`StatesGone` for a name neither there nor superseded."""
        out, gone, seen = set(), [], set()
        todo = sorted(set(names))
        while todo:
            batch = [n for n in todo if n not in seen]
            seen.update(batch)
            todo = []
            present = {k for part in _chunks(batch) for k in self._rdb.t1.distinct("key", {"channel": channel, "key": {"$in": part}})}
            out |= present
            rest = [n for n in batch if n not in present]
            notes = {d["key"]: d["by"] for part in _chunks(rest) for d in self._rdb.superseded.find({"_id": {"$in": [f"{channel}:{n}" for n in part]}})}
            for n in rest:
                if n in notes:
                    todo += [b for b in notes[n] if b not in seen]
                elif (self.task_info(n) or {}).get("states", 1) != 0:
                    gone.append(n)
        if gone:
            raise StatesGone(channel, sorted(gone), f"{redact(self.uri)} database {self.database}")
        return sorted(out)

    def channels(self) -> list[str]:
        return sorted(d["group"] for d in self._rdb.schemas.find({"collection": "t1"}, {"group": 1}))

    # --- T2 results ---
    def write_t2(self, unit: str, unit_key: str, key: str, table: pa.Table, lead: np.ndarray | None = None) -> None:
        """``lead`` has no counterpart here: the server's index finds the rows a selection asks for."""
        self._write_results("t2", PROVENANCE, unit, unit_key, key, table)

    def done_state_ids(self, unit: str, unit_key: str, skip: frozenset[str] = frozenset()) -> np.ndarray:
        """Sorted state ids with a result for this unit key: a query covered by the (unit_key, state_id)
        index, returning nothing but the ids (``skip``, the Parquet store's files to leave unread, has
        no counterpart: no cache here)."""
        return self._done("t2", "state_id", unit_key)

    def read_t2(self, unit: str, unit_key: str, state_ids: np.ndarray | None = None, stock: int | None = None) -> pa.Table | None:
        return self._read_results("t2", "state_id", unit_key, state_ids, stock)

    def t2_pieces(self, unit: str, unit_key: str, state_ids: np.ndarray, share: tuple[int, int] = (0, 1)) -> Iterator[pa.Table]:
        """:meth:`read_t2` as one piece: the server cuts the results to ``state_ids`` in its query (the
        first of ``share``'s n shares holds it, the others nothing)."""
        if share[0] != 0:
            return
        t = self.read_t2(unit, unit_key, state_ids)
        if t is not None:
            yield t

    def t2_units(self) -> list[tuple[str, str]]:
        return sorted((d["unit"], d["group"]) for d in self._rdb.schemas.find({"collection": "t2"}, {"unit": 1, "group": 1}))

    # --- T2 results per datapoint (T2PointUnit) ---
    def write_t2_points(self, unit: str, unit_key: str, key: str, table: pa.Table) -> None:
        self._write_results("t2point", POINT_PROVENANCE, unit, unit_key, key, table)

    def done_point_ids(self, unit: str, unit_key: str) -> np.ndarray:
        return self._done("t2point", "point_id", unit_key)

    def read_t2_points(self, unit: str, unit_key: str, point_ids: np.ndarray | None = None, stock: int | None = None) -> pa.Table | None:
        return self._read_results("t2point", "point_id", unit_key, point_ids, stock)

    def t2_point_units(self) -> list[tuple[str, str]]:
        return sorted((d["unit"], d["group"]) for d in self._rdb.schemas.find({"collection": "t2point"}, {"unit": 1, "group": 1}))

    def _write_results(self, collection: str, provenance: tuple[str, ...], unit: str, unit_key: str, key: str, table: pa.Table) -> None:
        _reserved(table, ("_id", "unit_key", "task", "body"), "T2 results")
        self._register(collection, unit_key, table.schema, unit=unit)
        prov = [c for c in table.column_names if c in provenance]
        body = [c for c in table.column_names if c not in provenance]

        def docs() -> Iterator[dict]:
            for row in _rows(table):
                doc = {"unit": unit, "unit_key": unit_key, **{c: row[c] for c in prov}, "task": key}
                doc["body"] = {c: row[c] for c in body}
                yield doc

        self._insert(collection, docs())

    def _done(self, collection: str, id_field: str, unit_key: str) -> np.ndarray:
        cursor = self.db[collection].find({"unit_key": unit_key}, {id_field: 1, "_id": 0}, batch_size=100_000).hint(f"{collection}_identity")
        return sorted_unique(np.frombuffer(b"".join(bytes(d[id_field]) for d in cursor), dtype=ID_DTYPE))

    def _read_results(self, collection: str, id_field: str, unit_key: str, ids: np.ndarray | None, stock: int | None) -> pa.Table | None:
        schema = self._schema(collection, unit_key)
        if schema is None:
            return None
        query: dict = {"unit_key": unit_key}
        if stock is not None:
            query["stock"] = int(stock)
        projection = {"_id": 0, "unit_key": 0, "task": 0}
        if ids is None:
            found: Iterable[dict] = self._rdb[collection].find(query, projection, batch_size=READ_BATCH)
        else:
            wanted = sorted_unique(np.asarray(ids, dtype=ID_DTYPE)).tobytes()
            want = [wanted[i : i + 16] for i in range(0, len(wanted), 16)]
            found = (d for part in _chunks(want) for d in self._rdb[collection].find({**query, id_field: {"$in": part}}, projection, batch_size=READ_BATCH))
        table = _table(({**d, **(d.pop("body", None) or {})} for d in found), schema)
        return table.sort_by(id_field)

    # --- recorded T2 failures (as the Parquet store: a stage's own replace what it recorded before) ---
    def write_t2_failures(self, unit: str, unit_key: str, key: str, table: pa.Table) -> None:
        self._write_failures("t2_failed", unit, unit_key, key, table)

    def read_t2_failures(self, unit: str, unit_key: str, state_ids: np.ndarray | None = None, stock: int | None = None) -> pa.Table | None:
        return self._read_failures("t2_failed", "state_id", unit_key, state_ids, stock)

    def t2_failure_units(self) -> list[tuple[str, str]]:
        return sorted((d["unit"], d["group"]) for d in self._rdb.schemas.find({"collection": "t2_failed"}, {"unit": 1, "group": 1}))

    def write_t2_point_failures(self, unit: str, unit_key: str, key: str, table: pa.Table) -> None:
        self._write_failures("t2point_failed", unit, unit_key, key, table)

    def read_t2_point_failures(self, unit: str, unit_key: str, point_ids: np.ndarray | None = None, stock: int | None = None) -> pa.Table | None:
        return self._read_failures("t2point_failed", "point_id", unit_key, point_ids, stock)

    def t2_point_failure_units(self) -> list[tuple[str, str]]:
        return sorted((d["unit"], d["group"]) for d in self._rdb.schemas.find({"collection": "t2point_failed"}, {"unit": 1, "group": 1}))

    def _write_failures(self, collection: str, unit: str, unit_key: str, key: str, table: pa.Table) -> None:
        self.db[collection].delete_many({"unit_key": unit_key, "task": key})
        if not table.num_rows:
            return
        _reserved(table, ("_id", "unit_key", "task"), "T2 failures")
        self._register(collection, unit_key, table.schema, unit=unit)
        self._insert(collection, ({"unit": unit, "unit_key": unit_key, **row, "task": key} for row in _rows(table)))

    def _read_failures(self, collection: str, id_field: str, unit_key: str, ids: np.ndarray | None, stock: int | None) -> pa.Table | None:
        """One row per id (several stages may have recorded one state's failure)."""
        table = self._read_results(collection, id_field, unit_key, ids, stock)
        return None if table is None else table.take(pa.array(first_rows(id_values(table.column(id_field)))))

    # --- journal, T3, manifests ---
    def write_journal(self, run_id: str, key: str, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._register("journal", "", table.schema)
        self._insert("journal", _rows(table))
        self._update_stock(table)

    def _update_stock(self, table: pa.Table) -> None:
        """stock docs: the channels an object entered and the runs that touched it ($addToSet: idempotent)."""
        from pymongo import UpdateOne

        stock = table.column("stock").to_numpy()
        chan = table.column("channel").to_pylist() if "channel" in table.column_names else [None] * len(stock)
        runs = table.column("run_id").to_pylist()
        by_stock: dict[int, tuple[set, set]] = {}
        for s, c, r in zip(stock.tolist(), chan, runs):
            cs, rs = by_stock.setdefault(s, (set(), set()))
            if c is not None:
                cs.add(c)
            rs.add(r)
        ops = []
        for s, (cs, rs) in sorted(by_stock.items()):
            add = {"run": {"$each": sorted(rs)}}
            if cs:
                add["channel"] = {"$each": sorted(cs)}
            ops.append(UpdateOne({"_id": s}, {"$addToSet": add}, upsert=True))
        for part in _chunks(ops, WRITE_BATCH):
            _bulk(self.db.stock, part, retry_duplicates=True)

    def read_journal(self, stock: int | None = None) -> pa.Table | None:
        schema = self._schema("journal", "")
        if schema is None:
            return None
        query = {} if stock is None else {"stock": int(stock)}
        return _table(self._rdb.journal.find(query, {"_id": 0}, batch_size=READ_BATCH), schema)

    def t3_dir(self, channel: str, key: str) -> Path:
        return self.root / "t3" / channel / key

    def deliveries(self, channel: str, unit_key: str) -> MongoDeliveries:
        """The delivery journal of a push unit for a channel (collection ``deliveries``)."""
        return MongoDeliveries(self, channel, unit_key)

    def shuffle_dir(self, run_id: str, key: str) -> Path:
        """Scratch files of a run's shuffle by object stay on (shared) disk, beside the T3 outputs."""
        return self.root / "_shuffle" / run_id / key

    def write_t3_objects(self, channel: str, key: str, table: pa.Table) -> None:
        self._register("t3", "", table.schema)
        self._insert("t3", _rows(table))

    def read_t3_objects(self, stock: int | None = None) -> pa.Table | None:
        schema = self._schema("t3", "")
        if schema is None:
            return None
        query = {} if stock is None else {"stock": int(stock)}
        return _table(self._rdb.t3.find(query, {"_id": 0}, batch_size=READ_BATCH), schema)

    def write_manifest(self, run_id: str, manifest: dict[str, Any]) -> str:
        doc = json.loads(json.dumps(manifest, default=str))
        if isinstance(doc.get("store"), dict) and doc["store"].get("uri"):
            doc["store"]["uri"] = redact(doc["store"]["uri"])
        self.db.runs.replace_one({"_id": run_id}, doc, upsert=True)
        return f"{redact(self.uri).rstrip('/')}/{self.database}.runs/{run_id}"

    def manifests(self) -> list[dict]:
        out = []
        for doc in self._rdb.runs.find({}).sort("_id", 1):
            doc.pop("_id")
            out.append(doc)
        return out

    # --- helpers ---
    def _insert(self, collection: str, docs: Iterable[dict]) -> None:
        from pymongo import InsertOne

        col = self.db[collection]
        batch: list = []
        for doc in docs:
            batch.append(InsertOne(doc))
            if len(batch) >= WRITE_BATCH:
                _bulk(col, batch)
                batch = []
        if batch:
            _bulk(col, batch)

    def _register(self, collection: str, group: str, schema: pa.Schema, **extra: Any) -> None:
        """Record the Arrow schema a table of this collection/group was written with (once per process)."""
        from bson import Binary

        blob = schema.remove_metadata().serialize().to_pybytes()
        _id = f"{collection}:{group}"
        if (_id, blob) in self._schemas_seen:
            return
        self.db.schemas.update_one(
            {"_id": _id},
            {"$setOnInsert": {"collection": collection, "group": group, **extra}, "$addToSet": {"schemas": Binary(blob)}},
            upsert=True,
        )
        self._schemas_seen.add((_id, blob))

    def _schema(self, collection: str, group: str) -> pa.Schema | None:
        doc = self._rdb.schemas.find_one({"_id": f"{collection}:{group}"})
        if not doc or not doc.get("schemas"):
            return None
        schemas = [pa.ipc.read_schema(pa.py_buffer(bytes(b))) for b in doc["schemas"]]
        return schemas[0] if len(schemas) == 1 else pa.unify_schemas(schemas, promote_options="default")


class MongoDeliveries:
    """A push unit's journal in the ``deliveries`` collection: one document per delivered key (``_id``),
    inserted once the endpoint acknowledged the request (acknowledged by the server before the next
    request is sent)."""

    def __init__(self, store: MongoStore, channel: str, unit_key: str):
        self.store, self.channel, self.unit_key = store, channel, unit_key

    def delivered(self, keys: Iterable[str]) -> np.ndarray:
        keys = list(keys)
        found = {d["_id"] for part in _chunks(keys) for d in self.store._rdb.deliveries.find({"_id": {"$in": part}}, {"_id": 1})}
        return np.array([k in found for k in keys], dtype=bool)

    def record(self, request_key: str, keys: Iterable[str], stocks: Iterable[int], run_id: str, status: int) -> None:
        from pymongo import InsertOne

        now = time.time()
        ops = [InsertOne({"_id": k, "channel": self.channel, "unit_key": self.unit_key, "stock": int(s), "run_id": run_id,
                          "status": int(status), "request": request_key, "at": now}) for k, s in zip(keys, stocks)]  # fmt: skip
        for part in _chunks(ops, WRITE_BATCH):
            _bulk(self.store.db.deliveries, part)


def _rows(table: pa.Table) -> Iterator[dict]:
    """Rows as dicts, converted a batch at a time."""
    for batch in table.to_batches(max_chunksize=WRITE_BATCH):
        yield from batch.to_pylist()


def _table(docs: Iterable[dict], schema: pa.Schema) -> pa.Table:
    """Documents -> one table with the written schema, converted a batch at a time."""
    parts, batch = [], []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= READ_BATCH:
            parts.append(pa.Table.from_pylist(batch, schema=schema))
            batch = []
    if batch or not parts:
        parts.append(pa.Table.from_pylist(batch, schema=schema))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _chunks(items: list, size: int = READ_BATCH) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _reserved(table: pa.Table, names: tuple[str, ...], what: str) -> None:
    clash = sorted(set(table.column_names) & set(names))
    if clash:
        raise ValueError(f"{what} cannot have columns named {', '.join(clash)} in a Mongo store (its own fields)")


def _bulk(col, ops: list, retry_duplicates: bool = False) -> None:
    """Unordered bulk write; duplicate keys are the idempotent outcome (the record is there already).
    ``retry_duplicates``: upserts that raced another process's insert of the same _id are sent again."""
    from pymongo.errors import BulkWriteError

    try:
        col.bulk_write(ops, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        other = [e for e in errors if e.get("code") != DUPLICATE_KEY]
        if other or exc.details.get("writeConcernErrors"):
            raise
        if retry_duplicates:
            col.bulk_write([ops[e["index"]] for e in errors], ordered=False)
