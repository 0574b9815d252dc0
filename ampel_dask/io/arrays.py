"""Array helpers for the hot paths, chosen on measurements (numpy 2.4, pyarrow 22; 380k int64):

- ``np.unique(a)`` without ``return_*`` takes a hash-table path: ~190 ms, against ~10 ms to sort and
  mask (:func:`sorted_unique`).
- ``np.lexsort`` over 3-4 keys: ~130-150 ms; Arrow's stable multi-key ``sort_indices``: ~17-20 ms
  (:func:`order_by`).
- Arrow's ``index_in`` hashes every string: ~0.1 us per value; one-character labels (photometric bands)
  are looked up by their byte instead (:func:`codes_of`), ~30x faster.
- ``ChunkedArray.take`` concatenates every chunk before it gathers: a work unit of three parts copied
  all ~2 M datapoints of its histories to keep 12% of them, ~80 ms per task (:func:`take_rows`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..keys import ID_DTYPE, id_lanes


#: needles from which :func:`search` sorts them first
SORT_NEEDLES = 1024


def search(haystack: np.ndarray, needles: np.ndarray, side: str = "left") -> np.ndarray:
    """``np.searchsorted(haystack, needles, side)``, with many needles sorted first: in needle order
    the binary search walks the haystack at random, which costs cache misses once it outgrows the CPU
    caches (1.5 M sorted uint64, 30,000 random needles: 13.7 ms, 2.3 ms sorted first; 150,000: 3.9 and
    1.5 ms). A T3 selection of 10 M LSST alerts spent 8.4 s of 35.7 in searchsorted."""
    if len(needles) < SORT_NEEDLES:
        return np.searchsorted(haystack, needles, side)  # type: ignore[call-overload]
    order = np.argsort(needles)
    out = np.empty(len(needles), dtype=np.int64)
    out[order] = np.searchsorted(haystack, needles[order], side)  # type: ignore[call-overload]
    return out


def contains(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Membership of ``values`` in a sorted array (binary search; no re-sort of the big side).

    128-bit ids (``keys.ID_DTYPE``) are sorted as :func:`sorted_unique` sorts them."""
    if not len(sorted_ids):
        return np.zeros(len(values), dtype=bool)
    if sorted_ids.dtype == ID_DTYPE:
        return lookup_sorted(sorted_ids, values) >= 0
    pos = np.clip(search(sorted_ids, values), 0, len(sorted_ids) - 1)
    return sorted_ids[pos] == values


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (what ``np.unique`` returns; 128-bit ids by their first lane,
    then their second, as unsigned numbers)."""
    values = np.asarray(values)
    s = values[id_order(values)] if values.dtype == ID_DTYPE else np.sort(values)
    if len(s) < 2:
        return s
    return s[np.r_[True, s[1:] != s[:-1]]]


def merged(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``sorted_unique(concatenate([sorted_ids, values]))`` without sorting ``sorted_ids`` (distinct,
    in :func:`sorted_unique` order) again: the new values are found by binary search and inserted.
    A cache of every T2 result id grown this way costs one copy per file read, where a sort of all
    of them per file made a run's T2 stages quadratic (1.35 s more per stage at 10 M LSST alerts)."""
    new = sorted_unique(values)
    new = new[~contains(sorted_ids, new)]
    if not len(sorted_ids) or not len(new):
        return new if not len(sorted_ids) else sorted_ids
    if sorted_ids.dtype != ID_DTYPE:
        return np.insert(sorted_ids, search(sorted_ids, new), new)
    sa, sb = id_lanes(sorted_ids)
    sa = np.ascontiguousarray(sa)
    va, vb = id_lanes(new)
    pos = search(sa, va)
    for i in np.flatnonzero(sa[np.minimum(pos, len(sa) - 1)] == va):  # a first lane shared: the second decides
        while pos[i] < len(sa) and sa[pos[i]] == va[i] and sb[pos[i]] < vb[i]:
            pos[i] += 1
    return np.insert(sorted_ids, pos, new)


def first_rows(values: np.ndarray) -> np.ndarray:
    """Row numbers of the first occurrence of each distinct value, in row order (what
    ``np.sort(np.unique(values, return_index=True)[1])`` gives, with one stable sort)."""
    values = np.asarray(values)
    if len(values) < 2:
        return np.arange(len(values))
    order = id_order(values) if values.dtype == ID_DTYPE else np.argsort(values, kind="stable")
    s = values[order]
    return np.sort(order[np.r_[True, s[1:] != s[:-1]]])


def id_order(ids: np.ndarray) -> np.ndarray:
    """Stable sort indices of 128-bit ids by (first lane, second lane).

    The lanes are uniform hashes, so sorting by the first lane alone (an int64 sort, ~3x faster than
    two keys) almost always suffices; when two different ids share a first lane, both lanes decide.
    """
    a, b = id_lanes(ids)
    order = np.argsort(a, kind="stable")
    sa = a[order]
    tie = sa[1:] == sa[:-1]
    if tie.any():
        sb = b[order]
        if (tie & (sb[1:] != sb[:-1])).any():
            order = np.lexsort((b, a))
    return order


