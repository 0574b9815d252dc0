"""``ampel-dask backtest``: per channel and night, and purity / completeness per class, recomputed here with
plain pandas from the truth tables (ELAsTiCC's GENTYPE, ZTF object labels) and the filter decisions (a
raw-column cut, and `ampel-dask filter --out`); a channel's ``max_pass_ratio`` stops its T3."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import yaml

from ampel_dask.graph.ingest import IngestOptions, ingest

TRUTH = "labels/elasticc_truth_sample/test_elasticc_earlysnia.parquet"
ZTF_LABELS = "labels/ztf_object_labels.csv"
PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ampel_dask.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def elasticc(tmp_path_factory, data_dir) -> Path:
    """Fink's dump of the labelled ELAsTiCC alerts (603 alerts of 553 SNe Ia), as an archive."""
    root = tmp_path_factory.mktemp("bt_elasticc")
    assert ingest([str(data_dir / TRUTH)], root, IngestOptions(workers=0, progress=False)).ingested == 603
    return root


@pytest.fixture(scope="module")
def truth(data_dir) -> pd.DataFrame:
    """One row per labelled alert, read from the truth file with pandas alone."""
    raw = pd.read_parquet(data_dir / TRUTH, columns=["diaObjectId", "GENTYPE", "diaSource"])
    src = pd.DataFrame(list(raw["diaSource"]))
    return pd.DataFrame({"alert_id": src["diaSourceId"], "object": raw["diaObjectId"].astype(str), "cls": raw["GENTYPE"].astype(str),
                         "snr": src["snr"], "night": nights_of(src["midPointTai"].to_numpy())})  # fmt: skip


def nights_of(mjd: np.ndarray) -> np.ndarray:
    """Rubin's dayObs: the date at UTC-12 h."""
    days = np.floor(mjd - 0.5).astype("int64")
    return np.array([int((pd.Timestamp("1858-11-17") + pd.Timedelta(days=int(d))).strftime("%Y%m%d")) for d in days])


def expected(alerts: pd.DataFrame, labels: dict[str, str]) -> dict:
    """The back-test of one channel, from (alert_id, object, night, passed) rows and object -> class."""
    nights = [{"night": int(n), "alerts": len(g), "passed": int(g.passed.sum()), "pass_ratio": g.passed.mean(),
               "objects": g.loc[g.passed, "object"].nunique()} for n, g in alerts.groupby("night")]  # fmt: skip
    seen, passed = set(alerts.object), set(alerts.loc[alerts.passed, "object"])
    lab = {o: c for o, c in labels.items() if o in seen}
    total = sum(o in passed for o in lab)
    classes = []
    for c in sorted(set(lab.values()), key=lambda c: (0, int(c), c) if c.isdigit() else (1, 0, c)):
        objs = [o for o, k in lab.items() if k == c]
        k = sum(o in passed for o in objs)
        classes.append({"class": c, "objects": len(objs), "passed": k, "completeness": k / len(objs), "purity": k / total if total else None})
    return {"alerts": len(alerts), "passed": int(alerts.passed.sum()), "objects": len(passed), "nights": nights, "classes": classes,
            "labelled_passed": total, "unlabelled_passed": len(passed - set(lab))}  # fmt: skip


def assert_same(got: dict, want: dict) -> None:
    for k, v in want.items():
        if k in ("nights", "classes"):
            assert len(got[k]) == len(v), k
            for g, w in zip(got[k], v):
                assert g.keys() >= w.keys()
                for kk, vv in w.items():
                    assert g[kk] == (pytest.approx(vv) if isinstance(vv, float) else vv), (k, kk, g, w)
        else:
            assert got[k] == v, k


def workflow(tmp_path: Path, channels: list[dict], surveys: list[str], name: str = "bt") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump({"name": name, "archive": {"surveys": surveys}, "channels": channels}))
    return path


INFANT = {"max_age": 10.0, "min_ndet": 2}


