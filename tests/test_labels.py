"""Readable names and units of T2 result columns: the declaration's rules, every built-in unit's
columns covered (the columns are the units' real output on real states), and the labels reaching the
report through a run's selection with the units of the configuration that computed them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ampel_dask as ad
from ampel_dask.tiers.catalog import build_catalog
from ampel_dask.tiers.labels import column_label, label_of, prettify
from ampel_dask.tiers.units.t2_catalog import T2CatalogMatch
from ampel_dask.tiers.units.t2_classifier import T2Classifier
from ampel_dask.tiers.units.t2_fit import T2BazinFit
from ampel_dask.tiers.units.t2_lightcurve import T2LightCurveFeatures
from ampel_dask.tiers.units.t2_redshift import T2RedshiftDigest
from ampel_dask.tiers.units.t2_snfit import T2SNCosmoFit
from ampel_dask.tiers.units.t2_summary import T2LightCurveSummary

from .t2_helpers import archive_states, ingest_quiet

REPO = Path(__file__).resolve().parents[1]


def test_declaration_rules():
    labels = {"peak_mag": ("Peak magnitude", "mag"), "n_{band}": ("Points in {band}", ""), "{feature}_{band}": ("{feature} ({band})", "")}
    assert column_label(labels, "peak_mag") == ("Peak magnitude", "mag")  # exact name
    assert column_label(labels, "n_r") == ("Points in r", "")  # first matching pattern wins
    assert column_label(labels, "beyond_1_std_g") == ("Beyond 1 std (g)", "")  # {band}: one word, the rest is the feature
    assert column_label(labels, "code") == ("Result code", "")
    assert column_label(labels, "p_SN_Ia") == ("P SN (Ia)", "")  # a pattern matches whatever fits its shape
    assert column_label({}, "p_SN_Ia") == ("P SN Ia", "")  # no declaration: the name made readable
    assert column_label({"{prefix}dist_arcsec": ("{prefix} distance", "arcsec")}, "gaia_dr3_dist_arcsec") == ("Gaia dr3 distance", "arcsec")
    assert prettify("__x__") == "X" and prettify("") == ""


@given(st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=1, max_size=4), st.from_regex(r"[a-zA-Z]{1,3}", fullmatch=True))
def test_band_placeholder_takes_the_last_word(words, band):
    column = "_".join([*words, band])
    label, _ = column_label({"{feature}_{band}": ("{feature}|{band}", "")}, column)
    feature, got = label.split("|")
    assert got == column.rsplit("_", 1)[1] == band
    assert feature == prettify(column.rsplit("_", 1)[0])


@pytest.fixture(scope="module")
def states(tmp_path_factory, data_dir) -> pa.Table:
    root = ingest_quiet([data_dir / "ztf" / "kowalski"], tmp_path_factory.mktemp("labels"))
    s = archive_states(root)
    return s.take(pa.array(np.arange(min(8, s.num_rows))))


def declared(unit, column: str) -> bool:
    """The unit declares this column (its label is not the fallback of a bare name)."""
    return unit.label(column, unit.config) != (prettify(column), "")


def test_every_builtin_unit_labels_its_real_output_columns(states, tmp_path):
    ra, dec = states.column("ra").to_numpy(), states.column("dec").to_numpy()
    cat = build_catalog(pa.table({"ra": ra[:3], "dec": dec[:3], "zz": np.array([0.05, 0.1, 0.2]), "name": ["a", "b", "c"]}), tmp_path / "cat.parquet")
    units = [
        T2LightCurveSummary(bands=["g", "r"]),
        T2LightCurveFeatures(),
        T2LightCurveFeatures(value="flux"),
        T2BazinFit(),
        T2BazinFit(transform=True),
        T2Classifier(model=str(REPO / "workflows/models/ztf_classifier.joblib")),
        T2CatalogMatch(catalog=str(cat), prefix="host_"),
        T2RedshiftDigest(sources=[{"name": "H", "catalog": str(cat), "z": "zz", "group": 1}]),
        T2SNCosmoFit(model="hsiao", redshift="fit"),
    ]
    seen = 0
    for unit in units:
        inputs = {}
        for dep in unit.dependencies():
            res = dep.process(states, {})
            inputs[dep.name()] = inputs[dep.identity.key] = res if isinstance(res, pa.Table) else pa.Table.from_pylist(res)
        out = unit.process(states.slice(0, 2) if isinstance(unit, T2SNCosmoFit) else states, inputs)
        cols = out.column_names if isinstance(out, pa.Table) else list(out[0])
        # a catalog's own columns pass through under the prefix: their names are the catalog's, not the unit's
        own = [c for c in cols if not (isinstance(unit, T2CatalogMatch) and c in ("host_zz", "host_name", "host_ra", "host_dec"))]
        missing = [c for c in own if not declared(unit, c)]
        assert not missing, f"{unit.name()} has no label for {missing}"
        seen += len(own)
    assert seen > 150
    # hand-checked: names, and units that follow the config
    assert T2LightCurveSummary.label("peak_mag") == ("Peak magnitude", "mag")
    f = T2LightCurveFeatures(value="flux")
    assert f.label("amplitude_g", f.config) == ("Half amplitude (g)", "nJy") and T2LightCurveFeatures.label("amplitude_g") == ("Half amplitude (g)", "mag")
    assert f.label("linear_fit_slope_r", f.config) == ("Linear fit slope (r)", "nJy/d") and f.label("skew_r", f.config) == ("Skewness (r)", "")
    assert T2BazinFit.label("bazin_fit_rise_time_r") == ("Rise time (r)", "d")
    assert T2Classifier.label("p_SN") == ("P(SN)", "") and T2CatalogMatch.label("host_dist_arcsec") == ("Host match distance", "arcsec")


def test_run_selection_carries_the_labels_of_the_config_that_computed_them(data_dir, tmp_path):
    """Through a real run: the export's Parquet schema holds each T2 column's label and unit, features in
    flux get nJy, and the report's table and object pages show them."""
    ad.ingest(data_dir / "ztf" / "kowalski", tmp_path / "archive")
    wf = {"name": "labels", "channels": [{
        "name": "ALL", "access": ["ZTF_PUB", "ZTF_PRIV"],
        "t2": ["T2LightCurveSummary", {"unit": "T2LightCurveFeatures", "config": {"value": "flux", "features": ["Amplitude"]}}],
        "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"]}},
               {"unit": "T3HtmlReport", "config": {"columns": ["T2LightCurveFeatures__amplitude_r"], "top_n": 3}}]}]}  # fmt: skip
    run = ad.run(wf, archive=tmp_path / "archive", store=tmp_path / "store", workers=0)
    [export] = [p for p in run.outputs if p.endswith(".parquet")]
    schema = pq.read_schema(export)
    assert label_of(schema.field("T2LightCurveSummary__peak_mag")) == ("Peak magnitude", "mag")
    assert label_of(schema.field("T2LightCurveFeatures__amplitude_r")) == ("Half amplitude (r)", "nJy")
    assert label_of(schema.field("T2LightCurveFeatures__n_g")) == ("Points in g", "")
    assert label_of(schema.field("object_id")) is None
    [index] = [Path(p) for p in run.outputs if p.endswith(".html")]
    text = index.read_text()
    assert 'title="T2LightCurveFeatures__amplitude_r">Half amplitude (r)<br><span class="sub">[nJy]</span>' in text
    page = next((index.parent / "objects").glob("*.html")).read_text()
    assert "<td>Peak magnitude</td>" in page and "<td>Half amplitude (r)</td>" in page and "<td>nJy</td>" in page