def lookup_sorted(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each 128-bit id of ``values`` in ``sorted_ids`` (in :func:`id_order`, no repeats), -1
    where absent: a binary search on the first lanes, exact when first lanes repeat."""
    out = np.full(len(values), -1, dtype=np.int64)
    if not len(sorted_ids) or not len(values):
        return out
    sa, _ = id_lanes(sorted_ids)
    sa = np.ascontiguousarray(sa)
    va, vb = id_lanes(values)
    pos = np.minimum(search(sa, va), len(sa) - 1)
    hit = sorted_ids[pos] == values
    out[hit] = pos[hit]
    # ids of sorted_ids sharing a first lane sit side by side, by second lane: search the run
    for i in np.flatnonzero(~hit & (sa[pos] == va)):
        stop = np.searchsorted(sa, va[i], side="right")
        j = np.flatnonzero(sorted_ids[pos[i] : stop] == values[i])
        if len(j):
            out[i] = pos[i] + j[0]
    return out


def lookup(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Row of each of ``values`` in ``keys`` (distinct values), -1 where absent. What the joins by id
    (T3 selection, T2 dependencies) use: a row joins only where its id is equal."""
    if not len(keys):
        return np.full(len(values), -1, dtype=np.int64)
    if keys.dtype == ID_DTYPE:
        order = id_order(keys)
        at = lookup_sorted(keys[order], values)
        return np.where(at >= 0, order[np.maximum(at, 0)], -1)
    order = np.argsort(keys)
    s = keys[order]
    pos = np.clip(np.searchsorted(s, values), 0, len(s) - 1)
    return np.where(s[pos] == values, order[pos], -1)


def order_by(*keys: tuple[np.ndarray, str]) -> np.ndarray:
    """Stable sort indices by several ``(values, "ascending" | "descending")`` keys, the first the most
    significant (``np.lexsort`` takes them the other way round); NaN sorts last either way."""
    table = pa.table({f"k{i}": np.asarray(v) for i, (v, _) in enumerate(keys)})
    idx = pc.sort_indices(table, sort_keys=[(f"k{i}", d) for i, (_, d) in enumerate(keys)])
    return idx.to_numpy()


def first_of_groups(groups: list[np.ndarray], then: list[np.ndarray]) -> np.ndarray:
    """Rows that keep each distinct combination of ``groups`` once, in ``groups`` order: the first row
    of each by ``then`` (ascending; ties by row). The datapoint-copy rules of the kept history and of the
    states (``io.history.first_per_class``, ``tiers.states.first_copies``) are this rule."""
    order = order_by(*((c, "ascending") for c in [*groups, *then]))
    first = np.ones(len(order), dtype=bool)
    if len(order):
        first[1:] = np.logical_or.reduce([x[1:] != x[:-1] for x in (c[order] for c in groups)])
    return order[first]


def codes_of(strings: pa.Array | pa.ChunkedArray, values: list[str]) -> np.ndarray:
    """Position of each string in ``values``, -1 where absent or null (``pc.index_in``, with a fast
    path for one-character strings and values)."""
    arr = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    if pa.types.is_string(arr.type) and values and all(len(v.encode()) == 1 for v in values):
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
        if len(arr) and bool(np.all(np.diff(offsets) == 1)):
            data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
            table = np.full(256, -1, dtype=np.int64)
            for i, v in reversed(list(enumerate(values))):
                table[v.encode()[0]] = i
            codes = table[data[offsets[:-1]]]
            if arr.null_count:
                codes[~np.asarray(arr.is_valid())] = -1
            return codes
    return pc.fill_null(pc.index_in(arr, value_set=pa.array(values, pa.string())), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def take_rows(chunks: pa.ChunkedArray | list[pa.Array], idx: np.ndarray) -> pa.Array:
    """``pa.chunked_array(chunks).take(idx)`` as one array, gathering from each chunk only the rows it
    holds (no concatenation of the whole input first)."""
    chunks = list(chunks.chunks) if isinstance(chunks, pa.ChunkedArray) else list(chunks)
    idx = np.asarray(idx, dtype=np.int64)
    if len(chunks) == 1:
        return chunks[0].take(pa.array(idx))
    bounds = np.cumsum([0, *(len(c) for c in chunks)])
    which = np.searchsorted(bounds, idx, side="right") - 1
    order = np.argsort(which, kind="stable")
    starts = np.searchsorted(which[order], np.arange(len(chunks) + 1))
    parts = [chunks[c].take(pa.array(idx[order[starts[c] : starts[c + 1]]] - bounds[c])) for c in range(len(chunks)) if starts[c + 1] > starts[c]]
    if not parts:
        return chunks[0].slice(0, 0)
    gathered = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
    if bool(np.all(order[1:] > order[:-1])):  # asked in chunk order already
        return gathered
    back = np.empty(len(order), dtype=np.int64)
    back[order] = np.arange(len(order))
    return gathered.take(pa.array(back))


def one_batch(table: pa.Table) -> pa.RecordBatch:
    """A table as one record batch (an IPC file's batch per bucket), its chunks combined only if it has several."""
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns], schema=table.schema)
