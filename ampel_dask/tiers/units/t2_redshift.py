"""One redshift per state from catalog matches of several catalogs, by priority group and distance.

In the spirit of AMPEL's T2DigestRedshifts: each redshift source (a catalog matched by a
:class:`T2CatalogMatch`, this unit's dependency) belongs to a quality group, 1 (best: nearby
spectroscopic hosts) to 7 (anything). A state's redshift is taken from its usable matches in the best
group present; within a group the nearest match wins (a tie goes to the source listed first). A
match is usable when it has a positive finite redshift, lies within the source's ``max_dist_arcsec``
and, if ``max_offset_kpc`` is set, within that projected distance at its own redshift. The error is the
catalog's own where it has one, else the group's typical precision (AMPEL's table). Where AMPEL averages
a group, this unit picks one match, so ``z_source`` names where the number came from.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from ..base import T2StateUnit, UnitConfig
from ..columns import floats
from .t2_catalog import T2CatalogMatch

OK, NO_REDSHIFT = 0, 1
GROUP_PRECISION = [0.0003, 0.003, 0.01, 0.02, 0.04, 0.1, 0.3]  # AMPEL's category_precision, groups 1..7


class RedshiftSource(UnitConfig):
    name: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="source name, reported in z_source")
    catalog: str = Field(..., description="catalog file written by ampel_dask.tiers.catalog.build_catalog")
    catalog_hash: str | None = Field(None, description="content hash of the catalog; None: taken from the file")
    z: str = Field("z", description="catalog column with the redshift")
    z_err: str | None = Field(None, description="catalog column with its error (None: the group's precision)")
    group: int = Field(..., ge=1, le=7, description="quality group, 1 best .. 7 worst: the best group present wins")
    radius_arcsec: float = Field(10.0, gt=0, le=3600.0, description="search radius of the catalog match")
    max_dist_arcsec: float | None = Field(None, gt=0, description="matches farther are not used (None: the radius)")
    max_offset_kpc: float | None = Field(None, gt=0, description="matches whose projected offset at their redshift is larger are not used")


class T2RedshiftDigestConfig(UnitConfig):
    sources: list[RedshiftSource] = Field(..., min_length=1, description="redshift catalogs, each matched by its own T2CatalogMatch")
    max_group: int = Field(7, ge=1, le=7, description="groups above this are ignored")
    group_precision: list[float] = Field(default_factory=lambda: list(GROUP_PRECISION), min_length=7, max_length=7, description="z_err of a match without its own error, per group")
    H0: float = Field(70.0, gt=0, description="Hubble constant for max_offset_kpc [km/s/Mpc] (flat LCDM)")
    Om0: float = Field(0.3, gt=0, lt=1, description="matter density for max_offset_kpc")

    @field_validator("sources")
    @classmethod
    def _unique(cls, v: list[RedshiftSource]) -> list[RedshiftSource]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique: {names}")
        return v


class T2RedshiftDigest(T2StateUnit):
    """``z``, ``z_err``, ``z_source`` (source name), ``z_group``, ``z_dist_arcsec``, ``n_sources`` (sources
    with a usable match) and ``code`` (0 = a redshift, 1 = none) per state."""

    Config = T2RedshiftDigestConfig
    version = "1"
    column_labels = {
        "z": ("Redshift", ""),
        "z_err": ("Redshift error", ""),
        "z_source": ("Redshift source", ""),
        "z_group": ("Redshift quality group (1 best)", ""),
        "z_dist_arcsec": ("Distance to redshift source", "arcsec"),
        "n_sources": ("Usable redshift sources", ""),
    }
    libraries = ("numpy", "astropy")

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.matches = [self._match(s) for s in self.config.sources]
        # the matches pinned each catalog's content hash: keep them in this unit's config (and identity)
        pinned = [s.model_copy(update={"catalog_hash": m.config.catalog_hash}) for s, m in zip(self.config.sources, self.matches)]
        self.config = self.config.model_copy(update={"sources": pinned})

    @staticmethod
    def _match(s: RedshiftSource) -> T2CatalogMatch:
        cols = [s.z] + ([s.z_err] if s.z_err else [])
        return T2CatalogMatch(catalog=s.catalog, catalog_hash=s.catalog_hash, radius_arcsec=s.radius_arcsec, columns=cols, prefix=f"{s.name}_")

    def dependencies(self) -> list[T2StateUnit]:
        return list(self.matches)

    def rows_for(self, states: pa.Table, inputs: dict[str, pa.Table] | None, unit: str) -> pa.Table:
        """This digest's rows for ``states`` as a dependent unit gets them: from the framework's inputs
        (by identity key, or name), else computed here (the dependent unit used on its own)."""
        got = (inputs or {}).get(self.identity.key, (inputs or {}).get(self.name()))
        if got is None:
            got = self.process(states)
        if got.num_rows != states.num_rows:
            raise ValueError(f"{unit}: {got.num_rows} digest rows for {states.num_rows} states")
        return got

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table:
        c = self.config
        n, k = states.num_rows, len(c.sources)
        z = np.full((n, k), np.nan)
        zerr = np.full((n, k), np.nan)
        dist = np.full((n, k), np.nan)
        for j, (s, m) in enumerate(zip(c.sources, self.matches)):
            r = (inputs or {}).get(m.identity.key)
            if r is None:  # standalone use, or a graph that keys inputs by name only: match here
                r = m.process(states)
            if r.num_rows != n:
                raise ValueError(f"T2RedshiftDigest: {r.num_rows} rows of source {s.name} for {n} states")
            p = m.config.prefix
            z[:, j] = floats(r.column(f"{p}{s.z}"))
            if s.z_err:
                zerr[:, j] = floats(r.column(f"{p}{s.z_err}"))
            dist[:, j] = floats(r.column(f"{p}dist_arcsec"))
        group = np.array([s.group for s in c.sources])
        limit = np.array([s.max_dist_arcsec if s.max_dist_arcsec is not None else s.radius_arcsec for s in c.sources])
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(z) & (z > 0) & np.isfinite(dist) & (dist <= limit) & (group <= c.max_group)
        offset_limit = np.array([s.max_offset_kpc if s.max_offset_kpc is not None else np.inf for s in c.sources])
        if np.isfinite(offset_limit).any() and usable.any():
            usable &= self._offset_kpc(dist, z, usable) <= offset_limit
        # best group first, then the nearest; argmin keeps the first source on a tie
        rank = np.where(usable, group * 1e7 + np.nan_to_num(dist), np.inf)
        best = np.argmin(rank, axis=1) if k else np.zeros(n, dtype=np.int64)
        found = np.isfinite(rank[np.arange(n), best]) if n else np.zeros(0, dtype=bool)
        pick = (np.arange(n), best)
        prec = np.asarray(c.group_precision)[group[best] - 1]
        z_err = np.where(np.isfinite(zerr[pick]) & (zerr[pick] >= 0), zerr[pick], prec)
        names = np.array([s.name for s in c.sources], dtype=object)
        return pa.table({
            "z": pa.array(np.where(found, z[pick], np.nan)),
            "z_err": pa.array(np.where(found, z_err, np.nan)),
            "z_source": pa.array(names[best], pa.string(), mask=~found),
            "z_group": pa.array(group[best].astype(np.int32), mask=~found),
            "z_dist_arcsec": pa.array(np.where(found, dist[pick], np.nan)),
            "n_sources": pa.array(usable.sum(axis=1).astype(np.int32)),
            "code": pa.array(np.where(found, OK, NO_REDSHIFT).astype(np.int32)),
        })  # fmt: skip

    def _offset_kpc(self, dist: np.ndarray, z: np.ndarray, usable: np.ndarray) -> np.ndarray:
        """Projected offset [kpc] of each usable match at its redshift (inf elsewhere)."""
        from astropy.cosmology import FlatLambdaCDM

        out = np.full(dist.shape, np.inf)
        cosmo = FlatLambdaCDM(H0=self.config.H0, Om0=self.config.Om0)
        kpc_per_arcsec = cosmo.kpc_proper_per_arcmin(z[usable]).value / 60.0
        out[usable] = dist[usable] * kpc_per_arcsec
        return out



__all__ = ["T2RedshiftDigest", "T2RedshiftDigestConfig", "RedshiftSource", "GROUP_PRECISION"]
