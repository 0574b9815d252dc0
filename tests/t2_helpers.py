"""Test helpers for the T2 units: small real archives, states, and plain per-state reference code."""

from __future__ import annotations

import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.tiers.states import T1PolicyConfig, build_states

ACCESS = ["ZTF_PUB", "ZTF_PRIV", "LSST"]


def ingest_quiet(sources: list[Path], root: Path) -> Path:
    ingest([str(s) for s in sources], root, IngestOptions(workers=0, progress=False))
    return root


def archive_states(root: Path, policy: T1PolicyConfig | None = None) -> pa.Table:
    arch = Archive(root)
    tables = [build_states(arch.read(p), policy or T1PolicyConfig(), ACCESS) for p in arch.partitions()]
    return pa.concat_tables(tables).combine_chunks()


def extract_busiest_objects(tarball: Path, rows: list[dict], n_objects: int, dest: Path) -> Path:
    """Copy the packets of the ``n_objects`` objects with most alerts out of a tarball (a quick, rich subset)."""
    counts = Counter(r["object_id"] for r in rows)
    objects = {o for o, _ in counts.most_common(n_objects)}
    members = {r["member"] for r in rows if r["object_id"] in objects}
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        for m in tar:
            if m.name in members:
                (dest / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return dest


def reference_curve(dps: list[dict], band: str, kinds: set[int], value: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One state's light curve in one band, built the plain way (per datapoint Python)."""
    err = "mag_err" if value == "mag" else "flux_err"
    pts = [(d["mjd"], d[value], d[err]) for d in dps
           if d["band"] == band and d["kind"] in kinds and d["mjd"] is not None and d[value] is not None and d[err] is not None
           and math.isfinite(d["mjd"]) and math.isfinite(d[value]) and math.isfinite(d[err]) and d[err] > 0]  # fmt: skip
    pts.sort(key=lambda p: p[0])  # stable: equal times keep the state's order
    if not pts:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    t, m, s = (np.array(x, dtype=np.float64) for x in zip(*pts))
    return t, m, s


def reference_feature(feature, dps: list[dict], band: str, kinds: set[int], value: str, min_points: int, nvalues: int) -> tuple[np.ndarray, int, bool]:
    """light_curve's own output on that curve, its length, and whether it is usable (else NaN: too short,
    or all points at one time, which makes light_curve panic)."""
    t, m, s = reference_curve(dps, band, kinds, value)
    if len(t) < min_points or (len(t) > 1 and t[0] == t[-1]):
        return np.full(nvalues, np.nan), len(t), False
    return np.asarray(feature(t, m, s, sorted=True, check=False, fill_value=np.nan)), len(t), True


def offset_positions(ra: np.ndarray, dec: np.ndarray, sep_arcsec: np.ndarray, pa_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions at exact separations and position angles from (ra, dec) (astropy, exact on the sphere)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(pa_deg * u.deg, sep_arcsec * u.arcsec)
    return c.ra.deg, c.dec.deg


def brute_force_pairs(ra: np.ndarray, dec: np.ndarray, cra: np.ndarray, cdec: np.ndarray, radius_arcsec: float) -> dict[tuple[int, int], float]:
    """All (source, catalog) pairs within the radius -> separation [arcsec], by astropy over the full cross product."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    cat = SkyCoord(cra * u.deg, cdec * u.deg)
    out = {}
    for lo in range(0, len(ra), 100):
        src = SkyCoord(ra[lo : lo + 100, None] * u.deg, dec[lo : lo + 100, None] * u.deg)
        sep = src.separation(cat[None, :]).arcsec
        for i, j in zip(*np.nonzero(sep <= radius_arcsec)):
            out[(lo + int(i), int(j))] = float(sep[i, j])
    return out


def ampel_is_star_in_gaia(srcs: list[dict], c) -> bool:
    """AMPEL's DecentFilter.is_star_in_gaia decision for one alert, given its catalog sources (plain Python).

    ``srcs``: dicts with the Gaia columns (None allowed) and ``dist_arcsec``, as catsHTM returns them.
    """
    if not srcs:
        return False
    star = False
    for src in srcs:
        g = {k: (math.nan if v is None else float(v)) for k, v in src.items()}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            distance_norm = bool(1.8 + 0.6 * np.exp((20 - np.float64(g["Mag_G"])) / 2.05) > g["dist_arcsec"])
            prox = distance_norm and c.gaia_veto_gmag_min <= g["Mag_G"] <= c.gaia_veto_gmag_max
            pmra = bool(abs(np.float64(g["PMRA"]) / np.float64(g["ErrPMRA"])) > c.gaia_pm_signif)
            pmdec = bool(abs(np.float64(g["PMDec"]) / np.float64(g["ErrPMDec"])) > c.gaia_pm_signif)
            plx = bool(abs(np.float64(g["Plx"]) / np.float64(g["ErrPlx"])) > c.gaia_plx_signif)
        clean = g["ExcessNoiseSig"] < c.gaia_excessnoise_sig_max
        if prox and clean and (pmra or pmdec or plx):
            star = True
    return star
