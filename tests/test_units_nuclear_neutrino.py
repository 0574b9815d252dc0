"""NuclearFilter on real ZTF alerts against a plain-Python reading of the raw packets (fastavro), and
T2NeutrinoCoincidence against astropy's offsets: coincidences injected at real alerts' positions and
times are found, random neutrinos find nothing; workflows/nuclear_neutrino.yml end to end."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ampel_dask.io.archive import Archive
from ampel_dask.tiers.base import UnitConfigError
from ampel_dask.tiers.units.t0_nuclear import NuclearFilter
from ampel_dask.tiers.units.t2_neutrino import MATCH, NO_MATCH, NO_POSITION, NeutrinoTable, T2NeutrinoCoincidence, separation_norm

from . import t2_helpers as h

ROOT = Path(__file__).resolve().parents[1]
# ZTF groups of every schema generation with PS1 fields (1.3 has none: those alerts are noSgscore)
GROUPS = ["ztf/ampel_core_real_201712.tar.gz", "ztf/fink_ztf_public_20181129.tar.gz", "ztf/fink_basic_alerts_2023_2025.tar.gz",
          "ztf/pitt_google", "ztf/kowalski", "ztf/alerce", "ztf/fink_local_202001", "ztf/boom"]  # fmt: skip


@pytest.fixture(scope="module")
def ztf_root(data_dir, tmp_path_factory) -> Path:
    return h.ingest_quiet([data_dir / g for g in GROUPS], tmp_path_factory.mktemp("ztf_nuclear"))


@pytest.fixture(scope="module")
def ztf_alerts(ztf_root) -> pa.Table:
    arch = Archive(ztf_root)
    return pa.concat_tables([arch.read(p) for p in arch.partitions()], promote_options="permissive")


def raw_packets(data_dir: Path) -> dict[int, dict]:
    """Every packet of GROUPS as fastavro decodes it, by candid."""
    out: dict[int, dict] = {}

    def add(fh) -> None:
        for rec in fastavro.reader(fh):
            out[rec["candidate"]["candid"]] = rec

    for g in GROUPS:
        path = data_dir / g
        if path.is_dir():
            for f in sorted(path.rglob("*.avro")):
                with open(f, "rb") as fh:
                    add(fh)
        else:
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.isfile() and m.name.endswith(".avro"):
                        add(io.BytesIO(tar.extractfile(m).read()))
    return out


# --- NuclearFilter: the cuts re-implemented one packet at a time ----------------------------------------

ALIAS = {"sgscore1": "sgscore", "sgmag1": "sgmag", "srmag1": "srmag", "simag1": "simag", "szmag1": "szmag"}
NAN = float("nan")


def _val(cand: dict, key: str) -> float:
    v = cand.get(key, cand.get(ALIAS.get(key, "-"), None))
    return NAN if v is None else float(v)


def _negative(v) -> bool:
    return v is not None and str(v).lower() in ("f", "0", "false")


def _gal_b(ra: float, dec: float) -> float:
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    return SkyCoord(ra * u.deg, dec * u.deg).galactic.b.deg


def nuclear_reference(rec: dict, c: dict) -> str | None:
    """AMPEL's NuclearFilter cuts as the unit documents them, read from one raw packet (None = accepted)."""
    cand = rec["candidate"]
    g = lambda k: _val(cand, k)  # noqa: E731
    sg1, sg2, d1, d2, d3 = g("sgscore1"), g("sgscore2"), abs(g("distpsnr1")), abs(g("distpsnr2")), abs(g("distpsnr3"))
    close2 = d2 < c["closePS1dist"]
    if math.isnan(sg1):
        return "noSgscore"
    if sg1 > c["maxSgscore"] and not (sg2 < c["minSafeSgscore"] and close2):
        return "sgscore"
    if sg2 > c["maxSgscore"] and close2:
        return "sgscore2"
    if g("srmag1") < 0 and not (g("srmag2") > 0 and close2):
        return "ps1Photometry"
    if not d1 <= c["maxDistPS1source"]:
        return "ps1TooFar"
    for b in "griz":
        lim = c[f"brightPS1{b}Mag"]
        if abs(g(f"s{b}mag1")) < lim:
            return "brightPS1"
        if abs(g(f"s{b}mag2")) < lim and d2 < c["brightObjDist"]:
            return "brightPS1_2"
        if abs(g(f"s{b}mag3")) < lim and d3 < c["brightObjDist"]:
            return "brightPS1_3"
    md = g("magdiff")
    if not (g("distnr") > 0 and g("nbad") <= 0 and g("fwhm") < 5 and g("elong") < 1.3 and -0.3 < md < 0.3 and not _negative(cand.get("isdiffpos"))):
        return "trigger"
    dets, seen = [], set()
    for p in [cand, *(rec.get("prv_candidates") or [])]:
        if p.get("candid") is None or p["candid"] in seen:
            continue
        seen.add(p["candid"])
        if not _negative(p.get("isdiffpos")):
            dets.append(p)
    if len(dets) < c["minDetections"]:
        return "nDet"
    magnr = g("magnr")
    if 0 < magnr < c["brightRefMag"]:
        return "brightRef"
    if g("nmtchps") > c["maxPS1matches"]:
        return "nmtchps"
    if abs(_gal_b(cand["ra"], cand["dec"])) < c["minGalLat"]:
        return "galPlane"
    rbs = [p["rb"] for p in dets if p.get("rb") is not None]
    if not (rbs and max(rbs) >= c["minRealBogusScore"]):
        return "rb"
    times = sorted(p["jd"] for p in dets)
    steps = [b - a for a, b in zip(times, times[1:]) if b - a > 0]
    if not steps:
        return "duplicates"
    if max(steps) < c["minDeltaJD"]:
        return "mover"
    if min(steps) > c["maxDeltaJD"]:
        return "gap"
    mags = [p["magpsf"] for p in dets if p.get("magpsf") is not None]
    if mags and min(mags) > c["diffmagLimit"]:
        return "faint"
    if g("magpsf") - magnr > c["maxDeltaMag"]:
        return "fluxIncrease"
    ranr, decnr = g("ranr"), g("decnr")
    offsets = []
    for fid in (1, 2):
        pts = [p for p in dets if p.get("fid") == fid and p.get("ra") is not None and p.get("dec") is not None]
        if len(pts) >= c["minDetections"]:
            dx = sum(((p["ra"] - ranr + 180) % 360 - 180) * math.cos(math.radians(decnr)) for p in pts) / len(pts)
            dy = sum(p["dec"] - decnr for p in pts) / len(pts)
            offsets.append(3600 * math.hypot(dx, dy))
    if not offsets:
        return "noOffset"
    if not any(c["minDeltaRad"] < o < c["maxDeltaRad"] for o in offsets):
        return "offset"
    return None


