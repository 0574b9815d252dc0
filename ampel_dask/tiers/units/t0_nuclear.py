"""T0 filter for nuclear transients (TDE-like flares in galaxy centres): AMPEL's ZTF NuclearFilter, vectorised.

The cuts and their order follow ampel-nuclear's ``NuclearFilter`` (its config names are kept, so AMPEL
channel configs such as TDE_RANKING's work as they are): the nearest PS1 source is a galaxy (``sgscore1``)
with sane photometry and lies close (``distpsnr1``), no bright PS1 star is near, the packet has enough
positive detections, the field is not crowded and not in the Galactic plane, the detections are not a
mover nor separated by long gaps, the flare is bright enough over its reference source, and the mean
position of the detections in g or r lies within ``maxDeltaRad`` of the reference-image source (the
host nucleus: ``ranr``/``decnr``, the source ``distnr`` measures to).

Where it differs, because the archive keeps every candidate field for the triggering detection only
(a packet's earlier detections keep time, band, magnitude, position, rb and sign):
- AMPEL's per-detection quality cuts (``distnr > 0``, ``nbad <= 0``, ``fwhm < 5``, ``elong < 1.3``,
  ``|magdiff| < 0.3``, positive) are applied to the triggering detection (reason ``trigger``);
  the counts, rb, time gaps, brightest magnitude and mean positions use all positive detections of the
  packet (trigger and ``prv_candidates``);
- the flux increase is the trigger's ``magpsf - magnr``; the host offset is the mean of the detections'
  positions against the trigger's ``ranr``/``decnr`` (on the sky, RA scaled by cos Dec; AMPEL averages
  each detection's own offset without the cos Dec factor), and only the mean (AMPEL also tries the
  median and an S/N-weighted mean);
- the Gaia veto needs a catalog service AMPEL queries; there is none here, so it is not applied.

Rubin/LSST: the normalised LSST alerts carry no field that locates a host (the diaObject is not kept;
AMPEL's TDEmocracy locates Rubin hosts by catalog match at T2), so this filter is ZTF-only: a workflow
that selects LSST alerts for it fails at planning, naming the missing columns.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ...io.layout import DETECTION, FLAG_NEGATIVE
from ..base import T0Filter, UnitConfig, Verdict
from ..columns import floats, num
from ..sky import galactic_latitude

# AMPEL's per-detection "default filter", applied to the trigger: (column, test)
TRIGGER_CUTS = (("distnr", lambda x: x > 0), ("nbad", lambda x: x <= 0), ("fwhm", lambda x: x < 5),
                ("elong", lambda x: x < 1.3), ("magdiff", lambda x: (x > -0.3) & (x < 0.3)))  # fmt: skip
PS1_BANDS = ("g", "r", "i", "z")


class NuclearFilterConfig(UnitConfig):
    """ampel-nuclear's NuclearFilter fields and defaults (camelCase as in AMPEL); the Gaia veto is not offered."""

    maxDeltaRad: float = Field(0.5, description="max offset [arcsec] of the detections' mean position from the reference source")
    minDeltaRad: float = Field(0.0, description="min offset [arcsec] (exclusive)")
    maxSgscore: float = Field(0.3, description="max star-galaxy score of the nearest PS1 source")
    minSafeSgscore: float = Field(0.5, description="a 2nd PS1 source within closePS1dist with a score below this overrides a high sgscore1")
    minDeltaJD: float = Field(0.01, description="detections spanning less (largest gap) are a potential mover [days]")
    maxDeltaJD: float = Field(10.0, description="detections whose smallest gap is larger are rejected [days]")
    minDetections: int = Field(3, description="positive detections in the packet (and per band for the offset)")
    diffmagLimit: float = Field(20.0, description="the brightest detection must be brighter than this [mag]")
    maxDeltaMag: float = Field(2.5, description="max magpsf - magnr of the trigger (the flare vs. its reference source)")
    minRealBogusScore: float = Field(0.3, description="min of the best rb among the positive detections")
    maxDistPS1source: float = Field(1.0, description="max distance to the nearest PS1 source [arcsec]")
    closePS1dist: float = Field(0.5, description="distance within which the 2nd PS1 source enters the checks [arcsec]")
    brightRefMag: float = Field(12.0, description="reject a reference source brighter than this [mag]")
    brightPS1gMag: float = Field(12.0, description="reject a PS1 source brighter than this in g [mag]")
    brightPS1rMag: float = Field(12.0, description="... in r")
    brightPS1iMag: float = Field(12.0, description="... in i")
    brightPS1zMag: float = Field(12.0, description="... in z")
    brightObjDist: float = Field(15.0, description="2nd/3rd PS1 sources within this are checked for brightness [arcsec]")
    removeNegative: bool = Field(True, description="negative detections do not count (and a negative trigger is rejected)")
    minGalLat: float = Field(5.0, description="min |galactic latitude| [deg]")
    maxPS1matches: int = Field(100, description="max PS1 sources within 30\" (nmtchps): crowded fields")


