"""T0 infant-supernova filter: young, rising, real, not a star, not a solar-system object.

Young supernovae are the ones worth a TNS report and a spectrum the same night: first detected within a
few days of the alert, still brightening. The filter reads each alert's own history (``dps``; in a
channel, the framework gives it the channel's view: only the datapoints its data rights allow, as its
states will hold, see tiers/rights.py), and ZTF's
``jdstarthist`` (the survey's first detection at the position, which also counts detections that raised
no alert). Everything is computed on the flattened datapoints of the whole batch with list offsets: no
Python per alert.

Cuts, in order (the first failing one is the reason): ``negative`` (a negative difference), ``rb``,
``drb``, ``reliability`` (real-bogus scores; a score the alert does not carry rejects nothing: older
ZTF schemas, ELAsTiCC), ``solar system`` (a known solar-system object within ``min_sso_dist``, or a
Rubin source associated with an ssObject), ``star`` (the nearest PS1 source is a star: AMPEL's
DecentFilter rule), ``gaia star`` (AMPEL's Gaia veto, with a local catalog), ``inconsistent times``
(ZTF's first detection at the position, ``jdstarthist``, later than the alert itself: a rewritten or
simulated packet, such as some of Fink's test alerts), ``ndet``, ``age``,
``not rising`` (no band brightened from its first to its latest positive detection), ``no recent upper
limit`` (optional: the last non-detection before the first detection is too old or missing).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ...io.layout import DETECTION, MJD_JD_OFFSET, UPPER_LIMIT
from ..base import T0Filter, Verdict
from ..helpers.gaia import GaiaVetoConfig, gaia_veto
from ..columns import num, present
from ..states import TIME_EPS


class InfantSNFilterConfig(GaiaVetoConfig):
    max_age: float = Field(3.0, gt=0, description="days from the first detection to the alert")
    age_from: Literal["history", "jdstarthist", "both"] = Field(
        "both", description="first detection from the alert's history (the channel's view), ZTF's jdstarthist (where the alert has it, "
        "else the history), or the earlier of the two")  # fmt: skip
    min_ndet: int = Field(2, ge=1, description="detections the channel sees in the alert's history, the trigger included")
    min_rise: float = Field(0.0, ge=0, description="brightening [mag] from the first to the latest positive detection of one band that "
                                                   "must be exceeded in some band")  # fmt: skip
    max_nondet_gap: float | None = Field(None, gt=0, description="if set: require an upper limit at most this many days before the first "
                                                                 "detection (bounds the explosion time)")  # fmt: skip
    min_rb: float = Field(0.3, description="ZTF real-bogus score rb (alerts without one pass)")
    min_drb: float = Field(0.5, description="ZTF deep-learning real-bogus drb (alerts without one pass)")
    min_reliability: float = Field(0.0, description="Rubin reliability (alerts without one pass)")
    min_sso_dist: float = Field(12.0, ge=0, description="reject within this distance of a known solar-system object [arcsec] (ssdistnr)")
    max_sso_mag: float | None = Field(None, description="... only if that object is at least this bright (ssmagnr); None = any brightness")
    ps1_star_radius: float = Field(1.0, ge=0, description="a PS1 source this close (distpsnr1, arcsec) ...")
    ps1_star_threshold: float = Field(0.8, description="... with sgscore1 above this is a star")


class InfantSNFilter(T0Filter):
    """Young (first detection within ``max_age`` days), rising, real, not a star or solar-system object."""

    Config = InfantSNFilterConfig
    version = "1"
    columns: ClassVar[list[str]] = ["survey", "mjd", "ra", "dec", "isdiffpos", "rb", "drb", "reliability", "ssdistnr", "ssmagnr",
                                    "ssObjectId", "distpsnr1", "sgscore1", "jdstarthist", "dps"]  # fmt: skip

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self._gaia, self.config = gaia_veto(self.name(), self.config)

    def apply(self, alerts: pa.Table) -> Verdict:
        c = self.config
        n = alerts.num_rows
        v = Verdict.accept_all(n)
        positive = np.asarray(alerts.column("isdiffpos").fill_null(True)) if "isdiffpos" in alerts.column_names else np.ones(n, bool)
        v.reject(~positive, "negative")
        v.reject(num(alerts, "rb") < c.min_rb, "rb")  # NaN (no score) compares False: passes
        v.reject(num(alerts, "drb") < c.min_drb, "drb")
        v.reject(num(alerts, "reliability") < c.min_reliability, "reliability")
        sso_d, sso_m = num(alerts, "ssdistnr"), num(alerts, "ssmagnr")
        near_sso = (sso_d >= 0) & (sso_d < c.min_sso_dist)
        if c.max_sso_mag is not None:
            near_sso &= ~(sso_m > c.max_sso_mag)
        near_sso |= present(alerts, "ssObjectId") & (num(alerts, "ssObjectId") != 0)
        v.reject(near_sso, "solar system")
        d1, s1 = num(alerts, "distpsnr1"), num(alerts, "sgscore1")
        v.reject((d1 >= 0) & (d1 < c.ps1_star_radius) & (s1 > c.ps1_star_threshold), "star")
        if self._gaia is not None and v.accepted.any():
            pending = v.accepted
            star = np.zeros(n, dtype=bool)
            star[pending] = self._gaia.is_star(num(alerts, "ra")[pending], num(alerts, "dec")[pending])
            v.reject(star, "gaia star")
        # the survey's first detection after the alert itself: times that cannot be (rewritten or simulated packets)
        v.reject(num(alerts, "jdstarthist") - MJD_JD_OFFSET > num(alerts, "mjd") + TIME_EPS, "inconsistent times")
        h = self.history(alerts)
        v.reject(h["ndet"] < c.min_ndet, "ndet")
        v.reject(~(h["age"] <= c.max_age), "age")  # no detection at all: NaN age, rejected
        v.reject(~(h["rise"] > c.min_rise), "not rising")
        if c.max_nondet_gap is not None:
            v.reject(~(h["nondet_gap"] <= c.max_nondet_gap), "no recent upper limit")
        return v

    def history(self, alerts: pa.Table) -> dict[str, np.ndarray]:
        """Per alert, from its history (``dps``): ``ndet``, ``first`` detection time, ``age`` (days, after
        ``age_from``), ``rise`` (the largest brightening [mag] of a band from its first to its latest
        positive detection, in time order, a tie by datapoint id; NaN without two in one band) and
        ``nondet_gap`` (first detection minus the last upper limit before it; NaN without one)."""
        n = alerts.num_rows
        if "dps" not in alerts.column_names:
            raise ValueError(f"{self.name()} reads the alerts' histories: the batch has no dps column")
        arr = alerts.column("dps").combine_chunks()
        offsets = np.asarray(arr.offsets)
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
        dp = arr.values.slice(offsets[0], offsets[-1] - offsets[0]) if n else arr.values.slice(0, 0)
        alert_mjd = num(alerts, "mjd")

        def field(name: str) -> np.ndarray:
            return pc.fill_null(pc.cast(dp.field(name), pa.float64()), np.nan).to_numpy(zero_copy_only=False)

        mjd, flux, kind = field("mjd"), field("flux"), field("kind")
        band = pc.fill_null(pc.dictionary_encode(dp.field("band")).indices, -1).to_numpy(zero_copy_only=False)
        seen = mjd <= alert_mjd[rows] + TIME_EPS  # a packet's own datapoints are never later; kept for any input
        det = seen & (kind == DETECTION)
        ndet = np.bincount(rows[det], minlength=n)
        first = _per_row(np.fmin, mjd[det], rows[det], n)

        # rising: per (alert, band), the latest positive detection against the first one
        pos = np.flatnonzero(det & (flux > 0))
        dp_id = pc.fill_null(dp.field("dp_id"), 0).to_numpy(zero_copy_only=False)
        order = pos[np.lexsort((dp_id[pos], mjd[pos], band[pos], rows[pos]))]  # time order; a tie by datapoint id
        r, b, f = rows[order], band[order], flux[order]
        rise = np.full(n, np.nan)
        if len(order):
            start = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]) | (b[1:] != b[:-1])])
            end = np.r_[start[1:], len(order)] - 1
            multi = end > start
            rise = _per_row(np.fmax, 2.5 * np.log10(f[end[multi]] / f[start[multi]]), r[start[multi]], n)

        ul = seen & (kind == UPPER_LIMIT) & (mjd < first[rows])  # NaN first: no upper limit counts
        gap = first - _per_row(np.fmax, mjd[ul], rows[ul], n)
        return {"ndet": ndet, "first": first, "age": self._age(alerts, alert_mjd - first), "rise": rise, "nondet_gap": gap}

    def _age(self, alerts: pa.Table, from_history: np.ndarray) -> np.ndarray:
        mode = self.config.age_from
        if mode == "history":
            return from_history
        from_survey = num(alerts, "mjd") - (num(alerts, "jdstarthist") - MJD_JD_OFFSET)
        if mode == "jdstarthist":
            return np.where(np.isnan(from_survey), from_history, from_survey)
        return np.fmax(from_history, from_survey)  # the earlier first detection; NaN only where both are


def _per_row(ufunc: np.ufunc, values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """``ufunc.reduceat`` of values over runs of equal, non-decreasing ``rows``; NaN for rows without any."""
    out = np.full(n, np.nan)
    if len(rows):
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        out[rows[starts]] = ufunc.reduceat(values, starts)
    return out


__all__ = ["InfantSNFilter", "InfantSNFilterConfig"]
