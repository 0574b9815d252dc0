"""The Python API (``import ampel_dask as ad``) against independent computations on real alerts:
AMPEL's own DecentFilter decisions, plain-Python cone and object cuts over the raw part files, and a
pandas re-derivation of a channel's objects from its states and T2 rows."""

from __future__ import annotations

import csv
import math
from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow.parquet as pq
import pytest

import ampel_dask as ad
from ampel_dask.units import DecentFilter

from .test_tiers import DECENT


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("api_archive")
    report = ad.ingest(sorted((data_dir / "ztf").glob("*.tar.gz")), root)
    assert (report.read, report.ingested, report.quarantined) == (1993, 1993, 0)  # 816 + 367 + 810 packets
    return root


def raw_rows(root) -> list[dict]:
    """Every archived alert's ra, dec, object and night, read from the part files directly."""
    rows = []
    for f in sorted(root.glob("survey=*/night=*/part-*.parquet")):
        rows += pq.read_table(f, columns=["alert_id", "object_id", "ra", "dec", "night"]).to_pylist()
    return rows


def test_a_unit_on_a_notebook_frame_decides_as_real_ampel(archive, data_dir):
    frame = ad.open_archive(archive).select(surveys=["ztf"]).to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 1993
    verdict = DecentFilter(**DECENT).verdict(frame).to_pandas()
    ours = dict(zip(frame["alert_id"], verdict["accepted"]))
    rows = list(csv.DictReader(open(data_dir / "reference" / "ampel_decentfilter_decisions.csv")))
    assert {int(r["candid"]): bool(int(r["accepted"])) for r in rows} == {int(k): bool(v) for k, v in ours.items()}


def test_cone_object_and_night_selections_match_plain_python(archive, data_dir):
    rows = raw_rows(archive)
    view = ad.open_archive(archive)
    ra0, dec0 = rows[100]["ra"], rows[100]["dec"]

    def sep(r):  # haversine, degrees
        a, b, c, d = map(math.radians, (r["ra"], r["dec"], ra0, dec0))
        h = math.sin((d - b) / 2) ** 2 + math.cos(b) * math.cos(d) * math.sin((c - a) / 2) ** 2
        return math.degrees(2 * math.asin(math.sqrt(h)))

    for radius in (0.01, 1.5, 20.0):
        expected = sorted(r["alert_id"] for r in rows if sep(r) <= radius)
        got = view.select(cone=(ra0, dec0, radius)).to_arrow().column("alert_id").to_pylist()
        assert sorted(got) == expected and expected, radius

    name = "ZTF18abotjph" if any(r["object_id"] == "ZTF18abotjph" for r in rows) else rows[5]["object_id"]
    sel = view.select(objects=[name], columns=["alert_id", "object_id", "dps"]).to_pandas()
    assert sorted(sel["alert_id"]) == sorted(r["alert_id"] for r in rows if r["object_id"] == name)
    assert all(len(h) > 0 for h in sel["dps"])  # histories joined back to their alerts
    only = view.select(objects=[name], columns=["mjd", "dps"]).to_pandas()  # histories without asking for ids
    assert list(only.columns) == ["mjd", "dps"] and len(only) == len(sel)

    # the Fink night: nights from the packets' own Julian dates in the manifest (UTC date = ZTF night)
    def night(jd: float) -> int:
        d = datetime(2000, 1, 1, 12, tzinfo=timezone.utc) + timedelta(days=jd - 2451545.0)
        return int(d.strftime("%Y%m%d"))

    man = [r for r in csv.DictReader(open(data_dir / "MANIFEST_alerts.csv")) if r["file"].startswith("ztf/") and r["file"].endswith(".tar.gz")]
    want = sorted(int(r["alert_id"]) for r in man if night(float(r["time"])) == 20181129)
    got = view.select(nights=20181129).to_arrow().column("alert_id").to_pylist()
    assert sorted(got) == want and len(want) == 367
    lazy = view.select(nights=(20181129, 20181129)).to_dask().compute()
    assert sorted(lazy["alert_id"]) == want


def test_run_and_store_frames_agree_with_a_pandas_rederivation(archive, tmp_path):
    wf = {"name": "api", "store": {"path": str(tmp_path / "store")},
          "channels": [{"name": "ALL", "access": ["ZTF_ALL"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "rb > 0.5"}}],
                        "t2": ["T2LightCurveSummary"]}]}  # fmt: skip
    run = ad.run(wf, archive=archive, workers=0)
    assert run.manifest["run_id"] == run.run_id and run.counts["alerts"] == 1993
    store = ad.open_store(tmp_path / "store")
    assert list(store.runs()["run_id"]) == [run.run_id]
    states, t2 = store.states("ALL"), store.t2("T2LightCurveSummary")
    assert len(states) == run.counts["channels"]["ALL"]["passed"]
    # the channel's objects: each object's latest state (by time, then alert id), with that state's T2 row
    latest = states.sort_values(["stock", "mjd", "alert_id"]).groupby("stock").tail(1)
    body = [c for c in t2.columns if c not in ("stock", "alert_id", "unit", "unit_version", "config_hash", "t2_key", "run_id")]
    expected = latest.merge(t2[body].add_prefix("T2LightCurveSummary__").rename(columns={"T2LightCurveSummary__state_id": "state_id"}), on="state_id", how="left")
    got = store.objects("ALL")
    cols = ["stock", "state_id", "alert_id", *[c for c in expected.columns if c.startswith("T2LightCurveSummary__")]]
    a = got[cols].sort_values("stock").reset_index(drop=True)
    b = expected[cols].sort_values("stock").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    stock, state = int(a["stock"].iloc[0]), bytes(a["state_id"].iloc[0]).hex()  # 128-bit content ids, shown as hex
    chain = store.explain(stock)
    assert state in {s["state_id"] for s in chain["states"]}
