"""Spatial and temporal coincidence of states with neutrino alerts (IceCube-style) from a local table.

The table (CSV or Parquet, one row per neutrino alert) gives ``name``, ``time`` (MJD, or an ISO date in
UTC), ``ra``, ``dec`` [deg] and the 90% error region, one of:

- a rectangle in RA and Dec, as IceCube's GCN circulars give it (``RA 77.43 +0.95 -0.65``):
  ``ra_err_plus``, ``ra_err_minus``, ``dec_err_plus``, ``dec_err_minus`` [deg of RA / Dec, signs ignored];
- an ellipse: ``err_major``, ``err_minor`` (semi-axes [deg]) and ``err_pa`` (major axis, deg east of north);
- a circle (GCN notices' ``SRC_ERROR``): ``err_radius`` [deg].

A state's separation in units of its region (``nu_sep_norm``; <= 1 inside, 2 = twice as far as the
boundary in that direction): for a rectangle, the larger of |dRA| / (the RA error on that side) and
|dDec| / (the Dec error on that side), with dRA the RA difference wrapped to +-180 deg (IceCube's errors
are RA intervals, not angles); for an ellipse or circle, the elliptical radius of the state's position
in a frame centred on the neutrino (longitude/latitude offsets, as astropy's SkyOffsetFrame), with the
axes along the position angle. The time offset ``nu_dt`` is the state's time minus the neutrino's.

Matching is one numpy pass per batch: pairs come from the time window (the states sorted by time, one
``searchsorted`` per neutrino), a Dec band drops most of them, and the offsets are computed for the pairs
left at once. The table's content hash is part of the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from ...io.layout import DETECTION
from ...keys import file_hash
from ..base import T2StateUnit, UnitConfig, pinned_hash

MATCH, NO_MATCH, NO_POSITION = 0, 1, 2
RECTANGLE, ELLIPSE, CIRCLE = 0, 1, 2
REGION_NAMES = ["rectangle", "ellipse", "circle"]
PAIRS_PER_STEP = 2_000_000  # candidate (state, neutrino) pairs held at once
RECT_COLS = ("ra_err_plus", "ra_err_minus", "dec_err_plus", "dec_err_minus")
ELLIPSE_COLS = ("err_major", "err_minor", "err_pa")


class T2NeutrinoCoincidenceConfig(UnitConfig):
    alerts: str = Field(..., description="neutrino alert table (CSV or Parquet): name, time, ra, dec and a 90% region (see the unit's docs)")
    alerts_hash: str | None = Field(None, description="content hash of the table; None: taken from the file (a mismatch is an error)")
    time_window: tuple[float, float] = Field((-365.0, 365.0), description="accepted state time minus neutrino time [days], inclusive")
    time_reference: Literal["first_detection", "alert", "peak"] = Field(
        "first_detection", description="the state's time: its first detection, the alert's time, or its brightest detection")
    max_sep_norm: float = Field(1.0, gt=0, description="accepted separation in units of the error region (1 = its boundary)")

    @field_validator("time_window")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] <= v[1]:
            raise ValueError(f"time_window: {v[0]} is after {v[1]}")
        return v


class NeutrinoTable:
    """The neutrino alerts as numpy arrays: name, mjd, ra, dec, region kind and its parameters [deg]."""

    def __init__(self, path: str):
        table = read_table(path)
        missing = [c for c in ("name", "time", "ra", "dec") if c not in table.column_names]
        if missing:
            raise ValueError(f"neutrino table {path}: missing column(s) {', '.join(missing)}")
        n = table.num_rows
        self.name = np.asarray(table.column("name").cast(pa.string()).to_pylist(), dtype=object)
        self.mjd = _times(table.column("time"), path)
        self.ra, self.dec = _f64(table, "ra"), _f64(table, "dec")
        rect = np.stack([np.abs(_f64(table, k)) for k in RECT_COLS])
        ell = np.stack([_f64(table, k) for k in ELLIPSE_COLS])
        radius = _f64(table, "err_radius")
        has_rect, has_ell, has_circle = np.isfinite(rect).all(axis=0), np.isfinite(ell).all(axis=0), np.isfinite(radius)
        kinds = has_rect.astype(int) + has_ell + has_circle
        for i in np.flatnonzero(kinds != 1)[:1]:
            what = "no complete error region" if kinds[i] == 0 else "more than one error region"
            raise ValueError(f"neutrino table {path}, row {i} ({self.name[i]}): {what} (give {', '.join(RECT_COLS)}; or {', '.join(ELLIPSE_COLS)}; or err_radius)")
        bad = ~(np.isfinite(self.ra) & np.isfinite(self.dec) & (np.abs(self.dec) <= 90) & np.isfinite(self.mjd))
        bad |= has_rect & ~(rect > 0).all(axis=0)
        bad |= has_ell & ~((ell[0] > 0) & (ell[1] > 0))
        bad |= has_circle & ~(radius > 0)
        for i in np.flatnonzero(bad)[:1]:
            raise ValueError(f"neutrino table {path}, row {i} ({self.name[i]}): a position, time or error that is missing, out of range or not positive")
        self.kind = np.where(has_rect, RECTANGLE, np.where(has_ell, ELLIPSE, CIRCLE))
        self.rect = rect  # (4, n): ra+, ra-, dec+, dec-
        self.major = np.where(has_ell, ell[0], radius)
        self.minor = np.where(has_ell, ell[1], radius)
        self.pa = np.where(has_ell, ell[2], 0.0)
        # how far in Dec a state inside max_sep_norm regions can lie (a cheap prefilter)
        self.dec_extent = np.where(has_rect, np.fmax(rect[2], rect[3]), np.fmax(self.major, self.minor))
        self.n = n


class T2NeutrinoCoincidence(T2StateUnit):
    """The best-matching neutrino alert per state: inside its 90% region, within a time window.

    Columns: ``nu_name``, ``nu_time`` (MJD), ``nu_dt`` (state time -
    neutrino time [d]), ``nu_sep_deg``, ``nu_sep_norm`` (separation in units of the 90% region),
    ``nu_region``, ``nu_n_matches`` (alerts within the window and region) and ``code`` (0 matched,
    1 no match, 2 no position or time). The best match is the smallest ``nu_sep_norm``."""

    Config = T2NeutrinoCoincidenceConfig
    version = "1"
    libraries: ClassVar[tuple[str, ...]] = ("numpy", "astropy")

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        c = self.config
        self.table = NeutrinoTable(c.alerts)
        self.config = c.model_copy(update={"alerts_hash": pinned_hash(self.name(), c.alerts, file_hash(c.alerts), c.alerts_hash)})

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table:
        c, nu = self.config, self.table
        n = states.num_rows
        ra, dec = _f64(states, "ra"), _f64(states, "dec")
        t = state_times(states, c.time_reference)
        valid = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90) & np.isfinite(t)
        s_idx, n_idx = self._pairs(t, dec, valid)
        norm = separation_norm(ra[s_idx], dec[s_idx], nu, n_idx)
        ok = norm <= c.max_sep_norm
        s_idx, n_idx, norm = s_idx[ok], n_idx[ok], norm[ok]
        n_matches = np.bincount(s_idx, minlength=n).astype(np.int32)
        # the best pair per state: sort by (state, norm), take each state's first
        order = np.lexsort((n_idx, norm, s_idx))
        first = order[np.r_[True, s_idx[order][1:] != s_idx[order][:-1]]] if len(order) else order
        best = np.full(n, -1)
        best[s_idx[first]] = n_idx[first]
        best_norm = np.full(n, np.nan)
        best_norm[s_idx[first]] = norm[first]
        hit = best >= 0
        j = np.where(hit, best, 0)
        sep = np.full(n, np.nan)
        from ..sky import angular_distance

        sep[hit] = angular_distance(ra[hit], dec[hit], nu.ra[j[hit]], nu.dec[j[hit]])
        code = np.where(hit, MATCH, np.where(valid, NO_MATCH, NO_POSITION)).astype(np.int32)
        names = np.asarray(REGION_NAMES, dtype=object)
        return pa.table({
            "nu_name": pa.array(nu.name[j] if nu.n else np.full(n, None), pa.string(), mask=~hit),
            "nu_time": pa.array(np.where(hit, nu.mjd[j] if nu.n else np.nan, np.nan)),
            "nu_dt": pa.array(np.where(hit, t - (nu.mjd[j] if nu.n else 0.0), np.nan)),
            "nu_sep_deg": pa.array(sep),
            "nu_sep_norm": pa.array(best_norm),
            "nu_region": pa.array(names[nu.kind[j]] if nu.n else np.full(n, None), pa.string(), mask=~hit),
            "nu_n_matches": pa.array(n_matches),
            "code": pa.array(code),
        })  # fmt: skip

    def _pairs(self, t: np.ndarray, dec: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(state, neutrino) index pairs within the time window and a Dec band around each neutrino
        (built for groups of neutrinos of at most PAIRS_PER_STEP candidate pairs, to bound memory)."""
        nu, (lo, hi) = self.table, self.config.time_window
        rows = np.flatnonzero(valid)
        order = rows[np.argsort(t[rows], kind="stable")]
        ts = t[order]
        start = np.searchsorted(ts, nu.mjd + lo, side="left")
        counts = np.maximum(np.searchsorted(ts, nu.mjd + hi, side="right") - start, 0)
        band = nu.dec_extent * self.config.max_sep_norm
        out_s, out_n = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        group = np.cumsum(counts) // PAIRS_PER_STEP
        for g in np.unique(group[counts > 0]):
            js = np.flatnonzero((group == g) & (counts > 0))
            k = counts[js]
            n_idx = np.repeat(js, k)
            pos = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k) + np.repeat(start[js], k)
            s_idx = order[pos]
            near = np.abs(dec[s_idx] - nu.dec[n_idx]) <= band[n_idx]
            out_s.append(s_idx[near])
            out_n.append(n_idx[near])
        return np.concatenate(out_s), np.concatenate(out_n)


