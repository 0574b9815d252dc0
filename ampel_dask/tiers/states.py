"""T1: which datapoints make an object's state at an alert, and the state's content hash.

A state is (stock, the datapoints visible at the alert's time under the channel's policy and data
rights). Its id is a 128-bit hash of their content, every field of every datapoint (``keys.state_ids``:
independent of their order, vectorised), mixed with the stock: two states with the same datapoint ids
but a value that differs (copies of a datapoint can differ between packets) have different ids.
Nothing the alert could not have known enters its state (no look-ahead): no datapoint observed after
it, none first published by a later packet, and no copy of a datapoint from a later packet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..io.arrays import first_of_groups, order_by, take_rows
from ..io.layout import DATAPOINT, DETECTION, FLAG_BAD_PHOT, FORCED, UPPER_LIMIT, band_as
from ..keys import datapoint_lanes, id_column, state_ids
from .base import T1Unit, UnitConfig

KINDS = {"detection": DETECTION, "upper_limit": UPPER_LIMIT, "forced": FORCED}

# AMPEL's data-rights tags for ZTF datapoints, by ZTF programid (1 public, 2 partnership, 3 Caltech)
ZTF_ACCESS = {"ZTF_PUB": {1}, "ZTF_PRIV": {2}, "ZTF_COLLAB": {2}, "ZTF_CALTECH": {3}, "ZTF_ALL": {0, 1, 2, 3}}
PUBLIC_SURVEYS = {"lsst": {"LSST", "LSST_PUB"}}
TIME_EPS = 1e-6  # days (~0.1 s): a datapoint at the alert's own time belongs to the state

HISTORY_RULE = 3  # which archived datapoints and copies a state holds (first_copies, published_by); part of t1h keys
STATE_COLUMNS = ["state_id", "stock", "object_id", "alert_id", "survey", "mjd", "ra", "dec", "dps"]


class T1PolicyConfig(UnitConfig):
    kinds: list[Literal["detection", "upper_limit", "forced"]] = Field(
        default=["detection", "upper_limit"], description="datapoint kinds that enter a state"
    )
    exclude_bands: list[str] = Field(default_factory=list, description="bands left out (e.g. ['i'])")
    exclude_flags: int = Field(FLAG_BAD_PHOT, ge=0, description="datapoints with any of these flag bits are left out")
    min_rb: float | None = Field(None, description="detections with rb/reliability below this are left out")
    history: Literal["packet", "archive"] = Field(
        "packet", description="'packet': the alert's own history; 'archive': plus the object's archived datapoints"
    )


class T1Policy(T1Unit):
    """The default state builder: packet (or archived) datapoints up to the alert time, minus exclusions."""

    Config = T1PolicyConfig

    @property
    def needs_history(self) -> bool:
        return self.config.history == "archive"

    def states(self, alerts: pa.Table, access: list[str], history: pa.Table | None = None) -> pa.Table:
        return build_states(alerts, self.config, access, history)


def access_mask(survey: np.ndarray | pa.Array | pa.ChunkedArray, programid: np.ndarray, access: list[str]) -> np.ndarray:
    """Which datapoints a channel with these access tags may use (unknown ZTF programid: private)."""
    names, codes = survey_codes(survey if isinstance(survey, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(survey, dtype=object), pa.string()))
    return access_by_survey(names, codes, programid, access)


def survey_codes(survey: pa.Array | pa.ChunkedArray) -> tuple[list[str | None], np.ndarray]:
    """The distinct survey names and each row's index among them (dictionary encoding: a batch holds a
    handful of names, and a Python string per row cost ~0.1 s per million rows)."""
    enc = (survey if pa.types.is_dictionary(survey.type) else pc.dictionary_encode(survey))
    enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
    names = [*enc.dictionary.to_pylist(), None]
    return names, pc.fill_null(enc.indices, len(names) - 1).to_numpy(zero_copy_only=False)


def access_by_survey(names: list[str | None], codes: np.ndarray, programid: np.ndarray, access: list[str]) -> np.ndarray:
    """:func:`access_mask` on survey codes (see :func:`survey_codes`)."""
    allowed_pid: set[int] = set()
    for tag in access:
        allowed_pid |= ZTF_ACCESS.get(tag, set())

    def of(name: str) -> np.ndarray:
        return codes == names.index(name) if name in names else np.zeros(len(codes), dtype=bool)

    ok = np.zeros(len(codes), dtype=bool)
    is_ztf = of("ztf")
    if allowed_pid and is_ztf.any():
        pid = np.where(np.isnan(programid), -1, programid).astype(np.int64)
        ok |= is_ztf & np.isin(pid, list(allowed_pid))
    for name, tags in PUBLIC_SURVEYS.items():
        if tags & set(access) or "ALL" in access:
            ok |= of(name)
    if "ALL" in access:
        ok |= is_ztf
    return ok


def alert_access(alerts: pa.Table, access: list[str]) -> np.ndarray:
    """May a channel see this alert at all (its trigger datapoint's data rights)?"""
    if "programid" in alerts.column_names:
        pid = pc.cast(alerts.column("programid"), pa.float64()).to_numpy(zero_copy_only=False)
    else:
        pid = np.full(alerts.num_rows, np.nan)
    return access_mask(alerts.column("survey"), pid, access)


def _flat(dps: pa.ChunkedArray | pa.ListArray) -> tuple[pa.StructArray, np.ndarray]:
    """Flattened datapoints and the row each one belongs to."""
    arr = dps.combine_chunks() if isinstance(dps, pa.ChunkedArray) else dps
    offsets = np.asarray(arr.offsets)
    lengths = np.diff(offsets)
    flat = arr.values.slice(offsets[0], offsets[-1] - offsets[0]) if len(arr) else arr.values.slice(0, 0)
    rows = np.repeat(np.arange(len(arr), dtype=np.int64), lengths)
    return flat, rows


def build_states(alerts: pa.Table, policy: T1PolicyConfig, access: list[str], history: pa.Table | None = None) -> pa.Table:
    """One state per alert row: policy + data rights applied to its datapoints, then hashed.

    Without ``history`` a state's datapoints come from the alert's own packet (``dps``), in packet
    order. With ``history`` (flat rows, see :func:`flat_history`) they are the object's archived
    datapoints that a packet published at or before the alert (in publication order: alert time, then
    alert id), each as the copy of the first packet that published it (:func:`first_copies`), in time
    order; the alerts need no ``dps`` then (if they have it, their packets join the history).
    """
    n = alerts.num_rows
    if history is None:
        flat, rows = _flat(alerts.column("dps"))
        source = pa.table({f.name: flat.field(f.name) for f in DATAPOINT})
        cand = visible = None
    else:
        if "dps" in alerts.column_names:
            packets = flat_history(alerts)
            packets = packets.set_column(packets.schema.get_field_index("band"), "band", band_as(packets.column("band"), history.schema.field("band").type))
            history = pa.concat_tables([history, packets], promote_options="default")
        source, rows, cand, visible = _object_history(alerts, history)

    def at(values: np.ndarray) -> np.ndarray:  # a datapoint column, one value per candidate
        return values if cand is None else values[cand]

    def col(name: str) -> pa.ChunkedArray:
        return source.column(name)

    if visible is None:  # no look-ahead: the packet's datapoints up to its time
        alert_mjd = alerts.column("mjd").to_numpy(zero_copy_only=False)
        keep = pc.fill_null(col("mjd"), np.inf).to_numpy() <= alert_mjd[rows] + TIME_EPS
    else:  # observed and published by the alert's time (see _object_history)
        keep = visible
    kind = at(col("kind").to_numpy())
    keep &= np.isin(kind, [KINDS[k] for k in policy.kinds])
    if policy.exclude_flags:
        flags = at(pc.fill_null(col("flags"), 0).to_numpy())
        keep &= (flags & policy.exclude_flags) == 0
    if policy.exclude_bands:
        keep &= ~at(np.asarray(pc.is_in(col("band"), value_set=pa.array(policy.exclude_bands)).fill_null(False)))
    if policy.min_rb is not None:
        rb = at(pc.fill_null(pc.cast(col("rb"), pa.float64()), np.inf).to_numpy())
        keep &= (kind != DETECTION) | (rb >= policy.min_rb)
    names, codes = survey_codes(alerts.column("survey"))
    pid = at(pc.cast(col("programid"), pa.float64()).to_numpy())
    keep &= access_by_survey(names, codes[rows], pid, access)

    idx = np.flatnonzero(keep)
    kept_rows = rows[idx]
    taken = source.take(pa.array(idx if cand is None else cand[idx]))  # the one gather of datapoints
    # a state's datapoints leave the loop with plain band names (the loop holds them as codes)
    kept = pa.StructArray.from_arrays([band_as(taken.column(f.name), f.type).combine_chunks() if f.name == "band" else taken.column(f.name).combine_chunks()
                                       for f in DATAPOINT], fields=list(DATAPOINT))  # fmt: skip
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(kept_rows, minlength=n), out=offsets[1:])
    dps = pa.ListArray.from_arrays(pa.array(offsets), kept)
    stock = alerts.column("stock").to_numpy(zero_copy_only=False)
    if cand is None:  # a packet's datapoints belong to its state alone: hash the kept ones
        lanes = datapoint_lanes(kept)
    else:  # an object's datapoints are in many of its states: hash each history row once
        a, b = datapoint_lanes(source)
        lanes = (a[cand[idx]], b[cand[idx]])
    sid = state_ids(stock, lanes, kept_rows, n)
    cols = {
        "state_id": id_column(sid),
        "stock": alerts.column("stock"),
        "object_id": alerts.column("object_id"),
        "alert_id": alerts.column("alert_id"),
        "survey": alerts.column("survey"),
        "mjd": alerts.column("mjd"),
        "ra": alerts.column("ra"),
        "dec": alerts.column("dec"),
        "dps": dps,
    }
    return pa.table(cols)


