"""Every id, hash and key of ampel-dask, made here and nowhere else.

Content addressing is what makes work collapse (inside a run, across channels, across runs): an archive
part is named by the hash of its bytes, a datapoint without a survey id by a hash of what identifies it,
a state by a 128-bit hash of its datapoints' content, a T2 result by (unit identity, state), a graph
task by its inputs' keys. One place for all of them, so that a key's meaning and width are decided once.

Ground floor: imports nothing of the package (numpy, pyarrow, xxhash and the standard library only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


# --- content ids: 128 bits over what a unit reads ----------------------------------------------------
#
# A state's id is a hash of its datapoints' *content* (every field a unit can read, not only their ids:
# copies of one datapoint can differ between packets), 128 bits wide (at LSST scale, ~10^10 states, a
# 64-bit id would collide; 128 bits do not). Made columnar: each datapoint's fields are absorbed into
# two independent 64-bit lanes (multiply-xorshift rounds, each lane with its own seed and multiplier,
# then splitmix64's finaliser: :func:`datapoint_lanes`); a state sums its datapoints' lanes (a
# multiset hash: independent of their order, ``np.add.reduceat``), then mixes in its object and its
# datapoint count (:func:`state_ids`). The two lanes of one datapoint are its point id
# (:func:`point_ids`), what ``T2PointUnit`` results are keyed by.
#
# In Arrow and in stores an id is ``fixed_size_binary(16)`` (:data:`ID_TYPE`: lane one then lane two,
# each little-endian); in numpy a ``V16`` array (:data:`ID_DTYPE`, a zero-copy view of the Arrow
# buffer; ``io.arrays`` sorts, de-duplicates and searches such arrays). For people it is hex
# (:func:`id_hex`): 32 digits in full, the first 16 (the first lane) as the short form shown by
# ``explain``; only the full id is a key.

ID_TYPE = pa.binary(16)
ID_DTYPE = np.dtype("V16")
LANE_SEEDS = (np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344))  # digits of pi: nothing up the sleeve
LANE_MULTIPLIERS = (np.uint64(0x9FB21C651E98DF25), np.uint64(0xC2B2AE3D27D4EB4F))  # odd: each round is a bijection
STOCK_SALTS = (np.uint64(0xD6E8FEB86659FD93), np.uint64(0xA4093822299F31D0))  # the stock is mixed apart from datapoints
BLOCK = 1 << 15  # datapoints hashed at a time: a block's lanes and words stay in the CPU's cache (2x faster)
_MASK64 = (1 << 64) - 1
_NAN64 = np.array(np.nan, dtype=np.float64).view(np.uint64)[()]
_NAN32 = np.array(np.nan, dtype=np.float32).view(np.uint32)[()]
_32 = np.uint64(32)
# the xxh3-128 halves of each one-byte string (photometric bands are looked up here, not hashed per row)
_BYTE_WORDS = [np.array([d & _MASK64 for d in _d], dtype=np.uint64), np.array([d >> 64 for d in _d], dtype=np.uint64)] if (
    _d := [xxhash.xxh3_128_intdigest(bytes([b])) for b in range(256)]) else []


def _round(h: np.ndarray, word: np.ndarray, mult: np.uint64, tmp: np.ndarray) -> None:
    """``h = xs(mult * (h ^ word))`` with ``xs(x) = x ^ (x >> 32)``, in place: for a given word a
    bijection of ``h``, so two datapoints that differ in one field never meet in a lane."""
    with np.errstate(over="ignore"):
        h ^= word
        h *= mult
        np.right_shift(h, _32, out=tmp)
        h ^= tmp


def _finalise(h: np.ndarray, tmp: np.ndarray) -> None:
    """splitmix64's finaliser, in place: every input bit reaches every output bit."""
    with np.errstate(over="ignore"):
        h += GOLDEN
        np.right_shift(h, np.uint64(30), out=tmp)
        h ^= tmp
        h *= _M1
        np.right_shift(h, np.uint64(27), out=tmp)
        h ^= tmp
        h *= _M2
        np.right_shift(h, np.uint64(31), out=tmp)
        h ^= tmp


def _bits(buffer: pa.Buffer | None, offset: int, n: int) -> np.ndarray | None:
    """An Arrow bitmap (validity, booleans) as a bool array."""
    if buffer is None:
        return None
    return np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), bitorder="little", count=offset + n)[offset:].view(bool)


