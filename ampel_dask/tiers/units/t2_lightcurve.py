"""Per-band light-curve features for whole batches of states, with the ``light_curve`` package (one
``Extractor.many`` call per batch: see :mod:`ampel_dask.tiers.helpers.band_curves`)."""

from __future__ import annotations

from typing import ClassVar, Literal

import light_curve as lc
import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from ..base import T2StateUnit, UnitConfig
from ..helpers.band_curves import ZTF_BANDS, band_curves, column_name, evaluate, make_feature, scatter

DEFAULT_FEATURES = ["Amplitude", "Mean", "StandardDeviation", "Skew", "BeyondNStd(1.0)", "LinearFit",
                    "MaximumSlope", "StetsonK", "InterPercentileRange(0.1)", "WeightedMean"]  # fmt: skip

OK, TOO_FEW_POINTS = 0, 1
# readable names of light_curve's features, with their unit for magnitudes (value: flux swaps mag for nJy)
FEATURE_LABELS = {
    "amplitude": ("Half amplitude", "mag"),
    "mean": ("Mean", "mag"),
    "standard_deviation": ("Standard deviation", "mag"),
    "skew": ("Skewness", ""),
    "beyond_1_std": ("Fraction beyond 1 sigma", ""),
    "linear_fit_slope": ("Linear fit slope", "mag/d"),
    "linear_fit_slope_sigma": ("Linear fit slope error", "mag/d"),
    "linear_fit_reduced_chi2": ("Linear fit chi2/dof", ""),
    "maximum_slope": ("Maximum slope", "mag/d"),
    "stetson_k": ("Stetson K", ""),
    "inter_percentile_range_10": ("10-90 percentile range", "mag"),
    "weighted_mean": ("Weighted mean", "mag"),
}


class T2LightCurveFeaturesConfig(UnitConfig):
    bands: list[str] = Field(default=ZTF_BANDS, min_length=1, description="bands to compute features in (ZTF g r i; LSST u g r i z y)")
    features: list[str] = Field(default=DEFAULT_FEATURES, min_length=1, description="light_curve feature classes, with literal arguments, e.g. 'BeyondNStd(1.0)'")
    value: Literal["mag", "flux"] = Field("mag", description="'mag' (mag, mag_err) or 'flux' (flux, flux_err in nJy)")
    kinds: list[Literal["detection", "upper_limit", "forced"]] = Field(default=["detection"], min_length=1, description="datapoint kinds used (upper limits have no mag or flux)")
    min_points: int = Field(3, ge=1, description="fewer usable points in a band -> NaN features for that band")

    @field_validator("bands")
    @classmethod
    def _unique_bands(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("bands must be unique")
        return v

    @field_validator("features")
    @classmethod
    def _known_features(cls, v: list[str]) -> list[str]:
        names = [column_name(n) for spec in v for n in make_feature(spec).names]
        if len(set(names)) != len(names):
            raise ValueError(f"features give repeated columns: {sorted({n for n in names if names.count(n) > 1})}")
        return v


class T2LightCurveFeatures(T2StateUnit):
    """Light-curve features per band (columns ``{feature}_{band}``, ``n_{band}``), one extractor call per batch.

    ``code``: 0 when at least one band has ``min_points`` usable points, 1 (too few points) otherwise.
    """

    Config = T2LightCurveFeaturesConfig
    version = "1"
    libraries = ("light-curve",)  # its feature code shapes the results
    n_jobs: ClassVar[int] = 1  # light_curve threads; Dask parallelises across batches. Not in the config hash.
    column_labels = {
        "n_{band}": ("Points in {band}", ""),
        **{f"{f}_{{band}}": (f"{label} ({{band}})", unit) for f, (label, unit) in FEATURE_LABELS.items()},
        "{feature}_{band}": ("{feature} ({band})", ""),
    }

    @classmethod
    def label(cls, column: str, config: T2LightCurveFeaturesConfig | None = None) -> tuple[str, str]:
        label, unit = super().label(column, config)
        if config is not None and config.value == "flux":
            unit = {"mag": "nJy", "mag/d": "nJy/d"}.get(unit, unit)
        return label, unit

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.extractor = lc.Extractor(*(make_feature(s) for s in self.config.features))
        self.feature_names = [column_name(f) for f in self.extractor.names]

    @property
    def columns(self) -> list[str]:
        """Result columns apart from ``code``, in output order."""
        return [f"{f}_{b}" for b in self.config.bands for f in self.feature_names] + [f"n_{b}" for b in self.config.bands]

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table:
        c = self.config
        n, nb = states.num_rows, len(c.bands)
        curves = band_curves(states, c.bands, c.kinds, c.value, c.min_points)
        values = scatter(evaluate(self.extractor, curves, self.n_jobs), curves, n, nb)
        cols: dict[str, pa.Array] = {}
        for j, b in enumerate(c.bands):
            for k, f in enumerate(self.feature_names):
                cols[f"{f}_{b}"] = pa.array(values[:, j, k])
        for j, b in enumerate(c.bands):
            cols[f"n_{b}"] = pa.array(curves.counts[:, j].astype(np.int32))
        cols["code"] = pa.array(np.where(curves.usable.any(axis=1), OK, TOO_FEW_POINTS).astype(np.int32))
        return pa.table(cols)


__all__ = ["T2LightCurveFeatures", "T2LightCurveFeaturesConfig"]
