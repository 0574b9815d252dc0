"""Gravitational-wave sky maps as LIGO/Virgo/KAGRA publish them, read with astropy and indexed with cdshealpix.

Two layouts (the LVK user guide's): a flat HEALPix map (``ORDERING`` RING or NESTED, ``NSIDE``, columns
``PROB`` [pix^-1] and, for 3D maps, ``DISTMU``, ``DISTSIGMA`` [Mpc], ``DISTNORM`` [Mpc^-2]) and a
multi-order map (``ORDERING = NUNIQ``: a ``UNIQ`` column, ``PROBDENSITY`` [sr^-1] and the same distance
layers). A position's pixel is found with cdshealpix (for a multi-order map: the pixel at the finest order,
then the map pixel whose range at that order holds it, by ``searchsorted``). The credible level of a
pixel is the probability of all pixels at least as dense, itself included (pixels ordered by density):
a position with level <= 0.9 lies inside the 90% credible region.

Distances: along a line of sight the map's posterior is ``p(r) = DISTNORM r^2 N(r; DISTMU, DISTSIGMA)``
(Singer et al. 2016); its CDF has a closed form (below), so a host's luminosity distance gets its
quantile without integrating. Pixels without distance information (``DISTMU`` infinite, as LVK writes
them) give NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from ..base import UnitConfig, pinned_hash

FOUR_PI = 4.0 * math.pi
MAX_ORDER = 29


@dataclass(frozen=True)
class SkyMap:
    """One sky map: per map pixel its probability density [sr^-1], probability, credible level and distance
    layers (NaN where absent); ``lookup`` turns positions into pixel indexes."""

    path: str
    layout: str  # "RING", "NESTED" or "NUNIQ"
    nside: int  # flat maps; 0 for NUNIQ
    density: np.ndarray
    credible: np.ndarray
    distmu: np.ndarray | None
    distsigma: np.ndarray | None
    distnorm: np.ndarray | None
    event_mjd: float | None
    max_order: int = 0  # NUNIQ: the finest order, and each pixel's range [start, stop) at it (sorted)
    start: np.ndarray | None = None
    stop: np.ndarray | None = None
    order: np.ndarray | None = None  # NUNIQ: map pixels sorted by start (index into the layers)

    @property
    def has_distance(self) -> bool:
        return self.distmu is not None

    def lookup(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Map pixel index of each position (-1: no valid position, or a position the map does not cover)."""
        from astropy.coordinates import Latitude, Longitude
        import astropy.units as u

        ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
        out = np.full(len(ra), -1, dtype=np.int64)
        ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
        if not ok.any():
            return out
        lon, lat = Longitude(ra[ok] % 360.0, u.deg), Latitude(dec[ok], u.deg)
        if self.layout == "RING":
            from cdshealpix.ring import lonlat_to_healpix

            out[ok] = lonlat_to_healpix(lon, lat, self.nside, num_threads=1).astype(np.int64)
        elif self.layout == "NESTED":
            from cdshealpix.nested import lonlat_to_healpix

            out[ok] = lonlat_to_healpix(lon, lat, int(np.log2(self.nside)), num_threads=1).astype(np.int64)
        else:
            from cdshealpix.nested import lonlat_to_healpix

            fine = lonlat_to_healpix(lon, lat, self.max_order, num_threads=1).astype(np.int64)
            k = np.searchsorted(self.start, fine, side="right") - 1
            inside = (k >= 0) & (fine < self.stop[np.maximum(k, 0)])
            out[ok] = np.where(inside, self.order[np.maximum(k, 0)], -1)
        return out


