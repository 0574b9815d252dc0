"""T2LightCurveSummary: counts, time span and brightest / latest magnitude of each state (like AMPEL's)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from ...io.layout import DETECTION, UPPER_LIMIT
from ..base import T2StateUnit, UnitConfig
from ..columns import history, per_row


class LightCurveSummaryConfig(UnitConfig):
    bands: list[str] = Field(default_factory=list, description="count detections in these bands too (e.g. ['g', 'r'])")


class T2LightCurveSummary(T2StateUnit):
    """Cheap per-state summary, vectorised over the whole batch of states."""

    Config = LightCurveSummaryConfig
    column_labels = {
        "ndet": ("Detections", ""),
        "nupper": ("Upper limits", ""),
        "first_mjd": ("First detection", "MJD"),
        "last_mjd": ("Last detection", "MJD"),
        "duration": ("Detected over", "d"),
        "peak_mag": ("Peak magnitude", "mag"),
        "latest_mag": ("Latest magnitude", "mag"),
        "ndet_{band}": ("Detections in {band}", ""),
    }

    def process(self, states: pa.Table, inputs=None) -> pa.Table:
        n = states.num_rows
        kind, rows, _ = history(states, "kind")
        mjd, _, _ = history(states, "mjd")
        mag, _, _ = history(states, "mag")
        det = (kind == DETECTION) & np.isfinite(mag)
        r, t, m = rows[det], mjd[det], mag[det]
        ndet = per_row(t, r, n, "count")
        first = per_row(t, r, n, "min")
        last = per_row(t, r, n, "max")
        brightest = per_row(m, r, n, "min")
        # latest magnitude: the detection with the largest time in each row (rows are time-ordered)
        latest = np.full(n, np.nan)
        if len(r):
            ends = np.flatnonzero(np.r_[r[1:] != r[:-1], True])
            latest[r[ends]] = m[ends]
        cols = {
            "ndet": pa.array(ndet),
            "nupper": pa.array(np.bincount(rows[kind == UPPER_LIMIT], minlength=n)),
            "first_mjd": pa.array(first),
            "last_mjd": pa.array(last),
            "duration": pa.array(last - first),
            "peak_mag": pa.array(brightest),
            "latest_mag": pa.array(latest),
        }
        if self.config.bands:
            band, _, _ = history(states, "band")
            bdet = band[det]
            for b in self.config.bands:
                cols[f"ndet_{b}"] = pa.array(np.bincount(r[bdet == b], minlength=n))
        cols["code"] = pa.array(np.where(ndet > 0, 0, 1).astype(np.int32))
        return pa.table(cols)
