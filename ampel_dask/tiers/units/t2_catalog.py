"""Nearest-neighbour match of each state's position against a catalog: a local HEALPix-indexed Parquet file
(``build_catalog``) or a HATS catalog folder (crossmatched through lsdb)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..base import T2StateUnit, UnitConfig, pinned_hash
from ..catalog import HPX, open_catalog
from ..hats_catalog import HatsCatalog, is_hats

OK, NO_POSITION = 0, 1


class T2CatalogMatchConfig(UnitConfig):
    catalog: str = Field(..., description="catalog file written by ampel_dask.tiers.catalog.build_catalog, or a HATS catalog/collection folder")
    radius_arcsec: float = Field(2.0, gt=0, le=3600.0, description="search radius [arcsec]")
    columns: list[str] | None = Field(None, description="catalog columns returned for the nearest match (None: all)")
    prefix: str = Field("cat_", description="prefix of the result columns, so several catalogs can sit side by side")
    catalog_hash: str | None = Field(None, description="content hash of the catalog file; None: taken from the file (a mismatch is an error)")


class T2CatalogMatch(T2StateUnit):
    """The nearest catalog source within the radius: its columns, ``{prefix}dist_arcsec``, ``{prefix}matched``.

    ``code``: 0 = searched (matched or not), 1 = the state has no valid position. The catalog's content
    hash is part of the config: a catalog rebuilt at the same path gives new results, never old ones.
    """

    Config = T2CatalogMatchConfig
    version = "1"
    column_labels = {"{prefix}dist_arcsec": ("{prefix} match distance", "arcsec"), "{prefix}matched": ("{prefix} match found", "")}

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.catalog = HatsCatalog(self.config.catalog) if is_hats(self.config.catalog) else open_catalog(self.config.catalog)
        digest = pinned_hash(self.name(), self.config.catalog, self.catalog.content_hash, self.config.catalog_hash)
        self.config = self.config.model_copy(update={"catalog_hash": digest})
        cols = self.config.columns if self.config.columns is not None else self.catalog.columns
        unknown = [c for c in cols if c not in self.catalog.columns]
        if unknown:
            raise ValueError(f"T2CatalogMatch: columns {unknown} not in catalog {self.config.catalog}")
        self.out_columns = [c for c in cols if c != HPX]

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table:
        p = self.config.prefix
        ra = pc.fill_null(pc.cast(states.column("ra"), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        dec = pc.fill_null(pc.cast(states.column("dec"), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        rows, dist, found = self.catalog.match(ra, dec, self.config.radius_arcsec, self.out_columns)
        cols = {f"{p}{c}": rows.column(c) for c in self.out_columns}
        cols[f"{p}dist_arcsec"] = pa.array(dist)
        cols[f"{p}matched"] = pa.array(found)
        valid = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
        cols["code"] = pa.array(np.where(valid, OK, NO_POSITION).astype(np.int32))
        return pa.table(cols)


__all__ = ["T2CatalogMatch", "T2CatalogMatchConfig"]
