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
    """The channel's population: each object's latest state, with the latest T2 results as columns."""
    states = store.read_states(plan.name, state_keys)
    if states is None or states.num_rows == 0:
        return None
    stock = states.column("stock").to_numpy()
    mjd = states.column("mjd").to_numpy()
    alert = states.column("alert_id").to_numpy()
    order = order_by((stock, "ascending"), (mjd, "descending"), (alert, "descending"))
    first = order[np.r_[True, stock[order][1:] != stock[order][:-1]]]  # one row per object, by stock: the
    sel = states.take(pa.array(first))  # selection's order, so its light curves are gathered once
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
