"""Data rights: a channel's view of alerts and of the archive, made in one place for every tier.

A channel's access tags (``ZTF_PUB``, ``ZTF_PRIV``, ``LSST`` ...; :data:`.states.ZTF_ACCESS`) say which
datapoints it may use. Its filters get :func:`channel_view` of each batch: only the alerts whose trigger
it may see, their history aggregates (``ndet``, ``first_det_mjd``, ``last_det_mjd``) and history
(``dps``, when a filter reads it) reduced to the datapoints it may see. States apply the same rule
(:func:`.states.build_states`), so T2 sees it too, and T3 units read the archive through
:class:`ChannelArchive`. So removing data a channel may not see never changes what it decides or writes.

Fast path: the archive keeps, per alert, a bit mask of the programids its history carries
(``history_programids``, written at ingest). Where the channel may see every one of them, the
aggregates computed at ingest over all datapoints are the channel's own and T0 reads flat columns only;
only the rows whose history holds a datapoint the channel may not see are recomputed from ``dps``.
Archives written before the mask existed are recomputed from ``dps`` (exact, slower).

The ZTF candidate's own history fields (``ndethist``, ``ncovhist``, ``jdstarthist``, ``jdendhist``)
are computed by IPAC and shipped in the packet: they are part of every packet, the public one too,
and are left as the survey wrote them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io.archive import Archive, Partition
from ..io.layout import DATAPOINT, DETECTION, OTHER_PROGRAMID, programid_bits
from .columns import SUMMARY, per_row
from .states import _flat, access_by_survey, alert_access, survey_codes

PROGRAMIDS = "history_programids"  # the ingest's bit mask (see io/layout.py)
RIGHTS_RULE = 1  # how a channel's T0 view is made; part of T0 keys, so results of an older rule are redone


def hidden_history(table: pa.Table, access: list[str]) -> np.ndarray:
    """Rows whose history may hold a datapoint the channel may not see, by the ingest's programid
    mask; rows without a mask (an archive written before it, a batch made by hand) count as such."""
    n = table.num_rows
    if PROGRAMIDS not in table.column_names:
        return np.ones(n, dtype=bool)
    bits = pc.fill_null(pc.cast(table.column(PROGRAMIDS), pa.int32()), -1).to_numpy(zero_copy_only=False)
    names, codes = survey_codes(table.column("survey"))
    # per survey, the mask of programids the channel may see (bit 15, no programid or one >= 15:
    # allowed only where such a datapoint is), from the one access rule; then one lookup per row
    pid = np.array([*range(OTHER_PROGRAMID), np.nan])
    bit = np.left_shift(1, np.arange(len(pid)))
    allowed = np.array([bit[access_by_survey(names, np.full(len(pid), k), pid, access)].sum() for k in range(len(names))], dtype=np.int32)
    return (bits < 0) | ((bits & ~allowed[codes]) != 0)


def channel_view(table: pa.Table, access: list[str], histories: Callable[[pa.Table], pa.Table] | None = None) -> tuple[pa.Table, np.ndarray]:
    """(the batch as a channel with these access tags may see it, which rows of ``table`` it holds).

    Rows whose trigger the channel may not see are left out; the history aggregates and programid mask
    (added when the batch lacks them) and ``dps`` (kept only if the batch had it) come from the
    datapoints it may see.
    ``histories(table)`` adds ``dps`` to a batch read without it; it is called only when some row's
    history holds a datapoint the channel may not see (or has no programid mask: an older archive).
    """
    seen = alert_access(table, access)
    if not (hidden_history(table, access) & seen).any() and all(c in table.column_names for c in (*SUMMARY, PROGRAMIDS)):
        return (table if seen.all() else table.filter(pa.array(seen))), seen
    had_dps = "dps" in table.column_names
    if not had_dps and seen.any():
        if histories is None:
            raise ValueError("the batch may hold datapoints this channel may not see, and has no history to leave them out of")
        table = histories(table)
    n = table.num_rows  # computed over the whole batch, filtered once at the end (no nested copy)
    dps = table.column("dps") if "dps" in table.column_names else pa.chunked_array([], pa.list_(DATAPOINT))
    field, rows = _fields(dps, ("kind", "mjd", "programid"))  # three fields, read chunk by chunk: no copy of the rest
    names, codes = survey_codes(table.column("survey"))
    keep = access_by_survey(names, codes[rows], field["programid"], access) & seen[rows]
    rows = rows[keep]
    field = {k: v[keep] for k, v in field.items()}
    det = field["kind"] == DETECTION
    t = field["mjd"][det]
    first, last = per_row(t, rows[det], n, "min"), per_row(t, rows[det], n, "max")
    bits = np.zeros(n, dtype=np.int32)  # the mask, too, tells only of what the channel may see
    if len(rows):
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        bits[rows[starts]] = np.bitwise_or.reduceat(programid_bits(field["programid"]), starts)
    summary = {"ndet": pa.array(per_row(t, rows[det], n, "count").astype(np.int32)),
               "first_det_mjd": pa.array(first, mask=~np.isfinite(first)), "last_det_mjd": pa.array(last, mask=~np.isfinite(last)),
               PROGRAMIDS: pa.array(bits)}  # fmt: skip
    view = table
    for name, values in summary.items():
        i = view.schema.get_field_index(name)
        view = view.set_column(i, name, values) if i >= 0 else view.append_column(name, values)
    i = view.schema.get_field_index("dps")
    if had_dps:
        view = view.set_column(i, "dps", _nest(_flat(dps)[0], rows, keep, n))
    elif i >= 0:
        view = view.remove_column(i)
    return (view if seen.all() else view.filter(pa.array(seen))), seen


def _fields(dps: pa.ChunkedArray | pa.ListArray, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Some fields of the flattened datapoints (as float64) and the row of each, chunk by chunk."""
    chunks = dps.chunks if isinstance(dps, pa.ChunkedArray) else [dps]
    out: dict[str, list[np.ndarray]] = {k: [] for k in names}
    rows, base = [], 0
    for chunk in chunks:
        offsets = np.asarray(chunk.offsets)
        values = chunk.values.slice(offsets[0], offsets[-1] - offsets[0])
        for k in names:
            out[k].append(pc.cast(values.field(k), pa.float64()).to_numpy(zero_copy_only=False))
        rows.append(np.repeat(np.arange(base, base + len(chunk), dtype=np.int64), np.diff(offsets)))
        base += len(chunk)
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()}, np.concatenate(rows) if rows else np.empty(0, np.int64)