@pytest.mark.parametrize("overrides", [{}, {"minDetections": 3, "maxDistPS1source": 0.5, "closePS1dist": 0.5, "maxDeltaRad": 0.5,
                                            "diffmagLimit": 20, "maxDeltaMag": 2.5}, {"minDetections": 2, "maxDeltaRad": 1.0, "removeNegative": True}],
                         ids=["ampel_defaults", "tde_ranking", "looser"])  # fmt: skip
def test_nuclear_filter_equals_plain_reading_of_raw_packets(ztf_alerts, data_dir, overrides):
    """Every ZTF alert of 8 groups (schemas 1.3-4.02): the unit's reason == the per-packet reference on the
    fastavro-decoded packet; AMPEL's TDE_RANKING channel config is accepted as it is."""
    unit = NuclearFilter(**overrides)
    got = dict(zip(ztf_alerts.column("alert_id").to_pylist(), unit.verdict(ztf_alerts).reason_of()))
    packets = raw_packets(data_dir)
    assert set(got) == set(packets)
    cfg = unit.config.model_dump()
    want = {cid: nuclear_reference(rec, cfg) for cid, rec in packets.items()}
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not diff, list(diff.items())[:10]
    reasons = set(want.values())
    assert sum(r is None for r in want.values()) >= 20  # not vacuous: real nuclear candidates pass
    assert {"noSgscore", "sgscore", "ps1TooFar", "trigger", "offset"} <= reasons


