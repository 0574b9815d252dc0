"""T1: which datapoints make an object's state at an alert, and the state's content hash.

A state is (stock, the datapoints visible at the alert's time under the channel's policy and data
rights). Its id is a 64-bit hash of the datapoint-id multiset (mixed with splitmix64 and summed per
list, so it is independent of order and vectorises with ``np.add.reduceat``), mixed with the stock.
Nothing later than the alert ever enters its state (no look-ahead).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..io.arrays import order_by
from ..io.layout import DATAPOINT, DETECTION, FLAG_BAD_PHOT, FORCED, UPPER_LIMIT, splitmix64
from .base import Unit, UnitConfig

KINDS = {"detection": DETECTION, "upper_limit": UPPER_LIMIT, "forced": FORCED}

# AMPEL's data-rights tags for ZTF datapoints, by ZTF programid (1 public, 2 partnership, 3 Caltech)
ZTF_ACCESS = {"ZTF_PUB": {1}, "ZTF_PRIV": {2}, "ZTF_COLLAB": {2}, "ZTF_CALTECH": {3}, "ZTF_ALL": {0, 1, 2, 3}}
PUBLIC_SURVEYS = {"lsst": {"LSST", "LSST_PUB"}}
TIME_EPS = 1e-6  # days (~0.1 s): a datapoint at the alert's own time belongs to the state

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


class T1Policy(Unit):
    """The default state builder: packet (or archived) datapoints up to the alert time, minus exclusions."""

    tier: ClassVar[str] = "T1"
    Config = T1PolicyConfig

    def states(self, alerts: pa.Table, access: list[str], history: pa.Table | None = None) -> pa.Table:
        return build_states(alerts, self.config, access, history)


def access_mask(survey: np.ndarray, programid: np.ndarray, access: list[str]) -> np.ndarray:
    """Which datapoints a channel with these access tags may use (unknown ZTF programid: private)."""
    allowed_pid: set[int] = set()
    for tag in access:
        allowed_pid |= ZTF_ACCESS.get(tag, set())
    ok = np.zeros(len(survey), dtype=bool)
    is_ztf = survey == "ztf"
    if allowed_pid:
        pid = np.where(np.isnan(programid), -1, programid).astype(np.int64)
        ok |= is_ztf & np.isin(pid, list(allowed_pid))
    for name, tags in PUBLIC_SURVEYS.items():
        if tags & set(access) or "ALL" in access:
            ok |= survey == name
    if "ALL" in access:
        ok |= is_ztf
    return ok


def alert_access(alerts: pa.Table, access: list[str]) -> np.ndarray:
    """May a channel see this alert at all (its trigger datapoint's data rights)?"""
    survey = np.asarray(alerts.column("survey").to_numpy(zero_copy_only=False))
    if "programid" in alerts.column_names:
        pid = pc.cast(alerts.column("programid"), pa.float64()).to_numpy(zero_copy_only=False)
    else:
        pid = np.full(alerts.num_rows, np.nan)
    return access_mask(survey, pid, access)


def _flat(dps: pa.ChunkedArray | pa.ListArray) -> tuple[pa.StructArray, np.ndarray]:
    """Flattened datapoints and the row each one belongs to."""
    arr = dps.combine_chunks() if isinstance(dps, pa.ChunkedArray) else dps
    offsets = np.asarray(arr.offsets)
    lengths = np.diff(offsets)
    flat = arr.values.slice(offsets[0], offsets[-1] - offsets[0]) if len(arr) else arr.values.slice(0, 0)
    rows = np.repeat(np.arange(len(arr), dtype=np.int64), lengths)
    return flat, rows


STOCK_SALT = np.uint64(0xD6E8FEB86659FD93)  # the stock is mixed apart from datapoint ids (see below)


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
        h = splitmix64(sums + stock_mix * np.uint64(0x9E3779B97F4A7C15) + counts)
    return h.view(np.int64)


def _reduce_sum(out: np.ndarray, values: np.ndarray, rows: np.ndarray) -> None:
    """Sum ``values`` into ``out[rows]`` for non-decreasing ``rows`` (reduceat: no Python loop)."""
    if not len(rows):
        return
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    with np.errstate(over="ignore"):
        out[rows[starts]] = np.add.reduceat(values, starts)


def build_states(alerts: pa.Table, policy: T1PolicyConfig, access: list[str], history: pa.Table | None = None) -> pa.Table:
    """One state per alert row: policy + data rights applied to its datapoints, then hashed."""
    n = alerts.num_rows
    flat, rows = _flat(alerts.column("dps"))
    if history is not None and history.num_rows:
        flat, rows = _with_history(alerts, flat, rows, history)
    alert_mjd = alerts.column("mjd").to_numpy(zero_copy_only=False)
    mjd = pc.fill_null(flat.field("mjd"), np.inf).to_numpy(zero_copy_only=False)
    kind = flat.field("kind").to_numpy(zero_copy_only=False)
    flags = pc.fill_null(flat.field("flags"), 0).to_numpy(zero_copy_only=False)
    keep = mjd <= alert_mjd[rows] + TIME_EPS  # no look-ahead
    keep &= np.isin(kind, [KINDS[k] for k in policy.kinds])
    if policy.exclude_flags:
        keep &= (flags & policy.exclude_flags) == 0
    if policy.exclude_bands:
        keep &= ~np.asarray(pc.is_in(flat.field("band"), value_set=pa.array(policy.exclude_bands)).fill_null(False))
    if policy.min_rb is not None:
        rb = pc.fill_null(pc.cast(flat.field("rb"), pa.float64()), np.inf).to_numpy(zero_copy_only=False)
        keep &= (kind != DETECTION) | (rb >= policy.min_rb)
    survey = np.asarray(alerts.column("survey").to_numpy(zero_copy_only=False))[rows]
    pid = pc.cast(flat.field("programid"), pa.float64()).to_numpy(zero_copy_only=False)
    keep &= access_mask(survey, pid, access)

    idx = np.flatnonzero(keep)
    kept_rows = rows[idx]
    kept = flat.take(pa.array(idx))
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(kept_rows, minlength=n), out=offsets[1:])
    dps = pa.ListArray.from_arrays(pa.array(offsets), kept)
    stock = alerts.column("stock").to_numpy(zero_copy_only=False)
    sid = state_ids(stock, kept.field("dp_id").to_numpy(zero_copy_only=False), kept_rows, n)
    cols = {
        "state_id": pa.array(sid),
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


def _with_history(alerts: pa.Table, flat: pa.StructArray, rows: np.ndarray, history: pa.Table) -> tuple[pa.StructArray, np.ndarray]:
    """Add each object's archived datapoints (``history``: flat, ``stock`` + DATAPOINT columns, and
    ``trigger``: the copy from the alert this datapoint triggered) to its rows.

    A join by object done with sorted arrays: history sorted by stock, each alert row finds its
    object's block with ``searchsorted``. A datapoint listed in several packets keeps one copy, chosen
    the same way whatever the partitioning: the copy from its own alert (that alert's time is
    authoritative; some rewritten packets carry other times in their history), then this packet's,
    then the latest. The look-ahead cut is applied afterwards, on the chosen times.
    """
    h_stock = history.column("stock").to_numpy(zero_copy_only=False)
    h_ids = history.column("dp_id").to_numpy(zero_copy_only=False)
    h_mjd = pc.fill_null(history.column("mjd"), np.inf).to_numpy(zero_copy_only=False)
    h_trigger = history.column("trigger").to_numpy(zero_copy_only=False) if "trigger" in history.column_names else np.zeros(len(h_ids), bool)
    # one copy per (object, datapoint) before the join, so each alert row gets its object's distinct
    # datapoints rather than every packet's copy of them: the trigger copy, else the latest
    order = order_by((h_stock, "ascending"), (h_ids, "ascending"), (h_trigger, "descending"), (h_mjd, "descending"))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (h_stock[order][1:] != h_stock[order][:-1]) | (h_ids[order][1:] != h_ids[order][:-1])
    order = order[first]
    h_stock = h_stock[order]
    a_stock = alerts.column("stock").to_numpy(zero_copy_only=False)
    lo = np.searchsorted(h_stock, a_stock, "left")
    hi = np.searchsorted(h_stock, a_stock, "right")
    counts = hi - lo
    extra_rows = np.repeat(np.arange(len(a_stock), dtype=np.int64), counts)
    extra = order[(np.repeat(lo - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(counts.sum())).astype(np.int64)]  # history rows
    # candidates: the packets' copies, then the objects' copies; chosen on numpy columns, and only the
    # chosen ones are gathered from the two sources (no concatenated struct of every candidate)
    all_rows = np.concatenate([rows, extra_rows])
    p_ids = flat.field("dp_id").to_numpy(zero_copy_only=False)
    ids = np.concatenate([p_ids, h_ids[extra]])
    mjd = np.concatenate([pc.fill_null(flat.field("mjd"), np.inf).to_numpy(zero_copy_only=False), h_mjd[extra]])
    own = p_ids == alerts.column("alert_id").to_numpy(zero_copy_only=False)[rows]
    prio = np.concatenate([np.where(own, 0, 1), np.where(h_trigger[extra], 0, 2)])
    by = order_by((all_rows, "ascending"), (ids, "ascending"), (prio, "ascending"), (mjd, "descending"))
    rep = np.zeros(len(ids), dtype=bool)
    rep[1:] = (all_rows[by][1:] == all_rows[by][:-1]) & (ids[by][1:] == ids[by][:-1])
    sel = by[~rep]
    final = sel[order_by((all_rows[sel], "ascending"), (mjd[sel], "ascending"), (ids[sel], "ascending"))]  # time order within each row
    # where each chosen copy lives: row i of the packets' datapoints, or len(rows) + row j of history
    src = final.copy()
    from_history = final >= len(rows)
    src[from_history] = len(rows) + extra[final[from_history] - len(rows)]
    h_struct = pa.StructArray.from_arrays([history.column(f.name).combine_chunks() for f in DATAPOINT], fields=list(DATAPOINT))
    both = pa.chunked_array([flat.cast(DATAPOINT), h_struct], type=h_struct.type)
    return both.take(pa.array(src)).combine_chunks(), all_rows[final]


__all__ = ["T1Policy", "T1PolicyConfig", "build_states", "state_ids", "access_mask", "alert_access", "STATE_COLUMNS"]
