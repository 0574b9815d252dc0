"""A HATS catalog (HEALPix-tiled Parquet, as LINCC serves Rubin data and surveys' catalogs) as a match input.

The Rubin community's catalogs come as HATS; ``T2CatalogMatch`` takes one in place of a catalog built
with :func:`ampel_dask.tiers.catalog.build_catalog` and crossmatches through lsdb (a batch's positions
become a small lsdb catalog; ``crossmatch`` reads only the tiles, and their margins, that the positions
touch). lsdb computes with Dask: here on the synchronous scheduler, inside the unit's own task.

Identity: the catalog's metadata files (properties, partition info, the Parquet ``_metadata`` footer with
every file's row-group statistics) are hashed, so a catalog rebuilt at the same path gives new results.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..keys import files_hash

METADATA_FILES = ("collection.properties", "hats.properties", "properties", "partition_info.csv", "dataset/_metadata", "dataset/_common_metadata")


def is_hats(path: str | Path) -> bool:
    """A HATS catalog or collection folder (it has ``hats.properties`` or ``collection.properties``)?"""
    p = Path(path)
    return p.is_dir() and ((p / "hats.properties").is_file() or (p / "collection.properties").is_file())


def hats_hash(path: str | Path) -> str:
    """Content hash of a HATS catalog or collection from its metadata files (see the module docstring)."""
    root = Path(path)
    files = [f for d in [root, *sorted(x for x in root.iterdir() if x.is_dir())] for name in METADATA_FILES if (f := d / name).is_file()]
    if not files:
        raise ValueError(f"{path}: not a HATS catalog (no hats.properties / collection.properties)")
    return files_hash(files)


class HatsCatalog:
    """The parts of :class:`~ampel_dask.tiers.catalog.Catalog` a match needs, for a HATS catalog."""

    def __init__(self, path: str | Path):
        self.path = str(Path(path).resolve())
        self.content_hash = hats_hash(self.path)
        cat = _open(self.path, self.content_hash)
        self.ra_column, self.dec_column = cat.hc_structure.catalog_info.ra_column, cat.hc_structure.catalog_info.dec_column
        self.columns = [c for c in cat.columns if not c.startswith("_healpix")]

    def __reduce__(self):  # pickles as its path: lsdb's catalog object is opened again where it is used
        return (HatsCatalog, (self.path,))

    def match(self, ra: np.ndarray, dec: np.ndarray, radius_arcsec: float, columns: list[str]) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """The nearest source within the radius of each position: its ``columns`` (nulls where none),
        the distance in arcsec (NaN where none) and whether there was one."""
        import dask
        import lsdb
        import pandas as pd

        n = len(ra)
        found = np.zeros(n, dtype=bool)
        dist = np.full(n, np.nan)
        at = np.full(n, -1, dtype=np.int64)
        ok = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90))
        matched = pd.DataFrame()
        if len(ok):
            left = pd.DataFrame({"_row": ok, "ra": np.asarray(ra)[ok] % 360.0, "dec": np.asarray(dec)[ok]})
            left_cat = lsdb.from_dataframe(left, ra_column="ra", dec_column="dec", margin_threshold=None, should_generate_moc=False)
            xm = left_cat.crossmatch(_open(self.path, self.content_hash), n_neighbors=1, radius_arcsec=radius_arcsec,
                                     suffixes=("_l", "_r"), suffix_method="all_columns")  # fmt: skip
            with dask.config.set(scheduler="synchronous"):
                matched = xm.compute(progress_bar=False).reset_index(drop=True)
        if len(matched):
            rows = matched["_row_l"].to_numpy()
            found[rows] = True
            dist[rows] = matched["_dist_arcsec"].to_numpy()
            at[rows] = np.arange(len(matched))
        picked = pa.Table.from_pandas(matched[[f"{c}_r" for c in columns]] if len(matched) else _empty(columns), preserve_index=False)
        idx = pa.array(np.where(found, at, 0), mask=~found)
        out = pa.table({c: picked.column(f"{c}_r").take(idx) if len(matched) else pa.nulls(n) for c in columns})
        return out, dist, found


def _empty(columns: list[str]):
    import pandas as pd

    return pd.DataFrame({f"{c}_r": [] for c in columns})


@lru_cache(maxsize=4)
def _open(path: str, digest: str):
    """lsdb's lazy catalog, once per process and content (a collection brings its default margin)."""
    import lsdb

    return lsdb.open_catalog(path)


__all__ = ["HatsCatalog", "is_hats", "hats_hash"]
