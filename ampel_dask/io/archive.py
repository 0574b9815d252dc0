"""The Parquet alert archive: hive-partitioned parts named by content hash, and a small index.

Layout::

    ARCHIVE/survey=ztf/night=20181129/part-<hash>.parquet      alert rows (flat columns)
    ARCHIVE/survey=ztf/night=20181129/_dps-<hash>.arrow        their histories (``dps``), same row order
    ARCHIVE/survey=ztf/night=20181129/_cutouts-<hash>.parquet  cutouts of the same rows (underscore: dataset readers skip it)
    ARCHIVE/_index.parquet                                     one row per part (found without scanning)
    ARCHIVE/quarantine/                                        packets that did not decode or normalise

Every file is written to a temporary name and renamed into place; a part's name is the hash of its
bytes (Parquet and history), so writing the same rows again lands on the same name and changes nothing.

Why the nested history lives beside the Parquet file, in Arrow IPC (Feather v2, zstd): decoding a
``list<struct>`` column from Parquet costs ~4 us per alert, 7x more than every flat column together,
while an IPC buffer decompresses at ~0.6 us per alert in a smaller file. Filters read flat columns only;
a run decodes histories for the batches that need them at IPC speed. Parts written before this layout
(history inside the Parquet file) are read the same way.

Parquet files are LZ4 (LZ4_RAW): against zstd level 1, reading the columns a filter needs takes
0.29 instead of 0.54 us per alert and writing 2.1 instead of 3.3 us, for files ~25% larger (cutouts, gzipped
FITS already, are not compressed again: :data:`CUTOUT_OPTS`). The
histories stay zstd in the archive (LZ4 would double them) and are LZ4 in a run's store.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..keys import content_hash
from .files import atomic_write, checkpoint, later, make_dirs
from .layout import coded_bands, plain_bands

INDEX = "_index.parquet"
RETIRED = "_retired.json"  # files replaced by compaction, kept a while for runs still reading them (io/compact.py)
INDEX_SCHEMA = pa.schema(
    [
        ("survey", pa.string()),
        ("night", pa.int32()),
        ("path", pa.string()),
        ("content_hash", pa.string()),
        ("rows", pa.int64()),
        ("min_mjd", pa.float64()),
        ("max_mjd", pa.float64()),
        ("min_alert_id", pa.int64()),
        ("max_alert_id", pa.int64()),
        ("cutouts", pa.string()),
        ("dps", pa.string()),
        ("cutout_refs", pa.list_(pa.string())),
    ]
)
PARQUET_OPTS = dict(compression="lz4", write_statistics=True)


def parquet_bytes(table: pa.Table, lead: int | None = None) -> bytes:
    """Deterministic Parquet bytes of a table (same rows and library version -> same bytes).

    Dictionary encoding only for text columns: on measurements, photometry and ids it is tried and
    abandoned page by page, which made writes 1.4-1.7x slower and files larger than without it.
    ``lead``: the first ``lead`` rows are a row group of their own (the rest one more), which a reader
    wanting only them can read alone.
    """
    buf = io.BytesIO()
    opts = dict(use_dictionary=text_columns(table.schema), **PARQUET_OPTS)
    if not lead or lead >= table.num_rows:
        pq.write_table(table, buf, **opts)
    else:
        with pq.ParquetWriter(buf, table.schema, **opts) as w:
            w.write_table(table.slice(0, lead), row_group_size=lead)
            w.write_table(table.slice(lead), row_group_size=table.num_rows - lead)
    return buf.getvalue()


#: cutouts are gzipped FITS already: LZ4 over them saved ~1% of their bytes (3,935 ZTF alerts, 158 MB)
#: and dictionary encoding of unique blobs is tried and abandoned; without both they are written 1.3x and
#: read 1.5x faster, 0.9% larger. Statistics on ``alert_id`` only (what ``read_cutouts`` filters on).
CUTOUT_OPTS = dict(compression="none", use_dictionary=False, write_statistics=["alert_id"])


def cutout_bytes(cutouts: pa.Table) -> bytes:
    """Deterministic Parquet bytes of a part's cutouts (see :data:`CUTOUT_OPTS`)."""
    buf = io.BytesIO()
    pq.write_table(cutouts, buf, **CUTOUT_OPTS)
    return buf.getvalue()


