"""Sky math for whole columns at once."""

from __future__ import annotations

import numpy as np


# ICRS -> Galactic rotation as astropy computes it (SkyCoord(...).galactic of the three ICRS unit vectors;
# rows: galactic x, y, z). A constant: asking astropy costs ~2 s of imports in every worker process, and
# tests/test_tiers.py checks the latitudes against astropy.
ICRS_TO_GALACTIC = np.array([
    [-0.05487565771259168, -0.8734370519556163, -0.4838350736167155],
    [0.4941094371927275, -0.44482972122329517, 0.7469821839866676],
    [-0.8676661375596587, -0.19807633727300075, 0.4559838136873016],
])  # fmt: skip


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)])


def galactic_latitude(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Galactic latitude in degrees (agrees with astropy's SkyCoord(...).galactic.b)."""
    z = ICRS_TO_GALACTIC[2] @ unit_vectors(ra_deg, dec_deg)
    return np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))


def angular_distance(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Great-circle distance in degrees (haversine, accurate at arcsecond scales)."""
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0))))