class NuclearFilter(T0Filter):
    """Nuclear transients in galaxies (AMPEL's ZTF NuclearFilter, vectorised; ZTF alerts only).

    Reasons, in AMPEL's order: noSgscore, sgscore, sgscore2, ps1Photometry, ps1TooFar, brightPS1,
    brightPS1_2, brightPS1_3, trigger, nDet, brightRef, nmtchps, galPlane, rb, duplicates, mover, gap,
    faint, fluxIncrease, noOffset, offset.
    """

    Config = NuclearFilterConfig
    version = "1"
    libraries = ("numpy",)
    _ps1 = [f"s{b}mag{k}" for k in (1, 2, 3) for b in PS1_BANDS]
    columns: ClassVar = ["sgscore1", "sgscore2", "distpsnr1", "distpsnr2", "distpsnr3", *_ps1, "distnr", "nbad", "fwhm",
                         "elong", "magdiff", "magnr", "magpsf", "ranr", "decnr", "nmtchps", "isdiffpos", "dps"]  # fmt: skip
    required_columns: ClassVar = ("sgscore1", "distpsnr1", "distnr", "ranr", "decnr", "magnr", "nmtchps")

    def apply(self, alerts: pa.Table) -> Verdict:
        c = self.config
        n = alerts.num_rows
        v = Verdict.accept_all(n)
        col = {k: num(alerts, k) for k in set(self.columns) - {"isdiffpos", "dps"} | {"ra", "dec"}}
        sg1, sg2 = col["sgscore1"], col["sgscore2"]
        d1, d2, d3 = np.abs(col["distpsnr1"]), np.abs(col["distpsnr2"]), np.abs(col["distpsnr3"])
        close2 = d2 < c.closePS1dist
        v.reject(np.isnan(sg1), "noSgscore")
        v.reject((sg1 > c.maxSgscore) & ~((sg2 < c.minSafeSgscore) & close2), "sgscore")
        v.reject((sg2 > c.maxSgscore) & close2, "sgscore2")
        v.reject((col["srmag1"] < 0) & ~((col["srmag2"] > 0) & close2), "ps1Photometry")
        v.reject(~(d1 <= c.maxDistPS1source), "ps1TooFar")  # no PS1 source (or no distance): too far
        limit = {"g": c.brightPS1gMag, "r": c.brightPS1rMag, "i": c.brightPS1iMag, "z": c.brightPS1zMag}
        for b in PS1_BANDS:  # AMPEL's loop: per band, the 1st, 2nd, 3rd source
            v.reject(np.abs(col[f"s{b}mag1"]) < limit[b], "brightPS1")
            v.reject((np.abs(col[f"s{b}mag2"]) < limit[b]) & (d2 < c.brightObjDist), "brightPS1_2")
            v.reject((np.abs(col[f"s{b}mag3"]) < limit[b]) & (d3 < c.brightObjDist), "brightPS1_3")
        good = np.ones(n, dtype=bool)
        for name, test in TRIGGER_CUTS:
            with np.errstate(invalid="ignore"):
                good &= test(col[name])
        if c.removeNegative:
            good &= np.asarray(alerts.column("isdiffpos").fill_null(True)) if "isdiffpos" in alerts.column_names else True
        v.reject(~good, "trigger")
        h = _PositiveDetections(alerts, c.removeNegative)
        v.reject(h.count < c.minDetections, "nDet")
        magnr = col["magnr"]
        v.reject((magnr > 0) & (magnr < c.brightRefMag), "brightRef")
        v.reject(col["nmtchps"] > c.maxPS1matches, "nmtchps")
        pending = v.accepted  # the sky math only where it can still matter
        b = np.full(n, 90.0)
        b[pending] = galactic_latitude(col["ra"][pending], col["dec"][pending])
        v.reject(np.abs(b) < c.minGalLat, "galPlane")
        v.reject(~(h.max_rb >= c.minRealBogusScore), "rb")
        v.reject(h.n_steps == 0, "duplicates")
        v.reject(h.max_step < c.minDeltaJD, "mover")
        v.reject(h.min_step > c.maxDeltaJD, "gap")
        v.reject(h.min_mag > c.diffmagLimit, "faint")
        v.reject(col["magpsf"] - magnr > c.maxDeltaMag, "fluxIncrease")
        offset = h.band_offsets(col["ranr"], col["decnr"], c.minDetections)  # (n, 2): g, r; NaN = too few
        v.reject(np.isnan(offset).all(axis=1), "noOffset")
        with np.errstate(invalid="ignore"):
            near = ((offset < c.maxDeltaRad) & (offset > c.minDeltaRad)).any(axis=1)
        v.reject(~near, "offset")
        return v