def test_backtest_on_elasticc_equals_pandas_over_the_truth_table(elasticc, truth, data_dir, tmp_path):
    wf = workflow(tmp_path, [{"name": "SNR10", "access": ["LSST"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "snr >= 10"}}]},
                             {"name": "INFANT", "access": ["LSST"], "filters": [{"unit": "InfantSNFilter", "config": INFANT}]}], ["lsst"])  # fmt: skip
    proc = cli("backtest", str(wf), "--archive", str(elasticc), "--labels", str(data_dir / TRUTH), "--plot", str(tmp_path / "bt.png"), "--json")
    report = last_json(proc)
    labels = dict(zip(truth.object, truth.cls))  # every row of an object has its GENTYPE
    # SNR10: the decision is a cut on a raw column of the truth file
    snr = truth.assign(passed=truth.snr.fillna(-np.inf) >= 10)
    assert_same(report["channels"]["SNR10"], expected(snr, labels))
    # INFANT: the filter's own decisions (ampel-dask filter), aggregated here
    cfg = tmp_path / "infant.yml"
    cfg.write_text(yaml.safe_dump(INFANT))
    assert cli("filter", str(elasticc), "--unit", "InfantSNFilter", "--config", str(cfg), "--out", str(tmp_path / "d.csv")).returncode == 0
    decisions = pd.read_csv(tmp_path / "d.csv")
    infant = truth.merge(decisions[["alert_id", "accepted"]], on="alert_id", validate="one_to_one").assign(passed=lambda f: f.accepted == 1)
    want = expected(infant, labels)
    assert_same(report["channels"]["INFANT"], want)
    assert 0 < want["passed"] < len(truth) and report["channels"]["INFANT"]["classes"][0]["class"] == "10"
    # the printed table says the same, and the plot is a PNG
    c = report["channels"]["INFANT"]["classes"][0]
    assert f"{100 * c['completeness']:.1f}%" in proc.stderr and f"{want['passed']} " in proc.stderr
    assert (tmp_path / "bt.png").read_bytes()[:8] == PNG


