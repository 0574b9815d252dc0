"""Shared machinery of the survey normalisers: column extraction, nested histories, validation.

A normaliser receives all records of one writer schema from one chunk as one Arrow struct array (see
:mod:`.columnar`), takes its columns with Arrow compute (never a dict per alert), derives the rest with
numpy, and assembles the per-alert histories from flat datapoint arrays plus offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .avro import WriterSchema
from .layout import CUTOUTS, DATAPOINT, DATAPOINT_FIELDS, programid_bits


@dataclass
class Normalized:
    """Alert rows and cutouts of a batch, plus the records that could not be normalised."""

    alerts: pa.Table | None
    cutouts: pa.Table | None
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (record position in batch, reason)


def column(rows: pa.StructArray, names: Sequence[str], typ: pa.DataType) -> pa.Array:
    """One field of the records as ``typ``: the first of ``names`` their type has (null where a record
    is null), else nulls. Float NaN becomes null, so a value is missing in one way only."""
    for name in names:
        i = rows.type.get_field_index(name)
        if i >= 0:  # a few calls per column: a normaliser takes ~120 of them per schema group
            arr = rows.field(i) if rows.null_count == 0 else pc.struct_field(rows, name)
            if arr.type != typ:
                arr = arr.cast(typ)
            if pa.types.is_floating(typ) and len(arr) > arr.null_count:
                nan = np.isnan(arr.to_numpy(zero_copy_only=False))
                if nan.any():
                    arr = pc.if_else(nan, pa.scalar(None, typ), arr)
            return arr
    return pa.nulls(len(rows), typ)


def has_field(rows: pa.StructArray, name: str) -> bool:
    return rows.type.get_field_index(name) >= 0


def flatten(rows: pa.StructArray, key: str) -> tuple[pa.StructArray, np.ndarray]:
    """The items of the list-valued field ``key`` of all records, and each item's record position."""
    lists = pc.struct_field(rows, key) if has_field(rows, key) else None
    if lists is None or not pa.types.is_list(lists.type):  # absent, or null in every record of the batch
        return pa.array([], pa.struct([])), np.empty(0, dtype=np.int64)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    return lists.flatten(), np.repeat(np.arange(len(rows), dtype=np.int64), lengths)


def texts(rows: pa.StructArray, name: str) -> list:
    """A field's values as Python objects (for the few per-record names, e.g. object ids)."""
    return column(rows, [name], pa.string()).to_pylist()


def f64(a: pa.Array) -> np.ndarray:
    """Float64 numpy view of an arrow column (nulls -> NaN)."""
    return pc.cast(a, pa.float64()).to_numpy(zero_copy_only=False)


def i64(a: pa.Array, fill: int = 0) -> np.ndarray:
    return pc.fill_null(pc.cast(a, pa.int64()), fill).to_numpy(zero_copy_only=False)


def nan_to_null(x: np.ndarray) -> pa.Array:
    return pa.array(x, mask=~np.isfinite(x))


@dataclass
class DatapointPart:
    """Flat datapoints of one kind for a batch, each tagged with the position of its alert."""

    alert: np.ndarray
    columns: dict[str, pa.Array]


