"""The delivery journal of a push unit (T3 webhook), in the Parquet store: what was delivered, by key.

A push is recorded only after the endpoint acknowledged it, durably (file and folder fsync'ed) before the
next request goes out; a key in the journal is never pushed again. So a re-run, a replayed live batch or
the next batch of a stream posts only what was not delivered yet: objects in a state not pushed before,
and pushes that failed. The window between an acknowledgement and its record (a crash in between) means
the receiver may see a key twice, never lose one: at-least-once, with the key to tell.

Layout: ``STORE/deliveries/<channel>/<unit delivery key>/<request key>.parquet`` (key, stock, run_id,
status, at); more than :data:`COMPACT_AT` files are merged into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ...keys import content_hash
from ..archive import parquet_bytes
from ..files import atomic_write, fsync_dir

SCHEMA = pa.schema([("key", pa.string()), ("stock", pa.int64()), ("run_id", pa.string()), ("status", pa.int32()),
                    ("at", pa.timestamp("ms", tz="UTC"))])  # fmt: skip
COMPACT_AT = 64  # files per journal before they are merged into one (a long live stream writes one a batch)


class ParquetDeliveries:
    """One push unit's journal for one channel (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _files(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*.parquet") if not p.name.startswith("."))

    def keys(self) -> pa.Array:
        """Every delivered key."""
        files = self._files()
        if len(files) > COMPACT_AT:
            files = self._compact(files)
        parts = []
        for f in files:
            try:
                parts.append(pq.ParquetFile(f).read(columns=["key"], use_threads=False).column("key"))
            except FileNotFoundError:  # merged by a compaction since the listing: its rows are in the merged file
                return self.keys()
        return pa.chunked_array(parts, pa.string()).combine_chunks() if parts else pa.array([], pa.string())

    def delivered(self, keys: Sequence[str]) -> np.ndarray:
        """For each key, was it delivered?"""
        if not len(keys):
            return np.zeros(0, dtype=bool)
        return pc.is_in(pa.array(list(keys), pa.string()), value_set=self.keys()).to_numpy(zero_copy_only=False)

    def record(self, request_key: str, keys: Sequence[str], stocks: Sequence[int], run_id: str, status: int) -> None:
        """Record one acknowledged request's objects, durably, before the caller sends the next one."""
        now = datetime.now(timezone.utc)
        table = pa.table({"key": pa.array(list(keys), pa.string()), "stock": pa.array(list(stocks), pa.int64()),
                          "run_id": pa.array([run_id] * len(keys), pa.string()), "status": pa.array([status] * len(keys), pa.int32()),
                          "at": pa.array([now] * len(keys), SCHEMA.field("at").type)}, schema=SCHEMA)  # fmt: skip
        atomic_write(self.folder / f"{request_key}.parquet", parquet_bytes(table), durable=True)

    def _compact(self, files: list[Path]) -> list[Path]:
        """Merge the journal's files into one (written durably before the merged ones are removed)."""
        table = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
        data = parquet_bytes(table)
        merged = self.folder / f"_merged-{content_hash(data)}.parquet"
        atomic_write(merged, data, durable=True)
        for f in files:
            if f != merged:
                f.unlink(missing_ok=True)
        fsync_dir(self.folder)
        return [merged]


__all__ = ["ParquetDeliveries", "SCHEMA", "COMPACT_AT"]