def separation_norm(ra: np.ndarray, dec: np.ndarray, nu: NeutrinoTable, j: np.ndarray) -> np.ndarray:
    """Separation of each (ra, dec) from neutrino ``j`` in units of its error region (see the module doc)."""
    out = np.full(len(j), np.inf)
    kind = nu.kind[j]
    r = kind == RECTANGLE
    if r.any():
        jr = j[r]
        dra = (ra[r] - nu.ra[jr] + 180.0) % 360.0 - 180.0
        ddec = dec[r] - nu.dec[jr]
        ra_err = np.where(dra >= 0, nu.rect[0, jr], nu.rect[1, jr])
        dec_err = np.where(ddec >= 0, nu.rect[2, jr], nu.rect[3, jr])
        out[r] = np.maximum(np.abs(dra) / ra_err, np.abs(ddec) / dec_err)
    e = ~r
    if e.any():
        je = j[e]
        lon, lat = offset_frame(ra[e], dec[e], nu.ra[je], nu.dec[je])
        pa_rad = np.radians(nu.pa[je])
        along = lon * np.sin(pa_rad) + lat * np.cos(pa_rad)  # lon points east, lat north; PA east of north
        across = lon * np.cos(pa_rad) - lat * np.sin(pa_rad)
        out[e] = np.hypot(along / nu.major[je], across / nu.minor[je])
    return out


