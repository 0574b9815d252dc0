"""Sky math for whole columns at once."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _icrs_to_galactic() -> np.ndarray:
    """astropy's ICRS -> Galactic rotation, read off once by transforming the three unit vectors."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra=[0.0, 90.0, 0.0] * u.deg, dec=[0.0, 0.0, 90.0] * u.deg, frame="icrs")
    g = c.galactic.cartesian
    return np.array([g.x.value, g.y.value, g.z.value])  # rows: galactic x, y, z of each icrs axis


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)])


def galactic_latitude(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Galactic latitude in degrees (agrees with astropy's SkyCoord(...).galactic.b)."""
    z = _icrs_to_galactic()[2] @ unit_vectors(ra_deg, dec_deg)
    return np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))


def angular_distance(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Great-circle distance in degrees (haversine, accurate at arcsecond scales)."""
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0))))
