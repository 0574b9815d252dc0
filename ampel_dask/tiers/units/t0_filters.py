"""Built-in T0 filters: AMPEL's ZTF DecentFilter (vectorised port), an LSST quality filter, expressions."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from ..base import T0Filter, UnitConfig, Verdict
from ..helpers.gaia import GaiaVetoConfig, gaia_veto
from ..columns import SUMMARY, detections, num, present
from ..expression import Expression, ExpressionError
from ..sky import galactic_latitude


class DecentFilterConfig(GaiaVetoConfig):
    """AMPEL's DecentFilter fields, unchanged (ampel.ztf.t0.DecentFilter), so AMPEL configs work as is."""

    # history
    min_ndet: int = Field(..., description="number of detections in the alert")
    min_tspan: float = Field(..., description="minimum duration of the detection history [days]")
    max_tspan: float = Field(..., description="maximum duration of the detection history [days]")
    min_archive_tspan: float = Field(0.0, description="minimum jdendhist - jdstarthist [days]")
    max_archive_tspan: float = Field(10**5.0, description="maximum jdendhist - jdstarthist [days]")
    # image quality
    min_drb: float = Field(0.0, description="deep-learning real-bogus score (skipped when 0 or absent)")
    min_rb: float = Field(..., description="real-bogus score")
    max_fwhm: float = Field(..., description="SExtractor FWHM [pix]")
    max_elong: float = Field(..., description="aimage / bimage")
    max_magdiff: float = Field(..., description="|magap - magpsf| [mag]")
    max_nbad: int = Field(..., description="bad pixels in a 5x5 stamp (AMPEL checks presence only)")
    # astro
    min_sso_dist: float = Field(..., description="distance to the nearest solar-system object [arcsec]")
    min_gal_lat: float = Field(..., description="minimum |galactic latitude| [deg]; negative disables")
    # PS1
    ps1_sgveto_rad: float = Field(..., description="max distance of the closest PS1 source for the star veto [arcsec]")
    ps1_sgveto_th: float = Field(..., description="sgscore1 above which that source is a star")
    ps1_confusion_rad: float = Field(..., description="reject if all three PS1 sources lie within this radius [arcsec]")
    ps1_confusion_sg_tol: float = Field(..., description="... and all their sgscores are within this of 0.5")


# AMPEL rejects an alert whose latest detection lacks any of these (in this order)
KEYS_TO_CHECK = ("fwhm", "elong", "magdiff", "nbad", "distpsnr1", "sgscore1", "distpsnr2", "sgscore2",
                 "distpsnr3", "sgscore3", "isdiffpos", "ra", "dec", "rb", "ssdistnr")  # fmt: skip


class DecentFilter(T0Filter):
    """General-purpose ZTF filter (AMPEL's DecentFilter), the same cuts in the same order, on whole batches.

    Reasons use AMPEL's log keys: nDet, tSpan, missing=<field>, isdiffpos, rb, drb, fwhm, elong, magdiff,
    archive_tspan, ssdistnr, galPlane, distpsnr1 (PS1 star), ps1Confusion, gaiaIsStar.
    """

    Config = DecentFilterConfig
    columns: ClassVar = [*KEYS_TO_CHECK, "drb", "jdstarthist", "jdendhist", *SUMMARY]

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self._gaia, self.config = gaia_veto(self.name(), self.config)

    def apply(self, alerts: pa.Table) -> Verdict:
        c = self.config
        n = alerts.num_rows
        v = Verdict.accept_all(n)
        ndet, first, last = detections(alerts)
        v.reject(ndet < c.min_ndet, "nDet")
        tspan = last - first
        v.reject(~((c.min_tspan <= tspan) & (tspan <= c.max_tspan)), "tSpan")
        col = {k: num(alerts, k) for k in {*KEYS_TO_CHECK, "drb", "jdstarthist", "jdendhist"} - {"isdiffpos"}}  # each column once
        isdiffpos = alerts.column("isdiffpos") if "isdiffpos" in alerts.column_names else pa.nulls(n, pa.bool_())
        for key in KEYS_TO_CHECK:
            missing = np.asarray(isdiffpos.is_null()) if key == "isdiffpos" else np.isnan(col[key])
            v.reject(missing, f"missing={key}")
        v.reject(~np.asarray(isdiffpos.fill_null(True)), "isdiffpos")
        v.reject(col["rb"] < c.min_rb, "rb")
        if c.min_drb > 0:
            v.reject(col["drb"] < c.min_drb, "drb")  # NaN (older alerts without drb) passes
        v.reject(col["fwhm"] > c.max_fwhm, "fwhm")
        v.reject(col["elong"] > c.max_elong, "elong")
        v.reject(np.abs(col["magdiff"]) > c.max_magdiff, "magdiff")
        span = col["jdendhist"] - col["jdstarthist"]
        v.reject(~np.isnan(span) & ~((c.min_archive_tspan < span) & (span < c.max_archive_tspan)), "archive_tspan")
        sso = col["ssdistnr"]
        v.reject((sso >= 0) & (sso < c.min_sso_dist), "ssdistnr")
        pending = v.accepted  # the sky math only for alerts still in the running
        b = np.full(n, 90.0)
        b[pending] = galactic_latitude(col["ra"][pending], col["dec"][pending])
        v.reject(np.abs(b) < c.min_gal_lat, "galPlane")
        d1, d2, d3 = col["distpsnr1"], col["distpsnr2"], col["distpsnr3"]
        s1, s2, s3 = col["sgscore1"], col["sgscore2"], col["sgscore3"]
        v.reject((d1 < c.ps1_sgveto_rad) & (s1 > c.ps1_sgveto_th), "distpsnr1")
        very_close = np.maximum(np.maximum(d1, d2), d3) < c.ps1_confusion_rad
        confused = np.maximum(np.maximum(np.abs(s1 - 0.5), np.abs(s2 - 0.5)), np.abs(s3 - 0.5)) < c.ps1_confusion_sg_tol
        v.reject(very_close & confused, "ps1Confusion")
        if self._gaia is not None:
            pending = v.accepted
            if pending.any():
                star = np.zeros(n, dtype=bool)
                star[pending] = self._gaia.is_star(col["ra"][pending], col["dec"][pending])
                v.reject(star, "gaiaIsStar")
        return v


