"""What every stored result says about where it came from: T2 provenance columns and journal rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..keys import ID_TYPE, id_column, id_values, t2_keys
from ..tiers.base import T2PointUnit, T2StateUnit


def with_provenance(out: pa.Table, states: pa.Table, unit: T2StateUnit, run_id: str) -> pa.Table:
    sid = states.column("state_id")
    prov = {"state_id": sid, "stock": states.column("stock"), "alert_id": states.column("alert_id")}
    return _with(prov, out, unit, id_values(sid), run_id)


def with_point_provenance(out: pa.Table, points: pa.Table, ids: np.ndarray, stock: np.ndarray, unit: T2PointUnit, run_id: str) -> pa.Table:
    """A T2PointUnit's rows: the datapoint's content id (``point_id``), its ``dp_id``, the object
    whose state brought it first, and the unit's provenance."""
    prov = {"point_id": id_column(ids), "dp_id": points.column("dp_id"), "stock": pa.array(stock, pa.int64())}
    return _with(prov, out, unit, ids, run_id)


def _with(prov: dict, out: pa.Table, unit: T2StateUnit | T2PointUnit, ids: np.ndarray, run_id: str) -> pa.Table:
    n = out.num_rows
    prov = {
        **prov,
        "unit": pa.array([unit.name()] * n),
        "unit_version": pa.array([str(unit.version)] * n),
        "config_hash": pa.array([unit.config_hash] * n),
        "t2_key": t2_keys(unit.identity.key, ids),  # 128 bits of (unit identity, content id)
        "run_id": pa.array([run_id] * n),
        "code": out.column("code").cast(pa.int32()) if "code" in out.column_names else pa.array(np.zeros(n, dtype=np.int32)),
    }
    body = {c: out.column(c) for c in out.column_names if c not in prov}
    return pa.table({**prov, **body})


def journal_rows(stock: pa.ChunkedArray | pa.Array, run_id: str, tier: int, channel_or_unit: str, action: str, alert_id=None, state_id=None) -> pa.Table:
    n = len(stock)
    return pa.table(
        {
            "stock": stock,
            "run_id": pa.array([run_id] * n),
            "tier": pa.array(np.full(n, tier, dtype=np.int8)),
            "channel": pa.array([channel_or_unit if tier != 2 else None] * n, pa.string()),
            "unit": pa.array([channel_or_unit if tier == 2 else None] * n, pa.string()),
            "action": pa.array([action] * n),
            "alert_id": alert_id if alert_id is not None else pa.nulls(n, pa.int64()),
            "state_id": state_id if state_id is not None else pa.nulls(n, ID_TYPE),
        }
    )