def _text_words(col: pa.Array) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
    """Strings as the two 64-bit halves of xxh3-128 of their UTF-8 bytes, one per lane (a function of
    a block's rows); each distinct string is hashed once, and one-byte strings (bands) not at all:
    their byte is looked up in a table."""
    n = len(col)
    if pa.types.is_dictionary(col.type):  # the words of its values, looked up by index: the same as plain strings
        values = _text_words(col.dictionary)(0, len(col.dictionary))
        lo, hi = (np.append(v, np.uint64(0)) for v in values)  # a null index: the last, zero word
        idx = pc.fill_null(col.indices, len(col.dictionary)).to_numpy(zero_copy_only=False)
        return lambda s, e: (lo[idx[s:e]], hi[idx[s:e]])
    if pa.types.is_string(col.type) and n and not col.null_count and col.buffers()[2] is not None:
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int32, count=col.offset + n + 1)[col.offset :]
        if offsets[-1] - offsets[0] == n and bool(np.all(np.diff(offsets) == 1)):
            byte = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[0] + n]
            return lambda s, e: (_BYTE_WORDS[0][byte[s:e]], _BYTE_WORDS[1][byte[s:e]])
    enc = pc.dictionary_encode(col.cast(pa.string()))
    digests = [xxhash.xxh3_128_intdigest(v.encode()) for v in enc.dictionary.to_pylist()]
    lo = np.array([d & _MASK64 for d in digests] + [0], dtype=np.uint64)
    hi = np.array([d >> 64 for d in digests] + [0], dtype=np.uint64)
    idx = pc.fill_null(enc.indices, len(digests)).to_numpy(zero_copy_only=False)  # a null: the last, zero word
    return lambda s, e: (lo[idx[s:e]], hi[idx[s:e]])


@dataclass
class _Field:
    """One datapoint field, ready to be cut into blocks of words: ``text`` gives one word per lane;
    ``raw`` numbers give their bits (``size`` 8: a word of their own; 1-4: 32 bits, paired two to a
    word). ``null``: where the field is null (its word is zero there), ``nan``: whether NaNs occur."""

    raw: np.ndarray | None = None
    size: int = 8
    text: Callable[[int, int], tuple[np.ndarray, np.ndarray]] | None = None
    null: np.ndarray | None = None
    nan: bool = False


def _prepare(name: str, col: pa.Array) -> _Field:
    t, n, off = col.type, len(col), col.offset
    null = ~_bits(col.buffers()[0], off, n) if col.null_count else None
    if pa.types.is_dictionary(t):
        if not (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
            raise TypeError(f"datapoint field {name!r} has type {t}, which content ids do not cover")
        return _Field(text=_text_words(col), null=null)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _Field(text=_text_words(col), null=null)
    if pa.types.is_boolean(t):
        return _Field(raw=_bits(col.buffers()[1], off, n).view(np.uint8), size=1, null=null)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)) or pa.types.is_float16(t):
        raise TypeError(f"datapoint field {name!r} has type {t}, which content ids do not cover")
    dtype = np.dtype(t.to_pandas_dtype())
    raw = np.frombuffer(col.buffers()[1], dtype=dtype, count=off + n)[off:] if n else np.empty(0, dtype)
    return _Field(raw=raw, size=dtype.itemsize, null=null, nan=pa.types.is_floating(t) and bool(np.isnan(raw).any()))


def _bits_of(f: _Field, s: int, e: int) -> np.ndarray:
    """The field's bits in rows s..e (uint64 or uint32; a view where nothing needs changing): floats as
    IEEE bits with every NaN as one NaN, integers two's complement."""
    v = f.raw[s:e]
    if f.size == 8:
        bits = v.view(np.uint64)
        return np.where(v == v, bits, _NAN64) if f.nan else bits
    if f.nan:  # float32
        return np.where(v == v, v.view(np.uint32), _NAN32)
    return v.view(np.uint32) if f.size == 4 else v.astype(np.int32).view(np.uint32)


def _value_type(t: pa.DataType) -> pa.DataType:
    """A field's type as content ids see it: a dictionary-encoded string is a string (an encoding is
    not content; ids must not move when the loop keeps ``band`` dictionary-encoded)."""
    return t.value_type if pa.types.is_dictionary(t) else t


