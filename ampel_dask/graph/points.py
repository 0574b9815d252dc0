"""T2 units per datapoint (``T2PointUnit``) inside a T2 stage: the distinct datapoints of the stage's
states, keyed by (unit identity, datapoint content id), computed once and never again.

A datapoint is in every later state of its object, and in the states of every channel that reaches
it; its result is computed the first time and found in the store after. Its key is its content
(``keys.point_ids``: every field), so a copy whose values differ from another's (a packet that carried
a re-processed measurement) is a datapoint of its own.

A unit that raises fails the datapoints it was given, as a state unit fails its states
(``graph/failures.py``): with ``on_error: fail`` they are counted and the run fails; with ``record``
the failing datapoints are isolated by bisection and stored with their error apart from the results
(``write_t2_point_failures``), so that the next run retries them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..io.arrays import contains, first_rows, sorted_unique
from ..io.stores import FAILURE, UNIT_FAILED, ResultStore
from ..keys import datapoint_lanes, id_hex, key_of, point_ids
from ..tiers.base import T2PointUnit
from .failures import attempt, unit_output
from .provenance import journal_rows, with_point_provenance


def flat_points(states: pa.Table) -> tuple[pa.StructArray, np.ndarray, np.ndarray, np.ndarray]:
    """Every datapoint of the states, flat: the datapoints, their object, their content ids, and the
    row of the state each came from."""
    dps = states.column("dps")
    arr = dps.combine_chunks() if isinstance(dps, pa.ChunkedArray) else dps
    offsets = np.asarray(arr.offsets)
    flat = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    rows = np.repeat(np.arange(len(arr), dtype=np.int64), np.diff(offsets))
    stock = states.column("stock").to_numpy(zero_copy_only=False)[rows]
    return flat, stock, point_ids(datapoint_lanes(flat)), rows


def run_point_unit(store: ResultStore, unit: T2PointUnit, chans: list[tuple[str, pa.Table]], key: str, run_id: str,
                   policy: str = "fail") -> tuple[dict, list[pa.Table], list[dict]]:  # fmt: skip
    """The unit over the distinct datapoints of the channels' states that have no result yet. Returns
    its counts (``points``: distinct datapoints, ``computed``, ``reused``, ``failed``, ``recorded``),
    journal rows, and its failures (as ``graph/failures.py`` describes them, counted in datapoints)."""
    ukey, name = unit.identity.key, unit.name()
    states = pa.concat_tables([s for _, s in chans], promote_options="default") if len(chans) > 1 else chans[0][1]
    flat, stock, ids, state_row = flat_points(states)
    first = first_rows(ids)  # each datapoint content once
    todo = ~contains(store.done_point_ids(name, ukey), ids[first])
    c = {"points": len(first), "computed": 0, "reused": int((~todo).sum()), "failed": 0, "recorded": 0}
    if not todo.any():
        return c, [], []
    pick = first[todo]
    points = pa.table({f.name: flat.field(f.name).take(pa.array(pick)) for f in flat.type})

    def run(rows: np.ndarray) -> pa.Table:
        part = points if len(rows) == points.num_rows else points.take(pa.array(rows))
        return unit_output(unit.process(part), part.num_rows, name, "datapoints")

    ok, bad = attempt(run, points.num_rows, isolate=policy == "record")
    journal = []
    if ok:
        done = np.concatenate([r for r, _ in ok])
        out = pa.concat_tables([t for _, t in ok], promote_options="default") if len(ok) > 1 else ok[0][1]
        at = pick[done]
        # named by the stage; with failures beside, by its datapoints too (a retry never replaces it)
        file = key_of(key, sorted(id_hex(ids[at]))) if bad else key
        store.write_t2_points(name, ukey, file, with_point_provenance(out, points.take(pa.array(done)), ids[at], stock[at], unit, run_id))
        c["computed"] = len(done)
        journal.append(journal_rows(pa.array(stock[at]), run_id, 2, name, "computed:point"))
    fails, recorded = [], []
    bounds = np.cumsum([s.num_rows for _, s in chans])  # the channel of a state row
    for rows, error, trace in bad:
        at = pick[rows]
        hit = contains(sorted_unique(ids[at]), ids)  # every copy of the failed datapoints, in any channel's states
        where = np.unique(np.searchsorted(bounds, state_row[hit], side="right"))
        f = {"tier": "T2", "unit": name, "channels": list(dict.fromkeys(chans[i][0] for i in where)), "datapoints": len(rows), "policy": policy,
             "recorded": len(rows) if policy == "record" else 0, "error": error, "cause": None}  # fmt: skip
        fails.append(f | ({"traceback": trace} if trace else {}))
        c["failed"] += len(rows)
        c["recorded"] += f["recorded"]
        if policy == "record":
            body = pa.table({"code": pa.array(np.full(len(rows), UNIT_FAILED, dtype=np.int32)), FAILURE: pa.array([error] * len(rows), pa.string())})
            recorded.append(with_point_provenance(body, points.take(pa.array(rows)), ids[at], stock[at], unit, run_id))
        journal.append(journal_rows(pa.array(stock[at]), run_id, 2, name, "failed:point"))
    # this stage's recorded failures replace the ones it recorded before (none left: they go)
    store.write_t2_point_failures(name, ukey, key, pa.concat_tables(recorded) if recorded else pa.table({}))
    return c, journal, fails