def text_columns(schema: pa.Schema) -> list[str]:
    """Parquet paths of the string and binary leaves (nested ones as ``a.list.element.b``)."""
    out: list[str] = []

    def walk(path: str, typ: pa.DataType) -> None:
        if pa.types.is_struct(typ):
            for f in typ:
                walk(f"{path}.{f.name}", f.type)
        elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
            walk(f"{path}.list.element", typ.value_type)
        elif pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
            out.append(path)

    for f in schema:
        walk(f.name, f.type)
    return out


DPS_OPTIONS = {  # archive: kept for years, so small; store: written and read within runs, so fast
    "zstd": pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=1)),
    "lz4": pa.ipc.IpcWriteOptions(compression="lz4"),
}


def dps_bytes(dps: pa.ChunkedArray | pa.Array, codec: str = "zstd") -> pa.Buffer:
    """Deterministic Arrow IPC file bytes of a part's histories (one record batch, column ``dps``), as
    the Arrow buffer they were written to: a copy into ``bytes`` cost 20-25 ms of ~0.1 s for the 38 MB
    of one 10 M-alert LSST history bucket's states (glibc maps a fresh block for each above 32 MiB)."""
    table = pa.table({"dps": dps}).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=DPS_OPTIONS[codec]) as writer:
        writer.write_table(table)
    return sink.getvalue()


def dps_path(part_path: str | Path) -> Path:
    """The datapoint file beside a Parquet file: ``part-<hash>.parquet`` -> ``_dps-<hash>.arrow`` (a
    store's ``<key>.parquet`` -> ``_dps-<key>.arrow``)."""
    p = Path(part_path)
    return p.with_name("_dps-" + p.name.removeprefix("part-").removesuffix(".parquet") + ".arrow")


def read_dps(part_path: str | Path, coded: bool = False) -> pa.ChunkedArray:
    """A part's histories in row order (from its IPC file, or from the Parquet file of an older part),
    ``band`` as plain strings, or as :data:`~.layout.BAND_CODES` (``coded``: what the run's loop holds),
    whichever way the file stores it (an archive written before the codes stores strings)."""
    side = dps_path(part_path)
    if side.exists():
        dps = _ipc_dps(side)
    else:
        pf = pq.ParquetFile(part_path)
        if "dps" not in pf.schema_arrow.names:
            raise FileNotFoundError(f"{side}: the history file of {part_path} is missing: the archive is incomplete")
        dps = pf.read(columns=["dps"], use_threads=False).column("dps")
    return coded_bands(dps) if coded else plain_bands(dps)


def _ipc_dps(path: Path) -> pa.ChunkedArray:
    with pa.OSFile(str(path)) as src:
        return pa.ipc.open_file(src).read_all().column("dps")


def read_part(part_path: str | Path, columns: list[str] | None = None, pf: pq.ParquetFile | None = None) -> pa.Table:
    """A part's rows: the flat columns from Parquet, ``dps`` (if asked for) from its history file
    (``pf``: the part's Parquet file if the caller has it open already)."""
    pf = pf or pq.ParquetFile(part_path)
    names = pf.schema_arrow.names
    if "dps" in names:  # an older part: everything in one file
        return pf.read(columns=columns, use_threads=False)
    want_dps = columns is None or "dps" in columns
    flat = pf.read(columns=None if columns is None else [c for c in columns if c != "dps"], use_threads=False)
    return flat.append_column("dps", read_dps(part_path)) if want_dps else flat


log = logging.getLogger("ampel_dask")


@dataclass(frozen=True)
class Partition:
    """One part file of the archive, as the index knows it."""

    survey: str
    night: int
    path: str  # relative to the archive root
    content_hash: str
    rows: int
    min_mjd: float
    max_mjd: float
    min_alert_id: int
    max_alert_id: int
    cutouts: str | None  # the part's own cutouts file (its alerts only)
    dps: str | None = None  # the history file (None: an older part, history inside the Parquet file)
    #: cutouts files of the parts a compaction merged into this one, kept in place rather than rewritten
    #: (:data:`REFERENCE_BYTES`): they also hold alerts of other parts, so they are read filtered by alert id
    cutout_refs: tuple[str, ...] = ()

    @property
    def cutout_files(self) -> tuple[str, ...]:
        """Every file holding this part's cutouts (its own, then those it shares)."""
        return ((self.cutouts,) if self.cutouts else ()) + self.cutout_refs

    @property
    def files(self) -> tuple[str, ...]:
        """Every archive file this part needs: rows, histories, cutouts (what sweeps and retirement keep)."""
        return (self.path, *((self.dps,) if self.dps else ()), *self.cutout_files)


