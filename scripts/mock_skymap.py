"""Write a mock gravitational-wave sky map in the LIGO/Virgo/KAGRA FITS layout (for trials and tests).

    python scripts/mock_skymap.py OUT.fits --ra 10.5 --dec 41.2 --sigma 3 --event-mjd 60233.0 \\
        [--layout NUNIQ|NESTED|RING] [--nside 128] [--dist-mu 150 --dist-sigma 40]

A Fisher (spherical Gaussian) blob of width ``sigma`` [deg] around (ra, dec): PROB per pixel for a flat
map (RING or NESTED), PROBDENSITY [sr^-1] with UNIQ for a multi-order map (pixels far from the peak
merged four levels up, as BAYESTAR's maps are coarse where nothing is). With ``--dist-mu`` the map gets
distance layers: DISTMU and DISTSIGMA constant, DISTNORM = 1 / integral of r^2 N(r; mu, sigma) over r > 0.
Header keys as LVK writes them (PIXTYPE, ORDERING, COORDSYS, NSIDE/MOCORDER, INDXSCHM, DATE-OBS, MJD-OBS).
It is a mock: the real maps come from GraceDB.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np


def fisher_density(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float, sigma_deg: float) -> np.ndarray:
    """Normalised Fisher density [sr^-1] at (ra, dec) for a blob of width sigma around (ra0, dec0)."""
    kappa = 1.0 / math.radians(sigma_deg) ** 2
    cos_t = np.sin(np.radians(dec)) * math.sin(math.radians(dec0)) + np.cos(np.radians(dec)) * math.cos(math.radians(dec0)) * np.cos(np.radians(ra - ra0))
    return kappa / (2 * math.pi * -np.expm1(-2 * kappa)) * np.exp(kappa * (cos_t - 1.0))


def pixel_centres(nside: int, nested: bool) -> tuple[np.ndarray, np.ndarray]:
    import astropy.units as u

    npix = 12 * nside * nside
    if nested:
        from cdshealpix.nested import healpix_to_lonlat

        lon, lat = healpix_to_lonlat(np.arange(npix, dtype=np.uint64), int(math.log2(nside)))
    else:
        from cdshealpix.ring import healpix_to_lonlat

        lon, lat = healpix_to_lonlat(np.arange(npix, dtype=np.uint64), nside)
    return lon.to_value(u.deg), lat.to_value(u.deg)


def distnorm(mu: float, sigma: float) -> float:
    """1 / integral_0^inf r^2 N(r; mu, sigma) dr (Singer et al. 2016, eq. in the LVK user guide)."""
    from scipy.stats import norm

    t = mu / sigma
    return 1.0 / ((mu**2 + sigma**2) * norm.cdf(t) + mu * sigma * norm.pdf(t))


def write_skymap(path: str | Path, ra: float, dec: float, sigma: float, event_mjd: float, layout: str = "NUNIQ",
                 nside: int = 128, dist_mu: float | None = None, dist_sigma: float | None = None, coarsen_below: float = 1e-3) -> Path:  # fmt: skip
    """Write the map; returns its path. ``coarsen_below``: NUNIQ groups of 256 pixels whose densest is below
    this fraction of the peak density become one pixel four orders up."""
    from astropy.io import fits
    from astropy.time import Time

    layout = layout.upper()
    nested = layout != "RING"
    lon, lat = pixel_centres(nside, nested)
    density = fisher_density(lon, lat, ra, dec, sigma)
    order = int(math.log2(nside))
    cols = []
    if layout == "NUNIQ":
        groups = density.reshape(-1, 256)
        coarse = groups.max(axis=1) < coarsen_below * density.max()
        fine_ipix = np.arange(len(density)).reshape(-1, 256)[~coarse].ravel()
        coarse_ipix = np.flatnonzero(coarse)
        uniq = np.r_[4 * 4 ** (order - 4) + coarse_ipix, 4 * 4**order + fine_ipix].astype(np.int64)
        dens = np.r_[groups[coarse].mean(axis=1), density[fine_ipix]]
        cols += [fits.Column("UNIQ", "K", array=uniq), fits.Column("PROBDENSITY", "D", unit="sr-1", array=dens)]
        n = len(uniq)
    else:
        prob = density * 4 * math.pi / len(density)
        cols.append(fits.Column("PROB", "D", unit="pix-1", array=prob / prob.sum()))
        n = len(prob)
    if dist_mu is not None:
        s = dist_sigma if dist_sigma is not None else dist_mu / 4
        cols += [fits.Column("DISTMU", "D", unit="Mpc", array=np.full(n, dist_mu)), fits.Column("DISTSIGMA", "D", unit="Mpc", array=np.full(n, s)),
                 fits.Column("DISTNORM", "D", unit="Mpc-2", array=np.full(n, distnorm(dist_mu, s)))]  # fmt: skip
    hdu = fits.BinTableHDU.from_columns(cols)
    hdr = hdu.header
    hdr["PIXTYPE"] = "HEALPIX"
    hdr["ORDERING"] = layout
    hdr["COORDSYS"] = "C"
    if layout == "NUNIQ":
        hdr["MOCORDER"] = order
        hdr["INDXSCHM"] = "EXPLICIT"
    else:
        hdr["NSIDE"] = nside
        hdr["INDXSCHM"] = "IMPLICIT"
    hdr["OBJECT"] = "MOCK"
    hdr["DATE-OBS"] = Time(event_mjd, format="mjd", scale="utc").isot
    hdr["MJD-OBS"] = event_mjd
    hdr["CREATOR"] = "ampel-dask scripts/mock_skymap.py"
    path = Path(path)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, overwrite=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--ra", type=float, required=True)
    ap.add_argument("--dec", type=float, required=True)
    ap.add_argument("--sigma", type=float, default=3.0, help="width of the blob [deg]")
    ap.add_argument("--event-mjd", type=float, required=True)
    ap.add_argument("--layout", default="NUNIQ", choices=["NUNIQ", "NESTED", "RING"])
    ap.add_argument("--nside", type=int, default=128)
    ap.add_argument("--dist-mu", type=float)
    ap.add_argument("--dist-sigma", type=float)
    a = ap.parse_args()
    print(write_skymap(a.out, a.ra, a.dec, a.sigma, a.event_mjd, a.layout, a.nside, a.dist_mu, a.dist_sigma))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
