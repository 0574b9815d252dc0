"""A channel's T3 selection: each object's latest state, joined with its latest T2 results.

The join is by 128-bit state content id (``keys.state_ids``): a T2 row joins a state only if it was
computed from the same datapoint values; one computed from other values (even with the same datapoint
ids) has another id and is refused, and so is a key column that is not a content id at all."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ..io.arrays import lookup, order_by
from ..io.stores import PROVENANCE, ResultStore
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
        if res is None:
            continue
        body = [c for c in res.column_names if c not in PROVENANCE or c == "code"]
        sel = left_join(sel, res.select(["state_id", *body]), prefix=f"{unit.name()}__", label=lambda col, u=unit: u.label(col, u.config))
    return sel


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