def read_skymap(path: str | Path) -> SkyMap:
    """A sky map file (FITS, gzipped or not), checked: an error names the file and what is wrong."""
    from astropy.io import fits

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such sky map file")
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        raise ValueError(f"{path}: not a FITS sky map ({exc})") from None
    with hdul:
        hdu = next((h for h in hdul[1:] if isinstance(h, fits.BinTableHDU) and ({"PROB", "PROBDENSITY"} & set(h.columns.names))), None)
        if hdu is None:
            raise ValueError(f"{path}: no HEALPix table with a PROB or PROBDENSITY column")
        hdr, data, names = hdu.header, hdu.data, set(hdu.columns.names)
        layout = str(hdr.get("ORDERING", "")).strip().upper()
        if str(hdr.get("COORDSYS", "C")).strip().upper() not in ("C", "CELESTIAL", "EQUATORIAL"):
            raise ValueError(f"{path}: COORDSYS {hdr.get('COORDSYS')!r}: only equatorial (C) sky maps are read")
        col = lambda name: np.asarray(data[name], dtype=np.float64).ravel() if name in names else None  # noqa: E731
        dist = [col(k) for k in ("DISTMU", "DISTSIGMA", "DISTNORM")]
        if any(d is None for d in dist):
            dist = [None, None, None]
        event = _event_mjd(hdr)
        if layout == "NUNIQ":
            if "UNIQ" not in names or "PROBDENSITY" not in names:
                raise ValueError(f"{path}: a NUNIQ sky map needs UNIQ and PROBDENSITY columns")
            return _multi_order(path, np.asarray(data["UNIQ"], dtype=np.int64).ravel(), col("PROBDENSITY"), dist, event)
        if layout not in ("RING", "NESTED"):
            raise ValueError(f"{path}: ORDERING {layout or '(none)'!r}; expected RING, NESTED or NUNIQ")
        if str(hdr.get("INDXSCHM", "IMPLICIT")).strip().upper() != "IMPLICIT":
            raise ValueError(f"{path}: a partial (INDXSCHM EXPLICIT) flat map is not supported; convert it to NUNIQ")
        prob = col("PROB") if "PROB" in names else None
        if prob is None:
            raise ValueError(f"{path}: a flat sky map needs a PROB column")
        nside = int(hdr.get("NSIDE", 0) or 0)
        if nside < 1 or nside & (nside - 1) or len(prob) != 12 * nside * nside:
            raise ValueError(f"{path}: NSIDE {nside} does not fit {len(prob)} pixels (12 NSIDE^2, NSIDE a power of 2)")
        area = np.full(len(prob), FOUR_PI / len(prob))
        density = prob / area
        return SkyMap(path, layout, nside, density, credible_levels(density, area), *dist, event)


def _multi_order(path: str, uniq: np.ndarray, density: np.ndarray, dist: list, event: float | None) -> SkyMap:
    order = np.zeros(len(uniq), dtype=np.int64)
    for o in range(MAX_ORDER + 1):  # order = floor(log2(uniq / 4) / 2), exactly, in integers
        order[uniq >= 4 * 4**o] = o
    ipix = uniq - 4 * 4**order
    if (uniq < 4).any() or (ipix >= 12 * 4**order).any():
        raise ValueError(f"{path}: UNIQ values that are not HEALPix pixels")
    top = int(order.max()) if len(order) else 0
    start = ipix << (2 * (top - order))
    stop = (ipix + 1) << (2 * (top - order))
    by_start = np.argsort(start, kind="stable")
    s, e = start[by_start], stop[by_start]
    if (s[1:] < e[:-1]).any():
        raise ValueError(f"{path}: overlapping pixels in the multi-order map")
    area = FOUR_PI / (12.0 * 4.0**order)
    return SkyMap(path, "NUNIQ", 0, density, credible_levels(density, area), *dist, event, top, s, e, by_start)