HISTORY_SCHEMA = pa.schema([("stock", pa.int64()), ("packet", pa.int64()), ("packet_mjd", pa.float64()), *DATAPOINT])


def flat_history(alerts: pa.Table) -> pa.Table:
    """Alerts' packets as flat history rows: the object, the packet (its alert id and time) and the
    datapoint's fields."""
    flat, rows = _flat(alerts.column("dps"))
    return pa.table(
        {
            "stock": alerts.column("stock").to_numpy(zero_copy_only=False)[rows],
            "packet": alerts.column("alert_id").to_numpy(zero_copy_only=False)[rows],
            "packet_mjd": alerts.column("mjd").to_numpy(zero_copy_only=False)[rows],
            **{f.name: flat.field(f.name) for f in DATAPOINT},
        }
    )


def thinned_history(alerts: pa.Table, keep: np.ndarray, group: Callable[[np.ndarray], np.ndarray] | None = None) -> pa.Table:
    """``one_copy(flat_history(alerts.filter(keep)))`` with one gather: the copies are chosen on their
    numeric keys first, and only the chosen ones are copied (no filtered nested lists in between).

    ``group``: a key computed from the stock; the rows come grouped by it (stable), e.g. by bucket.
    """
    stock, packet, packet_mjd = (alerts.column(c).to_numpy(zero_copy_only=False) for c in ("stock", "alert_id", "mjd"))
    values, where, rows, base = [], [], [], 0
    r0 = 0
    for chunk in alerts.column("dps").chunks:
        sel = np.flatnonzero(keep[r0 : r0 + len(chunk)])
        off = np.asarray(chunk.offsets)
        lengths = off[sel + 1] - off[sel]
        where.append(base + np.repeat(off[sel] - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum(), dtype=np.int64))
        rows.append(np.repeat(sel + r0, lengths))
        values.append(chunk.values)
        base += len(chunk.values)
        r0 += len(chunk)
    where_all, row = np.concatenate(where or [np.empty(0, np.int64)]), np.concatenate(rows or [np.empty(0, np.int64)])
    dp_id = np.concatenate([v.field("dp_id").to_numpy(zero_copy_only=False) for v in values] or [np.empty(0, np.int64)])[where_all]
    keys = pa.table({"stock": stock[row], "dp_id": dp_id, "packet": packet[row], "packet_mjd": packet_mjd[row]})
    pick = first_copies(keys) if keys.num_rows else np.empty(0, np.int64)
    if group is not None and len(pick):
        pick = pick[np.argsort(group(stock[row[pick]]), kind="stable")]
    chosen = take_rows(values, where_all[pick]) if values else pa.array([], DATAPOINT)
    r = row[pick]
    return pa.table({"stock": stock[r], "packet": packet[r], "packet_mjd": packet_mjd[r], **{f.name: chosen.field(f.name) for f in DATAPOINT}})


