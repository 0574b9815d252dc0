"""HATS/lsdb interop on real alerts: the archive (and a run's results) exported as HATS and opened by
lsdb from PyPI, with cone searches checked against plain Python; a HATS catalog as the input of a catalog
match, checked against astropy's nearest-neighbour search and against the same catalog built locally."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ampel_dask as ad

lsdb = pytest.importorskip("lsdb")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("hats_archive")
    ad.ingest([data_dir / "ztf" / "fink_basic_alerts_2023_2025.tar.gz", data_dir / "ztf" / "pitt_google"], root)
    return root


def rows_of(root) -> list[dict]:
    rows = []
    for f in sorted(root.glob("survey=*/night=*/part-*.parquet")):
        rows += pq.read_table(f, columns=["alert_id", "ra", "dec"]).to_pylist()
    return rows


def haversine(ra1, dec1, ra2, dec2) -> float:
    a, b, c, d = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d - b) / 2) ** 2 + math.cos(b) * math.cos(d) * math.sin((c - a) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h))))


def test_exported_archive_opens_in_lsdb_and_cone_searches_find_the_expected_alerts(archive, tmp_path):
    out = tmp_path / "alerts_hats"
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "export-hats", str(out), "--archive", str(archive)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cat = lsdb.open_catalog(out)
    rows = rows_of(archive)
    assert cat.margin is not None  # the collection brings its margin cache
    everything = cat.compute(progress_bar=False)
    assert sorted(everything["alert_id"]) == sorted(r["alert_id"] for r in rows)
    for k, radius_arcsec in ((0, 3600.0), (37, 30 * 3600.0), (120, 1.0)):
        ra0, dec0 = rows[k]["ra"], rows[k]["dec"]
        got = cat.cone_search(ra0, dec0, radius_arcsec).compute(progress_bar=False)
        want = sorted(r["alert_id"] for r in rows if haversine(r["ra"], r["dec"], ra0, dec0) * 3600 <= radius_arcsec)
        assert sorted(got["alert_id"]) == want and want


def test_a_runs_results_export_with_their_t2_columns(archive, tmp_path):
    wf = {"name": "hats", "store": {"path": str(tmp_path / "store")},
          "channels": [{"name": "ALL", "access": ["ZTF_ALL"], "t2": ["T2LightCurveSummary"]}]}  # fmt: skip
    ad.run(wf, archive=archive, workers=0)
    store = ad.open_store(tmp_path / "store")
    path = store.to_hats("ALL", tmp_path / "results_hats")
    got = lsdb.open_catalog(path).compute(progress_bar=False)
    objects = store.objects("ALL")
    assert len(got) == len(objects) and set(got["stock"]) == set(objects["stock"])
    col = next(c for c in objects.columns if c.startswith("T2LightCurveSummary__") and objects[c].dtype.kind == "f")
    a = got.set_index("stock")[col].sort_index()
    b = objects.set_index("stock")[col].sort_index()
    assert np.allclose(a.to_numpy(), b.to_numpy(), equal_nan=True)


def test_a_hats_catalog_feeds_the_catalog_match(archive, tmp_path, data_dir):
    """GCVS as a HATS collection and as a local catalog give the same matches; both equal astropy's
    nearest neighbour within the radius, for real alert positions and alerts moved onto GCVS stars."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    from ampel_dask.graph.hats import write_hats
    from ampel_dask.tiers.catalog import build_catalog
    from ampel_dask.tiers.units.t2_catalog import T2CatalogMatch

    gcvs = pq.read_table(data_dir / "catalogs" / "gcvs.parquet")
    hats_path = write_hats(gcvs, tmp_path / "gcvs_hats", "gcvs", margin_arcsec=10.0)
    local = build_catalog(gcvs, tmp_path / "gcvs.parquet")
    rows = rows_of(archive)[:40]
    rng = np.random.default_rng(7)
    stars = gcvs.take(pa.array(rng.choice(gcvs.num_rows, 20, replace=False)))
    ra = np.r_[[r["ra"] for r in rows], stars.column("ra").to_numpy() + 0.5 / 3600]
    dec = np.r_[[r["dec"] for r in rows], stars.column("dec").to_numpy()]
    states = pa.table({"state_id": np.arange(len(ra)), "ra": ra, "dec": dec})
    radius = 3.0
    out = {}
    for kind, cat in (("hats", hats_path), ("local", local)):
        unit = T2CatalogMatch(catalog=str(cat), radius_arcsec=radius, columns=["VarType"])
        out[kind] = unit.process(states)
    c_states = SkyCoord(ra * u.deg, dec * u.deg)
    c_cat = SkyCoord(gcvs.column("ra").to_numpy() * u.deg, gcvs.column("dec").to_numpy() * u.deg)
    idx, sep, _ = c_states.match_to_catalog_sky(c_cat)
    within = sep.arcsec <= radius
    assert within.sum() >= 20  # the moved alerts at least
    for kind, res in out.items():
        assert res.column("cat_matched").to_pylist() == within.tolist(), kind
        assert np.allclose(np.asarray(res.column("cat_dist_arcsec"))[within], sep.arcsec[within], atol=1e-3), kind
        want = [gcvs.column("VarType")[int(i)].as_py() if w else None for i, w in zip(idx, within)]
        assert res.column("cat_VarType").to_pylist() == want, kind
