"""A small, realistic ZTF-like alert stream, made here so the demo needs no data and no servers.

Objects with real light-curve shapes (Bazin-shaped supernovae of two kinds, periodic variables), plus
bogus detections and asteroids, are observed in g and r on a nightly cadence with a varying limiting
magnitude. Each detection becomes an alert packet in a ZTF-shaped Avro schema (candidate, 30 days of
prv_candidates with upper limits, a difference-image cutout), written as nightly tarballs
``ztf_public_YYYYMMDD.tar.gz`` like ZTF's public archive. Seeded: the same stream every time.
"""

from __future__ import annotations

import gzip
import io
import math
import tarfile
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path

import fastavro
import numpy as np

F, D, I, L, S = (["null", "float"], ["null", "double"], ["null", "int"], ["null", "long"], ["null", "string"])


def _fields(names_types: list[tuple[str, object]]) -> list[dict]:
    return [{"name": n, "type": t, "default": None} for n, t in names_types]


CANDIDATE = [("jd", "double"), ("fid", "int"), ("pid", "long"), ("diffmaglim", F), ("programid", "int"), ("candid", "long"),
             ("isdiffpos", "string"), ("rcid", I), ("field", I), ("ra", "double"), ("dec", "double"), ("magpsf", "float"),
             ("sigmapsf", "float"), ("magap", F), ("fwhm", F), ("elong", F), ("nbad", I), ("rb", F), ("drb", F),
             ("ssdistnr", F), ("ssmagnr", F), ("magdiff", F), ("distpsnr1", F), ("sgscore1", F), ("distpsnr2", F),
             ("sgscore2", F), ("distpsnr3", F), ("sgscore3", F), ("ndethist", "int"), ("ncovhist", "int"),
             ("jdstarthist", D), ("jdendhist", D), ("magzpsci", F)]  # fmt: skip
PRV = [("jd", "double"), ("fid", "int"), ("pid", "long"), ("diffmaglim", F), ("programid", "int"), ("candid", L),
       ("isdiffpos", S), ("magpsf", F), ("sigmapsf", F), ("rb", F), ("ra", D), ("dec", D)]  # fmt: skip
CUTOUT = {"type": "record", "name": "cutout", "fields": [{"name": "fileName", "type": "string"}, {"name": "stampData", "type": "bytes"}]}
SCHEMA = {
    "type": "record",
    "name": "alert",
    "namespace": "ztf",
    "version": "4.02-sim",
    "doc": "ZTF-shaped alert written by ampel-dask's demo simulator",
    "fields": [
        {"name": "schemavsn", "type": "string"},
        {"name": "publisher", "type": "string"},
        {"name": "objectId", "type": "string"},
        {"name": "candid", "type": "long"},
        {"name": "candidate", "type": {"type": "record", "name": "candidate", "fields": _fields(CANDIDATE)}},
        {"name": "prv_candidates", "type": ["null", {"type": "array", "items": {"type": "record", "name": "prv_candidate", "fields": _fields(PRV)}}], "default": None},
        {"name": "cutoutScience", "type": ["null", CUTOUT], "default": None},
        {"name": "cutoutTemplate", "type": ["null", "ztf.cutout"], "default": None},
        {"name": "cutoutDifference", "type": ["null", "ztf.cutout"], "default": None},
    ],
}
for f in SCHEMA["fields"][4]["type"]["fields"] + SCHEMA["fields"][5]["type"][1]["items"]["fields"]:
    if not isinstance(f["type"], list):
        f.pop("default")
PARSED = fastavro.parse_schema(SCHEMA)
KINDS = ("SN Ia", "SN II", "variable", "bogus", "asteroid")
MJD0 = 61000.0  # 2025-11-22


@dataclass
class SimObject:
    name: str
    kind: str
    ra: float
    dec: float
    params: dict


def _name(i: int) -> str:
    letters = []
    n = i
    for _ in range(7):
        n, r = divmod(n, 26)
        letters.append(chr(97 + r))
    return "ZTF25" + "".join(reversed(letters))


