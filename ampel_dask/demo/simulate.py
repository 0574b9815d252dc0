"""A small, realistic ZTF-like alert stream, made here so the demo needs no data and no servers.

Objects with real light-curve shapes (Bazin-shaped supernovae of two kinds, periodic variables), plus
bogus detections and asteroids, sit in survey fields that are observed as a survey observes them: each
field from its own first night, on an irregular cadence (some nights in g and r, some in one band,
some not at all), with gaps for bad weather that hit every field, and a limiting magnitude that
follows the moon and the conditions of each visit. Supernovae explode at different times, some before
their field is first observed. Each detection becomes an alert packet in a ZTF-shaped Avro schema
(candidate, 30 days of prv_candidates with upper limits, science/template/difference cutouts; one
packet in ten carries the difference stamp only, as some broker dumps do), written as nightly tarballs
``ztf_public_YYYYMMDD.tar.gz`` like ZTF's public archive. Seeded: the same stream every time.
"""

from __future__ import annotations

import gzip
import io
import math
import tarfile
from dataclasses import dataclass
from functools import lru_cache
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
N_FIELDS = 8
STAMP = 31  # cutout side, pixels
ZP = 22.0  # stamp counts: 50 * 10^(-0.4 (mag - ZP)) in the PSF


@dataclass
class SimObject:
    name: str
    kind: str
    ra: float
    dec: float
    params: dict


@dataclass
class Visit:
    """One exposure of one field: when, in which band, how deep."""

    mjd: float
    field: int
    fid: int  # 1 = g, 2 = r
    limit: float


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


def make_objects(n: int, rng: np.random.Generator, nights: int = 40) -> list[SimObject]:
    objs = []
    for i in range(n):
        kind = rng.choice(KINDS, p=[0.3, 0.2, 0.2, 0.2, 0.1])
        field = int(rng.integers(0, N_FIELDS))
        # one field per 15 deg of ra, at high galactic latitude (|b| > 20 deg for these ra/dec)
        ra, dec = float(120 + 15 * field + rng.uniform(0, 15)), float(np.degrees(np.arcsin(rng.uniform(0.2, 0.9))))
        p = {"colour": float(rng.normal(0.1, 0.15)), "field": field}
        if kind == "SN Ia":  # explosions spread over the stream, a few before their field is first seen
            p.update(t0=float(MJD0 + rng.uniform(-10, nights - 5)), rise=float(rng.uniform(2, 5)), fall=float(rng.uniform(20, 40)), peak=float(rng.uniform(17.0, 19.2)))
        elif kind == "SN II":
            p.update(t0=float(MJD0 + rng.uniform(-10, nights - 5)), rise=float(rng.uniform(1, 3)), fall=float(rng.uniform(60, 120)), peak=float(rng.uniform(17.5, 19.5)))
        elif kind == "variable":
            p.update(mean=float(rng.uniform(17, 19)), amp=float(rng.uniform(0.3, 1.0)), period=float(rng.uniform(0.3, 30)), phase=float(rng.uniform(0, 30)))
        else:
            p.update(peak=float(rng.uniform(18, 20)), night=int(rng.integers(0, nights)))
        objs.append(SimObject(_name(17_000_000 + i * 7919), str(kind), ra, dec, p))
    return objs


def schedule(nights: int, rng: np.random.Generator) -> list[Visit]:
    """The survey's visits, in time order.

    Weather is a two-state Markov chain over nights (a clear night turns bad with probability 0.15, a
    bad one stays bad with 0.55: gaps of one to a few nights, for every field at once). Each field is
    first observed on its own night (0 to 40% into the stream), then on a clear night with its own
    probability (0.35-0.9); a visited night has g and r an hour or so apart (70%) or one band. The 5-sigma
    depth is 20.7 at new moon, up to 0.8 mag shallower at full moon, and varies per visit (seeing, clouds).
    """
    clear = np.empty(nights, dtype=bool)
    state = True
    for k in range(nights):
        state = rng.uniform() > (0.15 if state else 0.55)
        clear[k] = state
    start = rng.integers(0, max(1, int(0.4 * nights)), N_FIELDS)
    p_visit = rng.uniform(0.35, 0.9, N_FIELDS)
    moon = 0.4 * (1 + np.cos(2 * np.pi * (np.arange(nights) - 8) / 29.5))  # full moon on night 8
    visits = []
    for night in np.flatnonzero(clear):
        for field in range(N_FIELDS):
            if night < start[field] or rng.uniform() > p_visit[field]:
                continue
            t = MJD0 + night + rng.uniform(0.12, 0.38)
            r = rng.uniform()
            bands = (1, 2) if r < 0.7 else (1,) if r < 0.85 else (2,)
            for k, fid in enumerate(bands):
                limit = 20.7 - moon[night] - abs(rng.normal(0, 0.3))
                visits.append(Visit(float(t + 0.04 * k + rng.uniform(0, 0.02)), field, fid, float(limit)))
    return sorted(visits, key=lambda v: v.mjd)


