"""T2 units on real alerts: light-curve features, Bazin fits, catalog matching, the Gaia veto, a classifier."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import light_curve as lc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ampel_dask.tiers.base import UnitConfigError
from ampel_dask.tiers.catalog import HPX, Catalog, build_catalog, search_depth
from ampel_dask.tiers.helpers.gaia import GAIA_COLUMNS, GaiaVeto
from ampel_dask.tiers.units.t0_filters import DecentFilter
from ampel_dask.tiers.units.t2_catalog import T2CatalogMatch
from ampel_dask.tiers.units.t2_classifier import T2Classifier
from ampel_dask.tiers.units.t2_fit import T2BazinFit
from ampel_dask.tiers.units.t2_lightcurve import T2LightCurveFeatures

from . import t2_helpers as h
from .conftest import group_location

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ztf_archive(tmp_path_factory, data_dir):
    """Real ZTF alerts: 2017 commissioning (816) + Fink's distribution samples, which hold the labelled objects."""
    root = tmp_path_factory.mktemp("t2_ztf")
    return h.ingest_quiet([data_dir / "ztf" / "ampel_core_real_201712.tar.gz", data_dir / "ztf" / "fink_client"], root)


@pytest.fixture(scope="session")
def ztf_states(ztf_archive):
    return h.archive_states(ztf_archive)


@pytest.fixture(scope="session")
def ztf_alerts(ztf_archive):
    from ampel_dask.io.archive import Archive

    arch = Archive(ztf_archive)
    return pa.concat_tables([arch.read(p) for p in arch.partitions()], promote_options="permissive")


@pytest.fixture(scope="session")
def lsst_states(tmp_path_factory, data_dir, manifest):
    """ELAsTiCC (simulated LSST): the 8 objects with most alerts, i.e. long multi-band light curves."""
    rows = manifest["lsst_elasticc_v0_9"]
    folder = h.extract_busiest_objects(data_dir / group_location(rows), rows, 8, tmp_path_factory.mktemp("elasticc_src"))
    return h.archive_states(h.ingest_quiet([folder], tmp_path_factory.mktemp("t2_lsst")))


