"""Sorting helpers for the hot paths, chosen on measurements (numpy 2.4, pyarrow 22; 380k int64):

- ``np.unique(a)`` without ``return_*`` takes a hash-table path: ~190 ms, against ~10 ms to sort and
  mask (:func:`sorted_unique`).
- ``np.lexsort`` over 3-4 keys: ~130-150 ms; Arrow's stable multi-key ``sort_indices``: ~17-20 ms
  (:func:`order_by`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (what ``np.unique`` returns)."""
    s = np.sort(np.asarray(values))
    if len(s) < 2:
        return s
    return s[np.r_[True, s[1:] != s[:-1]]]


def first_rows(values: np.ndarray) -> np.ndarray:
    """Row numbers of the first occurrence of each distinct value, in row order (what
    ``np.sort(np.unique(values, return_index=True)[1])`` gives, with one stable sort)."""
    values = np.asarray(values)
    if len(values) < 2:
        return np.arange(len(values))
    order = np.argsort(values, kind="stable")
    s = values[order]
    return np.sort(order[np.r_[True, s[1:] != s[:-1]]])


def order_by(*keys: tuple[np.ndarray, str]) -> np.ndarray:
    """Stable sort indices by several ``(values, "ascending" | "descending")`` keys, the first the most
    significant (``np.lexsort`` takes them the other way round); NaN sorts last either way."""
    table = pa.table({f"k{i}": np.asarray(v) for i, (v, _) in enumerate(keys)})
    idx = pc.sort_indices(table, sort_keys=[(f"k{i}", d) for i, (_, d) in enumerate(keys)])
    return idx.to_numpy()
