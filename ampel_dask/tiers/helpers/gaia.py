"""AMPEL's Gaia star veto (``DecentFilter.is_star_in_gaia``) against a local catalog, for whole batches.

AMPEL asks catsHTM for every Gaia DR2 source within ``gaia_rs`` of one alert and calls the alert a star
when any source that is close for its brightness and astrometrically clean has a significant proper
motion or parallax. Here the same flags are computed on all (alert, source) pairs of a batch at once
(from :meth:`Catalog.cone_all`) and OR-ed per alert. Missing values count as NaN, as in AMPEL (every
comparison with NaN is False).
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..base import UnitConfig, pinned_hash
from ..catalog import Catalog, open_catalog

GAIA_COLUMNS = ["Mag_G", "PMRA", "ErrPMRA", "PMDec", "ErrPMDec", "Plx", "ErrPlx", "ExcessNoiseSig"]


class GaiaVetoConfig(UnitConfig):
    """The Gaia veto's fields, as AMPEL's DecentFilter names them; a filter's config derives from this.
    AMPEL queries a catalog service; here the veto needs a local catalog, else it is off."""

    gaia_rs: float = Field(0.0, ge=0, description="Gaia search radius [arcsec]; 0 = no Gaia veto")
    gaia_pm_signif: float = 3.0
    gaia_plx_signif: float = 3.0
    gaia_veto_gmag_min: float = 9.0
    gaia_veto_gmag_max: float = 20.0
    gaia_excessnoise_sig_max: float = 999.0
    gaia_catalog: str | None = Field(None, description="HEALPix-indexed Gaia Parquet catalog for the Gaia veto")
    gaia_catalog_hash: str | None = Field(None, description="content hash of gaia_catalog; None: taken from the file (a mismatch is an error)")


def gaia_veto(unit: str, config: GaiaVetoConfig) -> tuple[GaiaVeto | None, GaiaVetoConfig]:
    """The veto a filter's config asks for (None: off, with a warning when a radius is set without a
    catalog) and the config with the catalog's content hash pinned (a rebuilt catalog: new T0 keys)."""
    if config.gaia_rs <= 0:
        return None, config
    if not config.gaia_catalog:
        warnings.warn(f"{unit}: gaia_rs > 0 but no gaia_catalog is configured; the Gaia veto is off", stacklevel=3)
        return None, config
    veto = GaiaVeto(config)
    digest = pinned_hash(unit, config.gaia_catalog, veto.catalog.content_hash, config.gaia_catalog_hash)
    return veto, config.model_copy(update={"gaia_catalog_hash": digest})


class GaiaVetoSettings(Protocol):
    """The DecentFilter fields the veto reads (any object with these attributes will do)."""

    gaia_rs: float
    gaia_pm_signif: float
    gaia_plx_signif: float
    gaia_veto_gmag_min: float
    gaia_veto_gmag_max: float
    gaia_excessnoise_sig_max: float
    gaia_catalog: str | None


def star_flags(dist: np.ndarray, g: dict[str, np.ndarray], c: Any) -> np.ndarray:
    """Per (alert, Gaia source) pair: does this source make the alert a star? (AMPEL's flags, vectorised)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        distance_norm = 1.8 + 0.6 * np.exp((20 - g["Mag_G"]) / 2.05) > dist
        prox = distance_norm & (c.gaia_veto_gmag_min <= g["Mag_G"]) & (g["Mag_G"] <= c.gaia_veto_gmag_max)
        pmra = np.abs(g["PMRA"] / g["ErrPMRA"]) > c.gaia_pm_signif
        pmdec = np.abs(g["PMDec"] / g["ErrPMDec"]) > c.gaia_pm_signif
        plx = np.abs(g["Plx"] / g["ErrPlx"]) > c.gaia_plx_signif
        clean = g["ExcessNoiseSig"] < c.gaia_excessnoise_sig_max
    return prox & clean & (pmra | pmdec | plx)


class GaiaVeto:
    """``is_star(ra, dec)``: AMPEL's ``is_star_in_gaia`` for arrays of positions (DecentFilter's Gaia cut)."""

    def __init__(self, config: GaiaVetoSettings, catalog: Catalog | None = None):
        self.config = config
        if catalog is None:
            if not config.gaia_catalog:
                raise ValueError("GaiaVeto needs gaia_catalog (a catalog built with ampel_dask.tiers.catalog.build_catalog)")
            catalog = open_catalog(config.gaia_catalog)
        self.catalog = catalog
        missing = [c for c in GAIA_COLUMNS if c not in catalog.columns]
        if missing:
            raise ValueError(f"Gaia catalog {catalog.path} lacks column(s) {missing} (AMPEL's names are needed)")

    def matches(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(alert index, catalog row, distance [arcsec], star flag) for every source within ``gaia_rs``."""
        src, row, dist = self.catalog.cone_all(ra, dec, self.config.gaia_rs)
        t = self.catalog.take(row, GAIA_COLUMNS)
        g = {c: pc.fill_null(pc.cast(t.column(c), pa.float64()), np.nan).to_numpy(zero_copy_only=False) for c in GAIA_COLUMNS}
        return src, row, dist, star_flags(dist, g, self.config)

    def is_star(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """True for each position with a Gaia source that AMPEL's veto calls a star."""
        ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
        src, _, _, flag = self.matches(ra, np.atleast_1d(np.asarray(dec, dtype=np.float64)))
        out = np.zeros(len(ra), dtype=bool)
        out[src[flag]] = True
        return out


__all__ = ["GaiaVeto", "GAIA_COLUMNS", "star_flags"]
