"""Sky-map units (SkyMapFilter, T2GWCounterpart) against a direct HEALPix lookup done here: astropy-healpix
finds each position's pixel (another implementation than the units' cdshealpix), credible levels come
from sorting the file's pixels by density and summing; distances from astropy.cosmology and scipy's
numerical integral of the map's line-of-sight posterior.

The maps are written by the test (scripts/mock_skymap.py, Fisher blobs with LVK's header keys and
layouts: flat RING and NESTED with PROB, multi-order NUNIQ with PROBDENSITY, distance layers): no PyPI
package of a reasonable size ships a real LVK map (gwemopt's 120 MB wheel has S190814bv in its tests;
gwcelery's are mock MDC events), so none is a test dependency.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ampel_dask.io.archive import Archive
from ampel_dask.tiers.base import UnitConfigError
from ampel_dask.tiers.catalog import build_catalog
from ampel_dask.tiers.units.t0_skymap import SkyMapFilter
from ampel_dask.tiers.units.t2_skymap import CANDIDATE, NO_POSITION, NOT_CANDIDATE, T2GWCounterpart

from . import t2_helpers as h

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import mock_skymap
finally:
    sys.path.pop(0)


@pytest.fixture(scope="module")
def ztf_states(data_dir, tmp_path_factory) -> pa.Table:
    """States of the 2023-10-18/19 ZTF alerts (fink_basic_alerts: 810 alerts, 741 objects)."""
    root = h.ingest_quiet([data_dir / "ztf" / "fink_basic_alerts_2023_2025.tar.gz"], tmp_path_factory.mktemp("gw"))
    return h.archive_states(root)


def direct_lookup(path: Path, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(density [sr^-1], credible level, the file's columns at the pixel) per position, the plain way:
    read the table with astropy, find the pixel with astropy-healpix, sort by density and sum."""
    import astropy.units as u
    from astropy.io import fits
    from astropy_healpix import HEALPix

    with fits.open(path) as hdul:
        hdr, data = hdul[1].header, hdul[1].data
        cols = {n: np.asarray(data[n], dtype=float) for n in data.columns.names}
    lon, lat = ra * u.deg, dec * u.deg
    if hdr["ORDERING"] == "NUNIQ":
        uniq = cols["UNIQ"].astype(np.int64)
        order = (np.floor(np.log2(uniq / 4.0) / 2)).astype(int)
        density = cols["PROBDENSITY"]
        area = 4 * np.pi / (12 * 4.0**order)
        where = {int(q): i for i, q in enumerate(uniq)}
        index = np.full(len(ra), -1)
        for o in np.unique(order):
            ip = HEALPix(nside=2**o, order="nested").lonlat_to_healpix(lon, lat)
            hit = [where.get(int(4 * 4**o + p), -1) for p in ip]
            index = np.where(index < 0, hit, index)
    else:
        hp = HEALPix(nside=hdr["NSIDE"], order=hdr["ORDERING"].lower())
        index = hp.lonlat_to_healpix(lon, lat)
        area = np.full(hp.npix, hp.pixel_area.to_value(u.sr))
        density = cols["PROB"] / area
    prob = density * area
    rank = np.argsort(-density, kind="stable")
    level = np.empty(len(prob))
    level[rank] = np.cumsum(prob[rank])
    return density[index], level[index], {k: v[index] for k, v in cols.items()}