def test_nuclear_filter_is_ztf_only(tmp_path):
    """LSST alerts carry no host-locating field: selecting them for NuclearFilter is a planning error."""
    from ampel_dask.graph.plan import check_columns, plan_workflow
    from ampel_dask.graph.workflow import Workflow, WorkflowError

    wf = Workflow.model_validate({"name": "n", "channels": [{"name": "N", "filters": [{"unit": "NuclearFilter"}],
                                                             "t1": {"unit": "T1Policy"}}]})  # fmt: skip
    with pytest.raises(WorkflowError, match=r"NuclearFilter uses column\(s\) .*distnr.*which lsst alerts do not have"):
        check_columns(wf, plan_workflow(wf), {"lsst"})
    check_columns(wf, plan_workflow(wf), {"ztf"})  # ZTF alerts have them all


# --- T2NeutrinoCoincidence ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ztf_states(ztf_root) -> pa.Table:
    return h.archive_states(ztf_root)


def _first_detection(dps: list[dict]) -> float:
    return min((d["mjd"] for d in dps if d["kind"] == 0), default=math.nan)


def expected_norm(ra, dec, nu: dict):
    """Separation in units of the region, by astropy (arrays or scalars): the RA difference wrapped with
    Angle for rectangles, the SkyOffsetFrame longitude/latitude for ellipses and circles."""
    import astropy.units as u
    from astropy.coordinates import Angle, SkyCoord

    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    if nu.get("ra_err_plus") is not None:
        dra = Angle((ra - nu["ra"]) * u.deg).wrap_at(180 * u.deg).deg
        ddec = dec - nu["dec"]
        era = np.where(dra >= 0, nu["ra_err_plus"], abs(nu["ra_err_minus"]))
        edec = np.where(ddec >= 0, nu["dec_err_plus"], abs(nu["dec_err_minus"]))
        return np.maximum(np.abs(dra) / era, np.abs(ddec) / edec)
    center = SkyCoord(nu["ra"] * u.deg, nu["dec"] * u.deg)
    off = SkyCoord(ra * u.deg, dec * u.deg).transform_to(center.skyoffset_frame())
    lon, lat = off.lon.wrap_at(180 * u.deg).deg, off.lat.deg
    a, b, pa_deg = (nu["err_radius"],) * 2 + (0.0,) if nu.get("err_radius") is not None else (nu["err_major"], nu["err_minor"], nu["err_pa"])
    t = math.radians(pa_deg)
    return np.hypot((lon * math.sin(t) + lat * math.cos(t)) / a, (lon * math.cos(t) - lat * math.sin(t)) / b)


COLUMNS = ["name", "time", "ra", "dec", "ra_err_plus", "ra_err_minus", "dec_err_plus", "dec_err_minus", "err_major", "err_minor", "err_pa", "err_radius"]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    return path