class _PositiveDetections:
    """The packet's positive detections, flattened: per-alert counts, best rb, time steps, brightest
    magnitude, and mean positions per band (all with numpy over the flat history)."""

    def __init__(self, alerts: pa.Table, positive_only: bool):
        n = alerts.num_rows
        dps = alerts.column("dps").combine_chunks()
        offsets = np.asarray(dps.offsets)
        values = dps.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
        keep = floats(values.field("kind")) == DETECTION
        if positive_only:
            keep &= (np.nan_to_num(floats(values.field("flags"))).astype(np.int64) & FLAG_NEGATIVE) == 0
        idx = np.flatnonzero(keep)
        self.n, self.rows = n, rows[idx]
        self._values, self._idx = values, idx
        mjd = self.field("mjd")
        self.count = np.bincount(self.rows, minlength=n)
        self.max_rb = self._reduce(self.field("rb"), np.fmax)
        self.min_mag = self._reduce(self.field("mag"), np.fmin)
        # consecutive time steps within an alert
        t_order = np.lexsort((mjd, self.rows))
        t, r = mjd[t_order], self.rows[t_order]
        same = r[1:] == r[:-1]
        step = (t[1:] - t[:-1])[same]
        step_row = r[1:][same]
        pos = step > 0
        self.n_steps = np.bincount(step_row[pos], minlength=n)
        self.max_step = _grouped(step[pos], step_row[pos], n, np.fmax)
        self.min_step = _grouped(step[pos], step_row[pos], n, np.fmin)

    def field(self, name: str) -> np.ndarray:
        """A datapoint field of the kept detections (float64, NaN for nulls; text for ``band``)."""
        x = self._values.field(name).take(pa.array(self._idx))
        if pa.types.is_string(x.type) or pa.types.is_large_string(x.type):
            return np.asarray(pc.fill_null(x, "").to_numpy(zero_copy_only=False), dtype=object)
        return floats(x)

    def _reduce(self, values: np.ndarray, ufunc) -> np.ndarray:
        return _grouped(values, self.rows, self.n, ufunc)

    def band_offsets(self, ranr: np.ndarray, decnr: np.ndarray, min_det: int) -> np.ndarray:
        """Offset [arcsec] of the mean detection position in g and in r from (ranr, decnr), in the tangent
        plane (RA differences wrapped and scaled by cos Dec); NaN where a band has fewer than ``min_det``."""
        band = self.field("band")
        ra, dec = self.field("ra"), self.field("dec")
        rows = self.rows
        out = np.full((self.n, 2), np.nan)
        cosd = np.cos(np.radians(decnr))
        for j, b in enumerate(("g", "r")):
            sel = (band == b) & np.isfinite(ra) & np.isfinite(dec)
            r = rows[sel]
            cnt = np.bincount(r, minlength=self.n)
            dra = (ra[sel] - ranr[r] + 180.0) % 360.0 - 180.0
            dx = np.bincount(r, weights=dra * cosd[r], minlength=self.n)
            dy = np.bincount(r, weights=dec[sel] - decnr[r], minlength=self.n)
            with np.errstate(invalid="ignore", divide="ignore"):
                off = 3600.0 * np.hypot(dx / cnt, dy / cnt)
            out[:, j] = np.where(cnt >= max(min_det, 1), off, np.nan)
        return out


def _grouped(values: np.ndarray, rows: np.ndarray, n: int, ufunc) -> np.ndarray:
    """``ufunc`` (np.fmax / np.fmin) of ``values`` per row (rows non-decreasing); NaN for empty rows."""
    out = np.full(n, np.nan)
    if not len(rows):
        return out
    order = np.argsort(rows, kind="stable")
    values, rows = values[order], rows[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    out[rows[starts]] = ufunc.reduceat(values, starts)
    return out




__all__ = ["NuclearFilter", "NuclearFilterConfig"]