def one_copy(history: pa.Table) -> pa.Table:
    """Each (object, datapoint) once, in (stock, dp_id) order (see :func:`first_copies`)."""
    return history.take(pa.array(first_copies(history))) if history.num_rows else history


def first_copies(history: pa.Table) -> np.ndarray:
    """Rows of ``history`` that keep each (object, datapoint) once, in (stock, dp_id) order: the copy of
    the first packet that published it, in publication order (alert time, then alert id).

    That packet's time is then the datapoint's publication time, so an alert sees the datapoint exactly
    when this copy's packet comes at or before it in publication order (:func:`published_by`), and the
    copy it sees is from such a packet. Later packets never change the choice (they come after it), nor
    does the order rows arrive in: the rule is a total order, so thinning pieces of a history first (the
    ``hist`` tasks do) and taking their union afterwards gives what one pass over the whole would.
    """
    col = lambda c: history.column(c).to_numpy(zero_copy_only=False)  # noqa: E731
    return first_of_groups([col("stock"), col("dp_id")], [col("packet_mjd"), col("packet")])


def published_by(packet_mjd: np.ndarray, packet: np.ndarray, alert_mjd: np.ndarray, alert_id: np.ndarray) -> np.ndarray:
    """Was the packet (alert time, alert id) published at or before the alert? Publication order is the
    alerts' time, and at equal times their id: two alerts of one exposure are a sequence too, so the
    first of them never holds what only the second published. Exact: both sides are alert times of the
    archive (the 1e-6 d tolerance is for observation times against the alert's)."""
    return (packet_mjd < alert_mjd) | ((packet_mjd == alert_mjd) & (packet <= alert_id))


