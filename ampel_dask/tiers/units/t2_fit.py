"""Bazin fits of flux light curves, one fit per (state, band), all of a batch in one ``BazinFit.many`` call.

Bands are fitted independently (not jointly): a joint multi-band model needs a colour model, which is a
science choice; per-band fits are what AMPEL-style T2s report and what light-curve's own multi-band mode
(``BazinFit(..., bands=[...])``) does too.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import light_curve as lc
import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from ..base import T2StateUnit, UnitConfig
from ..helpers.band_curves import band_curves, column_name, evaluate, scatter

FIT_FAILED_SHIFT = 8  # code bits: 0..7 too few points in bands[i], 8..15 fit failed in bands[i]


class T2BazinFitConfig(UnitConfig):
    bands: list[str] = Field(default=["g", "r"], min_length=1, max_length=8, description="bands fitted, each on its own (ZTF g r; LSST u g r i z y)")
    algorithm: Literal["lmsder", "mcmc", "ceres", "mcmc-ceres", "mcmc-lmsder", "nuts", "nuts-ceres", "nuts-lmsder"] = Field(
        "lmsder", description="light_curve least-squares / sampling algorithm (lmsder: fastest; mcmc*: ~10x slower, more robust)"
    )
    lmsder_niter: int | None = Field(None, ge=1, description="LMSDER iterations (None: light_curve's default, 10)")
    mcmc_niter: int | None = Field(None, ge=1, description="MCMC iterations (None: light_curve's default, 128)")
    kinds: list[Literal["detection", "forced"]] = Field(default=["detection", "forced"], min_length=1, description="datapoint kinds fitted (forced photometry only if the T1 policy keeps it)")
    min_points: int = Field(6, ge=6, description="fewer usable flux points in a band -> no fit (Bazin has 5 parameters)")
    transform: bool = Field(False, description="light_curve's transformed outputs (magnitude amplitude, no t0, ln chi2)")

    @field_validator("bands")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("bands must be unique")
        return v


class T2BazinFit(T2StateUnit):
    """Bazin (2009) fit per band on flux (nJy): columns ``bazin_fit_{param}_{band}``, ``n_{band}``, ``code``.

    ``code`` is a bit mask, 0 = every band fitted: bit ``i`` = band ``bands[i]`` had too few points (or all
    at one time), bit ``8 + i`` = its fit returned non-finite parameters.
    """

    Config = T2BazinFitConfig
    version = "1"
    libraries = ("light-curve",)  # its fitter shapes the results
    n_jobs: ClassVar[int] = 1  # light_curve threads; not part of the config hash
    column_labels = {
        "n_{band}": ("Points in {band}", ""),
        "bazin_fit_amplitude_{band}": ("Bazin amplitude ({band})", "nJy"),
        "bazin_fit_baseline_{band}": ("Bazin baseline ({band})", "nJy"),
        "bazin_fit_reference_time_{band}": ("Bazin reference time ({band})", "MJD"),
        "bazin_fit_rise_time_{band}": ("Rise time ({band})", "d"),
        "bazin_fit_fall_time_{band}": ("Fall time ({band})", "d"),
        "bazin_fit_reduced_chi2_{band}": ("Bazin fit chi2/dof ({band})", ""),
        # transform: true
        "bazin_fit_mag_full_amplitude_{band}": ("Bazin full amplitude ({band})", "mag"),
        "bazin_fit_baseline_amplitude_ratio_{band}": ("Bazin baseline/amplitude ({band})", ""),
        "ln1p_bazin_fit_reduced_chi2_{band}": ("ln(1 + Bazin chi2/dof) ({band})", ""),
    }

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        c = self.config
        opts = {k: v for k, v in (("lmsder_niter", c.lmsder_niter), ("mcmc_niter", c.mcmc_niter)) if v is not None}
        if c.transform:
            opts["transform"] = True
        self.feature = lc.BazinFit(c.algorithm, **opts)
        self.param_names = [column_name(n) for n in self.feature.names]

    @property
    def columns(self) -> list[str]:
        return [f"{p}_{b}" for b in self.config.bands for p in self.param_names] + [f"n_{b}" for b in self.config.bands]

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table:
        c = self.config
        n, nb = states.num_rows, len(c.bands)
        curves = band_curves(states, c.bands, c.kinds, "flux", c.min_points)
        values = scatter(evaluate(self.feature, curves, self.n_jobs), curves, n, nb)
        failed = curves.usable & ~np.isfinite(values).all(axis=2)
        bits = np.int32(1) << np.arange(nb, dtype=np.int32)
        code = ((~curves.usable) * bits).sum(axis=1) + ((failed * bits) << FIT_FAILED_SHIFT).sum(axis=1)
        cols: dict[str, pa.Array] = {}
        for j, b in enumerate(c.bands):
            for k, p in enumerate(self.param_names):
                cols[f"{p}_{b}"] = pa.array(values[:, j, k])
        for j, b in enumerate(c.bands):
            cols[f"n_{b}"] = pa.array(curves.counts[:, j].astype(np.int32))
        cols["code"] = pa.array(code.astype(np.int32))
        return pa.table(cols)


__all__ = ["T2BazinFit", "T2BazinFitConfig"]