def credible_levels(density: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Per pixel: the summed probability of the pixels before it in order of decreasing density, its own
    included (ligo.skymap's find_greedy_credible_levels; not renormalised; equal densities in pixel order)."""
    prob = np.where(np.isfinite(density) & (density > 0), density, 0.0) * area
    order = np.argsort(-prob / area, kind="stable")
    levels = np.empty(len(prob))
    levels[order] = np.cumsum(prob[order])
    return levels


def _event_mjd(hdr) -> float | None:
    if "MJD-OBS" in hdr:
        return float(hdr["MJD-OBS"])
    if "DATE-OBS" in hdr:
        from astropy.time import Time

        return float(Time(str(hdr["DATE-OBS"]), scale="utc").mjd)
    return None


@lru_cache(maxsize=2)
def cached_skymap(path: str, content_hash: str) -> SkyMap:
    """One parsed map per (path, content) and process: the units of a worker share it."""
    return read_skymap(path)


def distance_cdf(r: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """P(distance <= r) under p(r) ∝ r^2 N(r; mu, sigma) on r >= 0 (closed form of the integral)."""
    from scipy.special import ndtr

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        t0, t1 = -mu / sigma, (np.maximum(r, 0.0) - mu) / sigma
        phi = lambda t: np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
        part = (mu**2 + sigma**2) * (ndtr(t1) - ndtr(t0)) - 2 * mu * sigma * (phi(t1) - phi(t0)) - sigma**2 * (t1 * phi(t1) - t0 * phi(t0))
        total = (mu**2 + sigma**2) * ndtr(mu / sigma) + mu * sigma * phi(mu / sigma)
        out = np.clip(part / total, 0.0, 1.0)
    return np.where(np.isfinite(mu) & np.isfinite(sigma) & (sigma > 0) & np.isfinite(r), out, np.nan)


def distance_pdf(r: np.ndarray, mu: np.ndarray, sigma: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """dP/dr [Mpc^-1] along the line of sight: DISTNORM r^2 N(r; DISTMU, DISTSIGMA)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = norm * r**2 * np.exp(-0.5 * ((r - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return np.where(np.isfinite(mu) & (sigma > 0) & np.isfinite(norm), out, np.nan)




# --- what the sky-map units share ----------------------------------------------------------------------

class SkyMapUnitConfig(UnitConfig):
    skymap: str = Field(..., description="sky map FITS file (flat HEALPix PROB [+ DISTMU/DISTSIGMA/DISTNORM], or multi-order UNIQ/PROBDENSITY)")
    skymap_hash: str | None = Field(None, description="content hash of the file; None: taken from it (a mismatch is an error)")
    event_mjd: float | None = Field(None, description="merger time [MJD]; None: the map's MJD-OBS (or DATE-OBS)")
    window_days: tuple[float, float] = Field((0.0, 14.0), description="accepted first detection minus merger time [days], inclusive")

    @field_validator("window_days")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] <= v[1]:
            raise ValueError(f"window_days: {v[0]} is after {v[1]}")
        return v


class SkyMapUnit:
    """Mixin of the sky-map units: pins the map's content hash and event time in the config (so results
    follow the map's content and the time actually used), and loads the map once per process."""

    config: SkyMapUnitConfig

    def _pin_skymap(self) -> None:
        from ...keys import file_hash

        c = self.config
        digest = pinned_hash(type(self).__name__, c.skymap, file_hash(c.skymap), c.skymap_hash)
        m = cached_skymap(c.skymap, digest)
        event = c.event_mjd if c.event_mjd is not None else m.event_mjd
        if event is None:
            raise ValueError(f"{type(self).__name__}: {c.skymap} has no MJD-OBS or DATE-OBS: give event_mjd")
        self.config = c.model_copy(update={"skymap_hash": digest, "event_mjd": float(event)})

    @property
    def skymap(self) -> SkyMap:
        return cached_skymap(self.config.skymap, self.config.skymap_hash)

    def in_window(self, first_det: np.ndarray) -> np.ndarray:
        lo, hi = self.config.window_days
        dt = first_det - self.config.event_mjd
        return (dt >= lo) & (dt <= hi)


__all__ = ["SkyMap", "SkyMapUnit", "SkyMapUnitConfig", "read_skymap", "cached_skymap", "credible_levels", "distance_cdf", "distance_pdf"]