class LSSTQualityConfig(UnitConfig):
    min_reliability: float = Field(0.0, description="diaSource reliability (ML real/bogus), where given")
    min_snr: float = Field(5.0, description="signal-to-noise of the triggering diaSource")
    min_ndet: int = Field(1, description="detections in the alert's history, the trigger included")
    positive_only: bool = Field(True, description="reject negative difference-image sources")
    reject_flagged: bool = Field(True, description="reject when psfFlux_flag / pixelFlags / centroid_flag is set")
    reject_dipoles: bool = Field(True, description="reject sources fitted as dipoles")
    reject_solar_system: bool = Field(True, description="reject sources associated with an ssObject")
    max_extendedness: float | None = Field(None, description="reject more extended sources (0 point-like .. 1)")


class LSSTQualityFilter(T0Filter):
    """Basic quality cuts for Rubin alerts (fields absent in an older schema do not reject)."""

    Config = LSSTQualityConfig
    columns: ClassVar = ["reliability", "snr", "flux", "isdiffpos", "psfFlux_flag", "pixelFlags", "centroid_flag",
                         "isDipole", "ssObjectId", "diaObjectId", "extendedness", "flux_err", *SUMMARY]  # fmt: skip

    def apply(self, alerts: pa.Table) -> Verdict:
        c = self.config
        n = alerts.num_rows
        v = Verdict.accept_all(n)
        ndet, _, _ = detections(alerts)
        v.reject(ndet < c.min_ndet, "ndet")
        if c.positive_only:
            v.reject(~np.asarray(alerts.column("isdiffpos").fill_null(True)), "negative")
        snr = num(alerts, "snr")
        if np.isnan(snr).all():  # ELAsTiCC and some schemas: snr from the PSF flux
            snr = num(alerts, "flux") / num(alerts, "flux_err")
        v.reject(snr < c.min_snr, "snr")
        v.reject(num(alerts, "reliability") < c.min_reliability, "reliability")
        if c.reject_flagged:
            flagged = np.zeros(n, dtype=bool)
            for f in ("psfFlux_flag", "pixelFlags", "centroid_flag"):
                flagged |= num(alerts, f) == 1
            v.reject(flagged, "flagged")
        if c.reject_dipoles:
            v.reject(num(alerts, "isDipole") == 1, "dipole")
        if c.reject_solar_system:
            v.reject(present(alerts, "ssObjectId") & (num(alerts, "ssObjectId") != 0), "solar_system")
        if c.max_extendedness is not None:
            v.reject(num(alerts, "extendedness") > c.max_extendedness, "extended")
        return v


class ExpressionFilterConfig(UnitConfig):
    expr: str = Field(..., description='boolean expression over alert columns, e.g. "rb > 0.5 and ndethist >= 2"')
    reason: str | None = Field(None, description="name of the rejection (default: the expression)")


class ExpressionFilter(T0Filter):
    """Accept alerts for which an expression written in the workflow holds (vectorised, never eval'ed)."""

    Config = ExpressionFilterConfig

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        try:
            self.expression = Expression(self.config.expr)
        except ExpressionError as exc:
            from pydantic_core import InitErrorDetails, PydanticCustomError
            from pydantic import ValidationError

            from ..base import UnitConfigError

            err = ValidationError.from_exception_data(
                "ExpressionFilterConfig",
                [InitErrorDetails(type=PydanticCustomError("expression", str(exc)), loc=("expr",), input=self.config.expr)],
            )
            raise UnitConfigError(self.name(), err) from None
        from ..expression import DERIVED

        self.required_columns = [c for c in self.expression.columns if c not in DERIVED]
        self.columns = [*self.required_columns, *SUMMARY]

    def apply(self, alerts: pa.Table) -> Verdict:
        return Verdict.from_mask(self.expression(alerts), self.config.reason or self.config.expr)
