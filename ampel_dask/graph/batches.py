"""A work unit's alert batch: the columns T0 needs, and its histories when a step asks for them."""

from __future__ import annotations

from functools import lru_cache

import pyarrow as pa
import pyarrow.parquet as pq

from ..io.archive import read_dps, read_part
from ..io.layout import DATAPOINT, coded_bands


def read_partition(archive_root: str, rel_paths: str | list[str], columns: list[str] | None) -> pa.Table:
    """The columns T0 needs (never the nested history unless a filter asks for it), of one part or of
    a work unit of small parts (their rows concatenated in the given order)."""
    paths = [f"{archive_root}/{p}" for p in ([rel_paths] if isinstance(rel_paths, str) else rel_paths)]
    tables = []
    for path in paths:
        pf = pq.ParquetFile(path)  # opened once: a work unit may be a hundred small parts
        cols = columns
        if cols is not None:  # an older part lacks the history aggregates: a channel's view makes them
            names = set(pf.schema_arrow.names) | {"dps"}
            cols = [c for c in cols if c in names]
        tables.append(read_part(path, cols, pf))
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    return table.replace_schema_metadata({b"ampel_dask.paths": "\n".join(paths).encode()})


@lru_cache(maxsize=2)  # a 25k-alert part decodes to ~45 MB
def _histories(path: str) -> pa.ChunkedArray:
    """The nested history of a partition: read once per process however many channels need it (bands
    as codes: the loop's datapoints, see ``io.layout.BAND_CODES``)."""
    return read_dps(path, coded=True)


def with_histories(table: pa.Table) -> pa.Table:
    """Add ``dps`` to a batch read without it (rows in file order, as read_partition returns them), its
    bands as codes."""
    if "dps" in table.column_names:
        return table
    paths = (table.schema.metadata or {}).get(b"ampel_dask.paths")
    if paths is None:
        raise ValueError("batch has neither dps nor the paths of its partitions")
    chunks = [c for p in paths.decode().split("\n") for c in _histories(p).chunks]
    return table.append_column("dps", pa.chunked_array(chunks) if chunks else coded_bands(pa.array([], pa.list_(DATAPOINT))))