def test_neutrino_coincidences_injected_at_real_alerts_are_found_and_random_ones_are_not(ztf_states, tmp_path):
    """Three neutrinos (rectangle, ellipse, circle) placed so that three real alerts lie inside their 90%
    regions at known fractions, 20-40 days after each alert's first detection; one at a fourth alert's
    position but outside the time window; 40 at random positions where astropy finds no alert inside.
    Every state's result == astropy's offsets over all (state, neutrino) pairs."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    states = ztf_states
    dps = states.column("dps").to_pylist()
    ra, dec = states.column("ra").to_numpy(), states.column("dec").to_numpy()
    t_first = np.array([_first_detection(d) for d in dps])
    pick = [int(i) for i in np.flatnonzero(np.isfinite(t_first))[[10, 400, 900, 1400]]]
    rows = []
    # rectangle: the alert 0.6 of the way to the +RA edge and 0.3 towards -Dec (RA errors are RA degrees)
    i = pick[0]
    rows.append({"name": "INJ-RECT", "time": t_first[i] - 20.0, "ra": ra[i] - 0.6 * 1.2, "dec": dec[i] + 0.3 * 0.9,
                 "ra_err_plus": 1.2, "ra_err_minus": -0.7, "dec_err_plus": 0.5, "dec_err_minus": -0.9})  # fmt: skip
    # ellipse: the alert at 0.8 deg along PA 120 from the centre (major 1.5 at PA 30, minor 0.6)
    i = pick[1]
    c = SkyCoord(ra[i] * u.deg, dec[i] * u.deg).directional_offset_by(300 * u.deg, 0.8 * u.deg)
    rows.append({"name": "INJ-ELL", "time": t_first[i] - 40.0, "ra": c.ra.deg, "dec": c.dec.deg, "err_major": 1.5, "err_minor": 0.9, "err_pa": 30.0})
    # circle: 0.5 deg away, radius 1 deg
    i = pick[2]
    c = SkyCoord(ra[i] * u.deg, dec[i] * u.deg).directional_offset_by(10 * u.deg, 0.5 * u.deg)
    rows.append({"name": "INJ-CIRC", "time": t_first[i] - 30.0, "ra": c.ra.deg, "dec": c.dec.deg, "err_radius": 1.0})
    # the right place at the wrong time: 400 days before the first detection, outside (-365, 365)
    i = pick[3]
    rows.append({"name": "LATE", "time": t_first[i] + 400.0, "ra": ra[i], "dec": dec[i], "err_radius": 0.5})
    rng = np.random.default_rng(3)
    alerts_sky = SkyCoord(ra * u.deg, dec * u.deg)
    while len(rows) < 44:
        r, d = rng.uniform(0, 360), np.degrees(np.arcsin(rng.uniform(-1, 1)))
        nu = {"name": f"RND-{len(rows)}", "time": float(rng.uniform(np.nanmin(t_first), np.nanmax(t_first))), "ra": r, "dec": d, "err_radius": 1.0}
        if (alerts_sky.separation(SkyCoord(r * u.deg, d * u.deg)).deg > 1.0).all():  # astropy: no alert inside
            rows.append(nu)
    unit = T2NeutrinoCoincidence(alerts=str(write_csv(tmp_path / "nu.csv", rows)))
    out = unit.process(states).to_pylist()
    # the oracle: every pair within the window, by astropy
    best: dict[int, tuple[float, str, int]] = {}
    for j, nu in enumerate(rows):
        dt = t_first - nu["time"]
        norms = expected_norm(ra, dec, nu)
        for s in np.flatnonzero((dt >= -365) & (dt <= 365) & (norms <= 1.0)):
            k = best.get(s, (np.inf, "", 0))
            best[s] = min(k[:2], (float(norms[s]), nu["name"])) + (k[2] + 1,)
    for s, r in enumerate(out):
        if s in best:
            norm, name, n = best[s]
            assert (r["code"], r["nu_name"], r["nu_n_matches"]) == (MATCH, name, n), s
            assert r["nu_sep_norm"] == pytest.approx(norm, abs=1e-9)
            nu = next(x for x in rows if x["name"] == name)
            assert r["nu_dt"] == pytest.approx(t_first[s] - nu["time"], abs=1e-9)
            sep = SkyCoord(ra[s] * u.deg, dec[s] * u.deg).separation(SkyCoord(nu["ra"] * u.deg, nu["dec"] * u.deg)).deg
            assert r["nu_sep_deg"] == pytest.approx(sep, abs=1e-9)
        else:  # a state without detections (data rights) has no time to compare
            want = NO_POSITION if math.isnan(t_first[s]) else NO_MATCH
            assert (r["code"], r["nu_name"], r["nu_n_matches"]) == (want, None, 0), s
    # what was injected is found, at the injected fractions; nothing random, nothing late
    got = {r["nu_name"] for r in out}
    assert {"INJ-RECT", "INJ-ELL", "INJ-CIRC"} <= got and not any(str(g).startswith("RND") or g == "LATE" for g in got)
    assert out[pick[0]]["nu_sep_norm"] == pytest.approx(0.6, abs=1e-9) and out[pick[0]]["nu_region"] == "rectangle"
    assert out[pick[2]]["nu_sep_norm"] == pytest.approx(0.5, rel=1e-6) and out[pick[2]]["nu_region"] == "circle"
    assert out[pick[1]]["nu_dt"] == pytest.approx(40.0, abs=1e-9)


def test_neutrino_time_reference_window_and_bad_positions(ztf_states, tmp_path):
    """The window applies to the configured time (alert time vs. first detection); a state without a
    position gets code 2; ISO times in the table equal their MJD; Parquet reads as CSV does."""
    from astropy.time import Time

    s = next(x for x in ztf_states.to_pylist() if x["mjd"] - _first_detection(x["dps"]) > 2.0)  # earlier detections
    t_first, t_alert = _first_detection(s["dps"]), s["mjd"]
    nu_time = t_alert + 0.5  # after the first detection by more than 1 d, 0.5 d after the alert
    iso = Time(nu_time, format="mjd", scale="utc").isot
    path = write_csv(tmp_path / "one.csv", [{"name": "ONE", "time": iso, "ra": s["ra"], "dec": s["dec"], "err_radius": 0.1}])
    batch = pa.Table.from_pylist([s, dict(s, ra=None)], schema=ztf_states.schema)
    win = (-1.0, 0.0)
    first = T2NeutrinoCoincidence(alerts=str(path), time_window=win).process(batch).to_pylist()
    by_alert = T2NeutrinoCoincidence(alerts=str(path), time_window=win, time_reference="alert")
    assert by_alert.table.mjd[0] == pytest.approx(nu_time, abs=1e-8)  # the ISO date, read back as MJD
    alert = by_alert.process(batch).to_pylist()
    assert [r["code"] for r in first] == [NO_MATCH, NO_POSITION]
    assert [r["code"] for r in alert] == [MATCH, NO_POSITION] and alert[0]["nu_dt"] == pytest.approx(-0.5, abs=1e-6)
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    pq.write_table(pcsv.read_csv(path), tmp_path / "one.parquet")
    again = T2NeutrinoCoincidence(alerts=str(tmp_path / "one.parquet"), time_window=win, time_reference="alert").process(batch)
    import pandas.testing

    pandas.testing.assert_frame_equal(again.to_pandas(), by_alert.process(batch).to_pandas())


def test_neutrino_table_errors_name_file_and_row(tmp_path):
    good = {"name": "A", "time": 59000.0, "ra": 10.0, "dec": 5.0, "err_radius": 1.0}
    for bad, match in [({"err_radius": None}, "row 1 \\(B\\): no complete error region"),
                       ({"err_major": 1.0, "err_minor": 0.5, "err_pa": 0.0}, "more than one error region"),
                       ({"dec": 95.0}, "out of range"), ({"err_radius": -1.0}, "not positive")]:  # fmt: skip
        path = write_csv(tmp_path / "t.csv", [good, {**good, "name": "B", **bad}])
        with pytest.raises(ValueError, match=match):
            T2NeutrinoCoincidence(alerts=str(path))
    path = write_csv(tmp_path / "ok.csv", [good])
    unit = T2NeutrinoCoincidence(alerts=str(path))
    with open(path, "a") as fh:
        fh.write("C,59001,20,5,,,,,,,,1.0\n")
    assert T2NeutrinoCoincidence(alerts=str(path)).identity != unit.identity  # the table's content is identity
    with pytest.raises(ValueError, match="content hash"):
        T2NeutrinoCoincidence(alerts=str(path), alerts_hash=unit.config.alerts_hash)
    with pytest.raises(UnitConfigError, match="time_window"):
        T2NeutrinoCoincidence(alerts=str(path), time_window=(5, -5))
    with pytest.raises(FileNotFoundError):
        T2NeutrinoCoincidence(alerts=str(tmp_path / "missing.csv"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ra0=st.floats(0, 360, exclude_max=True), dec0=st.floats(-85, 85), a=st.floats(0.1, 5), ratio=st.floats(0.2, 1), pa_deg=st.floats(0, 180),
       kind=st.sampled_from(["rect", "ellipse"]), r=st.floats(0, 2), theta=st.floats(0, 360))  # fmt: skip
def test_separation_norm_agrees_with_astropy(tmp_path, ra0, dec0, a, ratio, pa_deg, kind, r, theta):
    """Any region, any offset (across RA = 0 too): the unit's normalised separation == astropy's."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    nu = {"name": "X", "time": 59000.0, "ra": ra0, "dec": dec0}
    if kind == "rect":
        nu.update(ra_err_plus=a, ra_err_minus=-a * ratio, dec_err_plus=a * ratio, dec_err_minus=a)
    else:
        nu.update(err_major=a, err_minor=a * ratio, err_pa=pa_deg)
    p = SkyCoord(ra0 * u.deg, dec0 * u.deg).directional_offset_by(theta * u.deg, r * a * u.deg)
    table = NeutrinoTable(str(write_csv(tmp_path / "h.csv", [nu])))
    got = separation_norm(np.array([p.ra.deg]), np.array([p.dec.deg]), table, np.array([0]))[0]
    assert got == pytest.approx(float(expected_norm(p.ra.deg, p.dec.deg, nu)), rel=1e-7, abs=1e-9)


