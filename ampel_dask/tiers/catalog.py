"""Local HEALPix-indexed Parquet catalogs and vectorised cone searches against them.

A catalog is one Parquet file sorted by the nested HEALPix index of its rows at ``order`` (column
``_hpx``; order and coordinate columns in the file metadata), written in row groups so a big catalog
can be read by pixel ranges. A cone search for a whole array of positions: every source's pixel and
its 8 neighbours at a depth whose cells are wider than the radius cover the cone; a catalog pixel
range per candidate cell comes from ``searchsorted`` on the sorted index, then exact great-circle
distances decide. No Python per source.

A catalog's identity is its content hash (:func:`content_hash`): units that read a catalog put it in
their config, so results computed against one catalog are never reused for a rebuilt one at the same
path. An open catalog pickles as its path and that hash (a graph ships units to the workers), and a
worker that finds other content at the path refuses to use it.
"""

from __future__ import annotations

import json
import os
import stat
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..keys import file_hash
from .sky import angular_distance

HPX = "_hpx"
META_KEY = b"ampel_dask.catalog"
MAX_ORDER = 29
# cdshealpix's smallest edge-to-opposite-edge cell distance is >= 0.6885 * 2**-depth rad at every depth
# (its SMALLER_EDGE2OPEDGE_DIST table: 0.841 at depth 0, tending to 0.6889 * 2**-depth): a cone of
# smaller radius lies inside the cell holding its centre and that cell's neighbours.
_MIN_EDGE_DIST = 0.6885


def healpix(ra: np.ndarray, dec: np.ndarray, order: int) -> np.ndarray:
    """Nested HEALPix index (int64) of positions in degrees."""
    import astropy.units as u
    from astropy.coordinates import Latitude, Longitude
    from cdshealpix.nested import lonlat_to_healpix

    lon = Longitude(np.asarray(ra, dtype=np.float64) % 360.0, u.deg)
    lat = Latitude(np.asarray(dec, dtype=np.float64), u.deg)
    return lonlat_to_healpix(lon, lat, order, num_threads=1).astype(np.int64)


def search_depth(radius_arcsec: float) -> int:
    """Deepest HEALPix depth whose 3x3 cell neighbourhood contains any cone of this radius (-1: none)."""
    r = np.radians(radius_arcsec / 3600.0)
    if r <= 0:
        return MAX_ORDER
    d = int(np.floor(np.log2(_MIN_EDGE_DIST / r)))
    return min(d, MAX_ORDER) if d >= 0 else -1


def build_catalog(table: pa.Table, path: str | Path, order: int = 10, ra: str = "ra", dec: str = "dec", row_group_size: int = 65536) -> Path:
    """Write ``table`` as a catalog sorted by its HEALPix index at ``order`` (rows without a position dropped).

    Choose ``order`` so a cell (58.6 deg / 2**order wide: order 10 3.4', 12 0.86') holds a few rows, since
    a source's candidates are ~9 cells' worth: ~10 suits sparse catalogs, 12-13 a Gaia-like density.
    """
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be in 0..{MAX_ORDER}")
    ra_v = pc.cast(table.column(ra), pa.float64()).to_numpy(zero_copy_only=False)
    dec_v = pc.cast(table.column(dec), pa.float64()).to_numpy(zero_copy_only=False)
    ok = np.isfinite(ra_v) & np.isfinite(dec_v) & (np.abs(dec_v) <= 90)
    if not ok.all():
        table, ra_v, dec_v = table.filter(pa.array(ok)), ra_v[ok], dec_v[ok]
    pix = healpix(ra_v, dec_v, order)
    order_idx = np.argsort(pix, kind="stable")
    if HPX in table.column_names:
        table = table.drop_columns([HPX])
    table = table.take(pa.array(order_idx)).append_column(HPX, pa.array(pix[order_idx]))
    meta = {"order": order, "ra": ra, "dec": dec, "rows": table.num_rows, "version": 1}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size, write_statistics=[HPX])
    return path


