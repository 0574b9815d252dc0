"""Alert packets from Parquet dumps, as broker data lakes hold them: one row per alert, the packet's
structure kept as nested columns (ZTF ``candidate``, ``prv_candidates``, ``fp_hists``, cutouts; Rubin
``diaSource``, ``prvDiaSources``, ``prvDiaForcedSources``, ``diaObject``, ...).

The rows are conformed to the Arrow shapes the Avro path's DataFusion decoding gives (:mod:`.columnar`),
so the survey normalisers (:mod:`.ztf`, :mod:`.lsst`) take them unchanged and an alert archives to the
same row from either form (``tests/test_parquet_ingest.py``). Conforming is:

- only the packet's own top-level fields are read (a column projection): the broker's additions
  (classifier scores, cross-matches, truth tables) are never decoded;
- a column of Arrow type ``null`` (or a list of them: pandas writes an all-null column so) is absent;
- large, dictionary and view variants of strings, bytes and lists become the plain types;
- integer ids that a pandas round trip stored as float64 (an int column with nulls becomes float): a value
  a float64 holds exactly (integral, ``|x| <= 2**53``) is the id. A value that has lost digits is never
  used as an id: where it names a datapoint of the history (ZTF ``prv_candidates.candid``, Rubin
  ``prvDiaSources.diaSourceId`` / ``prvDiaForcedSources.diaForcedSourceId``) it becomes a stable negative
  hash of itself and the datapoint's time, position and flux (the same detection gets the same id in
  every packet of the dump; it cannot equal the survey's id, which the dump no longer holds); anywhere
  else it becomes null, and a row left without what names it is quarantined saying so.

Files are read in row groups, and those in record batches, so a big dump never sits in memory whole.
The survey, and the writer schema's name and version where the dump's footer carries an Avro schema
(``parquet.avro.schema``, as parquet-avro writes it), are read from the footer once per file.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..keys import negative_id
from .avro import WriterSchema

SUFFIXES = (".parquet", ".parq")

# the packets' own top-level fields, every schema version (ZTF 1.x-4.02, lsst 3.0-11.x, ELAsTiCC), plus
# Fink's ``lsst_schema_version`` (the Rubin schema version its Spark packets carry in the record)
PACKET_FIELDS = {
    "ztf": ("schemavsn", "publisher", "objectId", "alertId", "candid", "candidate", "prv_candidates", "fp_hists",
            "cutoutScience", "cutoutTemplate", "cutoutDifference"),
    "lsst": ("alertId", "diaSourceId", "observation_reason", "target_name", "diaSource", "prvDiaSources",
             "prvDiaForcedSources", "prvDiaNondetectionLimits", "diaObject", "ssObject", "ssSource", "MPCORB",
             "mpc_orbits", "cutoutDifference", "cutoutScience", "cutoutTemplate", "lsst_schema_version"),
}  # fmt: skip

_ID_NAME = re.compile(r"(id|Id|ID)$|^objectidps\d$|^visit$")
_EXACT = 2.0**53
LOST_ID = 5  # negative_id family of history detections whose id a float64 lost (1, 2: limits, forced; 3, 4: stocks)
# history detections whose lost id becomes a hash: (list column, id field) -> fields that pin the datapoint down
# (the first name present of each group)
HISTORY_IDS: dict[tuple[str, str], list[tuple[str, ...]]] = {
    ("prv_candidates", "candid"): [("jd",), ("fid",), ("pid",), ("ra",), ("dec",), ("magpsf",)],
    ("prvDiaSources", "diaSourceId"): [("midpointMjdTai", "midPointTai"), ("ra",), ("dec", "decl"), ("psfFlux", "psFlux")],
    ("prvDiaForcedSources", "diaForcedSourceId"): [("midpointMjdTai", "midPointTai"), ("ra",), ("dec", "decl"), ("psfFlux", "psFlux")],
}


def has_magic(path: str | Path) -> bool:
    """Parquet's file signature, for a file named without a Parquet suffix."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


class NotAlertDump(ValueError):
    """A Parquet file whose columns are not alert packets (a catalog, an archive part, ...)."""


def survey_of(schema: pa.Schema) -> str | None:
    """Which normaliser understands rows of this schema (the test the Avro path makes on writer schemas)."""
    names = set(schema.names)

    def struct(name: str) -> bool:
        return name in names and pa.types.is_struct(schema.field(name).type)

    if struct("candidate") and names & {"objectId", "alertId", "candid"}:
        return "ztf"
    if struct("diaSource"):
        return "lsst"
    return None


@dataclass(frozen=True)
class Dump:
    """A Parquet alert dump: its survey, writer schema (name/version) and row groups (rows, bytes)."""

    path: str
    survey: str
    schema: WriterSchema
    columns: tuple[str, ...]
    row_groups: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return sum(r for r, _ in self.row_groups)


