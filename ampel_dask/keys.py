"""Every id, hash and key of ampel-dask, made here and nowhere else.

Content addressing is what makes work collapse (inside a run, across channels, across runs): an archive
part is named by the hash of its bytes, a datapoint without a survey id by a hash of what identifies it,
a state by a hash of its datapoints, a T2 result by (unit identity, state), a graph task by its inputs'
keys. One place for all of them, so that a key's meaning and width are decided once.

Ground floor: imports nothing of the package (numpy, xxhash and the standard library only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

# --- vectorised 64-bit mixing (ids computed for millions of rows at once) --------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser: a cheap, well-mixed 64-bit hash of 64-bit integers."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _as_u64(col: np.ndarray) -> np.ndarray:
    col = np.asarray(col)
    if col.dtype.kind == "f":
        return np.ascontiguousarray(col, dtype=np.float64).view(np.uint64)
    return col.astype(np.int64).view(np.uint64)


def combine_hash(*cols: np.ndarray) -> np.ndarray:
    """Hash rows of several numeric columns into one uint64 per row (order of columns matters)."""
    h = np.zeros(len(cols[0]), dtype=np.uint64)
    for c in cols:
        h = splitmix64(h ^ _as_u64(c))
    return h


def negative_id(kind: int, *cols: np.ndarray) -> np.ndarray:
    """Stable negative int64 datapoint id for measurements without a survey id of their own."""
    n = len(cols[0])
    h = combine_hash(np.full(n, kind, dtype=np.int64), *cols)
    return -((h >> np.uint64(1)).astype(np.int64)) - 1


def text_id(text: str) -> int:
    """Stable 63-bit non-negative hash of a string (band names inside datapoint ids, object names)."""
    return xxhash.xxh64_intdigest(text) >> 1


def text_ids(values: list[str | None]) -> np.ndarray:
    """:func:`text_id` of each string (None as the empty string)."""
    return np.array([text_id(v or "") for v in values], dtype=np.int64)


# --- objects -> buckets (the history shuffle) ------------------------------------------------------


def bucket_of(stock: np.ndarray, nbuckets: int) -> np.ndarray:
    """The shuffle bucket of each object: stable across runs and machines."""
    return (splitmix64(np.asarray(stock, dtype=np.int64)) % np.uint64(nbuckets)).astype(np.int64)


# --- states and T2 results --------------------------------------------------------------------------

STOCK_SALT = np.uint64(0xD6E8FEB86659FD93)  # the stock is mixed apart from datapoint ids (see state_ids)


def _reduce_sum(out: np.ndarray, values: np.ndarray, rows: np.ndarray) -> None:
    """Sum ``values`` into ``out[rows]`` for non-decreasing ``rows`` (reduceat: no Python loop)."""
    if not len(rows):
        return
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    with np.errstate(over="ignore"):
        out[rows[starts]] = np.add.reduceat(values, starts)


def state_ids(stock: np.ndarray, dp_id: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """64-bit state ids: order-independent hash of each row's datapoint ids, mixed with its stock.

    The stock goes through a salted mix, never the datapoints' own: Rubin numbers a new object after
    its first diaSource, so a one-detection state has dp_id == stock, and equal mixes would cancel.
    """
    mixed = splitmix64(dp_id.astype(np.int64))
    sums = np.zeros(n, dtype=np.uint64)
    _reduce_sum(sums, mixed, rows)
    counts = np.bincount(rows, minlength=n).astype(np.uint64)
    with np.errstate(over="ignore"):
        stock_mix = splitmix64(stock.astype(np.int64).view(np.uint64) ^ STOCK_SALT)
        h = splitmix64(sums + stock_mix * GOLDEN + counts)
    return h.view(np.int64)


def t2_keys(unit_key: str, state_ids: np.ndarray) -> "Any":
    """One 16-hex-digit key per (unit identity, state): the state id mixed with a 64-bit salt of the
    unit's key (splitmix64), vectorised; a per-row blake2b cost ~2 us per result. A pyarrow string array."""
    import pyarrow as pa

    salt = np.uint64(int.from_bytes(hashlib.blake2b(unit_key.encode(), digest_size=8).digest(), "big"))
    mixed = splitmix64(np.asarray(state_ids, dtype=np.int64).view(np.uint64) ^ salt)
    n = len(mixed)
    text = mixed.astype(">u8").tobytes().hex().encode()
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 16 * n + 1, 16, dtype=np.int32)), pa.py_buffer(text))


# --- configs, units, graph tasks ------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same config gives the same text everywhere."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)


def short_hash(text: str) -> str:
    """Hash of a text (configs, unit identities, task keys): 16 hex digits."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def key_of(*parts: object) -> str:
    """Content-hash key of anything JSON-serialisable (order of parts matters)."""
    return short_hash(canonical_json(list(parts)))


# --- pushes (T3 webhooks): idempotency keys -------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A state id as JSON: bytes (a wide binary id) as hex, numbers and text as they are."""
    return value.hex() if isinstance(value, (bytes, bytearray)) else value


def delivery_keys(channel: str, unit_key: str, stocks: list, state_ids: list) -> list[str]:
    """The idempotency key of each object a T3 unit pushes: 32 hex digits (xxh3-128) of the canonical
    JSON of ``[channel, stock, state id, unit key]``. The same object in the same state, pushed by the
    same unit for the same channel, has the same key in every run and on every machine; a new state gives
    a new key. One key per selected object (thousands, not millions: a Python loop)."""
    return [xxhash.xxh3_128_hexdigest(canonical_json([channel, int(s), _plain(st), unit_key]).encode()) for s, st in zip(stocks, state_ids)]


def batch_key(keys: list[str]) -> str:
    """The key of a request carrying several objects (the ``Idempotency-Key`` header): 32 hex digits
    (xxh3-128) of its objects' keys, sorted (the same objects give the same key in any order)."""
    return xxhash.xxh3_128_hexdigest("\n".join(sorted(keys)).encode())


# Graph task keys are ``<stage>-<content key>``; the stage names are used by the compiler that makes the
# keys and by the runner that reads results back, never spelled out elsewhere.
PLAN, READ, ROWS, T0, T1, T1H, T2, PASS, STOCKS, HIST, HIST_WRITTEN, SELECTION, T3 = (
    "plan", "read", "rows", "t0", "t1", "t1h", "t2", "pass", "stocks", "hist", "hw", "sel", "t3")  # fmt: skip


def task_key(stage: str, key: str) -> str:
    """The graph key of a task of ``stage`` whose content key is ``key``."""
    return f"{stage}-{key}"


def stage_of(task: str) -> str:
    """The stage a graph key belongs to (inverse of :func:`task_key`)."""
    return task.split("-", 1)[0]


# --- bytes and files ------------------------------------------------------------------------------------


def content_hash(*data: bytes) -> str:
    """xxh3-128 of byte strings (32 hex digits): archive parts are named by it."""
    h = xxhash.xxh3_128()
    for d in data:
        h.update(d)
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    """xxh3-128 of a file's bytes (32 hex digits), read in blocks: catalogs and models a unit reads."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def record_hash(fields: list[str], payload: bytes) -> str:
    """xxh3-64 of text fields (each terminated, so that field boundaries count) and a payload, as 16 hex
    digits: the names of quarantine entries."""
    h = xxhash.xxh3_64()
    for field in fields:
        h.update(field.encode() + b"\0")
    h.update(payload)
    return h.hexdigest()


def digest16(data: bytes) -> bytes:
    """16 bytes derived from ``data`` (xxh3-128): a deterministic Avro sync marker for a record's bytes."""
    return xxhash.xxh3_128_digest(data)