# --- cutouts ---------------------------------------------------------------------------------------

_YX = np.mgrid[0:STAMP, 0:STAMP] - STAMP // 2
_PSF = np.exp(-(_YX**2).sum(axis=0) / (2 * 1.8**2))


@lru_cache(maxsize=1)
def _fits_header() -> bytes:
    """The FITS header of a 31x31 float32 image, made once by astropy (the data block is appended)."""
    from astropy.io import fits

    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((STAMP, STAMP), dtype=np.float32)).writeto(buf)
    return buf.getvalue()[:2880]


def _fits(img: np.ndarray) -> bytes:
    """A stamp as gzipped FITS (what ZTF ships)."""
    data = img.astype(">f4").tobytes()
    return gzip.compress(_fits_header() + data + b"\0" * (-len(data) % 2880), compresslevel=1)


def _host(o: SimObject) -> np.ndarray:
    """The object's static scene: a galaxy beside a supernova, the star itself for a variable."""
    p = o.params
    if o.kind in ("SN Ia", "SN II"):
        dy, dx = p["host_offset"]
        r = np.hypot((_YX[0] - dy) / 1.0, (_YX[1] - dx) / 0.6)
        return p["host_flux"] * np.exp(-r / 3.5)
    if o.kind == "variable":
        return 50 * 10 ** (-0.4 * (p["mean"] - ZP)) * _PSF
    return np.zeros((STAMP, STAMP))


