"""Gravitational-wave counterpart candidates: each state's place in a sky map, its timing, its host's distance.

Per state: the sky map's probability density [sr^-1] and credible level at the state's position, the
first detection's delay after the merger, and, where the map has distance layers and the state a host
redshift (from a ``T2RedshiftDigest`` dependency, or a states column), the host's luminosity distance
(flat LCDM, astropy) placed in the map's distance posterior along that line of sight
(``p(r) = DISTNORM r^2 N(r; DISTMU, DISTSIGMA)``): its quantile, the density there, and whether it lies
in the central ``dist_credible`` interval (with the redshift error widening it both ways).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from ..base import T2StateUnit
from ..columns import floats
from ..helpers.skymap import SkyMapUnit, SkyMapUnitConfig, distance_cdf, distance_pdf
from .t2_neutrino import state_times
from .t2_redshift import T2RedshiftDigest, T2RedshiftDigestConfig

CANDIDATE, NOT_CANDIDATE, NO_POSITION = 0, 1, 2


class T2GWCounterpartConfig(SkyMapUnitConfig):
    max_credible_level: float = Field(0.9, gt=0, le=1, description="a candidate lies inside this credible region")
    redshift: Literal["none", "digest", "column"] = Field("none", description="host redshift: none, a T2RedshiftDigest (dependency) or states columns")
    digest: T2RedshiftDigestConfig | None = Field(None, description="the redshift digest's config (redshift: digest)")
    z_column: str = Field("z", description="states column with the redshift (redshift: column)")
    z_err_column: str | None = Field(None, description="states column with its error (redshift: column; None: no error)")
    dist_credible: float = Field(0.9, gt=0, lt=1, description="central interval of the distance posterior a host must reach")
    H0: float = Field(67.7, gt=0, description="Hubble constant [km/s/Mpc] (flat LCDM; LVK's maps assume Planck 2015/2018)")
    Om0: float = Field(0.31, gt=0, lt=1, description="matter density")

    @model_validator(mode="after")
    def _digest_given(self):
        if self.redshift == "digest" and self.digest is None:
            raise ValueError("redshift: digest needs a digest config")
        return self


class T2GWCounterpart(SkyMapUnit, T2StateUnit):
    """Each state against a GW sky map: probability density, credible level, timing, host distance check.

    Per state: ``gw_prob_density`` [sr^-1], ``gw_credible_level``, ``gw_dt`` (first detection - merger [d]),
    ``gw_in_window``, ``gw_in_region``; with distances and a redshift: ``gw_z``, ``gw_dist_lum`` [Mpc],
    ``gw_dist_mu``/``gw_dist_sigma`` (the pixel's layers), ``gw_dist_cdf`` (the host distance's quantile),
    ``gw_dist_pdf`` [Mpc^-1], ``gw_dist_consistent``. ``code``: 0 a candidate (in region and window, distance
    not inconsistent), 1 not a candidate, 2 no position."""

    Config = T2GWCounterpartConfig
    version = "1"
    libraries: ClassVar[tuple[str, ...]] = ("numpy", "scipy", "astropy", "cdshealpix")

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self._pin_skymap()
        self.digest = T2RedshiftDigest(self.config.digest) if self.config.redshift == "digest" else None
        if self.digest is not None:  # the digest pinned its catalogs' hashes: keep them in this config
            self.config = self.config.model_copy(update={"digest": self.digest.config})

    def dependencies(self) -> list[T2StateUnit]:
        return [self.digest] if self.digest is not None else []

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table:
        c, m = self.config, self.skymap
        n = states.num_rows
        ra, dec = floats(states.column("ra")), floats(states.column("dec"))
        px = m.lookup(ra, dec)
        seen = px >= 0
        k = np.maximum(px, 0)
        density = np.where(seen, m.density[k], np.nan)
        level = np.where(seen, m.credible[k], np.nan)
        dt = state_times(states, "first_detection") - c.event_mjd
        in_window = self.in_window(dt + c.event_mjd)
        in_region = seen & (level <= c.max_credible_level)
        cols: dict[str, Any] = {"gw_prob_density": density, "gw_credible_level": level, "gw_dt": dt,
                                "gw_in_window": pa.array(in_window), "gw_in_region": pa.array(in_region)}  # fmt: skip
        consistent = np.ones(n, dtype=bool)
        if m.has_distance and c.redshift != "none":
            z, z_err = self._redshifts(states, inputs)
            mu, sigma, norm = (np.where(seen, layer[k], np.nan) for layer in (m.distmu, m.distsigma, m.distnorm))
            d, d_lo, d_hi = self._distances(z, z_err)
            cdf = distance_cdf(d, mu, sigma)
            tail = (1.0 - c.dist_credible) / 2.0
            known = np.isfinite(cdf)
            ok = (distance_cdf(d_hi, mu, sigma) >= tail) & (distance_cdf(d_lo, mu, sigma) <= 1.0 - tail)
            consistent = ~known | ok  # no redshift or no distance layer: not inconsistent
            cols.update({"gw_z": z, "gw_dist_lum": d, "gw_dist_mu": mu, "gw_dist_sigma": sigma, "gw_dist_cdf": cdf,
                         "gw_dist_pdf": distance_pdf(d, mu, sigma, norm),
                         "gw_dist_consistent": pa.array(ok, mask=~known)})  # fmt: skip
        valid = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
        code = np.where(~valid, NO_POSITION, np.where(in_region & in_window & consistent, CANDIDATE, NOT_CANDIDATE))
        cols["code"] = code.astype(np.int32)
        return pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in cols.items()})

    def _redshifts(self, states: pa.Table, inputs: dict[str, pa.Table] | None) -> tuple[np.ndarray, np.ndarray]:
        c, n = self.config, states.num_rows
        if c.redshift == "column":
            if c.z_column not in states.column_names:
                raise ValueError(f"T2GWCounterpart: redshift: column needs a states column {c.z_column!r}")
            z = floats(states.column(c.z_column))
            z_err = floats(states.column(c.z_err_column)) if c.z_err_column and c.z_err_column in states.column_names else np.zeros(n)
        else:
            assert self.digest is not None
            got = self.digest.rows_for(states, inputs, "T2GWCounterpart")
            z, z_err = floats(got.column("z")), floats(got.column("z_err"))
        z = np.where(z > 0, z, np.nan)
        return z, np.where(np.isfinite(z_err) & (z_err > 0), z_err, 0.0)

    def _distances(self, z: np.ndarray, z_err: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Luminosity distance [Mpc] at z and at z -+ z_err (NaN where z is unknown)."""
        from astropy.cosmology import FlatLambdaCDM

        cosmo = FlatLambdaCDM(H0=self.config.H0, Om0=self.config.Om0)
        out = []
        for zz in (z, np.maximum(z - z_err, 0.0), z + z_err):
            d = np.full(len(z), np.nan)
            ok = np.isfinite(zz)
            if ok.any():
                d[ok] = cosmo.luminosity_distance(zz[ok]).to_value("Mpc")
            out.append(d)
        return out[0], out[1], out[2]



__all__ = ["T2GWCounterpart", "T2GWCounterpartConfig"]
