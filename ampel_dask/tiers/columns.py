"""Column helpers shared by units: numpy views of alert columns and per-alert history aggregates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def num(table: pa.Table, name: str) -> np.ndarray:
    """Float64 numpy view of a column (nulls and missing columns -> NaN)."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    col = table.column(name)
    if col.num_chunks == 1 and col.null_count == 0 and pa.types.is_floating(col.type):
        return col.chunk(0).to_numpy().astype(np.float64, copy=False)  # the common case, no Arrow cast
    return pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)


def floats(arr) -> np.ndarray:
    """Float64 numpy copy of an Arrow array or chunked array (nulls -> NaN)."""
    return np.asarray(pc.fill_null(pc.cast(arr, pa.float64()), np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)


def present(table: pa.Table, name: str) -> np.ndarray:
    """True where the column exists and holds a value."""
    if name not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    col = table.column(name)
    valid = np.asarray(col.is_valid())
    if pa.types.is_floating(col.type):
        valid &= ~np.isnan(num(table, name))
    return valid


def history(table: pa.Table, field: str, column: str = "dps") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values of one datapoint field, row index of each datapoint, list offsets) for a nested column."""
    arr = table.column(column).combine_chunks()
    offsets = np.asarray(arr.offsets)
    start, end = int(offsets[0]), int(offsets[-1])
    values = arr.values.slice(start, end - start).field(field)
    rows = np.repeat(np.arange(len(arr), dtype=np.int64), np.diff(offsets))
    vals = values.to_numpy(zero_copy_only=False) if values.null_count == 0 else pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    return vals, rows, offsets - start


def per_row(values: np.ndarray, rows: np.ndarray, n: int, how: str, empty: float = np.nan) -> np.ndarray:
    """Aggregate datapoint values per row ('count', 'min', 'max', 'sum') for non-decreasing ``rows``."""
    if how == "count":
        return np.bincount(rows, minlength=n).astype(np.int64)
    out = np.full(n, empty, dtype=np.float64)
    if not len(rows):
        return out
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    ufunc = {"min": np.fmin, "max": np.fmax, "sum": np.add}[how]
    out[rows[starts]] = ufunc.reduceat(values.astype(np.float64), starts)
    return out


SUMMARY = ("ndet", "first_det_mjd", "last_det_mjd")


def detections(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(number of detections, first and last detection time) per alert: from the ingest's summary
    columns when the batch has them (no need to read the nested history), else from ``dps``."""
    if all(c in table.column_names for c in SUMMARY):
        return (np.nan_to_num(num(table, "ndet"), nan=0).astype(np.int64), num(table, "first_det_mjd"), num(table, "last_det_mjd"))
    from ..io.layout import DETECTION

    n = table.num_rows
    t, rows, _ = history(table, "mjd")
    kind, _, _ = history(table, "kind")
    det = kind == DETECTION
    return per_row(t[det], rows[det], n, "count"), per_row(t[det], rows[det], n, "min"), per_row(t[det], rows[det], n, "max")