class Catalog:
    """A catalog file opened for cone searches; positions are read per row group, only where needed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.file = pq.ParquetFile(self.path)
        except pa.ArrowException as exc:  # a text file, a truncated file: Arrow's reason, as a plain ValueError
            raise ValueError(f"{self.path} is not an ampel_dask catalog (not a Parquet file: {exc})") from None
        meta = (self.file.schema_arrow.metadata or {}).get(META_KEY)
        if meta is None:
            raise ValueError(f"{self.path} is not an ampel_dask catalog (no {META_KEY.decode()} metadata)")
        md = self.file.metadata
        col = self.file.schema_arrow.get_field_index(HPX)
        groups = [md.row_group(i) for i in range(md.num_row_groups)]
        stats = [g.column(col).statistics if col >= 0 else None for g in groups]
        try:
            self.meta = json.loads(meta)
            self.order: int = int(self.meta["order"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.path} is not an ampel_dask catalog (its {META_KEY.decode()} metadata has no order)") from None
        if col < 0 or any(s is None or not s.has_min_max for s in stats):
            raise ValueError(f"{self.path} is not an ampel_dask catalog (no {HPX} column with row group statistics)")
        self._rg_rows = np.array([g.num_rows for g in groups], dtype=np.int64)
        self._rg_start = np.r_[0, np.cumsum(self._rg_rows)[:-1]].astype(np.int64)
        self._rg_min = np.array([s.min for s in stats], dtype=np.int64)
        self._rg_max = np.array([s.max for s in stats], dtype=np.int64)
        self._loaded = np.zeros(0, dtype=np.int64)  # row groups whose positions are in memory
        self._merged: tuple[np.ndarray, ...] = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))

    @property
    def content_hash(self) -> str:
        return content_hash(self.path)

    def __reduce__(self):  # pickles as path + content (the open file and loaded positions stay here)
        st = self.path.stat()
        return _reopen, (str(self.path), self.content_hash, st.st_size, st.st_mtime_ns)

    def __len__(self) -> int:
        return int(self._rg_rows.sum())

    @property
    def loaded_row_groups(self) -> int:
        """Row groups whose positions are in memory (those touched by searches so far; 32 bytes a row)."""
        return len(self._loaded)

    @property
    def columns(self) -> list[str]:
        return [n for n in self.file.schema_arrow.names if n != HPX]

    def _positions(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hpx, ra, dec, global row) of at least these row groups, in index order.

        Row groups are read once and merged into one sorted set of arrays, so repeated queries cost a
        ``searchsorted``, not a read or a concatenation.
        """
        new = np.setdiff1d(groups, self._loaded)
        if len(new):
            cols = [HPX, self.meta["ra"], self.meta["dec"]]
            parts = [self.file.read_row_groups([int(g) for g in new], columns=cols)]
            fresh = [pc.cast(parts[0].column(i), pa.float64() if i else pa.int64()).to_numpy() for i in range(3)]
            fresh.append(np.concatenate([self._rg_start[g] + np.arange(self._rg_rows[g], dtype=np.int64) for g in new]))
            merged = [np.concatenate([old, f]) for old, f in zip(self._merged, fresh)]
            order = np.argsort(merged[3], kind="stable")  # row order is index order
            self._merged = tuple(m[order] for m in merged)
            self._loaded = np.union1d(self._loaded, new)
        return self._merged

    def cone_all(self, ra: np.ndarray, dec: np.ndarray, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (source index, catalog row, distance [arcsec]) pairs within the radius, by source then distance."""
        ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
        dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
        src = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90))
        depth = search_depth(radius_arcsec)
        if depth < 0:  # radius above ~39 deg: every row is a candidate
            cells, shift = np.zeros((len(src), 1), dtype=np.int64), 2 * self.order + 4  # one range: everything
        else:
            depth = min(depth, self.order)
            from cdshealpix.nested import neighbours

            cells = neighbours(healpix(ra[src], dec[src], depth).astype(np.uint64), depth, num_threads=1).astype(np.int64)
            cells.sort(axis=1)
            cells[:, 1:][cells[:, 1:] == cells[:, :-1]] = -1  # a cell listed twice is searched once
            shift = 2 * (self.order - depth)
        # catalog rows of each distinct cell: sorted needles make searchsorted cache-friendly (5x here)
        valid = cells >= 0
        ucell, inverse = np.unique(cells[valid], return_inverse=True)
        hpx, cra, cdec, rowid = self._positions(self._groups_for(ucell << shift, (ucell + 1) << shift))
        ulo = np.searchsorted(hpx, ucell << shift, "left")
        uhi = np.searchsorted(hpx, (ucell + 1) << shift, "left")
        lo, counts = np.zeros(cells.shape, dtype=np.int64), np.zeros(cells.shape, dtype=np.int64)
        lo[valid], counts[valid] = ulo[inverse], (uhi - ulo)[inverse]
        lo, counts = lo.ravel(), counts.ravel()
        total = int(counts.sum())
        pair_src = np.repeat(np.repeat(src, cells.shape[1]), counts)
        starts = np.repeat(lo - np.r_[0, np.cumsum(counts)[:-1]], counts)
        pair_cat = starts + np.arange(total, dtype=np.int64)
        dist = angular_distance(ra[pair_src], dec[pair_src], cra[pair_cat], cdec[pair_cat]) * 3600.0
        keep = dist <= radius_arcsec
        pair_src, pair_cat, dist = pair_src[keep], pair_cat[keep], dist[keep]
        order = np.lexsort((rowid[pair_cat], dist, pair_src))
        return pair_src[order], rowid[pair_cat[order]], dist[order]

    def _groups_for(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Row groups whose [min, max] index overlaps any [lo, hi) range (groups are sorted by index)."""
        first = np.searchsorted(self._rg_max, lo, "left")  # first group that can hold >= lo
        last = np.searchsorted(self._rg_min, hi, "left")  # groups before this start below hi
        counts = np.maximum(last - first, 0)
        out = np.repeat(first - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(int(counts.sum()))
        return np.unique(out)

    def cone_match(self, ra: np.ndarray, dec: np.ndarray, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
        """Nearest catalog row within the radius per source (-1 / NaN where none)."""
        n = len(np.atleast_1d(ra))
        src, cat, dist = self.cone_all(ra, dec, radius_arcsec)
        index, distance = np.full(n, -1, dtype=np.int64), np.full(n, np.nan)
        first = np.r_[True, src[1:] != src[:-1]] if len(src) else np.zeros(0, dtype=bool)
        index[src[first]], distance[src[first]] = cat[first], dist[first]
        return index, distance

    def match(self, ra: np.ndarray, dec: np.ndarray, radius_arcsec: float, columns: list[str]) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """The nearest source within the radius of each position: its ``columns`` (nulls where none), the
        distance in arcsec (NaN where none) and whether there was one (what :class:`HatsCatalog` offers too)."""
        index, dist = self.cone_match(ra, dec, radius_arcsec)
        return self.take(index, columns), dist, index >= 0

    def take(self, index: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Catalog rows by global row index (-1 -> null row), reading only the row groups involved."""
        index = np.asarray(index, dtype=np.int64)
        columns = list(columns) if columns is not None else self.columns
        hit = index >= 0
        groups = np.searchsorted(self._rg_start, index[hit], "right") - 1
        ug = np.unique(groups)
        if len(ug):
            part = pa.concat_tables([self.file.read_row_group(int(g), columns=columns) for g in ug])
            base = np.r_[0, np.cumsum(self._rg_rows[ug])[:-1]]
            local = base[np.searchsorted(ug, groups)] + index[hit] - self._rg_start[groups]
        else:
            part = pa.schema([self.file.schema_arrow.field(c) for c in columns]).empty_table()
            local = np.zeros(0, dtype=np.int64)
        pos = np.full(len(index), -1, dtype=np.int64)
        pos[hit] = local
        take = pa.array(pos, mask=~hit)  # null index -> null row
        return part.take(take)


def open_catalog(path: str | Path) -> Catalog:
    """Shared open catalog per file and process (units reuse positions already read); a rewritten file reopens.
    A regular file only: a FIFO or device would block or never end."""
    st = Path(path).stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not an ampel_dask catalog (not a regular file)")
    return _open(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _open(path: str, mtime_ns: int, size: int) -> Catalog:
    return Catalog(path)


def content_hash(path: str | Path) -> str:
    """xxh3-128 of the file's bytes (32 hex digits), computed once per file version and process."""
    st = Path(path).stat()
    return _hash(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=32)
def _hash(path: str, mtime_ns: int, size: int) -> str:
    return file_hash(path)


def _reopen(path: str, digest: str, size: int, mtime_ns: int) -> Catalog:
    """The catalog a pickled one names, if the file still holds the same content."""
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns) and content_hash(path) != digest:
        raise ValueError(f"catalog {path} changed since the workflow was planned (content hash {digest}, now {content_hash(path)})")
    return open_catalog(path)


__all__ = ["build_catalog", "Catalog", "open_catalog", "content_hash", "healpix", "search_depth", "HPX"]