def _nest(flat: pa.StructArray, rows: np.ndarray, keep: np.ndarray, n: int) -> pa.ListArray:
    """The kept datapoints as one list per row (``rows``: the row of each kept datapoint)."""
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


class ChannelArchive:
    """The archive as a channel may see it: what its T3 units get as ``context.archive``.

    :meth:`read` gives :func:`channel_view` of a part (alerts whose trigger the channel may not see
    are left out, histories and aggregates hold only datapoints it may see); :meth:`read_cutouts`
    gives only the cutouts of alerts it may see.
    """

    def __init__(self, archive: Archive, access: list[str]):
        self._archive = archive
        self.access = list(access)

    def partitions(self, surveys: list[str] | None = None, nights: list[int] | None = None) -> list[Partition]:
        return self._archive.partitions(surveys, nights)

    def _columns(self, part: Partition) -> set[str]:
        return set(pq.read_schema(self._archive.root / part.path).names) | {"dps"}

    def read(self, part: Partition, columns: list[str] | None = None) -> pa.Table:
        have = self._columns(part)
        need = None if columns is None else sorted(({*columns, "survey", "programid", PROGRAMIDS, *SUMMARY}) & have)
        table = self._archive.read(part, need)

        def histories(t: pa.Table) -> pa.Table:
            return t.append_column("dps", self._archive.read(part, ["dps"]).column("dps"))

        view, _ = channel_view(table, self.access, histories)
        return view if columns is None else view.select([c for c in columns if c in view.column_names])

    def read_cutouts(self, part: Partition, alert_ids: list[int] | None = None) -> pa.Table | None:
        if not part.cutout_files:
            return None
        rows = self._archive.read(part, sorted({"alert_id", "survey", "programid"} & self._columns(part)))
        ids = rows.column("alert_id").to_numpy(zero_copy_only=False)[alert_access(rows, self.access)]
        if alert_ids is not None:
            ids = np.intersect1d(ids, np.asarray(alert_ids, dtype=np.int64))
        return self._archive.read_cutouts(part, ids.tolist())


__all__ = ["channel_view", "hidden_history", "ChannelArchive", "PROGRAMIDS", "RIGHTS_RULE"]
