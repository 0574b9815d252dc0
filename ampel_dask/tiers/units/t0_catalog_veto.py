"""T0 veto: reject alerts that lie within a radius of a source in any of several local catalogs.

Variable stars (GCVS) and young stellar objects (SPICY) are the commonest impostors of a transient
search; their positions decide, not their light curves, so the veto sits at T0: a vetoed alert never
costs a state, a T2 fit or a store row, and the verdict counts every rejection under the catalog's name
(``ampel-dask filter`` shows them). Each catalog is one vectorised cone search per batch
(:meth:`Catalog.cone_match`); its content hash is part of the config, so a rebuilt catalog gives new
T0 keys, never old decisions.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import Field, field_validator

from ..base import T0Filter, UnitConfig, Verdict, pinned_hash
from ..columns import floats
from ..catalog import open_catalog


class VetoCatalog(UnitConfig):
    name: str = Field(..., min_length=1, description="catalog name; rejections are counted as 'in <name>'")
    path: str = Field(..., description="catalog file written by ampel_dask.tiers.catalog.build_catalog")
    radius_arcsec: float = Field(2.0, gt=0, le=3600.0, description="an alert this close to a catalog source is rejected")
    catalog_hash: str | None = Field(None, description="content hash of the file; None: taken from it (a mismatch is an error)")


class CatalogVetoFilterConfig(UnitConfig):
    catalogs: list[VetoCatalog] = Field(..., min_length=1, description="catalogs whose sources veto alerts, checked in order")

    @field_validator("catalogs")
    @classmethod
    def _unique(cls, v: list[VetoCatalog]) -> list[VetoCatalog]:
        names = [c.name for c in v]
        if len(set(names)) != len(names):
            raise ValueError(f"catalog names must be unique: {names}")
        return v


class CatalogVetoFilter(T0Filter):
    """Rejects an alert within ``radius_arcsec`` of a source of any listed catalog (reason ``in <name>``;
    the first catalog in the list that matches is the reason). Alerts without a position pass."""

    Config = CatalogVetoFilterConfig
    version = "1"
    columns: ClassVar[list[str]] = ["ra", "dec"]
    required_columns: ClassVar[tuple[str, ...]] = ("ra", "dec")

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.catalogs = [open_catalog(c.path) for c in self.config.catalogs]
        pinned = [c.model_copy(update={"catalog_hash": pinned_hash(self.name(), c.path, cat.content_hash, c.catalog_hash)})
                  for c, cat in zip(self.config.catalogs, self.catalogs)]  # fmt: skip
        self.config = self.config.model_copy(update={"catalogs": pinned})

    def apply(self, alerts: pa.Table) -> Verdict:
        ra = floats(alerts.column("ra"))
        dec = floats(alerts.column("dec"))
        v = Verdict.accept_all(alerts.num_rows)
        for spec, cat in zip(self.config.catalogs, self.catalogs):
            index, _ = cat.cone_match(ra, dec, spec.radius_arcsec)
            v.reject(index >= 0, f"in {spec.name}")
        return v



__all__ = ["CatalogVetoFilter", "CatalogVetoFilterConfig", "VetoCatalog"]