# --- workflows/nuclear_neutrino.yml ------------------------------------------------------------------


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_nuclear_neutrino_workflow_runs_as_the_readme_shows(tmp_path, data_dir, ztf_alerts):
    """The README's commands on fink_basic_alerts (2023-10): ingest, write neutrinos.csv with one neutrino at
    a passing nuclear candidate 10 days after its first detection, run: the channel passes exactly what
    NuclearFilter decides, and the candidate's state has the coincidence."""
    import pyarrow.parquet as pq

    src = data_dir / "ztf" / "fink_basic_alerts_2023_2025.tar.gz"
    r = _run(tmp_path, "-m", "ampel_dask.cli", "ingest", str(src), "--archive", "archive", "--json")
    assert r.returncode == 0, r.stderr
    arch = Archive(tmp_path / "archive")
    alerts = pa.concat_tables([arch.read(p) for p in arch.partitions()], promote_options="permissive")
    passed = NuclearFilter(minDetections=3, maxDistPS1source=0.5, closePS1dist=0.5, maxDeltaRad=0.5, diffmagLimit=20, maxDeltaMag=2.5).verdict(alerts).accepted
    assert passed.sum() >= 5
    k = int(np.flatnonzero(passed)[0])
    target = alerts.slice(k, 1).to_pylist()[0]
    t_first = _first_detection(target["dps"])
    write_csv(tmp_path / "neutrinos.csv", [{"name": "IC-TEST", "time": t_first - 10.0, "ra": target["ra"] + 0.2, "dec": target["dec"],
                                             "ra_err_plus": 0.5, "ra_err_minus": -0.5, "dec_err_plus": 0.5, "dec_err_minus": -0.5}])  # fmt: skip
    shutil.copy(ROOT / "workflows" / "nuclear_neutrino.yml", tmp_path / "nuclear_neutrino.yml")
    r = _run(tmp_path, "-m", "ampel_dask.cli", "run", "nuclear_neutrino.yml", "--archive", "archive", "--store", "store", "--workers", "0", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    ch = summary["channels"]["NUCLEAR_NEUTRINO"]
    assert (ch["passed"], ch["rejected"]) == (int(passed.sum()), int((~passed).sum()))
    t2 = pq.read_table(next((tmp_path / "store" / "t2" / "T2NeutrinoCoincidence").glob("*"))).to_pylist()
    assert len(t2) == ch["passed"]
    hits = [row for row in t2 if row["code"] == MATCH]
    nu = {"ra": target["ra"] + 0.2, "dec": target["dec"], "ra_err_plus": 0.5, "ra_err_minus": -0.5, "dec_err_plus": 0.5, "dec_err_minus": -0.5}
    inside = {a["stock"] for a in alerts.filter(pa.array(passed)).to_pylist() if expected_norm(a["ra"], a["dec"], nu) <= 1.0}
    assert {row["stock"] for row in hits} == inside and target["stock"] in inside
    assert all(row["nu_name"] == "IC-TEST" for row in hits)
    assert [row["nu_sep_norm"] for row in hits if row["alert_id"] == target["alert_id"]] == [pytest.approx(0.4, abs=1e-9)]