def _stamps(o: SimObject, rng: np.random.Generator, mag: float, limit: float, with_images: bool) -> dict:
    """Science, template and difference cutouts of one detection."""
    noise = 50 * 10 ** (-0.4 * (limit - ZP)) / 8  # per pixel: a source at the limit peaks at ~8 sigma
    source = 50 * 10 ** (-0.4 * (mag - ZP)) * _PSF
    if o.kind == "bogus":  # a hot pixel and its neighbour, not a PSF
        source = np.zeros((STAMP, STAMP))
        source[STAMP // 2, STAMP // 2 : STAMP // 2 + 2] = 50 * 10 ** (-0.4 * (mag - ZP))
    host = _host(o)
    diff = (source - (host if o.kind == "variable" else 0)) + rng.normal(0, noise * 1.4, (STAMP, STAMP))
    out = {"cutoutDifference": diff}
    if with_images:
        out["cutoutTemplate"] = host + rng.normal(0, noise * 0.5, (STAMP, STAMP))
        out["cutoutScience"] = host * (0 if o.kind == "variable" else 1) + source + rng.normal(0, noise, (STAMP, STAMP))
    return out


# --- the stream ------------------------------------------------------------------------------------


def simulate(out_dir: str | Path, n_objects: int = 200, nights: int = 40, seed: int = 42) -> list[Path]:
    """Write nightly tarballs of simulated alerts; returns their paths."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objs = make_objects(n_objects, rng, nights)
    for o in objs:
        if o.kind in ("SN Ia", "SN II"):
            o.params.update(host_offset=(float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4))), host_flux=float(rng.uniform(150, 600)))
    by_field = [[o for o in objs if o.params["field"] == f] for f in range(N_FIELDS)]
    history: dict[str, list[dict]] = {o.name: [] for o in objs}
    detections: dict[str, list[float]] = {o.name: [] for o in objs}
    packets: dict[int, list[tuple[int, dict]]] = {}
    candid = 3_000_000_000_000_000_000 // 10
    for v in schedule(nights, rng):
        night = int(v.mjd - MJD0)
        pid = int((v.mjd - 40000) * 1e5) * 10 + v.field
        for o in by_field[v.field]:
            jd = v.mjd + 2400000.5 + rng.uniform(0, 0.0005)
            if o.kind in ("bogus", "asteroid") and night != o.params["night"]:
                continue
            mag = min(float(_true_mag(o, np.array([jd - 2400000.5]), v.fid)[0]), 30.0)
            err = float(np.hypot(0.015, min(1.0857 / (5 * 10 ** (-0.4 * (mag - v.limit))), 0.6)))  # 5 sigma at the limit
            obs = mag + rng.normal(0, err)
            prv = [h for h in history[o.name] if h["jd"] > jd - 30]
            if obs > v.limit or not np.isfinite(obs):
                if o.kind not in ("bogus", "asteroid"):
                    history[o.name].append({"jd": jd, "fid": v.fid, "pid": pid, "diffmaglim": v.limit, "programid": 1, "candid": None,
                                            "isdiffpos": None, "magpsf": None, "sigmapsf": None, "rb": None, "ra": None, "dec": None})  # fmt: skip
                continue
            candid += int(rng.integers(1, 1000))
            detections[o.name].append(jd)
            rb = float(rng.uniform(0.05, 0.35)) if o.kind == "bogus" else float(rng.uniform(0.6, 1.0))
            cand = {
                "jd": jd, "fid": v.fid, "pid": pid, "diffmaglim": v.limit, "programid": 1, "candid": candid, "isdiffpos": "t",
                "rcid": int(rng.integers(0, 64)), "field": 600 + v.field, "ra": o.ra + rng.normal(0, 1e-5), "dec": o.dec + rng.normal(0, 1e-5),
                "magpsf": obs, "sigmapsf": err, "magap": obs + rng.normal(0, 0.05), "fwhm": float(rng.uniform(5.5, 9) if o.kind == "bogus" else rng.uniform(1.5, 3.5)),
                "elong": float(rng.uniform(1.0, 1.3)), "nbad": 0, "rb": rb, "drb": rb, "ssdistnr": 2.0 if o.kind == "asteroid" else -999.0,
                "ssmagnr": 19.0 if o.kind == "asteroid" else -999.0, "magdiff": float(rng.normal(0, 0.05)),
                "distpsnr1": float(rng.uniform(2, 15)), "sgscore1": float(rng.uniform(0, 0.3)), "distpsnr2": float(rng.uniform(15, 30)),
                "sgscore2": float(rng.uniform(0, 1)), "distpsnr3": float(rng.uniform(30, 40)), "sgscore3": float(rng.uniform(0, 1)),
                "ndethist": len(detections[o.name]), "ncovhist": len(detections[o.name]) + len(prv),
                "jdstarthist": detections[o.name][0], "jdendhist": jd, "magzpsci": 26.3,
            }  # fmt: skip
            rec = {"schemavsn": "4.02-sim", "publisher": "ampel-dask demo", "objectId": o.name, "candid": candid, "candidate": cand,
                   "prv_candidates": prv or None, "cutoutScience": None, "cutoutTemplate": None, "cutoutDifference": None}  # fmt: skip
            for key, img in _stamps(o, rng, obs, v.limit, with_images=rng.uniform() > 0.1).items():
                rec[key] = {"fileName": f"candid{candid}_{key[6:].lower()}.fits.gz", "stampData": _fits(img)}
            packets.setdefault(night, []).append((candid, rec))
            history[o.name].append({"jd": jd, "fid": v.fid, "pid": pid, "diffmaglim": v.limit, "programid": 1, "candid": candid, "isdiffpos": "t",
                                    "magpsf": obs, "sigmapsf": err, "rb": rb, "ra": cand["ra"], "dec": cand["dec"]})  # fmt: skip
    paths = []
    for night, night_packets in sorted(packets.items()):
        path = out / f"ztf_public_{_date(MJD0 + night)}.tar.gz"
        with tarfile.open(path, "w:gz", compresslevel=1) as tar:
            for cid, rec in night_packets:
                buf = io.BytesIO()
                fastavro.writer(buf, PARSED, [rec], sync_marker=cid.to_bytes(8, "big") * 2)
                info = tarfile.TarInfo(f"{cid}.avro")
                info.size = buf.tell()
                info.mtime = 0
                buf.seek(0)
                tar.addfile(info, buf)
        paths.append(path)
    return paths


def truth(n_objects: int = 200, seed: int = 42, nights: int = 40) -> dict[str, str]:
    """Object name -> simulated class (for the curious, and for tests)."""
    return {o.name: o.kind for o in make_objects(n_objects, np.random.default_rng(seed), nights)}


def _date(mjd: float) -> str:
    d = np.datetime64("1858-11-17") + np.timedelta64(int(math.floor(mjd)), "D")
    return str(d).replace("-", "")