def _object_history(alerts: pa.Table, history: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """A join by object done with sorted arrays: each alert row's candidates are its object's
    datapoints (one copy each, :func:`first_copies`) observed up to the alert's time, a contiguous run
    of the history sorted by (stock, mjd). Returns the history's datapoint columns, and per candidate
    (in time order) its alert row, its history row and whether the alert sees it: not if its first
    packet came after the alert (a late publication). Nothing is gathered here: the policy's cut
    comes first, in one mask with that one."""
    pick = first_copies(history) if history.num_rows else np.empty(0, np.int64)
    h_stock = history.column("stock").to_numpy(zero_copy_only=False)[pick]
    h_mjd = pc.fill_null(history.column("mjd"), np.inf).to_numpy(zero_copy_only=False)[pick]
    order = order_by((h_stock, "ascending"), (h_mjd, "ascending"), (history.column("dp_id").to_numpy(zero_copy_only=False)[pick], "ascending"))
    h_stock, h_mjd, pick = h_stock[order], h_mjd[order], pick[order]
    p_mjd, p_id = (history.column(c).to_numpy(zero_copy_only=False)[pick] for c in ("packet_mjd", "packet"))
    a_stock, a_mjd, a_id = (alerts.column(c).to_numpy(zero_copy_only=False) for c in ("stock", "mjd", "alert_id"))
    n, m = len(a_stock), len(h_stock)
    lo = np.searchsorted(h_stock, a_stock, "left")
    # where each alert's (stock, time) falls among the sorted datapoints: one merge (a sort of both),
    # datapoints before alerts at equal keys; the datapoints before it are its run's end
    merged = order_by(
        (np.concatenate([h_stock, a_stock]), "ascending"),
        (np.concatenate([h_mjd, a_mjd + TIME_EPS]), "ascending"),
        (np.concatenate([np.zeros(m, np.int8), np.ones(n, np.int8)]), "ascending"),
    )
    at = np.flatnonzero(merged >= m)
    hi = np.empty(n, dtype=np.int64)
    hi[merged[at] - m] = at - np.arange(len(at))
    counts = np.maximum(hi - lo, 0)
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    runs = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(len(rows), dtype=np.int64)
    # observed by the alert's time is not enough: the copy's packet (the first to publish it) must be too
    seen = published_by(p_mjd[runs], p_id[runs], np.repeat(a_mjd, counts), np.repeat(a_id, counts))
    return history.select([f.name for f in DATAPOINT]), rows, pick[runs], seen


__all__ = ["T1Policy", "T1PolicyConfig", "build_states", "state_ids", "access_mask", "access_by_survey", "survey_codes", "alert_access", "STATE_COLUMNS", "flat_history", "thinned_history", "one_copy", "first_copies", "published_by", "HISTORY_RULE", "HISTORY_SCHEMA"]
