"""T3 export: the run's selection as Parquet and/or CSV files, for notebooks, spreadsheets and other tools.

Also home of the small helpers the built-in T3 units share (column patterns, JSON-safe values,
atomic file targets), so that each unit module stays short.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from ...io.files import atomic_target
from ..base import T3Context, T3Unit, UnitConfig

T2_SEP = "__"  # T2 result columns are named <T2 unit>__<field>
_PATTERN = re.compile(r"[*?\[]")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

# --- helpers shared by the T3 units ---------------------------------------------------------------


def t2_columns(names: Sequence[str]) -> list[str]:
    """Columns holding T2 results (``<unit>__<field>``), in table order."""
    return [n for n in names if T2_SEP in n.strip("_")]


def match_columns(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Columns matching shell-style patterns, in pattern order, each once (``T2Classifier__*``)."""
    out: list[str] = []
    for pat in patterns:
        for n in names if _PATTERN.search(pat) else ([pat] if pat in names else []):
            if fnmatchcase(n, pat) and n not in out:
                out.append(n)
    return out


def safe_name(text: str) -> str:
    """A file-name-safe version of an object id or channel name."""
    return _SAFE_NAME.sub("_", str(text)).strip("._") or "_"


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, bytes -> hex, nested lists/dicts cleaned recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)


def to_json_column(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A nested column as one JSON string per row (null stays null)."""
    dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    return pa.array([None if v is None else dumps(json_safe(v)) for v in col.to_pylist()], type=pa.string())


# --- the unit -------------------------------------------------------------------------------------


class T3ExportConfig(UnitConfig):
    formats: list[Literal["parquet", "csv"]] = Field(
        default=["parquet", "csv"], min_length=1, description="file formats to write, one file each"
    )
    filename: str | None = Field(
        None, description="file name stem (no folder, no suffix); default '<channel>_export'"
    )
    include: list[str] | None = Field(
        None,
        description="columns to write, in this order; shell patterns allowed ('T2Classifier__*'); None = all. "
        "Plain names absent from the selection are written as empty columns, so the file layout is stable",
    )
    exclude: list[str] = Field(default_factory=list, description="columns (or patterns) left out")
    dps: Literal["drop", "json"] = Field(
        "drop", description="the nested datapoints: 'drop' them, or write them as one JSON string per object"
    )

    @field_validator("filename")
    @classmethod
    def _stem_only(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or "\\" in v or v in (".", "..")):
            raise ValueError("filename is a stem (no folder separators), e.g. 'candidates'")
        return v


class T3Export(T3Unit):
    """Write the selection (one row per object, T2 results as columns) to Parquet and/or CSV."""

    Config = T3ExportConfig
    version = "1"

    @property
    def reads_dps(self) -> bool:
        c = self.config
        wanted = c.include is None or bool(match_columns(["dps"], c.include))
        return c.dps == "json" and wanted and not match_columns(["dps"], c.exclude)

    def table(self, selection: pa.Table) -> pa.Table:
        """The table as it is exported: columns chosen, ``dps`` dropped or turned into JSON."""
        c = self.config
        names = selection.column_names
        if c.include is None:
            cols = list(names)
        else:  # patterns expand to what exists; plain names are kept even when absent
            cols = [n for p in c.include for n in (match_columns(names, [p]) if _PATTERN.search(p) else [p])]
            cols = list(dict.fromkeys(cols))
        drop = set(match_columns(cols, c.exclude))
        if c.dps == "drop":
            drop.add("dps")
        arrays, fields = [], []
        for name in cols:
            if name in drop:
                continue
            if name in names:
                col = selection.column(name)
                if name == "dps":
                    col = to_json_column(col)
                field = selection.schema.field(name).with_type(col.type)  # keeps a T2 column's label and unit
            else:  # asked for by name, absent in this run (e.g. a T2 unit without results)
                col = pa.nulls(selection.num_rows, pa.null())
                field = pa.field(name, pa.null())
            arrays.append(col)
            fields.append(field)
        if not fields:
            raise ValueError(f"{self.name()}: include/exclude leave no column to export")
        return pa.table(arrays, schema=pa.schema(fields))

    def react(self, selection: pa.Table, context: T3Context) -> list[dict]:
        return self.react_batches(iter([selection]), context)

    def react_batches(self, batches: Iterator[pa.Table], context: T3Context) -> list[dict]:
        """Each batch written as it comes (one row group each): the files grow, memory does not."""
        stem = self.config.filename or f"{safe_name(context.channel)}_export"
        out_dir = Path(context.out_dir)
        paths = {fmt: out_dir / f"{stem}.{fmt}" for fmt in self.config.formats}
        rows = 0
        with ExitStack() as stack:
            tmps = {fmt: stack.enter_context(atomic_target(p)) for fmt, p in paths.items()}
            writers: dict = {}
            for batch in batches:
                table = self.table(batch)
                rows += table.num_rows
                for fmt, tmp in tmps.items():
                    if fmt == "parquet":
                        w = writers.get(fmt) or writers.setdefault(fmt, stack.enter_context(pq.ParquetWriter(tmp, table.schema, compression="zstd")))
                        w.write_table(table)
                    else:
                        flat = csv_table(table)
                        w = writers.get(fmt) or writers.setdefault(fmt, stack.enter_context(pacsv.CSVWriter(tmp, flat.schema)))
                        w.write_table(flat)
        return [{"kind": "file", "format": fmt, "path": str(p), "rows": rows} for fmt, p in paths.items()]


def csv_table(table: pa.Table) -> pa.Table:
    """The table as CSV holds it: nested columns (lists, structs) as JSON text, since CSV has no nesting,
    and binary columns (``state_id``: 128-bit content ids) as hex text."""
    flat = table
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            flat = flat.set_column(i, field.name, to_json_column(table.column(i)))
        elif pa.types.is_binary(field.type) or pa.types.is_fixed_size_binary(field.type) or pa.types.is_large_binary(field.type):
            flat = flat.set_column(i, field.name, pa.array([None if v is None else v.hex() for v in table.column(i).to_pylist()], pa.string()))
    return flat


__all__ = ["T3Export", "T3ExportConfig", "t2_columns", "match_columns", "json_safe", "atomic_target", "safe_name"]
