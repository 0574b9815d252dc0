"""T0 filter for gravitational-wave counterparts: inside a sky map's credible region, first seen after the merger.

A position cut against a LIGO/Virgo/KAGRA sky map (flat HEALPix or multi-order, ``tiers/helpers/skymap``)
and a time cut on the packet's first detection (``first_det_mjd``, the ingest's summary of the packet's
history): both need no light curve, so they sit at T0, where they cut a night of alerts to the few in the
localisation before any state is built. ``T2GWCounterpart`` gives the passing objects their probability
density, credible level and distance check.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from ..base import T0Filter, Verdict
from ..columns import num
from ..helpers.skymap import SkyMapUnit, SkyMapUnitConfig


class SkyMapFilterConfig(SkyMapUnitConfig):
    max_credible_level: float = Field(0.9, gt=0, le=1, description="keep alerts inside this credible region (0.9: the 90% region)")


class SkyMapFilter(SkyMapUnit, T0Filter):
    """Alerts inside a sky map's credible region, first detected within a window after the merger.

    Keeps alerts inside the ``max_credible_level`` region whose packet's first detection lies in
    ``window_days`` after the merger (``event_mjd``, default the map's time). Reasons: ``window`` (first detection outside the window, or
    none), ``credible_level`` (outside the region, or no position)."""

    Config = SkyMapFilterConfig
    version = "1"
    libraries = ("numpy", "astropy", "cdshealpix")
    columns: ClassVar = ["ra", "dec", "first_det_mjd"]
    required_columns: ClassVar = ("ra", "dec", "first_det_mjd")

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self._pin_skymap()

    def apply(self, alerts: pa.Table) -> Verdict:
        v = Verdict.accept_all(alerts.num_rows)
        v.reject(~self.in_window(num(alerts, "first_det_mjd")), "window")
        pending = np.flatnonzero(v.accepted)  # the pixel lookup only for alerts still in the running
        m = self.skymap
        px = m.lookup(num(alerts, "ra")[pending], num(alerts, "dec")[pending])
        inside = np.zeros(alerts.num_rows, dtype=bool)
        inside[pending] = (px >= 0) & (m.credible[np.maximum(px, 0)] <= self.config.max_credible_level)
        v.reject(~inside, "credible_level")
        return v


__all__ = ["SkyMapFilter", "SkyMapFilterConfig"]