def open_dump(path: str | Path) -> Dump:
    """Read a file's footer: a :class:`Dump`, or :class:`NotAlertDump` saying what the file is instead
    (pyarrow's own errors for a file that is not readable Parquet)."""
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    survey = survey_of(schema)
    if survey is None:
        if {"alert_id", "stock", "survey"} <= set(schema.names) or {"alert_id", "cutout_science"} <= set(schema.names):
            raise NotAlertDump("an ampel-dask archive file, not an alert dump (ingest reads packets, not archives)")
        shown = ", ".join(schema.names[:8]) + (", ..." if len(schema.names) > 8 else "")
        raise NotAlertDump(f"Parquet without alert-packet columns (a ZTF 'candidate' or Rubin 'diaSource' struct); its columns: {shown}")
    meta = pf.metadata
    groups = tuple(
        (meta.row_group(i).num_rows, sum(meta.row_group(i).column(j).total_compressed_size for j in range(meta.num_columns)))
        for i in range(meta.num_row_groups)
    )
    columns = tuple(n for n in schema.names if n in PACKET_FIELDS[survey])
    return Dump(str(path), survey, _writer_schema(schema.metadata or {}), columns, groups)


def _writer_schema(meta: dict[bytes, bytes]) -> WriterSchema:
    """The Avro schema parquet-avro keeps in the footer, where there is one; else a stand-in whose
    version is unknown (the packets' own ``schemavsn`` / ``lsst_schema_version`` still name theirs)."""
    for key in (b"parquet.avro.schema", b"avro.schema"):
        if key in meta:
            try:
                raw = json.loads(meta[key])
            except ValueError:
                continue
            if isinstance(raw, dict):
                return WriterSchema(key=meta[key].decode(), parsed={}, raw=raw)
    return WriterSchema(key="parquet", parsed={}, raw={"name": "parquet", "version": "unknown"})


@dataclass(frozen=True)
class Slice:
    """Consecutive row groups of one dump: a unit of decode work, read in batches of ``batch_rows``."""

    dump: Dump
    row_groups: tuple[int, ...]
    first_row: int  # the file's row number of its first row
    rows: int
    nbytes: int
    batch_rows: int

    @property
    def path(self) -> str:
        return self.dump.path


def slices(dump: Dump, max_bytes: int, max_rows: int) -> Iterator[Slice]:
    """A dump's row groups in order, gathered up to ``max_rows`` rows or ``max_bytes`` (compressed);
    a bigger row group is a slice of its own (its batches bound the memory)."""
    groups: list[int] = []
    first = row = nbytes = 0
    for i, (n, b) in enumerate(dump.row_groups):
        if groups and (row - first + n > max_rows or nbytes + b > max_bytes):
            yield Slice(dump, tuple(groups), first, row - first, nbytes, max_rows)
            groups, first, nbytes = [], row, 0
        groups.append(i)
        row += n
        nbytes += b
    if groups and row > first:
        yield Slice(dump, tuple(groups), first, row - first, nbytes, max_rows)


@dataclass
class Batch:
    """Conformed rows of a slice, with what quarantine needs: their file row numbers, the rows as read,
    and per row the ids a float64 lost (named in a quarantine reason)."""

    path: str
    first_row: int
    rows: pa.StructArray
    original: pa.RecordBatch
    lost: dict[int, list[str]] = field(default_factory=dict)

    def label(self, i: int) -> str:
        """As the Avro path names a record: the file, and ``#n`` for any but its first row."""
        row = self.first_row + i
        return f"{self.path}#{row}" if row else self.path

    def note(self, i: int) -> str:
        names = self.lost.get(i)
        return f" ({', '.join(sorted(set(names)))} stored as float64 with digits lost: not used as an id)" if names else ""

    def raw(self, i: int) -> bytes:
        """The row as the dump has it (its packet columns), as a one-row Parquet file."""
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_batches([self.original.slice(i, 1)]), buf)
        return buf.getvalue()


@dataclass
class BadRows:
    """Rows of a slice that could not be read (a damaged page) or conformed: quarantined together."""

    row: int
    records: int
    reason: str


def read(sl: Slice) -> Iterator[Batch | BadRows]:
    """The slice's rows, batch by batch; if the file fails part way, the rows not yet read."""
    row, end = sl.first_row, sl.first_row + sl.rows
    try:
        batches = pq.ParquetFile(sl.path).iter_batches(batch_size=sl.batch_rows, row_groups=list(sl.row_groups), columns=list(sl.dump.columns), use_threads=False)
        for batch in batches:
            try:
                rows, lost = conform(batch)
            except (pa.ArrowException, ValueError, TypeError) as exc:  # a column of a type no alert field has
                yield BadRows(row, batch.num_rows, f"cannot conform Parquet rows (rows {row}-{row + batch.num_rows - 1}): {type(exc).__name__}: {exc}")
            else:
                yield Batch(sl.path, row, rows, batch, lost)
            row += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        yield BadRows(row, end - row, f"unreadable Parquet rows (rows {row}-{end - 1} of row groups {sl.row_groups[0]}-{sl.row_groups[-1]}): {type(exc).__name__}: {exc}")


