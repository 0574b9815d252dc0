"""Archive alerts, or a run's selection with its T2 columns, as a HATS catalog that lsdb opens.

HATS (HEALPix-tiled Parquet with a margin cache) is how the Rubin community serves catalogs and alerts
(LINCC's lsdb); writing ours in it lets an astronomer crossmatch results with any other HATS catalog, or
open them with ``lsdb.open_catalog``. Built with ``lsdb.from_dataframe`` (fine for selections up to a
few million rows, held in memory once); whole multi-year archives are the job of hats-import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa


def write_hats(table: pa.Table | Any, path: str | Path, name: str, margin_arcsec: float = 10.0, ra: str = "ra", dec: str = "dec") -> Path:
    """Write ``table`` (Arrow or pandas) as a HATS collection at ``path``: the catalog ``name`` and a margin
    of ``margin_arcsec`` (so crossmatches at tile edges find their neighbours). Nested columns (light
    curves) are left out: HATS catalogs here are flat. Returns the collection's folder."""
    import dask
    import lsdb

    if isinstance(table, pa.Table):
        flat = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
        frame = table.select(flat).to_pandas()
    else:
        frame = table
    if not len(frame):
        raise ValueError(f"nothing to write as HATS catalog {name!r}: the selection is empty")
    out = Path(path)
    with dask.config.set(scheduler="synchronous"):
        cat = lsdb.from_dataframe(frame, ra_column=ra, dec_column=dec, catalog_name=name, margin_threshold=margin_arcsec)
        cat.write_catalog(out, catalog_name=name, as_collection=True, overwrite=True, progress_bar=False)
    return out


__all__ = ["write_hats"]