def _bazin(t: np.ndarray, t0: float, rise: float, fall: float, peak: float) -> np.ndarray:
    """Magnitude of a Bazin-shaped transient peaking at ``peak`` mag (flux: A e^-(t-t0)/fall / (1+e^-(t-t0)/rise))."""
    x = t - t0
    f = np.exp(-x / fall) / (1 + np.exp(-x / rise))
    tmax = t0 + rise * np.log(fall / rise - 1) if fall > 2 * rise else t0
    fmax = np.exp(-(tmax - t0) / fall) / (1 + np.exp(-(tmax - t0) / rise))
    with np.errstate(divide="ignore"):
        return peak - 2.5 * np.log10(np.maximum(f / fmax, 1e-12))


def _true_mag(o: SimObject, t: np.ndarray, band: int) -> np.ndarray:
    p = o.params
    colour = p["colour"] if band == 1 else 0.0
    if o.kind in ("SN Ia", "SN II"):
        return _bazin(t, p["t0"], p["rise"], p["fall"], p["peak"]) + colour
    if o.kind == "variable":
        return p["mean"] + p["amp"] * np.sin(2 * np.pi * (t - p["phase"]) / p["period"]) + colour
    return np.full(len(t), p["peak"])  # bogus / asteroid: flat where seen


def make_objects(n: int, rng: np.random.Generator) -> list[SimObject]:
    objs = []
    for i in range(n):
        kind = rng.choice(KINDS, p=[0.3, 0.2, 0.2, 0.2, 0.1])
        # high galactic latitude field band (|b| > 20 deg for these ra/dec)
        ra, dec = float(rng.uniform(120, 240)), float(np.degrees(np.arcsin(rng.uniform(0.2, 0.9))))
        p = {"colour": float(rng.normal(0.1, 0.15))}
        if kind == "SN Ia":
            p.update(t0=float(MJD0 + rng.uniform(-5, 25)), rise=float(rng.uniform(2, 5)), fall=float(rng.uniform(20, 40)), peak=float(rng.uniform(17.0, 19.2)))
        elif kind == "SN II":
            p.update(t0=float(MJD0 + rng.uniform(-5, 25)), rise=float(rng.uniform(1, 3)), fall=float(rng.uniform(60, 120)), peak=float(rng.uniform(17.5, 19.5)))
        elif kind == "variable":
            p.update(mean=float(rng.uniform(17, 19)), amp=float(rng.uniform(0.3, 1.0)), period=float(rng.uniform(0.3, 30)), phase=float(rng.uniform(0, 30)))
        else:
            p.update(peak=float(rng.uniform(18, 20)), night=int(rng.integers(0, 30)))
        objs.append(SimObject(_name(17_000_000 + i * 7919), str(kind), ra, dec, p))
    return objs


_PSF = np.exp(-(np.mgrid[-15:16, -15:16] ** 2).sum(axis=0) / (2 * 1.8**2))


@lru_cache(maxsize=1)
def _fits_header() -> bytes:
    """The FITS header of a 31x31 float32 image, made once by astropy (the data block is appended)."""
    from astropy.io import fits

    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((31, 31), dtype=np.float32)).writeto(buf)
    return buf.getvalue()[:2880]


def _stamp(rng: np.random.Generator, flux: float) -> bytes:
    """A 31x31 difference-image cutout as gzipped FITS (what ZTF ships): a PSF plus noise."""
    img = (flux * _PSF + rng.normal(0, 1, (31, 31))).astype(">f4").tobytes()
    data = img + b"\0" * (-len(img) % 2880)
    return gzip.compress(_fits_header() + data, compresslevel=1)