def _positions(states: pa.Table, n_random: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    ra = np.r_[states.column("ra").to_numpy(), rng.uniform(0, 360, n_random)]
    dec = np.r_[states.column("dec").to_numpy(), np.degrees(np.arcsin(rng.uniform(-1, 1, n_random)))]
    return ra, dec


@pytest.mark.parametrize("layout", ["NUNIQ", "NESTED", "RING"])
def test_credible_levels_and_densities_agree_with_direct_lookup(ztf_states, tmp_path, layout):
    """On the real alert positions (and 20,000 random ones): density and credible level == the direct lookup;
    both units agree with each other; the region holds about the expected share of the random positions."""
    s0 = ztf_states.slice(0, 1).to_pylist()[0]
    path = mock_skymap.write_skymap(tmp_path / "map.fits", s0["ra"], s0["dec"], 8.0, s0["mjd"] - 1.0, layout, nside=64)
    ra, dec = _positions(ztf_states)
    states = pa.table({"ra": ra, "dec": dec, "dps": pa.array([[]] * len(ra), ztf_states.schema.field("dps").type)})
    out = T2GWCounterpart(skymap=str(path)).process(states)
    density, level, _ = direct_lookup(path, ra, dec)
    np.testing.assert_allclose(out.column("gw_prob_density").to_numpy(), density, rtol=1e-12)
    np.testing.assert_allclose(out.column("gw_credible_level").to_numpy(), level, rtol=1e-9, atol=1e-12)
    inside = level <= 0.9
    assert out.column("gw_in_region").to_pylist() == inside.tolist()
    assert 10 <= inside[: ztf_states.num_rows].sum() < ztf_states.num_rows  # the real alerts straddle the boundary
    share = inside[ztf_states.num_rows :].mean()  # a 8-deg Fisher blob's 90% region: 2 pi sigma^2 ln 10 sr
    assert share == pytest.approx(2 * math.pi * math.radians(8) ** 2 * math.log(10) / (4 * math.pi), rel=0.15)
    alerts = pa.table({"ra": ra, "dec": dec, "first_det_mjd": np.full(len(ra), s0["mjd"])})
    assert SkyMapFilter(skymap=str(path)).verdict(alerts).accepted.tolist() == inside.tolist()


def test_sky_map_filter_on_real_alerts(ztf_states, tmp_path):
    """Real ZTF alerts against a map around one of them, the merger 3 days before that alert's first
    detection, window 0-14 d: decisions and reasons == the direct lookup and each packet's first detection."""
    from ampel_dask.io.layout import DETECTION

    alerts = ztf_states  # one per alert, with the packet's datapoints (the filter reads first_det_mjd)
    dps = alerts.column("dps").to_pylist()
    first = np.array([min((d["mjd"] for d in x if d["kind"] == DETECTION), default=np.nan) for x in dps])
    s0 = alerts.slice(100, 1).to_pylist()[0]
    event = first[100] - 3.0
    path = mock_skymap.write_skymap(tmp_path / "m.fits", s0["ra"], s0["dec"], 10.0, event, "NUNIQ", nside=128)
    table = pa.table({"ra": alerts.column("ra"), "dec": alerts.column("dec"), "first_det_mjd": first})
    got = SkyMapFilter(skymap=str(path), max_credible_level=0.5).verdict(table).reason_of()
    _, level, _ = direct_lookup(path, table.column("ra").to_numpy(), table.column("dec").to_numpy())
    dt = first - event
    want = ["window" if not (0 <= t <= 14) else "credible_level" if not lv <= 0.5 else None for t, lv in zip(dt, level)]
    assert got == want
    assert want.count(None) >= 3 and "window" in want and "credible_level" in want


@pytest.fixture()
def distance_map(tmp_path) -> Path:
    return mock_skymap.write_skymap(tmp_path / "d.fits", 150.0, 20.0, 5.0, 60000.0, "NUNIQ", nside=64, dist_mu=200.0, dist_sigma=40.0)


def test_distance_check_hand_computed(distance_map):
    """Hosts at the map's peak with z = 0.01, 0.045, 0.06 +- 0.02, 0.2 and none: luminosity distances from
    astropy's FlatLambdaCDM(67.7, 0.31) (0.01: 44.9 Mpc by hand, cz/H0 (1 + (1 - q0) z / 2)), their
    quantile in the map's r^2 N(200, 40) posterior by scipy's quad, the 90% interval decision."""
    from astropy.cosmology import FlatLambdaCDM
    from scipy import integrate, stats

    z = [0.01, 0.045, 0.06, 0.2, None]
    z_err = [0.0, 0.0, 0.02, 0.0, None]
    states = pa.table({"ra": [150.0] * 5, "dec": [20.0] * 5, "z": z, "z_err": z_err,
                       "dps": pa.array([[{"kind": 0, "mjd": 60001.0}]] * 5, pa.list_(pa.struct([("kind", pa.int8()), ("mjd", pa.float64())])))})  # fmt: skip
    out = T2GWCounterpart(skymap=str(distance_map), redshift="column", z_err_column="z_err").process(states).to_pylist()
    cosmo = FlatLambdaCDM(H0=67.7, Om0=0.31)
    q0 = 0.31 / 2 - 0.69
    assert cosmo.luminosity_distance(0.01).value == pytest.approx(299792.458 * 0.01 / 67.7 * (1 + (1 - q0) * 0.01 / 2), rel=1e-3)
    post = lambda r: r**2 * stats.norm.pdf(r, 200.0, 40.0)  # noqa: E731
    total = integrate.quad(post, 0, np.inf)[0]
    cdf = lambda d: integrate.quad(post, 0, d)[0] / total  # noqa: E731
    for row, zz, ze in zip(out, z, z_err):
        assert row["gw_dt"] == pytest.approx(1.0) and row["gw_in_window"] and row["gw_in_region"]
        if zz is None:
            assert row["gw_dist_consistent"] is None and math.isnan(row["gw_dist_cdf"]) and row["code"] == CANDIDATE
            continue
        d = cosmo.luminosity_distance(zz).value
        assert row["gw_dist_lum"] == pytest.approx(d, rel=1e-9)
        assert row["gw_dist_cdf"] == pytest.approx(cdf(d), abs=1e-7)
        norm = 1.0 / total  # the file's DISTNORM is the same normalisation
        assert row["gw_dist_pdf"] == pytest.approx(norm * post(d), rel=1e-6)
        lo, hi = cdf(cosmo.luminosity_distance(max(zz - ze, 0)).value), cdf(cosmo.luminosity_distance(zz + ze).value)
        ok = hi >= 0.05 and lo <= 0.95
        assert row["gw_dist_consistent"] is ok and row["code"] == (CANDIDATE if ok else NOT_CANDIDATE)
    # by hand: 44.9 Mpc is far below 200 +- 40 (inconsistent), ~207 Mpc (z 0.045) right in it, 0.06 +- 0.02
    # reaches into it, ~1000 Mpc (z 0.2) far beyond
    assert [r["gw_dist_consistent"] for r in out] == [False, True, True, False, None]


def test_redshift_from_a_digest_dependency(distance_map, tmp_path):
    """A host catalog with z = 0.045 at 1" from the state: the digest's z (standalone, and passed by identity
    key as the graph does) gives the same distance check as the z column."""
    states = pa.table({"ra": [150.0], "dec": [20.0], "z": [0.045], "dps": pa.array([[{"kind": 0, "mjd": 60002.0}]], pa.list_(pa.struct([("kind", pa.int8()), ("mjd", pa.float64())])))})
    (hra,), (hdec,) = h.offset_positions(np.array([150.0]), np.array([20.0]), np.array([1.0]), np.array([45.0]))
    cat = build_catalog(pa.table({"ra": [hra], "dec": [hdec], "z": [0.045]}), tmp_path / "hosts.parquet")
    unit = T2GWCounterpart(skymap=str(distance_map), redshift="digest", digest={"sources": [{"name": "H", "catalog": str(cat), "group": 1, "radius_arcsec": 2}]})
    (dep,) = unit.dependencies()
    want = T2GWCounterpart(skymap=str(distance_map), redshift="column").process(states).to_pylist()[0]
    for got in (unit.process(states), unit.process(states, {dep.identity.key: dep.process(states)})):
        row = got.to_pylist()[0]
        for k in ("gw_z", "gw_dist_lum", "gw_dist_cdf", "gw_dist_consistent", "code"):
            assert row[k] == want[k], k


def test_time_window_and_bad_positions(distance_map):
    """First detections before the merger or after the window are not candidates; no position: code 2."""
    kinds = pa.list_(pa.struct([("kind", pa.int8()), ("mjd", pa.float64())]))
    states = pa.table({"ra": [150.0, 150.0, 150.0, None], "dec": [20.0, 20.0, 20.0, 20.0],
                       "dps": pa.array([[{"kind": 0, "mjd": 59999.0}, {"kind": 0, "mjd": 60003.0}], [{"kind": 1, "mjd": 59999.0}, {"kind": 0, "mjd": 60013.9}],
                                        [{"kind": 0, "mjd": 60014.5}], [{"kind": 0, "mjd": 60001.0}]], kinds)})  # fmt: skip
    out = T2GWCounterpart(skymap=str(distance_map)).process(states).to_pylist()
    assert [r["gw_dt"] for r in out] == pytest.approx([-1.0, 13.9, 14.5, 1.0])
    assert [r["gw_in_window"] for r in out] == [False, True, False, True]  # an upper limit before the merger is no detection
    assert [r["code"] for r in out] == [NOT_CANDIDATE, CANDIDATE, NOT_CANDIDATE, NO_POSITION]
    shifted = T2GWCounterpart(skymap=str(distance_map), event_mjd=59998.5).process(states).to_pylist()
    assert [r["gw_in_window"] for r in shifted] == [True, False, False, True]


def test_sky_map_config_errors_and_identity(distance_map, tmp_path):
    unit = T2GWCounterpart(skymap=str(distance_map))
    assert unit.config.event_mjd == 60000.0  # from MJD-OBS, pinned in the config
    assert len(pickle.dumps(unit)) < 20_000  # the parsed map stays behind when the unit travels
    other = mock_skymap.write_skymap(tmp_path / "o.fits", 150.0, 20.0, 6.0, 60000.0, "NUNIQ", nside=64, dist_mu=200.0, dist_sigma=40.0)
    assert T2GWCounterpart(skymap=str(other)).identity != unit.identity
    with pytest.raises(ValueError, match="content hash"):
        T2GWCounterpart(skymap=str(other), skymap_hash=unit.config.skymap_hash)
    with pytest.raises(FileNotFoundError):
        SkyMapFilter(skymap=str(tmp_path / "none.fits"))
    (tmp_path / "text.fits").write_text("not a sky map\n")
    with pytest.raises(ValueError, match="not a FITS sky map"):
        SkyMapFilter(skymap=str(tmp_path / "text.fits"))
    with pytest.raises(UnitConfigError, match="window_days"):
        SkyMapFilter(skymap=str(distance_map), window_days=(5, 1))
    with pytest.raises(UnitConfigError, match="digest"):
        T2GWCounterpart(skymap=str(distance_map), redshift="digest")
    from astropy.io import fits

    with fits.open(distance_map) as hdul:
        del hdul[1].header["MJD-OBS"], hdul[1].header["DATE-OBS"]
        hdul.writeto(tmp_path / "notime.fits")
    with pytest.raises(ValueError, match="event_mjd"):
        SkyMapFilter(skymap=str(tmp_path / "notime.fits"))
    assert SkyMapFilter(skymap=str(tmp_path / "notime.fits"), event_mjd=60000.0).config.event_mjd == 60000.0


# --- workflows/gw_counterparts.yml ---------------------------------------------------------------------


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_gw_counterparts_workflow_runs_as_the_readme_shows(tmp_path, data_dir):
    """The README's commands: ingest fink_basic_alerts, write a mock map around one alert (merger 2 days before
    the first alert), run: the channel passes what the direct lookup and the window decide; every passing
    state has a T2GWCounterpart row with the direct lookup's credible level."""
    import pyarrow.parquet as pq

    src = data_dir / "ztf" / "fink_basic_alerts_2023_2025.tar.gz"
    assert _run(tmp_path, "-m", "ampel_dask.cli", "ingest", str(src), "--archive", "archive").returncode == 0
    arch = Archive(tmp_path / "archive")
    alerts = pa.concat_tables([arch.read(p) for p in arch.partitions()], promote_options="permissive")
    a0 = alerts.slice(0, 1).to_pylist()[0]
    event = float(np.nanmin(alerts.column("mjd").to_numpy())) - 2.0
    r = _run(tmp_path, str(ROOT / "scripts" / "mock_skymap.py"), "skymap.fits", "--ra", str(a0["ra"]), "--dec", str(a0["dec"]),
             "--sigma", "6", "--event-mjd", str(event), "--dist-mu", "150", "--dist-sigma", "40")  # fmt: skip
    assert r.returncode == 0, r.stderr
    shutil.copy(ROOT / "workflows" / "gw_counterparts.yml", tmp_path / "gw_counterparts.yml")
    r = _run(tmp_path, "-m", "ampel_dask.cli", "run", "gw_counterparts.yml", "--archive", "archive", "--store", "store", "--workers", "0", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    ch = summary["channels"]["GW_COUNTERPARTS"]
    _, level, _ = direct_lookup(tmp_path / "skymap.fits", alerts.column("ra").to_numpy(), alerts.column("dec").to_numpy())
    dt = alerts.column("first_det_mjd").to_numpy() - event
    passed = (level <= 0.9) & (dt >= 0) & (dt <= 14)
    assert (ch["passed"], ch["rejected"]) == (int(passed.sum()), int((~passed).sum()))
    assert ch["passed"] >= 3
    t2 = pq.read_table(next((tmp_path / "store" / "t2" / "T2GWCounterpart").glob("*")))
    assert t2.num_rows == ch["passed"]
    want = dict(zip(alerts.column("stock").to_pylist(), level))
    for stock, lv in zip(t2.column("stock").to_pylist(), t2.column("gw_credible_level").to_pylist()):
        assert lv == pytest.approx(want[stock], rel=1e-9)
