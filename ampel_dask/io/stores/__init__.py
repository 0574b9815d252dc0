"""Result stores: Parquet (default) and MongoDB (optional), both :class:`ResultStore`.

``store_spec`` makes the spec a store is opened from (what tasks receive); ``open_store`` opens it,
once per process and spec.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .base import FAILURE, POINT_PROVENANCE, PROVENANCE, UNIT_FAILED, Deliveries, ResultStore, StatesGone, StoreFormatError
from .mongo import is_mongo_uri, redact, uri_database
from .parquet import ParquetStore


def store_spec(location: str | Path, path: str | None = None, database: str | None = None) -> dict:
    """The spec of the store at ``location``: a ``mongodb://host:port/DB`` URI (database: ``database``,
    else the URI's path, else ampel_dask; ``path``: the local folder for T3 files, default ``store``) or a
    Parquet store folder."""
    if is_mongo_uri(str(location)):
        return {"kind": "mongo", "uri": str(location), "database": database or uri_database(str(location)), "path": path or "store"}
    return {"kind": "parquet", "path": str(Path(location).resolve())}


def open_store(spec: dict) -> ResultStore:
    """A store from its spec dict (what tasks receive; a store object itself stays on the driver)."""
    return _open(json.dumps(spec, sort_keys=True))


@lru_cache(maxsize=8)
def _open(spec_json: str) -> ResultStore:
    spec = json.loads(spec_json)
    if spec["kind"] == "parquet":
        return ParquetStore(spec["path"])
    if spec["kind"] == "mongo":
        from .mongo import MongoStore

        return MongoStore(spec["uri"], spec.get("database", "ampel_dask"), spec.get("path"))
    raise ValueError(f"unknown store kind {spec['kind']!r}")


__all__ = ["ResultStore", "StoreFormatError", "Deliveries", "StatesGone", "ParquetStore", "PROVENANCE", "POINT_PROVENANCE", "UNIT_FAILED", "FAILURE",
           "store_spec", "open_store",
           "is_mongo_uri", "redact", "uri_database"]  # fmt: skip