def simulate(out_dir: str | Path, n_objects: int = 200, nights: int = 20, seed: int = 42) -> list[Path]:
    """Write nightly tarballs of simulated alerts; returns their paths."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objs = make_objects(n_objects, rng)
    epochs = [(MJD0 + night + 0.15 + 0.08 * k, 1 + k % 2) for night in range(nights) for k in range(2) if rng.uniform() > 0.15]
    history: dict[str, list[dict]] = {o.name: [] for o in objs}
    detections: dict[str, list[float]] = {o.name: [] for o in objs}
    paths = []
    candid = 3_000_000_000_000_000_000 // 10
    for night in range(nights):
        packets = []
        for mjd, fid in [e for e in epochs if int(e[0] - MJD0) == night]:
            limit = float(rng.normal(20.4, 0.3))
            pid = int((mjd - 40000) * 1e5)
            for o in objs:
                jd = mjd + 2400000.5 + rng.uniform(0, 0.01)
                if o.kind in ("bogus", "asteroid") and night != o.params["night"]:
                    continue
                mag = min(float(_true_mag(o, np.array([jd - 2400000.5]), fid)[0]), 30.0)
                err = float(np.hypot(0.015, min(1.0857 / (5 * 10 ** (-0.4 * (mag - limit))), 0.6)))  # 5 sigma at the limit
                obs = mag + rng.normal(0, err)
                prv = [h for h in history[o.name] if h["jd"] > jd - 30]
                if obs > limit or not np.isfinite(obs):
                    if o.kind not in ("bogus", "asteroid"):
                        history[o.name].append({"jd": jd, "fid": fid, "pid": pid, "diffmaglim": limit, "programid": 1, "candid": None,
                                                "isdiffpos": None, "magpsf": None, "sigmapsf": None, "rb": None, "ra": None, "dec": None})  # fmt: skip
                    continue
                candid += int(rng.integers(1, 1000))
                detections[o.name].append(jd)
                rb = float(rng.uniform(0.05, 0.35)) if o.kind == "bogus" else float(rng.uniform(0.6, 1.0))
                cand = {
                    "jd": jd, "fid": fid, "pid": pid, "diffmaglim": limit, "programid": 1, "candid": candid, "isdiffpos": "t",
                    "rcid": int(rng.integers(0, 64)), "field": 600 + int(o.ra // 10), "ra": o.ra + rng.normal(0, 1e-5), "dec": o.dec + rng.normal(0, 1e-5),
                    "magpsf": obs, "sigmapsf": err, "magap": obs + rng.normal(0, 0.05), "fwhm": float(rng.uniform(5.5, 9) if o.kind == "bogus" else rng.uniform(1.5, 3.5)),
                    "elong": float(rng.uniform(1.0, 1.3)), "nbad": 0, "rb": rb, "drb": rb, "ssdistnr": 2.0 if o.kind == "asteroid" else -999.0,
                    "ssmagnr": 19.0 if o.kind == "asteroid" else -999.0, "magdiff": float(rng.normal(0, 0.05)),
                    "distpsnr1": float(rng.uniform(2, 15)), "sgscore1": float(rng.uniform(0, 0.3)), "distpsnr2": float(rng.uniform(15, 30)),
                    "sgscore2": float(rng.uniform(0, 1)), "distpsnr3": float(rng.uniform(30, 40)), "sgscore3": float(rng.uniform(0, 1)),
                    "ndethist": len(detections[o.name]), "ncovhist": len(detections[o.name]) + len(prv),
                    "jdstarthist": detections[o.name][0], "jdendhist": jd, "magzpsci": 26.3,
                }  # fmt: skip
                flux = 10 ** (-0.4 * (obs - 22.0)) * 50
                packets.append(
                    (candid, {
                        "schemavsn": "4.02-sim", "publisher": "ampel-dask demo", "objectId": o.name, "candid": candid, "candidate": cand,
                        "prv_candidates": prv or None,
                        "cutoutScience": None, "cutoutTemplate": None,
                        "cutoutDifference": {"fileName": f"candid{candid}_diff.fits.gz", "stampData": _stamp(rng, flux)},
                    })  # fmt: skip
                )
                history[o.name].append({"jd": jd, "fid": fid, "pid": pid, "diffmaglim": limit, "programid": 1, "candid": candid, "isdiffpos": "t",
                                        "magpsf": obs, "sigmapsf": err, "rb": rb, "ra": cand["ra"], "dec": cand["dec"]})  # fmt: skip
        if not packets:
            continue
        date = _date(MJD0 + night)
        path = out / f"ztf_public_{date}.tar.gz"
        with tarfile.open(path, "w:gz", compresslevel=1) as tar:
            for cid, rec in packets:
                buf = io.BytesIO()
                fastavro.writer(buf, PARSED, [rec], sync_marker=cid.to_bytes(8, "big") * 2)
                info = tarfile.TarInfo(f"{cid}.avro")
                info.size = buf.tell()
                info.mtime = 0
                buf.seek(0)
                tar.addfile(info, buf)
        paths.append(path)
    return paths


def truth(n_objects: int = 200, seed: int = 42) -> dict[str, str]:
    """Object name -> simulated class (for the curious, and for tests)."""
    return {o.name: o.kind for o in make_objects(n_objects, np.random.default_rng(seed))}


def _date(mjd: float) -> str:
    d = np.datetime64("1858-11-17") + np.timedelta64(int(math.floor(mjd)), "D")
    return str(d).replace("-", "")