def _sample(code_ok: np.ndarray, k: int = 40) -> list[int]:
    ok, bad = np.flatnonzero(code_ok), np.flatnonzero(~code_ok)
    return sorted(set(ok[:: max(1, len(ok) // k)].tolist()) | set(bad[:5].tolist()))


# --- T2LightCurveFeatures -----------------------------------------------------------------------


def _check_features(unit: T2LightCurveFeatures, states: pa.Table, rows: list[int]) -> int:
    """Unit output == light_curve on the same per-state arrays built the plain way; returns short bands seen."""
    c = unit.config
    out = unit.process(states)
    assert out.num_rows == states.num_rows
    nvals = len(unit.feature_names)
    kinds = {dict(detection=0, upper_limit=1, forced=2)[k] for k in c.kinds}
    short = 0
    for i in rows:
        dps = states.column("dps")[i].as_py()
        for b in c.bands:
            ref, npts, _ = h.reference_feature(unit.extractor, dps, b, kinds, c.value, c.min_points, nvals)
            got = np.array([out.column(f"{f}_{b}")[i].as_py() for f in unit.feature_names], dtype=float)
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0, equal_nan=True, err_msg=f"state {i} band {b}")
            assert out.column(f"n_{b}")[i].as_py() == npts
            short += 0 < npts < c.min_points
    return short


def test_features_equal_light_curve_on_real_ztf_states(ztf_states):
    unit = T2LightCurveFeatures()
    out = unit.process(ztf_states)
    code = out.column("code").to_numpy()
    assert set(np.unique(code)) == {0, 1}
    # a band with 1-2 points must be NaN while another band of the same state has features
    n = np.stack([out.column(f"n_{b}").to_numpy() for b in "gri"], axis=1)
    mixed = np.flatnonzero(((n > 0) & (n < 3)).any(axis=1) & (n >= 3).any(axis=1))
    assert len(mixed)
    rows = sorted(set(_sample(code == 0)) | set(mixed[:10].tolist()))
    assert _check_features(unit, ztf_states, rows) > 0
    assert np.isnan(out.column("amplitude_g").to_numpy()[n[:, 0] < 3]).all()
    assert (code == np.where((n >= 3).any(axis=1), 0, 1)).all()


def test_features_on_flux_and_lsst_bands(lsst_states):
    unit = T2LightCurveFeatures(bands=list("ugrizy"), value="flux", min_points=4, features=["Amplitude", "Mean", "Skew", "LinearFit", "Kurtosis"])
    out = unit.process(lsst_states)
    rows = _sample(out.column("code").to_numpy() == 0, 25)
    assert rows
    _check_features(unit, lsst_states, rows)  # asserts every sampled row against light_curve
    assert out.column_names[-1] == "code" and "linear_fit_slope_y" in out.column_names


def test_features_call_the_extractor_once_per_batch(ztf_states):
    unit = T2LightCurveFeatures()
    calls = []

    class Spy:
        names = unit.extractor.names

        def many(self, *a, **kw):
            calls.append(len(a[0]))
            return unit_real.many(*a, **kw)

    unit_real, unit.extractor = unit.extractor, Spy()
    unit.process(ztf_states)
    assert len(calls) == 1 and calls[0] > 100


def test_features_do_not_depend_on_datapoint_order(lsst_states):
    """States from elsewhere may not be time-ordered: the unit then sorts (lexsort) and gets the same features."""
    arr = lsst_states.column("dps").combine_chunks()
    off = np.asarray(arr.offsets)
    row = np.repeat(np.arange(len(arr)), np.diff(off))
    reverse = off[row + 1] - 1 - (np.arange(off[-1]) - off[row])
    shuffled = lsst_states.set_column(lsst_states.schema.get_field_index("dps"), "dps",
                                      pa.ListArray.from_arrays(pa.array(off), arr.values.take(pa.array(reverse))))  # fmt: skip
    unit = T2LightCurveFeatures(bands=list("ugrizy"))
    a, b = unit.process(lsst_states), unit.process(shuffled)
    for name in a.column_names:
        np.testing.assert_allclose(b.column(name).to_numpy(), a.column(name).to_numpy(), rtol=1e-9, equal_nan=True, err_msg=name)


def test_features_config_is_validated_and_hashed():
    with pytest.raises(UnitConfigError, match="features"):
        T2LightCurveFeatures(features=["NoSuchFeature"])
    with pytest.raises(UnitConfigError, match="features"):
        T2LightCurveFeatures(features=["__import__('os')"])
    with pytest.raises(UnitConfigError, match="bands"):
        T2LightCurveFeatures(bands=["g", "g"])
    with pytest.raises(UnitConfigError, match="repeated"):
        T2LightCurveFeatures(features=["Mean", "Mean"])
    assert T2LightCurveFeatures(features=["BeyondNStd(1.0)", "BeyondNStd(2)"]).feature_names == ["beyond_1_std", "beyond_2_std"]
    assert T2LightCurveFeatures().config_hash == T2LightCurveFeatures({}).config_hash
    assert T2LightCurveFeatures(min_points=4).config_hash != T2LightCurveFeatures().config_hash


def test_features_empty_batch(ztf_states):
    out = T2LightCurveFeatures().process(ztf_states.slice(0, 0))
    assert out.num_rows == 0 and "code" in out.column_names


# --- T2BazinFit ---------------------------------------------------------------------------------


def _check_bazin(unit: T2BazinFit, states: pa.Table) -> pa.Table:
    out = unit.process(states)
    assert out.num_rows == states.num_rows
    c = unit.config
    nb = len(c.bands)
    code = out.column("code").to_numpy()
    fitted = np.stack([out.column(f"n_{b}").to_numpy() >= c.min_points for b in c.bands], axis=1)
    rows = _sample(fitted.any(axis=1), 15)
    direct = lc.BazinFit(c.algorithm)
    for i in rows:
        dps = states.column("dps")[i].as_py()
        for j, b in enumerate(c.bands):
            ref, npts, usable = h.reference_feature(direct, dps, b, {0, 2}, "flux", c.min_points, len(unit.param_names))
            got = np.array([out.column(f"{p}_{b}")[i].as_py() for p in unit.param_names], dtype=float)
            np.testing.assert_allclose(got, ref, rtol=1e-10, equal_nan=True, err_msg=f"state {i} band {b}")
            assert bool(code[i] & (1 << j)) == (not usable)
            assert bool(code[i] & (1 << (8 + j))) == (usable and not np.isfinite(ref).all())
    assert ((code & ((1 << nb) - 1)) == 0).sum() == fitted.all(axis=1).sum()
    return out


def test_bazin_equals_light_curve_on_elasticc(lsst_states):
    out = _check_bazin(T2BazinFit(bands=list("ugrizy")), lsst_states)
    n_fits = sum(int((out.column(f"n_{b}").to_numpy() >= 6).sum()) for b in "ugrizy")
    assert n_fits > 50
    amp = np.concatenate([out.column(f"bazin_fit_amplitude_{b}").to_numpy() for b in "ugrizy"])
    assert np.isfinite(amp).sum() > 0.8 * n_fits


def test_bazin_on_ztf_states_and_codes(ztf_states):
    out = _check_bazin(T2BazinFit(), ztf_states)
    assert set(out.column_names) >= {"bazin_fit_rise_time_g", "bazin_fit_reduced_chi2_r", "n_g", "code"}
    with pytest.raises(UnitConfigError):
        T2BazinFit(min_points=3)


# --- catalog + T2CatalogMatch -------------------------------------------------------------------


@pytest.fixture(scope="session")
def position_rows(ztf_states):
    """One state per object, at a real alert position with no other such position within 20" (a few real
    ZTF objects lie 1.7-2" apart, which would blur which counterpart is whose)."""
    from ampel_dask.tiers.sky import angular_distance

    stock = ztf_states.column("stock").to_numpy()
    _, first = np.unique(stock, return_index=True)
    ra, dec = ztf_states.column("ra").to_numpy()[first], ztf_states.column("dec").to_numpy()[first]
    first = first[np.isfinite(ra) & np.isfinite(dec)]
    ra, dec = ztf_states.column("ra").to_numpy()[first], ztf_states.column("dec").to_numpy()[first]
    d = angular_distance(ra[:, None], dec[:, None], ra[None, :], dec[None, :]) * 3600
    np.fill_diagonal(d, np.inf)
    return np.sort(first[d.min(axis=1) > 20])


@pytest.fixture(scope="session")
def positions(ztf_states, position_rows):
    return ztf_states.column("ra").to_numpy()[position_rows], ztf_states.column("dec").to_numpy()[position_rows]


@pytest.fixture(scope="session")
def offset_catalog(tmp_path_factory, positions):
    """Counterparts at known separations (0.05-1.9") of real positions, decoys at 2.5-8", far background."""
    ra, dec = positions
    rng = np.random.default_rng(7)
    n = len(ra)
    sep = rng.uniform(0.05, 1.9, n)
    has = rng.random(n) < 0.8  # 20% of positions get no counterpart
    cra, cdec = h.offset_positions(ra, dec, sep, rng.uniform(0, 360, n))
    dra, ddec = h.offset_positions(np.repeat(ra, 2), np.repeat(dec, 2), rng.uniform(2.5, 8.0, 2 * n), rng.uniform(0, 360, 2 * n))
    bra, bdec = rng.uniform(0, 360, 3000), np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))
    all_ra = np.concatenate([cra[has], dra, bra])
    all_dec = np.concatenate([cdec[has], ddec, bdec])
    kind = np.array(["counterpart"] * int(has.sum()) + ["decoy"] * 2 * n + ["background"] * 3000)
    ident = np.arange(len(all_ra))
    table = pa.table({"ra": all_ra, "dec": all_dec, "source_id": ident, "kind": kind, "mag": 15 + ident % 7 * 0.5})
    path = build_catalog(table, tmp_path_factory.mktemp("cat") / "offsets.parquet", order=10, row_group_size=256)
    truth = np.full(n, -1)
    truth[has] = np.arange(int(has.sum()))
    return path, sep, truth, (all_ra, all_dec)


def test_catalog_file_is_sorted_by_healpix_with_order_in_metadata(offset_catalog):
    path = offset_catalog[0]
    t = pq.read_table(path)
    hpx = t.column("_hpx").to_numpy()
    assert np.array_equal(hpx, np.sort(hpx))
    cat = Catalog(path)
    assert cat.order == 10 and len(cat) == t.num_rows and pq.ParquetFile(path).metadata.num_row_groups > 10
    assert search_depth(2.0) > 10  # 2" cones fit in a 3x3 block of order-10 cells
    cat.cone_match(np.array([10.0, 10.001]), np.array([20.0, 20.0]), 2.0)
    assert 0 < cat.loaded_row_groups <= 3  # a small search reads only the row groups it needs


def test_cone_match_finds_known_counterparts(offset_catalog, positions):
    path, sep, truth, _ = offset_catalog
    cat = Catalog(path)
    index, dist = cat.cone_match(*positions, 2.0)
    ids = cat.take(index, ["source_id"]).column("source_id").to_numpy(zero_copy_only=False)
    matched = index != -1
    assert (matched == (truth != -1)).all()
    assert (ids[matched] == truth[matched]).all()
    np.testing.assert_allclose(dist[matched], sep[truth != -1], rtol=0, atol=1e-6)
    assert np.isnan(dist[~matched]).all()


def test_cone_all_equals_brute_force(offset_catalog, positions):
    path, _, _, (cra, cdec) = offset_catalog
    cat = Catalog(path)
    ra, dec = positions
    brute = h.brute_force_pairs(ra, dec, cra, cdec, 6.0)
    for radius in (2.0, 6.0):
        src, row, dist = cat.cone_all(ra, dec, radius)
        ids = cat.take(row, ["source_id"]).column("source_id").to_numpy()
        expected = {k: v for k, v in brute.items() if v <= radius}
        assert set(zip(src.tolist(), ids.tolist())) == set(expected)
        np.testing.assert_allclose(dist, [expected[k] for k in zip(src.tolist(), ids.tolist())], atol=1e-6, rtol=0)
        assert np.array_equal(src, np.sort(src))
    # no position, no match; empty input
    idx, d = cat.cone_match(np.array([np.nan, 10.0]), np.array([0.0, np.nan]), 2.0)
    assert (idx == -1).all() and np.isnan(d).all()
    assert len(cat.cone_all(np.zeros(0), np.zeros(0), 2.0)[0]) == 0


def test_t2_catalog_match(offset_catalog, ztf_states, position_rows):
    path, sep, truth, _ = offset_catalog
    unit = T2CatalogMatch(catalog=str(path), radius_arcsec=2.0, columns=["source_id", "kind", "mag"], prefix="x_")
    states = ztf_states.take(pa.array(position_rows))
    out = unit.process(states)
    assert out.num_rows == states.num_rows
    assert out.column_names == ["x_source_id", "x_kind", "x_mag", "x_dist_arcsec", "x_matched", "code"]
    matched = out.column("x_matched").to_numpy(zero_copy_only=False)
    assert (matched == (truth != -1)).all() and matched.sum() > 100
    assert set(out.column("x_kind").filter(pa.array(matched)).to_pylist()) == {"counterpart"}
    assert out.column("x_source_id").to_pylist() == [int(t) if t != -1 else None for t in truth]
    np.testing.assert_allclose(out.column("x_dist_arcsec").to_numpy()[matched], sep[matched], atol=1e-6, rtol=0)
    assert (out.column("code").to_numpy() == 0).all()
    # every state of the batch (other alerts of the same objects too): one row each, as the catalog says
    full = unit.process(ztf_states)
    idx, dist = Catalog(path).cone_match(ztf_states.column("ra").to_numpy(), ztf_states.column("dec").to_numpy(), 2.0)
    assert full.num_rows == ztf_states.num_rows
    np.testing.assert_array_equal(full.column("x_dist_arcsec").to_numpy(), dist)
    with pytest.raises(ValueError, match="not in catalog"):
        T2CatalogMatch(catalog=str(path), columns=["nope"])


def test_catalog_units_pickle_as_path_and_content_hash(offset_catalog, tmp_path):
    """A unit travels to the workers pickled: its catalog goes as path + content hash (an open Parquet
    file cannot be pickled), the hash is in the unit's config (a rebuilt catalog changes its keys),
    and a worker that finds other content at the path refuses it."""
    import pickle
    import shutil

    path = tmp_path / "cat.parquet"
    shutil.copy(offset_catalog[0], path)
    unit = T2CatalogMatch(catalog=str(path), columns=["source_id"])
    assert unit.config.catalog_hash == Catalog(path).content_hash and len(unit.config.catalog_hash) == 32
    copy = pickle.loads(pickle.dumps(unit))
    assert copy.identity == unit.identity and copy.catalog.path == path
    with pytest.raises(ValueError, match="content hash"):
        T2CatalogMatch(catalog=str(path), catalog_hash="0" * 32)
    data = pickle.dumps(unit)
    table = pq.read_table(offset_catalog[0]).drop_columns([HPX])
    build_catalog(table.slice(1), path, order=10, row_group_size=256)  # one source fewer, same path
    with pytest.raises(ValueError, match="changed since the workflow was planned"):
        pickle.loads(data)
    assert T2CatalogMatch(catalog=str(path), columns=["source_id"]).identity.key != unit.identity.key


# --- GaiaVeto -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gaia_catalog(tmp_path_factory, positions):
    """Synthetic Gaia sources around real alert positions: 0-4 each within 0-6", AMPEL's column names,
    values spanning every branch (bright/faint, significant/insignificant PM and parallax, noisy, nulls, zero errors)."""
    ra, dec = positions
    rng = np.random.default_rng(11)
    k = rng.integers(0, 5, len(ra))
    sra, sdec = h.offset_positions(np.repeat(ra, k), np.repeat(dec, k), rng.uniform(0, 6, k.sum()), rng.uniform(0, 360, k.sum()))
    m = len(sra)

    def col(lo, hi, null=0.05, zero=0.0):
        v = rng.uniform(lo, hi, m)
        v[rng.random(m) < zero] = 0.0
        return pa.array(v, mask=rng.random(m) < null)

    table = pa.table({
        "ra": sra, "dec": sdec, "Mag_G": col(8, 22), "PMRA": col(-20, 20), "ErrPMRA": col(0.5, 5, zero=0.03),
        "PMDec": col(-20, 20), "ErrPMDec": col(0.5, 5, zero=0.03), "Plx": col(-3, 10), "ErrPlx": col(0.5, 3, zero=0.03),
        "ExcessNoiseSig": col(0, 5),
    })  # fmt: skip
    return build_catalog(table, tmp_path_factory.mktemp("gaia") / "gaia.parquet", order=8, row_group_size=128), table


def _decent_config(**kw) -> dict:
    loose = dict(min_ndet=0, min_tspan=-1.0, max_tspan=1e9, min_rb=0.0, max_fwhm=1e9, max_elong=1e9, max_magdiff=1e9,
                 max_nbad=1000, min_sso_dist=0.0, min_gal_lat=-1.0, ps1_sgveto_rad=-1.0, ps1_sgveto_th=1.0,
                 ps1_confusion_rad=-1.0, ps1_confusion_sg_tol=0.0)  # fmt: skip
    return {**loose, **kw}


def test_gaia_veto_equals_ampel_per_alert(gaia_catalog, positions):
    from ampel_dask.tiers.units.t0_filters import DecentFilterConfig
    from ampel_dask.tiers.sky import angular_distance

    path, table = gaia_catalog
    ra, dec = positions
    rows = table.to_pylist()
    sra, sdec = table.column("ra").to_numpy(), table.column("dec").to_numpy()
    for gaia in ({"gaia_rs": 5.0}, {"gaia_rs": 3.0, "gaia_pm_signif": 5.0, "gaia_plx_signif": 2.0, "gaia_excessnoise_sig_max": 2.0, "gaia_veto_gmag_min": 12.0}):
        c = DecentFilterConfig(**_decent_config(gaia_catalog=str(path), **gaia))
        star = GaiaVeto(c).is_star(ra, dec)
        expected = np.zeros(len(ra), dtype=bool)
        for i in range(len(ra)):  # per alert, the way AMPEL does it
            d = angular_distance(ra[i], dec[i], sra, sdec) * 3600
            srcs = [{**{k: rows[j][k] for k in GAIA_COLUMNS}, "dist_arcsec": d[j]} for j in np.flatnonzero(d <= c.gaia_rs)]
            expected[i] = h.ampel_is_star_in_gaia(srcs, c)
        assert (star == expected).all()
        assert 0 < star.sum() < len(ra)


def test_decent_filter_uses_gaia_veto(gaia_catalog, ztf_alerts):
    path, _ = gaia_catalog
    plain = DecentFilter(_decent_config()).verdict(ztf_alerts)
    with_gaia = DecentFilter(_decent_config(gaia_rs=5.0, gaia_catalog=str(path))).verdict(ztf_alerts)
    reached = plain.accepted
    assert reached.sum() > 50
    star = GaiaVeto(DecentFilter(_decent_config(gaia_rs=5.0, gaia_catalog=str(path))).config).is_star(
        ztf_alerts.column("ra").to_numpy(), ztf_alerts.column("dec").to_numpy())  # fmt: skip
    gaia_reject = np.array([r == "gaiaIsStar" for r in with_gaia.reason_of()])
    assert (gaia_reject == (reached & star)).all() and gaia_reject.sum() > 0


# --- classifier ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, ztf_archive, data_dir):
    spec = importlib.util.spec_from_file_location("train_classifier", ROOT / "scripts" / "train_classifier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("model") / "model.joblib"
    summary = mod.train(ztf_archive, data_dir / "labels" / "ztf_object_labels.csv", out, n_estimators=25)
    return out, summary


def test_training_runs_on_the_labelled_alerts(trained_model):
    from ampel_dask.tiers.units.t2_classifier import load_model

    path, summary = trained_model
    assert summary["samples"] >= 30 and len(summary["classes"]) >= 2
    bundle = load_model(path)
    assert bundle["feature_unit"]["name"] == "T2LightCurveFeatures"
    assert bundle["features"] == T2LightCurveFeatures(bundle["feature_unit"]["config"]).columns
    assert "mechanics" in bundle["training"]["note"]


def test_model_pickled_by_another_sklearn_version_is_a_clear_error(trained_model, tmp_path, monkeypatch):
    """scikit-learn only warns when an estimator was pickled by another version (and it may then
    predict wrongly): the unit refuses a model file of another minor version and says which versions
    and what to do; another patch release of the same minor version loads."""
    import joblib
    import sklearn.base

    from ampel_dask.tiers.units.t2_classifier import load_model, write_metadata

    bundle = load_model(trained_model[0])
    old = tmp_path / "old.joblib"
    with monkeypatch.context() as m:
        m.setattr(sklearn.base, "__version__", "1.0.0")  # what BaseEstimator.__getstate__ records
        joblib.dump(bundle, old)
    write_metadata(old, bundle)  # planning reads the sidecar; the estimator is loaded where it runs
    unit = T2Classifier(model=str(old))
    with pytest.raises(ValueError, match=r"old\.joblib: .* pickled by scikit-learn 1\.0\.0, this is .*retrain the model"):
        unit.model
    patch = tmp_path / "patch.joblib"
    with monkeypatch.context() as m:
        m.setattr(sklearn.base, "__version__", ".".join(sklearn.__version__.split(".")[:2]) + ".99")
        joblib.dump(bundle, patch)
    assert set(load_model(patch)) == set(bundle)


def test_classifier_is_planned_from_the_sidecar_without_unpickling(trained_model, ztf_states, tmp_path):
    """The training script writes <model>.meta.json; a unit built from it has the identity of one
    built from the bundle, loads the estimator only when it runs, and ignores a sidecar of another file."""
    import json
    import shutil

    from ampel_dask.tiers.units import t2_classifier as tc

    path, _ = trained_model
    assert tc.meta_path(path).exists()
    copy = tmp_path / "model.joblib"
    shutil.copy(path, copy)
    tc._load.cache_clear()
    assert not tc.meta_path(copy).exists()
    from_bundle = T2Classifier(model=str(copy))  # no sidecar: metadata from the model itself
    assert tc._load.cache_info().currsize == 1
    tc.write_metadata(copy)
    tc._load.cache_clear()
    planned = T2Classifier(model=str(copy))
    assert tc._load.cache_info().currsize == 0, "planning unpickled the model although the sidecar describes it"
    assert planned.identity == from_bundle.identity
    out = planned.process(ztf_states)
    assert tc._load.cache_info().currsize == 1
    assert out.to_pandas().equals(from_bundle.process(ztf_states).to_pandas())  # NaN where both are NaN
    meta = json.loads(tc.meta_path(copy).read_text())
    tc.meta_path(copy).write_text(json.dumps(meta | {"model_hash": "0" * 16, "classes": ["x", "y", "z"]}))
    tc._load.cache_clear()
    stale = T2Classifier(model=str(copy))  # a sidecar of another file is never trusted
    assert stale.classes == from_bundle.classes and tc._load.cache_info().currsize == 1


def test_classifier_on_states(trained_model, ztf_states):
    path, summary = trained_model
    unit = T2Classifier(model=str(path))
    (dep,) = unit.dependencies()
    assert isinstance(dep, T2LightCurveFeatures)
    feats = dep.process(ztf_states)
    out = unit.process(ztf_states, {dep.name(): feats})
    assert out.num_rows == ztf_states.num_rows
    classes = sorted(summary["classes"])
    assert out.column_names == ["classification", *[f"p_{k}" for k in classes], "code"]
    ok = out.column("code").to_numpy() == 0
    assert (ok == (feats.column("code").to_numpy() == 0)).all() and ok.sum() > 100
    p = np.stack([out.column(f"p_{k}").to_numpy() for k in classes], axis=1)
    np.testing.assert_allclose(p[ok].sum(axis=1), 1.0, atol=1e-9)
    assert np.isnan(p[~ok]).all() and out.column("classification").null_count == (~ok).sum()
    best = np.asarray(classes)[np.argmax(p[ok], axis=1)]
    assert (np.asarray(out.column("classification").filter(pa.array(ok)).to_pylist()) == best).all()
    # standalone (features computed inside) gives the same; identity covers the model file and feature config
    alone = unit.process(ztf_states)
    np.testing.assert_array_equal(np.stack([alone.column(f"p_{k}").to_numpy() for k in classes], axis=1), p)
    assert unit.config.model_hash and unit.config.features == dep.config
    with pytest.raises(ValueError, match="features config differs"):
        T2Classifier(model=str(path), features={"min_points": 5})
    assert not math.isnan(summary["train_accuracy"])


def test_classifier_direct_tree_calls_equal_sklearn(trained_model, ztf_states):
    """The forest's trees are called directly (per-call speed); the probabilities are sklearn's own,
    on real features with missing values, and other estimators go through their predict_proba."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.impute import SimpleImputer

    from ampel_dask.tiers.units.t2_classifier import feature_matrix, load_model, predict_proba

    path, _ = trained_model
    bundle = load_model(path)
    feats = T2LightCurveFeatures(bundle["feature_unit"]["config"]).process(ztf_states)
    x = feature_matrix(feats, bundle["features"])
    assert np.isnan(x).any() and len(x) > 100
    model = bundle["model"]
    np.testing.assert_array_equal(predict_proba(model, x), model.predict_proba(x))
    forest = model.steps[-1][1]
    xi = model.steps[0][1].transform(x)
    np.testing.assert_array_equal(predict_proba(forest, xi), forest.predict_proba(xi))
    np.testing.assert_array_equal(predict_proba(forest, x), forest.predict_proba(x))  # NaNs routed as sklearn does
    y = np.asarray(bundle["classes"])[np.arange(len(x)) % len(bundle["classes"])]
    other = make_pipeline(SimpleImputer(keep_empty_features=True), StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    np.testing.assert_array_equal(predict_proba(other, x), other.predict_proba(x))
