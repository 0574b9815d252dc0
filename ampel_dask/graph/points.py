"""T2 units per datapoint (``T2PointUnit``) inside a T2 stage: the distinct datapoints of the stage's
states, keyed by (unit identity, datapoint content id), computed once and never again.

A datapoint is in every later state of its object, and in the states of every channel that reaches
it; its result is computed the first time and found in the store after. Its key is its content
(``keys.point_ids``: every field), so a copy whose values differ from another's (a packet that carried
a re-processed measurement) is a datapoint of its own.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ..io.arrays import contains, first_rows
from ..io.stores import ResultStore
from ..keys import datapoint_lanes, point_ids
from ..tiers.base import T2PointUnit
from .provenance import journal_rows, with_point_provenance

log = logging.getLogger("ampel_dask")


def flat_points(states: pa.Table) -> tuple[pa.StructArray, np.ndarray, np.ndarray]:
    """Every datapoint of the states, flat: the datapoints, their object, their content ids."""
    dps = states.column("dps")
    arr = dps.combine_chunks() if isinstance(dps, pa.ChunkedArray) else dps
    offsets = np.asarray(arr.offsets)
    flat = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    rows = np.repeat(np.arange(len(arr), dtype=np.int64), np.diff(offsets))
    stock = states.column("stock").to_numpy(zero_copy_only=False)[rows]
    return flat, stock, point_ids(datapoint_lanes(flat))


def run_point_unit(store: ResultStore, unit: T2PointUnit, states: pa.Table, key: str, run_id: str) -> tuple[dict, pa.Table | None]:
    """The unit over the states' distinct datapoints that have no result yet; returns its counts
    (``points``: distinct datapoints, ``computed``, ``reused``, ``failed``) and journal rows."""
    ukey = unit.identity.key
    flat, stock, ids = flat_points(states)
    first = first_rows(ids)  # each datapoint content once
    todo = ~contains(store.done_point_ids(unit.name(), ukey), ids[first])
    c = {"points": len(first), "computed": int(todo.sum()), "reused": int((~todo).sum()), "failed": 0}
    if not todo.any():
        return c, None
    pick = first[todo]
    points = pa.table({f.name: flat.field(f.name).take(pa.array(pick)) for f in flat.type})
    try:
        out = unit.process(points)
        out = out if isinstance(out, pa.Table) else pa.Table.from_pylist(out)
        if out.num_rows != points.num_rows:
            raise ValueError(f"{unit.name()} returned {out.num_rows} rows for {points.num_rows} datapoints")
    except Exception as exc:  # reported, not stored: the next run retries them
        log.exception("T2 unit %s failed on %d datapoints", unit.name(), points.num_rows)
        c.update(computed=0, failed=points.num_rows, error=f"{type(exc).__name__}: {exc}")
        return c, None
    store.write_t2_points(unit.name(), ukey, key, with_point_provenance(out, points, ids[pick], stock[pick], unit, run_id))
    return c, journal_rows(pa.array(stock[pick]), run_id, 2, unit.name(), "computed:point")
