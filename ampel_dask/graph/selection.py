"""A channel's T3 selection: each object's latest state, joined with its latest T2 results.

The join is by 128-bit state content id (``keys.state_ids``): a T2 row joins a state only if it was
computed from the same datapoint values; one computed from other values (even with the same datapoint
ids) has another id and is refused, and so is a key column that is not a content id at all.

A state whose T2 unit failed and was recorded (``on_error: record``) is in the selection like any
other, with the unit's body columns null and ``<Unit>__code`` = -1 (``UNIT_FAILED``: codes a unit sets
itself are >= 0); a selection that holds such states also has ``<Unit>__failure``, the error (null for
the others). Without failures the selection is what it always was.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ..io.arrays import contains, lookup, order_by, sorted_unique
from ..io.stores import FAILURE, PROVENANCE, ResultStore
from ..keys import id_values
from ..tiers.base import T2PointUnit
from ..tiers.labels import with_label
from .plan import ChannelPlan


def selection(store: ResultStore, plan: ChannelPlan, state_keys: list[str]) -> pa.Table | None:
    """The channel's population: each object's latest state, with the latest T2 results as columns;
    without the states' datapoints when none of the channel's T3 units reads them."""
    sel = latest_states(store, plan.name, state_keys, by_set=plan.history, dps=any(u.reads_dps for u in plan.t3))
    if sel is None:
        return None
    sid = id_values(sel.column("state_id"))
    for unit in plan.t2:
        if isinstance(unit, T2PointUnit):  # per datapoint, not per state: read with store.read_t2_points
            continue
        res = store.read_t2(unit.name(), unit.identity.key, sid)
        pieces = []
        if res is not None:
            body = [c for c in res.column_names if c not in PROVENANCE or c == "code"]
            pieces.append(res.select(["state_id", *body]))
        have = sorted_unique(id_values(res.column("state_id"))) if res is not None else sid[:0]
        open_ = sid[~contains(have, sid)]  # a failure recorded before a later success is no failure
        fails = store.read_t2_failures(unit.name(), unit.identity.key, open_) if len(open_) else None
        if fails is not None and fails.num_rows:
            pieces.append(fails.select(["state_id", "code", FAILURE]))
        if pieces:
            right = pa.concat_tables(pieces, promote_options="default") if len(pieces) > 1 else pieces[0]
            sel = left_join(sel, right, prefix=f"{unit.name()}__", label=lambda col, u=unit: _label(u, col))
    return sel


def _latest(stock: np.ndarray, mjd: np.ndarray, alert: np.ndarray) -> np.ndarray:
    """Row of each object's latest state (latest time, then alert id; the first such row on ties), in
    the order of ``stock``: the selection's order, so that its light curves are gathered once."""
    order = order_by((stock, "ascending"), (mjd, "descending"), (alert, "descending")).astype(np.int64)
    return order[np.r_[True, stock[order][1:] != stock[order][:-1]]]


def latest_states(store: ResultStore, channel: str, keys: list[str], by_set: bool = False, dps: bool = True) -> pa.Table | None:
    """Each object's latest state among the state sets ``keys`` (``dps``: with its datapoints).

    ``by_set``: found from three small columns of every set first, then each set read whole once for
    its chosen rows only. For a history channel, whose states hold each object's light curve up to every
    one of its alerts: reading them all at once to keep one per object took 7 s and ~2.4 GB of one
    worker on 1 M replicated LSST alerts (7.9 GB on 3 M)."""
    if not by_set:
        states = store.read_states(channel, keys, dps=dps)
        if states is None or states.num_rows == 0:
            return None
        first = _latest(*(states.column(c).to_numpy() for c in ("stock", "mjd", "alert_id")))
        return states.take(pa.array(first))
    light = [(k, t) for k in keys if (t := store.read_states(channel, [k], columns=["stock", "mjd", "alert_id"])) is not None and t.num_rows]
    if not light:
        return None
    cols = {c: np.concatenate([t.column(c).to_numpy() for _, t in light]) for c in ("stock", "mjd", "alert_id")}
    first = _latest(cols["stock"], cols["mjd"], cols["alert_id"])
    which = np.repeat(np.arange(len(light)), [t.num_rows for _, t in light])[first]  # the set of each chosen row
    offsets = np.cumsum([0, *(t.num_rows for _, t in light)])
    pieces, placed = [], []
    for i in np.unique(which):
        mine = np.flatnonzero(which == i)
        whole = store.read_states(channel, [light[i][0]], dps=dps)
        pieces.append(whole.take(pa.array(first[mine] - offsets[i])))
        placed.append(mine)
    sel = pa.concat_tables(pieces, promote_options="default")
    at = np.empty(len(first), dtype=np.int64)
    at[np.concatenate(placed)] = np.arange(len(first))
    return sel.take(pa.array(at))  # back in the order of stock


def _label(unit, column: str) -> tuple[str, str]:
    """A T2 column's (label, unit); the framework's ``failure`` column is labelled here, not by the unit."""
    return ("Unit failure", "") if column == FAILURE else unit.label(column, unit.config)


def left_join(left: pa.Table, right: pa.Table, prefix: str, label: Callable[[str], tuple[str, str]] | None = None) -> pa.Table:
    """Add ``right``'s columns (one row per state_id) to ``left`` by state content id; nulls where
    ``right`` has no row with the same content id. Both sides must hold 128-bit content ids.
    ``label(column)``: the (label, unit) each added column carries in its field metadata (reports show it).

    Done with sorted ids and ``take`` because Arrow's hash join cannot carry list columns (dps).
    """
    at = lookup(id_values(right.column("state_id")), id_values(left.column("state_id")))
    found = at >= 0
    idx = pa.array(np.where(found, at, 0), mask=~found)
    for name in right.column_names:
        if name != "state_id":
            col = right.column(name).take(idx)
            field = pa.field(prefix + name, col.type)
            left = left.append_column(with_label(field, *label(name)) if label else field, col)
    return left
