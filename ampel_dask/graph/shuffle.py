"""The disk shuffle of history channels: passing alerts and their objects' datapoints, by object bucket.

Each ``pass``/``hist`` task writes one Arrow IPC file whose record batch *i* holds bucket *i*; each
``t1h`` task reads only its bucket's batch of every file. No table travels through the scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.archive import read_dps
from ..io.arrays import contains, one_batch, take_rows
from ..io.layout import BAND_CODES, band_as
from ..io.files import atomic_target
from ..keys import bucket_of
from ..tiers.states import alert_access, thinned_history

if TYPE_CHECKING:
    from .tasks import T0Result


def write_buckets(table: pa.Table, shuffle_dir: str, kind: str, name: str, nbuckets: int) -> None:
    """Rows grouped by the bucket of their stock into one Arrow IPC file ``<kind>/<name>.arrow`` whose
    record batch *i* holds bucket *i* (empty or not): one file per task instead of one per bucket, and
    each reader reads only its batch of every file. Rows already in bucket order are not moved.
    Buffers are LZ4-compressed: a history shuffle repeats each object's stock and packet down its rows and
    holds columns a survey leaves empty; 10 M LSST alerts wrote 12 GB of it uncompressed (a quarter with
    LZ4, decompressed at ~1.2 GB/s), more than the page cache kept for the buckets to read back."""
    if not table.num_rows:
        return
    b = bucket_of(table.column("stock").to_numpy(), nbuckets)
    if (b[1:] < b[:-1]).any():
        order = np.argsort(b, kind="stable")
        table, b = table.take(pa.array(order)), b[order]
    table = table.combine_chunks()
    bounds = np.searchsorted(b, np.arange(nbuckets + 1))
    with atomic_target(Path(shuffle_dir) / kind / f"{name}.arrow", scratch=True) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema, options=_COMPRESSED) as writer:
            for k in range(nbuckets):
                writer.write_batch(one_batch(table.slice(bounds[k], bounds[k + 1] - bounds[k])))


_COMPRESSED = pa.ipc.IpcWriteOptions(compression="lz4")


def read_bucket(shuffle_dir: str, kind: str, bucket: int) -> pa.Table | None:
    tables = []
    for f in sorted((Path(shuffle_dir) / kind).glob("*.arrow")):
        with pa.memory_map(str(f)) as src:  # maps the footer and this bucket's batch only (a read of
            batch = pa.ipc.open_file(src).get_batch(bucket)  # each cost 3x as much on 10 M LSST alerts' files)
        if batch.num_rows:
            tables.append(pa.Table.from_batches([batch]))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def stocks_of(summaries: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The objects that passed (sorted) and each one's latest passing alert time, from the (stock, mjd)
    of every passing alert."""
    stock = np.concatenate([s for s, _ in summaries] or [np.empty(0, np.int64)])
    mjd = np.concatenate([m for _, m in summaries] or [np.empty(0)])
    if not len(stock):
        return stock, mjd
    order = np.argsort(stock, kind="stable")
    stock, mjd = stock[order], mjd[order]
    starts = np.flatnonzero(np.r_[True, stock[1:] != stock[:-1]])
    return stock[starts], np.maximum.reduceat(mjd, starts)


def accepted_by_any(t0s: list[T0Result]) -> np.ndarray | None:
    """Rows of a work unit that one of these T0 results accepted (None without any)."""
    return np.logical_or.reduce([t0.verdict.accepted for t0 in t0s]) if t0s else None


def history_pieces(archive_root: str, rel_paths: list[str], passing: tuple[np.ndarray, np.ndarray], shuffle_dir: str, name: str, nbuckets: int,
                   packet_t0: list[T0Result] | None = None, access: list[str] | None = None) -> dict:
    """The passing objects' packets in these archive parts, up to each object's latest passing alert
    (later packets add nothing to its states), as flat datapoints thinned to one copy per object and
    datapoint, written by object bucket (the shuffle). ``access``: the channel's tags; only packets
    whose alert it may see are read (a copy of a datapoint from a packet it may not see is not its).

    ``packet_t0``: the T0 results of the packet channels of a work unit the run reads (rows in the order
    of its parts): the histories of the rows one of them accepted are decoded here too, once, and
    returned for their T1 (``rows``, ``dps``). A part with neither costs a read of five small columns."""
    stocks, until = passing
    out: dict = {"written": 0}
    carry = accepted_by_any(packet_t0 or [])

    def wanted(head: pa.Table) -> np.ndarray:
        if not len(stocks):
            return np.zeros(head.num_rows, dtype=bool)
        stock = head.column("stock").to_numpy()
        at = np.minimum(np.searchsorted(stocks, stock), len(stocks) - 1)
        keep = (stocks[at] == stock) & (head.column("mjd").to_numpy() <= until[at] + 1e-6)
        return keep if access is None else keep & alert_access(head, access)

    pieces = []  # (alerts with their histories, which rows to keep)
    carried = []  # histories of the rows packet channels accepted, in row order
    offset = 0
    for rel in rel_paths:
        path = f"{archive_root}/{rel}"
        pf = pq.ParquetFile(path)
        n = pf.metadata.num_rows
        mine = carry[offset : offset + n] if carry is not None else np.zeros(n, dtype=bool)
        offset += n
        if not mine.any() and not (_may_hold(pf, stocks) and _holds(pf, stocks)):
            continue
        head = pf.read(columns=[c for c in ("alert_id", "stock", "mjd", "survey", "programid") if c in pf.schema_arrow.names], use_threads=False)
        keep = wanted(head)
        if keep.any() or mine.any():
            dps = read_dps(path, coded=True)
            if keep.any():
                pieces.append((head.append_column("dps", dps), keep))
            if mine.any():
                carried.append(take_rows(dps, np.flatnonzero(mine)))
    if carried:
        out.update(rows=np.flatnonzero(carry), dps=pa.chunked_array(carried))
    if pieces:
        alerts = pa.concat_tables([a for a, _ in pieces])
        flat = thinned_history(alerts, np.concatenate([k for _, k in pieces]), group=lambda stock: bucket_of(stock, nbuckets))
        flat = flat.set_column(flat.schema.get_field_index("band"), "band", band_as(flat.column("band"), BAND_CODES))  # one type in every shuffle file
        write_buckets(flat, shuffle_dir, "history", name, nbuckets)
        out["written"] = flat.num_rows
    return out


def _holds(pf: pq.ParquetFile, stocks: np.ndarray) -> bool:
    """Does this part hold one of ``stocks`` (sorted)? Its ``stock`` column read alone, before the
    other head columns: the archive's other nights mostly hold other objects within the same stock
    range, which the footer cannot tell apart."""
    return bool(contains(stocks, pf.read(columns=["stock"], use_threads=False).column("stock").to_numpy()).any())


def _may_hold(pf: pq.ParquetFile, stocks: np.ndarray) -> bool:
    """Can this part hold one of ``stocks`` (sorted)? From its footer's ``stock`` statistics (min, max
    per row group, no column read); True when it has none."""
    if not len(stocks):
        return False
    md = pf.metadata
    leaves = [md.schema.column(j).path for j in range(md.num_columns)]
    if "stock" not in leaves:
        return md.num_row_groups > 0
    at = leaves.index("stock")
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(at).statistics
        if st is None or not st.has_min_max:
            return True
        k = np.searchsorted(stocks, st.min)
        if k < len(stocks) and stocks[k] <= st.max:
            return True
    return False