def test_backtest_against_many_ztf_classes(tmp_path_factory, data_dir, tmp_path):
    """ZTF object labels (SIMBAD, TNS, ALeRCE classes; an object with several labels takes its first row):
    purity and completeness of many classes, and the channel's data rights (alerts of other programs are
    not its alerts)."""
    root = tmp_path_factory.mktemp("bt_ztf")
    ingest([str(data_dir / "ztf" / "fink_client"), str(data_dir / "parquet" / "fink_ztf_datatest_part2.parquet"),
            str(data_dir / "parquet" / "fink_ztf_superluminous.parquet")], root, IngestOptions(workers=0, progress=False))  # fmt: skip
    expr = "rb >= 0.7 and ndet >= 3"
    wf = workflow(tmp_path, [{"name": "RB", "access": ["ZTF_PUB"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": expr}}]}], ["ztf"])
    report = last_json(cli("backtest", str(wf), "--archive", str(root), "--labels", str(data_dir / ZTF_LABELS), "--no-plot", "--json"))
    cfg = tmp_path / "expr.yml"
    cfg.write_text(yaml.safe_dump({"expr": expr}))
    assert cli("filter", str(root), "--unit", "ExpressionFilter", "--config", str(cfg), "--out", str(tmp_path / "d.csv")).returncode == 0
    alerts = pads.dataset(root / "survey=ztf", format="parquet", partitioning="hive").to_table(columns=["alert_id", "object_id", "night", "programid"]).to_pandas()
    alerts = alerts.merge(pd.read_csv(tmp_path / "d.csv")[["alert_id", "accepted"]], on="alert_id", validate="one_to_one")
    public = alerts[alerts.programid == 1]  # ZTF_PUB: programid 1
    rows = public.rename(columns={"object_id": "object"}).assign(passed=lambda f: f.accepted == 1)
    labels = pd.read_csv(data_dir / ZTF_LABELS, dtype=str).drop_duplicates("object_id", keep="first")
    want = expected(rows, dict(zip(labels.object_id, labels.label)))
    got = report["channels"]["RB"]
    assert_same(got, want)
    assert got["unseen"] == len(alerts) - len(public)
    purities = {c["purity"] for c in want["classes"] if c["passed"]}
    assert len(want["classes"]) > 20 and len(purities) > 2  # many classes, purities that differ


def test_nights_option_and_python_api(elasticc, truth, data_dir, tmp_path):
    import ampel_dask as ad

    wf = workflow(tmp_path, [{"name": "SNR10", "access": ["LSST"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "snr >= 10"}}]}], ["lsst"])
    nights = sorted(set(truth.night))
    lo, hi = nights[5], nights[20]
    report = last_json(cli("backtest", str(wf), "--archive", str(elasticc), "--nights", f"{lo}:{hi}", "--no-plot", "--json"))
    rows = truth[(truth.night >= lo) & (truth.night <= hi)].assign(passed=lambda f: f.snr.fillna(-np.inf) >= 10)
    want = expected(rows, {})
    assert {k: report["channels"]["SNR10"][k] for k in ("alerts", "passed", "objects")} == {k: want[k] for k in ("alerts", "passed", "objects")}
    assert report["nights"] == [lo, hi] and "classes" not in report["channels"]["SNR10"]
    bt = ad.backtest(wf, archive=elasticc, labels=data_dir / TRUTH, nights=(lo, hi))
    frame = bt.nights_frame()
    assert frame.passed.sum() == want["passed"] and list(frame.night) == [n["night"] for n in want["nights"]]
    classes = bt.classes_frame()
    assert list(classes["class"]) == ["10"] and classes.passed.sum() == rows.loc[rows.passed, "object"].nunique()


def test_backtest_usage_errors_are_one_line_exit_2(elasticc, tmp_path, data_dir):
    wf = workflow(tmp_path, [{"name": "A", "access": ["LSST"], "filters": []}], ["lsst"])
    bad = tmp_path / "labels.csv"
    bad.write_text("foo,bar\n1,2\n")
    for args, msg in ((["--nights", "2025:2024"], "--nights"), (["--nights", "20250301:20250101"], "first not after"),
                      (["--labels", str(bad)], "no object column"), (["--labels", str(tmp_path / "none.csv")], "no such labels file"),
                      (["--labels", str(data_dir / ZTF_LABELS), "--label-source", "nobody"], "no labelled object")):  # fmt: skip
        proc = cli("backtest", str(wf), "--archive", str(elasticc), "--no-plot", *args)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


# --- max_pass_ratio ----------------------------------------------------------------------------------


def test_max_pass_ratio_stops_t3_with_the_reason(elasticc, truth, tmp_path):
    ratio = float((truth.snr.fillna(-np.inf) >= 10).mean())
    passed = int((truth.snr.fillna(-np.inf) >= 10).sum())
    assert 0.2 < ratio < 0.95

    def channel(name: str, limit: float | None) -> dict:
        # the same alerts pass both channels; their filters differ in text (two channels with identical
        # filters and T1 policy share their T1 task keys on main: only one of them gets states)
        expr = "snr >= 10" if limit is not None else "snr >= 10 and snr > 0"
        return {"name": name, "access": ["LSST"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": expr}}],
                "t2": ["T2LightCurveSummary"], "t3": [{"unit": "T3Export", "config": {"formats": ["csv"]}}],
                **({"max_pass_ratio": limit} if limit is not None else {})}  # fmt: skip

    store = tmp_path / "store"
    wf = workflow(tmp_path, [channel("GUARDED", round(ratio / 2, 4)), channel("FREE", None)], ["lsst"], "guarded")
    proc = cli("run", str(wf), "--archive", str(elasticc), "--store", str(store), "--workers", "0", "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"channel GUARDED passed {passed} of the {len(truth)} alerts it sees" in lines[0] and "max_pass_ratio" in lines[0]
    assert "T3Export" in lines[0]
    assert not list((store / "t3" / "GUARDED").rglob("*.csv"))  # no T3 output of the guarded channel
    assert len(list((store / "t3" / "FREE").rglob("*.csv"))) == 1  # the other channel reacted
    [manifest] = [json.loads(p.read_text()) for p in (store / "runs").glob("*.json")]
    assert "GUARDED" in manifest["stopped"] and manifest["channels"]["GUARDED"]["passed"] == passed

    # the limit raised: the same store runs only the held T3 (states and T2 are reused)
    wf = workflow(tmp_path, [channel("GUARDED", min(1.0, round(ratio + 0.01, 4))), channel("FREE", None)], ["lsst"], "guarded")
    summary = last_json(cli("run", str(wf), "--archive", str(elasticc), "--store", str(store), "--workers", "0", "--json"))
    assert summary["t2"]["computed"] == 0 and summary["t3"]["outputs"] == 1
    [out] = list((store / "t3" / "GUARDED").rglob("*.csv"))
    assert len(pd.read_csv(out)) == truth.loc[truth.snr.fillna(-np.inf) >= 10, "object"].nunique()


def test_max_pass_ratio_is_checked_in_the_workflow(tmp_path):
    from ampel_dask.graph.workflow import WorkflowError, load_workflow

    for bad in (0, 1.5, -0.1):
        path = workflow(tmp_path, [{"name": "A", "max_pass_ratio": bad}], ["ztf"])
        with pytest.raises(WorkflowError, match="max_pass_ratio"):
            load_workflow(path)
    assert math.isclose(load_workflow(workflow(tmp_path, [{"name": "A", "max_pass_ratio": 0.05}], ["ztf"])).channels[0].max_pass_ratio, 0.05)