def offset_frame(ra: np.ndarray, dec: np.ndarray, ra0: np.ndarray, dec0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude [deg] of (ra, dec) in the frame centred on (ra0, dec0) with north up
    (astropy's SkyOffsetFrame with rotation 0): rotate about z by -ra0, then about y by dec0."""
    a, d, a0, d0 = map(np.radians, (ra, dec, ra0, dec0))
    x, y, z = np.cos(d) * np.cos(a - a0), np.cos(d) * np.sin(a - a0), np.sin(d)
    x2 = x * np.cos(d0) + z * np.sin(d0)
    z2 = -x * np.sin(d0) + z * np.cos(d0)
    return np.degrees(np.arctan2(y, x2)), np.degrees(np.arcsin(np.clip(z2, -1.0, 1.0)))


def state_times(states: pa.Table, reference: str) -> np.ndarray:
    """Each state's time: the alert's (``mjd``), or its first / brightest detection (from ``dps``)."""
    if reference == "alert":
        return _f64(states, "mjd")
    n = states.num_rows
    dps = states.column("dps").combine_chunks()
    offsets = np.asarray(dps.offsets)
    values = dps.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    det = _arr(values.field("kind")) == DETECTION
    mjd = _arr(values.field("mjd"))
    det &= np.isfinite(mjd)
    out = np.full(n, np.nan)
    if reference == "first_detection":
        np.fmin.at(out, rows[det], mjd[det])
        return out
    flux = _arr(values.field("flux"))
    det &= np.isfinite(flux)
    r, f, tm = rows[det], flux[det], mjd[det]
    order = np.lexsort((tm, -f, r))  # brightest first (the earliest of equals), per state
    first = order[np.r_[True, r[order][1:] != r[order][:-1]]] if len(order) else order
    out[r[first]] = tm[first]
    return out


def read_table(path: str) -> pa.Table:
    """A CSV or Parquet file (by its suffix), with pyarrow."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if p.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(p)
    if p.suffix.lower() in (".csv", ".txt"):
        from pyarrow import csv

        return csv.read_csv(p, convert_options=csv.ConvertOptions(strings_can_be_null=True))
    raise ValueError(f"{path}: a neutrino table must be .csv or .parquet")


def _times(col: pa.ChunkedArray, path: str) -> np.ndarray:
    """MJD from numbers, or from ISO dates (UTC) with astropy.time."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return _arr(col)
    if pa.types.is_timestamp(col.type):  # pyarrow's CSV reader parses ISO dates itself (UTC assumed)
        ns = pc.cast(pc.cast(col, pa.timestamp("ns", col.type.tz)), pa.int64()).to_numpy(zero_copy_only=False)
        days, rest = np.divmod(ns, 86_400 * 10**9)  # exact in integers, then the day fraction
        return np.where(pc.is_null(col).to_numpy(zero_copy_only=False), np.nan, days + 40_587.0 + rest / 86_400e9)  # Unix epoch: MJD 40587
    from astropy.time import Time

    values = np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
    given = np.array([bool(v) for v in values])
    out = np.full(len(values), np.nan)
    try:
        if given.any():
            out[given] = Time(list(values[given]), scale="utc").mjd
    except ValueError as exc:
        raise ValueError(f"neutrino table {path}: time is neither an MJD nor an ISO date: {exc}") from None
    return out


def _arr(arr) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.cast(arr, pa.float64()), np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)


def _f64(table: pa.Table, name: str) -> np.ndarray:
    return _arr(table.column(name)) if name in table.column_names else np.full(table.num_rows, np.nan)


__all__ = ["T2NeutrinoCoincidence", "T2NeutrinoCoincidenceConfig", "NeutrinoTable", "separation_norm", "offset_frame", "state_times"]