def datapoint_lanes(datapoints: pa.Table | pa.StructArray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes (uint64 lanes) of each datapoint's content: every field, by name
    and type (the field list seeds the lanes), nulls told apart from zeros and NaN. No Python per row.

    Each field becomes a word: 64-bit numbers their bits (every NaN as one NaN); fields of at most 32
    bits paired two to a word; strings xxh3-128 of their bytes, one half per lane; a null field a zero,
    and a bit in a last word of null flags. Each lane takes the words in field order through
    multiply-xorshift rounds (its own seed and multiplier), then splitmix64's finaliser. Done in blocks
    of :data:`BLOCK` rows into preallocated buffers, so that the work stays in the CPU's cache.
    """
    if isinstance(datapoints, pa.StructArray):
        names = [f.name for f in datapoints.type]
        columns = [datapoints.field(i) for i in range(len(names))]
    else:
        names = datapoints.column_names
        columns = [c.combine_chunks() for c in datapoints.columns]
    if len(names) > 64:
        raise ValueError(f"a datapoint has {len(names)} fields; content ids take at most 64")
    m = len(columns[0]) if columns else 0
    layout = ";".join(f"{name}:{_value_type(col.type)}" for name, col in zip(names, columns)).encode()
    seeds = [seed ^ np.uint64(xxhash.xxh3_64_intdigest(layout, seed=i)) for i, seed in enumerate(LANE_SEEDS)]
    fields = [_prepare(name, col) for name, col in zip(names, columns)]
    flags = [(np.uint64(1 << i), f.null) for i, f in enumerate(fields) if f.null is not None]
    lanes = (np.empty(m, dtype=np.uint64), np.empty(m, dtype=np.uint64))
    size = min(m, BLOCK)
    tmp, word, pair, nulls = (np.empty(size, dtype=np.uint64) for _ in range(4))
    ma, mb = LANE_MULTIPLIERS
    for s in range(0, m, BLOCK):
        e = min(m, s + BLOCK)
        a, b, t, w, p, nl = lanes[0][s:e], lanes[1][s:e], tmp[: e - s], word[: e - s], pair[: e - s], nulls[: e - s]
        a[:], b[:] = seeds
        pending = False  # a 32-bit word waiting in ``pair`` for its partner
        for f in fields:
            if f.text is not None:
                wa, wb = f.text(s, e)
                if f.null is not None:
                    wa, wb = np.where(f.null[s:e], np.uint64(0), wa), np.where(f.null[s:e], np.uint64(0), wb)
                _round(a, wa, ma, t)
                _round(b, wb, mb, t)
                continue
            bits = _bits_of(f, s, e)
            if f.size == 8 and f.null is None:
                _round(a, bits, ma, t)
                _round(b, bits, mb, t)
                continue
            target = w if f.size == 8 or pending else p
            np.copyto(target, bits, casting="unsafe")
            if f.null is not None:
                np.copyto(target, np.uint64(0), where=f.null[s:e])
            if f.size < 8:
                pending = not pending
                if pending:
                    continue
                np.left_shift(p, _32, out=p)
                np.bitwise_or(p, w, out=p)
                target = p
            _round(a, target, ma, t)
            _round(b, target, mb, t)
        nl[:] = 0
        for bit, null in flags:
            np.bitwise_or(nl, bit, out=nl, where=null[s:e])
        for h, mult in ((a, ma), (b, mb)):
            if pending:
                _round(h, p, mult, t)
            _round(h, nl, mult, t)
            _finalise(h, t)
    return lanes


def point_ids(lanes: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """128-bit content ids of single datapoints (their two lanes), as an :data:`ID_DTYPE` array."""
    return _pack(lanes[0], lanes[1])


def _pack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty((len(a), 2), dtype="<u8")
    out[:, 0], out[:, 1] = a, b
    return out.view(ID_DTYPE).reshape(len(a))


def _reduce_sum(out: np.ndarray, values: np.ndarray, rows: np.ndarray) -> None:
    """Sum ``values`` into ``out[rows]`` for non-decreasing ``rows`` (reduceat: no Python loop)."""
    if not len(rows):
        return
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    with np.errstate(over="ignore"):
        out[rows[starts]] = np.add.reduceat(values, starts)


def state_ids(stock: np.ndarray, lanes: tuple[np.ndarray, np.ndarray], rows: np.ndarray, n: int) -> np.ndarray:
    """128-bit state ids (an :data:`ID_DTYPE` array of ``n``): per lane, the sum of the state's
    datapoint lanes (:func:`datapoint_lanes`; ``rows``: the state of each datapoint, non-decreasing),
    its datapoint count and its stock, mixed.

    The stock goes through salted mixes of its own: Rubin numbers a new object after its first
    diaSource, so a one-detection state has dp_id == stock, and equal mixes must not cancel.
    """
    counts = np.bincount(rows, minlength=n).astype(np.uint64)
    stock = np.asarray(stock).astype(np.int64).view(np.uint64)
    out = []
    for lane, salt in zip(lanes, STOCK_SALTS):
        sums = np.zeros(n, dtype=np.uint64)
        _reduce_sum(sums, lane, rows)
        with np.errstate(over="ignore"):
            out.append(splitmix64(sums + splitmix64(stock ^ salt) * GOLDEN + counts))
    return _pack(*out)


def id_lanes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two uint64 lanes of an :data:`ID_DTYPE` array (strided views of it)."""
    pairs = np.ascontiguousarray(ids, dtype=ID_DTYPE).view("<u8").reshape(len(ids), 2)
    return pairs[:, 0], pairs[:, 1]


def id_column(ids: np.ndarray) -> pa.FixedSizeBinaryArray:
    """An :data:`ID_DTYPE` array as an Arrow ``fixed_size_binary(16)`` array."""
    ids = np.ascontiguousarray(ids, dtype=ID_DTYPE)
    return pa.FixedSizeBinaryArray.from_buffers(ID_TYPE, len(ids), [None, pa.py_buffer(ids)])


def id_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An id column as an :data:`ID_DTYPE` array (a view of its buffer). Anything but 128-bit content
    ids (such as the 64-bit ids of stores written before them) is refused."""
    if column.type != ID_TYPE:
        raise TypeError(f"not a column of 128-bit content ids: {column.type} (a store written by an older ampel-dask? start a new store)")
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError("an id column holds nulls")
    if not len(arr):
        return np.empty(0, dtype=ID_DTYPE)
    return np.frombuffer(arr.buffers()[1], dtype=ID_DTYPE, count=len(arr), offset=16 * arr.offset)


def id_hex(ids: np.ndarray | bytes, short: bool = False) -> list[str] | str:
    """Ids as hex: 32 digits, or with ``short`` the first 16 (a display form, never a key). Bytes give
    one string, an array a list."""
    width = 16 if short else 32
    if isinstance(ids, (bytes, bytearray)):
        return bytes(ids).hex()[:width]
    text = np.ascontiguousarray(ids, dtype=ID_DTYPE).tobytes().hex()
    return [text[i : i + width] for i in range(0, len(text), 32)]


def t2_keys(unit_key: str, ids: np.ndarray) -> pa.StringArray:
    """One 32-hex-digit key per (unit identity, state or datapoint id), vectorised: each id's lanes
    mixed with the two 64-bit halves of xxh3-128 of the unit's key. A pyarrow string array."""
    salt = xxhash.xxh3_128_intdigest(unit_key.encode())
    a, b = id_lanes(ids)
    ka = splitmix64(splitmix64(a ^ np.uint64(salt & _MASK64)) ^ b)
    kb = splitmix64(splitmix64(b ^ np.uint64(salt >> 64)) ^ a)
    n = len(ka)
    both = np.empty((n, 2), dtype=">u8")
    both[:, 0], both[:, 1] = ka, kb
    text = both.tobytes().hex().encode()
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 32 * n + 1, 32, dtype=np.int32)), pa.py_buffer(text))


