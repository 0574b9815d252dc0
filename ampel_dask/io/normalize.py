"""Shared machinery of the survey normalisers: column extraction, nested histories, validation.

A normaliser receives all records of one writer schema from one chunk and builds columns with one
pyarrow conversion per field (never a dict per alert), derives the rest with numpy, and assembles the
per-alert histories from flat datapoint arrays plus offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .avro import Record, WriterSchema
from .layout import CUTOUTS, DATAPOINT, DATAPOINT_FIELDS


@dataclass
class Normalized:
    """Alert rows and cutouts of a batch, plus the records that could not be normalised."""

    alerts: pa.Table | None
    cutouts: pa.Table | None
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (record position in batch, reason)


def record_fields(ws: WriterSchema, path: Sequence[str]) -> set[str]:
    """Field names of the (possibly nested, nullable, array, named-reference) record at ``path``."""
    named = _named_records(ws.raw)
    t: object = ws.raw
    for name in path:
        t = _unwrap(t, named)
        fields = t.get("fields", []) if isinstance(t, dict) else []
        t = next((f["type"] for f in fields if f["name"] == name), None)
        if t is None:
            return set()
    t = _unwrap(t, named)
    return {f["name"] for f in t.get("fields", [])} if isinstance(t, dict) else set()


def _named_records(schema: object) -> dict[str, dict]:
    """Record definitions by full and short name, so that references by name can be followed."""
    out: dict[str, dict] = {}

    def walk(t: object, ns: str) -> None:
        if isinstance(t, list):
            for x in t:
                walk(x, ns)
        elif isinstance(t, dict):
            kind = t.get("type")
            if kind == "record":
                name = t.get("name", "")
                space = t.get("namespace", ns)
                full = name if "." in name or not space else f"{space}.{name}"
                out[full] = out[name.split(".")[-1]] = t
                for f in t.get("fields", []):
                    walk(f["type"], full.rsplit(".", 1)[0] if "." in full else space)
            elif kind == "array":
                walk(t["items"], ns)
            elif kind == "map":
                walk(t["values"], ns)
            elif isinstance(kind, (dict, list)):
                walk(kind, ns)

    walk(schema, "")
    return out


def _unwrap(t: object, named: dict[str, dict]) -> object:
    """Strip null unions and arrays down to the record type, following references by name."""
    while True:
        if isinstance(t, list):
            t = next((x for x in t if x != "null"), None)
        elif isinstance(t, dict) and t.get("type") == "array":
            t = t["items"]
        elif isinstance(t, dict) and isinstance(t.get("type"), (dict, list)):
            t = t["type"]
        elif isinstance(t, str) and t in named:
            t = named[t]
        else:
            return t


def column(rows: list[dict], names: Sequence[str], present: set[str], typ: pa.DataType) -> pa.Array:
    """One column from a list of record dicts: the first of ``names`` the schema has, else nulls."""
    for name in names:
        if name in present:
            return pa.array(list(map(itemgetter(name), rows)), type=typ, from_pandas=True)
    return pa.nulls(len(rows), typ)


def flatten(values: list[dict], key: str) -> tuple[list[dict], np.ndarray]:
    """Concatenate the list-valued ``key`` of each record; returns the items and their alert index."""
    lists = [v.get(key) or () for v in values]
    counts = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    items = [x for lst in lists for x in lst]
    return items, np.repeat(np.arange(len(values), dtype=np.int64), counts)


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
    dp_id = cols["dp_id"].to_numpy(zero_copy_only=False)
    mjd = np.nan_to_num(f64(cols["mjd"]), nan=np.inf)
    n = len(alert)
    # the same datapoint twice in one alert (e.g. a prv entry repeating the trigger): keep the first
    by_id = np.lexsort((np.arange(n), dp_id, alert))
    repeat = np.zeros(n, dtype=bool)
    repeat[1:] = (alert[by_id][1:] == alert[by_id][:-1]) & (dp_id[by_id][1:] == dp_id[by_id][:-1])
    keep = np.ones(n, dtype=bool)
    keep[by_id[repeat]] = False
    sel = np.flatnonzero(keep)
    order = sel[np.lexsort((dp_id[sel], mjd[sel], alert[sel]))]
    alert_s = alert[order]
    idx = pa.array(order)
    struct = pa.StructArray.from_arrays([cols[n].take(idx) for n in DATAPOINT_FIELDS], fields=list(DATAPOINT))
    offsets = np.zeros(n_alerts + 1, dtype=np.int32)
    np.cumsum(np.bincount(alert_s, minlength=n_alerts), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), struct)


def history_summary(dps: pa.ListArray) -> dict[str, pa.Array]:
    """Per alert: number of detections and first / last detection time in its nested history."""
    n = len(dps)
    offsets = np.asarray(dps.offsets)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    values = dps.values
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
    return {"ndet": pa.array(ndet), "first_det_mjd": nan_to_null(first), "last_det_mjd": nan_to_null(last)}


def cutouts_table(alert_ids: pa.Array, science: list, template: list, difference: list) -> pa.Table:
    return pa.Table.from_arrays(
        [alert_ids, pa.array(science, pa.binary()), pa.array(template, pa.binary()), pa.array(difference, pa.binary())],
        schema=CUTOUTS,
    )


def stamp(value: object) -> bytes | None:
    """Cutout bytes from a ZTF-style {fileName, stampData} record or a plain bytes field."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("stampData")
    return value  # type: ignore[return-value]


def reject_rows(table: pa.Table, checks: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Rows failing a check (first failing reason wins) -> (keep mask, [(row, reason)])."""
    bad = np.zeros(table.num_rows, dtype=bool)
    rejects: list[tuple[int, str]] = []
    for mask, reason in checks:
        new = mask & ~bad
        rejects += [(int(i), reason) for i in np.flatnonzero(new)]
        bad |= new
    return ~bad, rejects


Normalizer = Callable[[list[Record], WriterSchema, list[str]], Normalized]