def assemble_dps(n_alerts: int, parts: list[DatapointPart]) -> pa.ListArray:
    """Nest flat datapoints into one list per alert, sorted by time, with duplicate ids removed."""
    parts = [p for p in parts if len(p.alert)]
    if not parts:
        return pa.array([[] for _ in range(n_alerts)], type=pa.list_(DATAPOINT))
    alert = np.concatenate([p.alert for p in parts])
    cols = {}
    for name in DATAPOINT_FIELDS:
        typ = DATAPOINT.field(name).type
        cols[name] = pa.concat_arrays(
            [pc.cast(p.columns[name], typ) if name in p.columns else pa.nulls(len(p.alert), typ) for p in parts]
        )
    # int64 whatever the nulls (a record without a trigger id, refused later): as float64, ids of ~1e18
    # that differ by less than 256 compared equal and were dropped as repeats, in every alert of the batch
    has_id = np.asarray(cols["dp_id"].is_valid())
    dp_id = pc.fill_null(cols["dp_id"], 0).to_numpy(zero_copy_only=False)
    mjd = np.nan_to_num(f64(cols["mjd"]), nan=np.inf)
    n = len(alert)
    # the same datapoint twice in one alert (e.g. a prv entry repeating the trigger): keep the first
    by_id = np.lexsort((np.arange(n), dp_id, alert))
    repeat = np.zeros(n, dtype=bool)
    same = (alert[by_id][1:] == alert[by_id][:-1]) & (dp_id[by_id][1:] == dp_id[by_id][:-1])
    repeat[1:] = same & has_id[by_id][1:] & has_id[by_id][:-1]
    keep = np.ones(n, dtype=bool)
    keep[by_id[repeat]] = False
    sel = np.flatnonzero(keep)
    order = sel[np.lexsort((dp_id[sel], ~has_id[sel], mjd[sel], alert[sel]))]  # a missing id after the others
    alert_s = alert[order]
    idx = pa.array(order)
    struct = pa.StructArray.from_arrays([cols[n].take(idx) for n in DATAPOINT_FIELDS], fields=list(DATAPOINT))
    offsets = np.zeros(n_alerts + 1, dtype=np.int32)
    np.cumsum(np.bincount(alert_s, minlength=n_alerts), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), struct)


def history_summary(dps: pa.ListArray) -> dict[str, pa.Array]:
    """Per alert: number of detections and first / last detection time in its nested history, over
    all its datapoints, and the programids they carry (:func:`.layout.programid_bits`; a channel that
    may not see some of them gets the aggregates recomputed in its view, see ``tiers/rights.py``)."""
    n = len(dps)
    offsets = np.asarray(dps.offsets)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    values = dps.values.slice(offsets[0], offsets[-1] - offsets[0]) if n else dps.values.slice(0, 0)
    bits = np.zeros(n, dtype=np.int32)
    if len(rows):
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        bits[rows[starts]] = np.bitwise_or.reduceat(programid_bits(f64(values.field("programid"))), starts)
    det = values.field("kind").to_numpy(zero_copy_only=False) == 0
    mjd = f64(values.field("mjd"))
    r, t = rows[det], mjd[det]
    ndet = np.bincount(r, minlength=n).astype(np.int32)
    first = np.full(n, np.nan)
    last = np.full(n, np.nan)
    if len(r):
        starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
        first[r[starts]] = np.fmin.reduceat(t, starts)
        last[r[starts]] = np.fmax.reduceat(t, starts)
    return {"ndet": pa.array(ndet), "first_det_mjd": nan_to_null(first), "last_det_mjd": nan_to_null(last), "history_programids": pa.array(bits)}


def cutouts_table(alert_ids: pa.Array, rows: pa.StructArray) -> pa.Table:
    stamps = [stamp(rows, f"cutout{kind}") for kind in ("Science", "Template", "Difference")]
    return pa.Table.from_arrays([alert_ids, *stamps], schema=CUTOUTS)


def stamp(rows: pa.StructArray, name: str) -> pa.Array:
    """Cutout bytes from a ZTF-style {fileName, stampData} record or a plain bytes field."""
    if not has_field(rows, name):
        return pa.nulls(len(rows), pa.binary())
    arr = pc.struct_field(rows, name)
    if pa.types.is_struct(arr.type):
        return column(arr, ["stampData"], pa.binary())
    return pc.cast(arr, pa.binary())


def rows_where(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """``table.filter(mask)``, without the copy when every row is kept (cutouts are large)."""
    return table if bool(np.all(mask)) else table.filter(pa.array(mask))


def reject_rows(table: pa.Table, checks: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Rows failing a check (first failing reason wins) -> (keep mask, [(row, reason)])."""
    bad = np.zeros(table.num_rows, dtype=bool)
    rejects: list[tuple[int, str]] = []
    for mask, reason in checks:
        new = mask & ~bad
        rejects += [(int(i), reason) for i in np.flatnonzero(new)]
        bad |= new
    return ~bad, rejects


Normalizer = Callable[[pa.StructArray, WriterSchema, list[str]], Normalized]