# --- configs, units, graph tasks ------------------------------------------------------------------------

HASH_FAMILY = "xxh3-128"  # of every key, config hash and content hash here: 32 hex digits
# what a store records about the keys it was written with; stores of another format are refused, not mixed
KEY_FORMAT = "ampel-dask keys 2: xxh3-128 keys, 128-bit content ids"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same config gives the same text everywhere."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)


def hash_text(text: str) -> str:
    """xxh3-128 of a text as 32 hex digits: configs, unit identities, graph task keys."""
    return xxhash.xxh3_128_hexdigest(text.encode())


def key_of(*parts: object) -> str:
    """Content-hash key of anything JSON-serialisable (order of parts matters)."""
    return hash_text(canonical_json(list(parts)))


# --- pushes (T3 webhooks): idempotency keys -------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A state id as JSON: bytes (a wide binary id) as hex, numbers and text as they are."""
    return value.hex() if isinstance(value, (bytes, bytearray)) else value


def delivery_keys(channel: str, unit_key: str, stocks: list, state_ids: list) -> list[str]:
    """The idempotency key of each object a T3 unit pushes: 32 hex digits (xxh3-128) of the canonical JSON of ``[channel, stock, state id, unit key]``. The same object in the same state, pushed
    by the same unit for the same channel, has the same key in every run and on every machine; a new
    state gives a new key. One key per selected object (thousands, not millions: a Python loop)."""
    return [hash_text(canonical_json([channel, int(s), _plain(st), unit_key])) for s, st in zip(stocks, state_ids)]


def batch_key(keys: list[str]) -> str:
    """The key of a request carrying several objects (the ``Idempotency-Key`` header): 32 hex digits
    (xxh3-128) of its objects' keys, sorted (the same objects give the same key in any order)."""
    return hash_text("\n".join(sorted(keys)))


# Graph task keys are ``<stage>-<content key>``; the stage names are used by the compiler that makes the
# keys and by the runner that reads results back, never spelled out elsewhere.
PLAN, READ, ROWS, T0, T1, STORED, T1H, T2, PASS, STOCKS, HIST, HIST_WRITTEN, BUCKET_STAGES, SELECTION, T3 = (
    "plan", "read", "rows", "t0", "t1", "stored", "t1h", "t2", "pass", "stocks", "hist", "hw", "t2b", "sel", "t3")  # fmt: skip


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


def files_hash(paths: list[str | Path]) -> str:
    """One xxh3-128 over several files' contents, independent of the order they are listed in (a
    model's files)."""
    h = xxhash.xxh3_128()
    for digest in sorted(file_hash(p) for p in paths):
        h.update(digest.encode())
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
