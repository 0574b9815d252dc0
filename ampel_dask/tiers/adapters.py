"""The slow path, for units written one alert (or one state) at a time, AMPEL style.

A class deriving from :class:`PerAlertFilter` implements ``process(alert) -> bool | None`` exactly like
an AMPEL ``AbsAlertFilter``: ``alert.datapoints`` is a list of dicts with ZTF-style keys (``candid``,
``jd``, ``fid``, ``magpsf``, ``sigmapsf``, ``isdiffpos``, ``rb``, ... the latest first) and
``alert.stock`` / ``alert.id`` identify it. It runs a Python loop over the batch: fine for porting and
prototyping, tens to hundreds of times slower than a vectorised :class:`~.base.T0Filter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..io.layout import DETECTION, MJD_JD_OFFSET
from .base import T0Filter, T2StateUnit, Verdict

FID = {"g": 1, "r": 2, "i": 3}


@dataclass
class AlertView:
    """What an AMPEL filter sees: id, stock, and datapoints (latest first), as plain dicts."""

    id: int
    stock: int
    datapoints: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def get_values(self, key: str, filters: Any = None) -> list[Any]:
        return [dp[key] for dp in self.datapoints if dp.get(key) is not None]


def _history_point(dp: dict) -> dict:
    det = dp["kind"] == DETECTION
    return {
        "candid": dp["dp_id"] if det else None,
        "jd": dp["mjd"] + MJD_JD_OFFSET if dp["mjd"] is not None else None,
        "mjd": dp["mjd"],
        "fid": FID.get(dp["band"], dp["band"]),
        "band": dp["band"],
        "magpsf": dp["mag"] if det else None,
        "sigmapsf": dp["mag_err"] if det else None,
        "diffmaglim": dp["maglim"],
        "flux": dp["flux"],
        "flux_err": dp["flux_err"],
        "isdiffpos": None if not det else ("f" if (dp["flags"] or 0) & 2 else "t"),
        "programid": dp["programid"],
        "rb": dp["rb"],
        "kind": dp["kind"],
    }


def alert_views(alerts: pa.Table) -> list[AlertView]:
    """Row-by-row dict views of a batch (the conversion itself is the slow part of this path)."""
    views = []
    for row in alerts.to_pylist():
        dps = row.pop("dps", None) or []
        latest = dict(row)
        latest["candid"] = row["alert_id"]
        if row.get("mjd") is not None:
            latest["jd"] = row["mjd"] + MJD_JD_OFFSET
        if isinstance(row.get("isdiffpos"), bool):
            latest["isdiffpos"] = "t" if row["isdiffpos"] else "f"
        others = [_history_point(dp) for dp in reversed(dps) if dp["dp_id"] != row["alert_id"]]
        views.append(AlertView(row["alert_id"], row["stock"], [latest, *others], extra={"survey": row.get("survey")}))
    return views


class PerAlertFilter(T0Filter):
    """Base for AMPEL-style filters: override ``process(alert: AlertView) -> bool | int | None``."""

    def process(self, alert: AlertView) -> bool | int | None:
        raise NotImplementedError

    def apply(self, alerts: pa.Table) -> Verdict:
        mask = np.fromiter((bool(self.process(a)) for a in alert_views(alerts)), dtype=bool, count=alerts.num_rows)
        return Verdict.from_mask(mask, f"{self.name()} rejected")


class PerStateUnit(T2StateUnit):
    """Base for T2 units written per state: override ``compute(state: dict) -> dict`` (slow path).

    ``state`` has the state's columns and ``dps``: its datapoints as a list of dicts, time-ordered.
    """

    def compute(self, state: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> list[dict]:
        return [self.compute(s) for s in states.to_pylist()]