#: a cutouts file at least this large is referenced by the parts a compaction merges its part into,
#: not rewritten: cutouts are most of an archive's bytes (ZTF: ~40 KB an alert), and copying them made
#: compaction cost a nightly tarball's ingest ~20%; smaller files (a mixed-order ingest's tiny parts)
#: are rewritten, so that a part's cutouts stay in a few files of at least this size
REFERENCE_BYTES = 8 << 20


#: canonical row order of a part: by object, then time, then alert id
ROW_ORDER = [("stock", "ascending"), ("mjd", "ascending"), ("alert_id", "ascending")]


def sort_rows(table: pa.Table) -> pa.Table:
    """A table in canonical row order (:data:`ROW_ORDER`)."""
    return table.sort_by(ROW_ORDER)


class Archive:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # --- paths ---
    @property
    def index_path(self) -> Path:
        return self.root / INDEX

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "_tmp"

    def night_dir(self, survey: str, night: int) -> Path:
        return self.root / f"survey={survey}" / f"night={night:08d}"

    def exists(self) -> bool:
        return self.index_path.exists()

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.index_path.exists():
            with self.locked():
                if not self.index_path.exists():
                    atomic_write(self.index_path, parquet_bytes(INDEX_SCHEMA.empty_table()))

    # --- index ---
    def index(self) -> pa.Table:
        if not self.index_path.exists():
            return INDEX_SCHEMA.empty_table()
        table = pq.read_table(self.index_path)
        if "dps" not in table.column_names:  # an index written before history files existed
            table = table.append_column("dps", pa.nulls(table.num_rows, pa.string()))
        if "cutout_refs" not in table.column_names:  # an index written before compaction referenced cutouts
            table = table.append_column("cutout_refs", pa.array([[]] * table.num_rows, pa.list_(pa.string())))
        return table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)

    def partitions(self, surveys: list[str] | None = None, nights: list[int] | None = None) -> list[Partition]:
        rows = self.index().to_pylist()
        out = [Partition(**{**r, "cutout_refs": tuple(r["cutout_refs"] or ())}) for r in rows]
        if surveys:
            out = [p for p in out if p.survey in surveys]
        if nights:
            wanted = set(nights)
            out = [p for p in out if p.night in wanted]
        return out

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise index updates between concurrent ingests (advisory file lock; re-entrant for this
        object, so that an ingest can hold it from its duplicate check to its index update)."""
        if getattr(self, "_held", False):
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "_index.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._held = True
            try:
                yield
            finally:
                self._held = False
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def publishing(self) -> Iterator[None]:
        """Hold the lock while parts are renamed into place and indexed, with a marker file that only an
        ingest killed in between leaves behind: the next one then sweeps the part files the index does
        not name (readers of the folders would see those rows twice once they are ingested again). The
        archive is listed only then, not at every ingest or live batch."""
        marker = self.root / "_publishing"
        with self.locked():
            if marker.exists() and (orphans := self.sweep_orphans()):
                log.warning("removed %d part file(s) a killed ingest left unindexed (their alerts are ingested again when given)", len(orphans))
            atomic_write(marker, str(os.getpid()).encode())
            yield
            marker.unlink()

    def retired(self) -> dict[str, float]:
        """Files compaction replaced (relative path -> when), not deleted yet."""
        path = self.root / RETIRED
        return json.loads(path.read_text()) if path.exists() else {}

    def retire(self, files: list[str]) -> None:
        """Journal files replaced (by compaction, or history segments merged away) for deletion after a
        grace period (``io/compact.delete_retired``); call with the lock held."""
        if not files:
            return
        journal = self.retired()
        now = time.time()
        for f in files:
            journal.setdefault(f, now)
        atomic_write(self.root / RETIRED, json.dumps(journal, sort_keys=True).encode())

    def sweep_orphans(self) -> list[str]:
        """Remove part files the index does not name (call with the lock held); files compaction retired
        wait for their grace period."""
        known = set(self.retired())
        for p in self.partitions():
            known |= set(p.files)
        removed = []
        for f in sorted(self.root.glob("survey=*/night=*/*")):
            rel = f.relative_to(self.root).as_posix()
            if f.is_file() and f.name.startswith(("part-", "_dps-", "_cutouts-")) and rel not in known:
                f.unlink()
                removed.append(rel)
        return removed

    def add_partitions(self, parts: list[Partition]) -> None:
        """Append parts to the index (atomic replace, under the lock); already-known paths are skipped."""
        if not parts:
            return
        checkpoint()  # the parts' bytes were fsync'ed by their writers; their names (renames by this process) now
        with self.locked():
            current = self.index()
            known = set(current.column("path").to_pylist())
            new = [p.__dict__ for p in parts if p.path not in known]
            if not new:
                return
            table = pa.concat_tables([current, pa.Table.from_pylist(new, schema=INDEX_SCHEMA)])
            table = table.sort_by([("survey", "ascending"), ("night", "ascending"), ("path", "ascending")])
            atomic_write(self.index_path, parquet_bytes(table))

    def replace_partitions(self, old: list[str], new: list[Partition]) -> None:
        """Drop the index entries of ``old`` paths and add ``new`` ones in one atomic index write."""
        checkpoint()  # the new parts' names (renames by this process) durable before the index names them
        with self.locked():
            current = self.index()
            gone = set(old) - {p.path for p in new}
            keep = current.filter(pa.array([p not in gone for p in current.column("path").to_pylist()], pa.bool_()))
            known = set(keep.column("path").to_pylist())
            rows = [p.__dict__ for p in new if p.path not in known]
            table = pa.concat_tables([keep, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)])
            table = table.sort_by([("survey", "ascending"), ("night", "ascending"), ("path", "ascending")])
            atomic_write(self.index_path, parquet_bytes(table))

    # --- data ---
    def read(self, part: Partition, columns: list[str] | None = None) -> pa.Table:
        return read_part(self.root / part.path, columns)

    def read_cutouts(self, part: Partition, alert_ids: list[int] | None = None, files: tuple[str, ...] | None = None) -> pa.Table | None:
        """A part's cutouts (``alert_ids``: only these alerts' rows, read with a Parquet filter; ``files``:
        only from these of its files). A shared file (:attr:`Partition.cutout_refs`) is read filtered by
        the part's own alert ids, so no other part's cutouts come with it."""
        files = part.cutout_files if files is None else files
        if not files:
            return None
        if alert_ids is None and files == (part.cutouts,):
            return pq.read_table(self.root / part.cutouts)
        if any(f in part.cutout_refs for f in files):  # shared files: this part's alerts only
            own = self.read(part, ["alert_id"]).column("alert_id").to_numpy()
            alert_ids = own if alert_ids is None else np.intersect1d(own, np.asarray(alert_ids, dtype=np.int64))
        if not len(alert_ids):
            return pq.read_schema(self.root / files[0]).empty_table()
        wanted = [("alert_id", "in", [int(a) for a in alert_ids])]
        tables = [pq.read_table(self.root / f, filters=wanted) for f in files]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")

    def write_part(self, table: pa.Table, cutouts: pa.Table | None) -> Partition:
        """Write one part (rows of a single survey and night) and its cutouts; returns its index entry."""
        return self.publish(stage(table, cutouts, self.tmp_dir / "direct"))

    def publish(self, staged: Staged, keep: np.ndarray | None = None) -> Partition | None:
        """Move a staged part into the archive; ``keep`` drops rows (duplicates) and rewrites it."""
        if keep is not None and not keep.all():
            table = pq.read_table(staged.path)
            if staged.dps is not None:
                table = table.append_column("dps", _ipc_dps(staged.dps))
            cut = pq.read_table(staged.cutouts) if staged.cutouts else None
            discard(staged)
            if not keep.any():
                return None
            mask = pa.array(keep)
            refs = staged.cutout_refs
            staged = stage(table.filter(mask), cut, staged.path.parent)  # stage() picks the kept rows' cutouts
            staged.cutout_refs = refs
        ndir = self.night_dir(staged.survey, staged.night)
        later(ndir, *make_dirs(ndir))  # the renames below are durable with the folder: made so before the index names them
        part_path = ndir / f"part-{staged.content_hash}.parquet"
        cut_rel = dps_rel = None
        if staged.dps is not None:
            dps_file = dps_path(part_path)
            os.replace(staged.dps, dps_file)
            dps_rel = str(dps_file.relative_to(self.root))
        if staged.cutouts is not None:
            cut_path = ndir / f"_cutouts-{staged.content_hash}.parquet"
            os.replace(staged.cutouts, cut_path)
            cut_rel = str(cut_path.relative_to(self.root))
        os.replace(staged.path, part_path)
        return Partition(
            survey=staged.survey,
            night=staged.night,
            path=str(part_path.relative_to(self.root)),
            content_hash=staged.content_hash,
            rows=len(staged.alert_ids),
            min_mjd=staged.min_mjd,
            max_mjd=staged.max_mjd,
            min_alert_id=int(staged.alert_ids.min()),
            max_alert_id=int(staged.alert_ids.max()),
            cutouts=cut_rel,
            dps=dps_rel,
            cutout_refs=tuple(sorted(set(staged.cutout_refs) - {cut_rel})),
        )


@dataclass
class Staged:
    """A part written under a temporary name, waiting for the de-duplication verdict."""

    survey: str
    night: int
    path: Path
    cutouts: Path | None
    dps: Path | None
    content_hash: str
    alert_ids: np.ndarray  # in row order
    min_mjd: float
    max_mjd: float
    cutout_refs: tuple[str, ...] = ()  # archive files holding more of its cutouts (a merge's references)


def stage(table: pa.Table, cutouts: pa.Table | None, tmp_dir: Path, durable: bool = True) -> Staged:
    """Sort rows canonically and write the part (and its aligned cutouts) under temporary names.

    ``durable=False``: not fsync'ed file by file; the caller calls :func:`sync` before publishing."""
    table = sort_rows(table)
    data = parquet_bytes(table.drop_columns(["dps"]) if "dps" in table.column_names else table)
    hist = dps_bytes(coded_bands(table.column("dps"))) if "dps" in table.column_names else None  # bands as codes: 12% smaller
    digest = content_hash(data, hist) if hist is not None else content_hash(data)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    path = tmp_dir / f"part-{digest}.{token}.parquet"
    atomic_write(path, data, durable)
    dps_file = None
    if hist is not None:
        dps_file = tmp_dir / f"dps-{digest}.{token}.arrow"
        atomic_write(dps_file, hist, durable)
    cut_path = None
    aligned = align_cutouts(table, cutouts) if cutouts is not None else None
    if aligned is not None and aligned.num_rows:
        cut_path = tmp_dir / f"cutouts-{digest}.{token}.parquet"
        atomic_write(cut_path, cutout_bytes(aligned), durable)
    mjd = table.column("mjd").to_numpy(zero_copy_only=False)
    return Staged(
        survey=table.column("survey")[0].as_py(),
        night=int(table.column("night")[0].as_py()),
        path=path,
        cutouts=cut_path,
        dps=dps_file,
        content_hash=digest,
        alert_ids=table.column("alert_id").to_numpy(zero_copy_only=False),
        min_mjd=float(np.nanmin(mjd)),
        max_mjd=float(np.nanmax(mjd)),
    )


def discard(staged: Staged) -> None:
    for p in (staged.path, staged.cutouts, staged.dps):
        if p is not None and p.exists():
            p.unlink()


def align_cutouts(table: pa.Table, cutouts: pa.Table) -> pa.Table:
    """Cutout rows in the order of the part's rows (one per alert id, first copy wins; alerts without
    cutouts have no row). Cutouts are most of an archive's bytes: taken once, or not at all when they
    are in order already."""
    ids = cutouts.column("alert_id").to_numpy()
    uniq, first = np.unique(ids, return_index=True)
    want = table.column("alert_id").to_numpy()
    at = np.minimum(np.searchsorted(uniq, want), max(len(uniq) - 1, 0))
    found = uniq[at] == want if len(uniq) else np.zeros(len(want), dtype=bool)
    order = first[at[found]]
    if len(order) == cutouts.num_rows and np.array_equal(order, np.arange(len(order))):
        return cutouts
    return cutouts.take(pa.array(order, type=pa.int64()))