def conform(batch: pa.RecordBatch) -> tuple[pa.StructArray, dict[int, list[str]]]:
    """Rows of packet columns -> the struct array a normaliser takes (see the module's docstring)."""
    lost: dict[int, list[str]] = {}
    names, arrays = [], []
    for name, arr in zip(batch.schema.names, batch.columns):
        typ = plain_type(arr.type)
        if typ is None:
            continue
        if typ != arr.type:
            arr = arr.cast(typ)
        arr = _fix_ids(name, arr, lost)
        names.append(name)
        arrays.append(arr)
    if not names:
        return pa.array([{}] * batch.num_rows, pa.struct([])), lost
    return pa.StructArray.from_arrays(arrays, names=names), lost


def plain_type(t: pa.DataType) -> pa.DataType | None:
    """The type the Avro path would give (``None``: a column that holds nothing)."""
    if pa.types.is_null(t):
        return None
    if pa.types.is_dictionary(t):
        return plain_type(t.value_type)
    if pa.types.is_large_string(t) or _is(t, "is_string_view"):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or _is(t, "is_binary_view"):
        return pa.binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or _is(t, "is_list_view"):
        value = plain_type(t.value_type)
        return None if value is None else pa.list_(pa.field(t.value_field.name, value))
    if pa.types.is_struct(t):  # a field that holds nothing keeps its type (a normaliser reads it as nulls)
        return pa.struct([pa.field(f.name, plain_type(f.type) or f.type) for f in t])
    return t


def _is(t: pa.DataType, test: str) -> bool:
    fn = getattr(pa.types, test, None)  # view types exist from pyarrow 16 on
    return bool(fn and fn(t))


def _fix_ids(name: str, arr: pa.Array, lost: dict[int, list[str]]) -> pa.Array:
    """Float-typed integer ids of a column (itself, its struct fields, its list items' fields)."""
    typ = arr.type
    if pa.types.is_floating(typ) and _ID_NAME.search(name):
        return _exact_ids(arr, name, np.arange(len(arr)), lost)
    if pa.types.is_struct(typ):
        fixable = [f.name for f in typ if pa.types.is_floating(f.type) and _ID_NAME.search(f.name)]
        if not fixable:
            return arr
        children = [_exact_ids(pc.struct_field(arr, f.name), f"{name}.{f.name}", np.arange(len(arr)), lost) if f.name in fixable else pc.struct_field(arr, f.name) for f in typ]
        return pa.StructArray.from_arrays(children, names=[f.name for f in typ], mask=arr.is_null())
    if pa.types.is_list(typ) and pa.types.is_struct(typ.value_type):
        items_type = typ.value_type
        fixable = [f.name for f in items_type if pa.types.is_floating(f.type) and _ID_NAME.search(f.name)]
        if not fixable:
            return arr
        items = arr.flatten()
        parent = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        children = []
        for f in items_type:
            child = pc.struct_field(items, f.name)
            if f.name in fixable:
                child = _exact_ids(child, f"{name}.{f.name}", parent, lost, _hash_inputs(items, HISTORY_IDS.get((name, f.name))))
            children.append(child)
        items = pa.StructArray.from_arrays(children, names=[f.name for f in items_type], mask=items.is_null())
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(arr) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), items, type=pa.list_(pa.field(typ.value_field.name, items.type)), mask=arr.is_null())
    return arr


def _hash_inputs(items: pa.StructArray, groups: list[tuple[str, ...]] | None) -> list[np.ndarray] | None:
    if groups is None:
        return None
    cols = []
    for names in groups:
        name = next((n for n in names if items.type.get_field_index(n) >= 0), None)
        values = pc.struct_field(items, name) if name is not None else pa.nulls(len(items), pa.float64())
        cols.append(np.nan_to_num(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), nan=0.0))
    return cols


def _exact_ids(values: pa.Array, path: str, row_of: np.ndarray, lost: dict[int, list[str]], hash_with: list[np.ndarray] | None = None) -> pa.Array:
    """int64 ids from float64: exact values kept, NaN is missing, a value with lost digits is hashed
    (``hash_with``: a history detection) or dropped, and its row noted."""
    x = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    present = np.asarray(values.is_valid()) & ~np.isnan(x)
    with np.errstate(invalid="ignore"):
        exact = present & (np.abs(x) <= _EXACT) & (x == np.round(x))
    bad = present & ~exact
    ids = np.where(exact, x, 0).astype(np.int64)
    if bad.any():
        for r in np.unique(row_of[bad]).tolist():
            lost.setdefault(int(r), []).append(path)
        if hash_with is not None:
            ids = np.where(bad, negative_id(LOST_ID, x, *hash_with), ids)
            exact = exact | bad
    return pa.array(ids, pa.int64(), mask=~exact)
