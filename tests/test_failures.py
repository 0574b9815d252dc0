"""No silent failures: a unit that raises fails the run in one line (exit 1), or, with ``on_error: record``,
its failed states are stored with their error, counted, shown by ``explain`` and retried by the next run.

The runs are ``ampel-dask`` subprocesses on the real ZTF alerts of ../shared/data/ztf/pitt_google, with
test units (``tests/failing_units.py``) registered as a science package registers its own: T2Fragile
raises on any batch holding a chosen object, and is "fixed" for the next run by unsetting a variable.
Expected numbers come from the stored T1 states (written before any T2 unit runs) and the archive,
read with pyarrow, never from the failure handling under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ampel_dask.graph.failures import BISECT_CALLS, attempt
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.graph.workflow import WorkflowError, load_workflow
from ampel_dask.io.layout import ztf_stock
from ampel_dask.io.stores import ParquetStore

from .failing_units import FAIL_DPS_ENV, FAIL_ENV, units_env
from .server_fixtures import mongo, mongo_db  # noqa: F401  (fixtures)

POISON = "ZTF21abvawaj"  # two alerts on 2021-09-01, in one archive part
STOCK = ztf_stock(POISON)
FRAGILE = {"name": "fragile", "batch_rows": 5, "channels": [  # small work units: the failing one is one of several
    {"name": "A", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 1"}}],
     "t2": ["T2LightCurveSummary", "T2Fragile", "T2FragileChild"], "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"]}}]},
    {"name": "B", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 2"}}],
     "t2": ["T2LightCurveSummary"], "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"]}}]},
]}  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("failures") / "archive"
    ingest([str(data_dir / "ztf" / "pitt_google")], root, IngestOptions(workers=0, progress=False))
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("site")


def cli(site: Path, *args: str, fail: str | None = None, fail_dps: str | None = None) -> subprocess.CompletedProcess:
    env = units_env(site, **({FAIL_ENV: fail} if fail else {}), **({FAIL_DPS_ENV: fail_dps} if fail_dps else {}))
    return subprocess.run([sys.executable, "-m", "ampel_dask.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def write_workflow(path: Path, wf: dict) -> Path:
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    return path


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def state_files(store: Path, channel: str) -> dict[str, pa.Table]:
    """Each work unit's stored T1 states (file stem -> state_id, stock), as any Parquet reader sees them."""
    return {f.stem: pq.read_table(f, columns=["state_id", "stock"]) for f in sorted((store / "states" / channel).glob("*.parquet"))}


def ids(table: pa.Table, stock: int | None = None) -> set[bytes]:
    """128-bit state ids (16 bytes each) of the states, or of one object's."""
    rows = table.to_pylist()
    return {r["state_id"] for r in rows if stock is None or r["stock"] == stock}


def hexes(ids: set[bytes]) -> set[str]:
    """As ``explain`` and exports write ids: 32 hex digits."""
    return {bytes(i).hex() for i in ids}


def t2_ids(store: Path, unit: str) -> set[bytes]:
    return {i for f in (store / "t2" / unit).glob("*/*.parquet") for i in pq.read_table(f, columns=["state_id"]).column("state_id").to_pylist()}


def contents(states: pa.Table, dp_id: int | None = None) -> set[tuple]:
    """The distinct datapoints of states, as plain Python tells them apart: by every field's value (its
    repr: NaN equals NaN, -0.0 is not 0.0), of one datapoint id if given."""
    return {tuple((k, repr(v)) for k, v in sorted(d.items())) for dps in states.column("dps").to_pylist() for d in dps if dp_id in (None, d["dp_id"])}


def export(store: Path, channel: str) -> pa.Table | None:
    files = sorted((store / "t3" / channel).glob(f"*/{channel}_export.parquet"))
    return pq.read_table(files[0]) if files else None


# --------------------------------------------------------------------------------------------------
# on_error: fail (the default)
# --------------------------------------------------------------------------------------------------


def test_a_failing_t2_unit_fails_the_run_in_one_line_and_the_next_run_retries(archive, site, tmp_path):
    wf, store = write_workflow(tmp_path / "wf.yml", FRAGILE), tmp_path / "store"
    args = ["run", str(wf), "--archive", str(archive), "--store", str(store), "--workers", "0", "--json"]
    proc = cli(site, *args, fail=str(STOCK))
    assert proc.returncode == 1, proc.stderr[-3000:]

    files = state_files(store, "A")  # T1 ran for every work unit; T2Fragile was given each unit's states
    all_a = set().union(*(ids(t) for t in files.values()))
    all_states = all_a | set().union(*(ids(t) for t in state_files(store, "B").values()))
    (hit,) = [t for t in files.values() if STOCK in t.column("stock").to_pylist()]
    n = len(ids(hit))  # the failing stage's states: the unit raised on all of them at once
    assert 0 < n < len(all_a)
    line = proc.stderr.strip().splitlines()[-1]
    assert line == f"Error: run failed: T2 unit T2Fragile (channel A) failed on {n:,} states: ValueError: fragile: {n} states, one of stocks {STOCK} among them"

    out = last_json(proc)
    assert out["status"] == "failed"
    assert out["t2_units"]["T2Fragile"] == {"computed": len(all_a) - n, "reused": 0, "failed": n, "recorded": 0}
    assert out["t2_units"]["T2FragileChild"] == {"computed": len(all_a) - n, "reused": 0, "failed": n, "recorded": 0}  # not run on missing inputs
    assert out["t2_units"]["T2LightCurveSummary"] == {"computed": len(all_states), "reused": 0, "failed": 0, "recorded": 0}
    assert out["t2"] == {"computed": 2 * (len(all_a) - n) + len(all_states), "reused": 0, "failed": 2 * n, "recorded": 0}
    error = f"ValueError: fragile: {n} states, one of stocks {STOCK} among them"
    assert [(f["unit"], f["channels"], f["states"], f["policy"], f["error"], f["cause"]) for f in out["failures"]] == [
        ("T2Fragile", ["A"], n, "fail", error, None),
        ("T2FragileChild", ["A"], n, "fail", f"its dependency T2Fragile failed on them: {error}", "T2Fragile"),
    ]
    assert list(out["t3"]["not_run"]) == ["A"] and out["t3"]["outputs"] == 1  # B's T3 ran, A's did not (partial results)
    assert export(store, "A") is None and export(store, "B") is not None
    assert t2_ids(store, "T2Fragile") == all_a - ids(hit)  # nothing stored for the failed states
    assert "T2 unit T2Fragile: computed" in proc.stderr and f"failed {n} (recorded 0)" in proc.stderr  # the text summary

    manifest = json.loads((store / "runs" / f"{out['run_id']}.json").read_text())  # written although the run failed
    assert manifest["status"] == "failed" and manifest["failures"] == out["failures"]
    status = cli(site, "status", out["run_id"], "--store", str(store))
    assert status.returncode == 0 and f"run {out['run_id']}: failed;" in status.stdout and f"failed on {n:,} states" in status.stdout
    info = json.loads(cli(site, "explain", POISON, "--store", str(store), "--json").stdout.strip().splitlines()[-1])
    assert info["failed_runs"] == [{"run_id": out["run_id"], "reason": line.removeprefix("Error: run failed: ")}]
    assert {t["state_id"] for t in info["t2"] if t["unit"] == "T2Fragile" and t.get("failure") == error} == hexes(ids(hit, STOCK))

    again = cli(site, *args)  # the unit fixed: exactly the failed states are computed, T3 of A runs
    assert again.returncode == 0, again.stderr[-3000:]
    out2 = last_json(again)
    assert out2["status"] == "ok" and out2["failures"] == []
    for unit in ("T2Fragile", "T2FragileChild"):
        assert out2["t2_units"][unit] == {"computed": n, "reused": len(all_a) - n, "failed": 0, "recorded": 0}
    assert out2["t2_units"]["T2LightCurveSummary"]["computed"] == 0
    table = export(store, "A")
    states = ParquetStore(store).read_states("A")
    dps = dict(zip(states.column("state_id").to_pylist(), (len(d) for d in states.column("dps").to_pylist())))
    assert table is not None and table.num_rows == len(set(states.column("stock").to_pylist()))
    assert [dps[s] for s in table.column("state_id").to_pylist()] == table.column("T2Fragile__n_dps").to_pylist()
    assert "T2Fragile__failure" not in table.column_names  # without failures, the selection as it always was


# --------------------------------------------------------------------------------------------------
# on_error: record
# --------------------------------------------------------------------------------------------------


def test_recorded_failures_are_counted_shown_seen_by_t3_and_retried(archive, site, tmp_path):
    spec = json.loads(json.dumps(FRAGILE))
    spec["channels"][0]["t2"][1] = {"unit": "T2Fragile", "on_error": "record"}
    wf, store = write_workflow(tmp_path / "wf.yml", spec), tmp_path / "store"
    args = ["run", str(wf), "--archive", str(archive), "--store", str(store), "--workers", "0", "--json"]
    proc = cli(site, *args, fail=str(STOCK))
    assert proc.returncode == 0, proc.stderr[-3000:]

    all_a = set().union(*(ids(t) for t in state_files(store, "A").values()))
    bad = set().union(*(ids(t, STOCK) for t in state_files(store, "A").values()))
    k = len(bad)  # the poison object's states alone: the others of its batch are isolated from them
    assert k == 2
    out = last_json(proc)
    assert out["status"] == "ok"
    assert out["t2_units"]["T2Fragile"] == {"computed": len(all_a) - k, "reused": 0, "failed": k, "recorded": k}
    assert out["t2_units"]["T2FragileChild"] == {"computed": len(all_a) - k, "reused": 0, "failed": k, "recorded": k}  # the dependency's policy
    error = f"ValueError: fragile: 1 states, one of stocks {STOCK} among them"
    assert [(f["unit"], f["channels"], f["states"], f["policy"], f["recorded"], f["error"]) for f in out["failures"]] == [
        ("T2Fragile", ["A"], k, "record", k, error),
        ("T2FragileChild", ["A"], k, "record", k, f"its dependency T2Fragile failed on them: {error}"),
    ]
    assert f"T2 unit T2Fragile: computed {len(all_a) - k}, reused 0, failed {k} (recorded {k})" in proc.stderr
    assert f"failed {2 * k} (recorded {2 * k}, retried by the next run)" in proc.stderr

    s = ParquetStore(store)
    (key,) = [key for unit, key in s.t2_units() if unit == "T2Fragile"]
    done = set(s.done_state_ids("T2Fragile", key).tolist())
    assert done == all_a - bad  # a recorded failure is not "done"
    failures = s.read_t2_failures("T2Fragile", key)
    assert set(failures.column("state_id").to_pylist()) == bad and set(failures.column("code").to_pylist()) == {-1}

    info = json.loads(cli(site, "explain", POISON, "--store", str(store), "--json").stdout.strip().splitlines()[-1])
    shown = [t for t in info["t2"] if t["unit"] == "T2Fragile"]
    assert {t["state_id"] for t in shown} == hexes(bad) and all(t["code"] == -1 and t["recorded"] and t["failure"] == error for t in shown)
    text = cli(site, "explain", POISON, "--store", str(store)).stdout
    assert text.count("T2 T2Fragile v1") == k and text.count("FAILED (code -1, recorded; the next run retries it)") == 2 * k

    table = export(store, "A")  # T3 ran: the failed object is in its selection, flagged, without a result
    row = table.filter(pa.compute.equal(table.column("stock"), STOCK)).to_pylist()[0]
    assert row["T2Fragile__code"] == -1 and row["T2Fragile__n_dps"] is None and row["T2Fragile__failure"] == error
    assert row["T2FragileChild__code"] == -1 and row["T2FragileChild__twice"] is None
    others = table.filter(pa.compute.not_equal(table.column("stock"), STOCK))
    assert set(others.column("T2Fragile__code").to_pylist()) == {0} and others.column("T2Fragile__failure").null_count == others.num_rows

    again = cli(site, *args)  # fixed: the recorded states, and only they, are computed
    assert again.returncode == 0, again.stderr[-3000:]
    out2 = last_json(again)
    for unit in ("T2Fragile", "T2FragileChild"):
        assert out2["t2_units"][unit] == {"computed": k, "reused": len(all_a) - k, "failed": 0, "recorded": 0}
    assert set(s.done_state_ids("T2Fragile", key).tolist()) == all_a
    assert s.read_t2_failures("T2Fragile", key) is None  # the stage's failures are replaced by none
    info = json.loads(cli(site, "explain", POISON, "--store", str(store), "--json").stdout.strip().splitlines()[-1])
    assert {(t["state_id"], t["code"], t["body"]["n_dps"]) for t in info["t2"] if t["unit"] == "T2Fragile"} == {
        (bytes(sid).hex(), 0, len(d)) for sid, d in zip(*(ParquetStore(store).read_states("A", stock=STOCK).column(c).to_pylist() for c in ("state_id", "dps")))}
    table = export(store, "A")  # T3 again, now without failures: no failure column, every code 0
    assert "T2Fragile__failure" not in table.column_names and set(table.column("T2Fragile__code").to_pylist()) == {0}
    third = last_json(cli(site, *args))
    assert third["t2"]["computed"] == 0 and "nothing to compute" in third["note"]


# --------------------------------------------------------------------------------------------------
# a T2PointUnit: the same policy, per datapoint
# --------------------------------------------------------------------------------------------------


def test_a_point_unit_fails_the_run_or_records_its_datapoints(archive, site, tmp_path):
    spec = json.loads(json.dumps(FRAGILE))
    spec["channels"][0]["t2"] = ["T2FragilePoint"]
    spec["stage_rows"] = 1  # a T2 stage per work unit (not per month's group): the expected count below is per stage
    store = tmp_path / "store"
    args = ["run", str(write_workflow(tmp_path / "wf.yml", spec)), "--archive", str(archive), "--store", str(store), "--workers", "0", "--json"]
    proc = cli(site, *args, fail_dps="all")  # on_error: fail, every batch raises
    assert proc.returncode == 1, proc.stderr[-3000:]
    s = ParquetStore(store)
    files = {stem: s.read_states("A", [stem]) for stem in state_files(store, "A")}  # one T2 stage per work unit
    n = sum(len(contents(t)) for t in files.values())  # each stage gave the unit its distinct datapoints
    assert proc.stderr.strip().splitlines()[-1] == f"Error: run failed: T2 unit T2FragilePoint (channel A) failed on {n:,} datapoints: ValueError: fragile point: all"
    out = last_json(proc)
    assert out["status"] == "failed" and out["t2_units"]["T2FragilePoint"] == {"computed": 0, "reused": 0, "failed": n, "recorded": 0}
    assert [(f["unit"], f["channels"], f["datapoints"], f["policy"]) for f in out["failures"]] == [("T2FragilePoint", ["A"], n, "fail")]
    assert list(out["t3"]["not_run"]) == ["A"] and export(store, "A") is None and export(store, "B") is not None
    assert not list((store / "t2points").rglob("*.parquet")) and not list((store / "t2points_failed").rglob("*.parquet"))

    # on_error: record, one of the poison object's datapoints raises: it alone is recorded, in every copy
    spec["channels"][0]["t2"] = [{"unit": "T2FragilePoint", "on_error": "record"}]
    store = tmp_path / "store2"
    args = ["run", str(write_workflow(tmp_path / "wf.yml", spec)), "--archive", str(archive), "--store", str(store), "--workers", "0", "--json"]
    poison = [d["dp_id"] for t in files.values() for dps in t.filter(pa.compute.equal(t.column("stock"), STOCK)).column("dps").to_pylist() for d in dps]
    dp = next(i for i in sorted(set(poison)) if sum(bool(contents(t, i)) for t in files.values()) == 1)  # in one work unit only
    k = sum(len(contents(t, dp)) for t in files.values())
    assert 0 < k < n
    everything = set().union(*(contents(t) for t in files.values()))
    proc = cli(site, *args, fail_dps=str(dp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc)
    assert out["status"] == "ok" and out["t2_units"]["T2FragilePoint"]["failed"] == out["t2_units"]["T2FragilePoint"]["recorded"] == k
    assert out["t2_units"]["T2FragilePoint"]["computed"] == len(everything) - k  # stages in turn (--workers 0): a datapoint once
    error = f"ValueError: fragile point: dp_id {dp} among 1 datapoints"  # isolated by bisection
    assert [(f["unit"], f["channels"], f["datapoints"], f["policy"], f["recorded"], f["error"]) for f in out["failures"]] == [
        ("T2FragilePoint", ["A"], k, "record", k, error)]
    p = ParquetStore(store)
    (key,) = [key for unit, key in p.t2_point_failure_units() if unit == "T2FragilePoint"]
    failures = p.read_t2_point_failures("T2FragilePoint", key)
    assert failures.column("dp_id").to_pylist() == [dp] * k and set(failures.column("code").to_pylist()) == {-1}
    assert set(failures.column("failure").to_pylist()) == {error}
    assert not set(failures.column("point_id").to_pylist()) & set(p.done_point_ids("T2FragilePoint", key).tolist())  # not done
    assert export(store, "A") is not None  # recorded: T3 runs
    info = json.loads(cli(site, "explain", POISON, "--store", str(store), "--json").stdout.strip().splitlines()[-1])
    shown = [t for t in info["t2_points"] if t["dp_id"] == dp]
    assert len(shown) == k and all(t["code"] == -1 and t["recorded"] and t["failure"] == error for t in shown)
    text = cli(site, "explain", POISON, "--store", str(store)).stdout
    assert text.count(f"datapoint {dp}  T2 T2FragilePoint") == k and "FAILED (code -1, recorded; the next run retries it)" in text

    again = last_json(cli(site, *args))  # fixed: the recorded datapoints, and only they, are computed
    # (the other stages are skipped, their datapoints counted as reused from their markers)
    assert again["t2_units"]["T2FragilePoint"] == {"computed": k, "reused": n - k, "failed": 0, "recorded": 0} and again["failures"] == []
    assert p.read_t2_point_failures("T2FragilePoint", key) is None
    shown = [t for t in json.loads(cli(site, "explain", POISON, "--store", str(store), "--json").stdout.strip().splitlines()[-1])["t2_points"] if t["dp_id"] == dp]
    assert len(shown) == k and all(t["code"] == 0 and "failure" not in t for t in shown)


# --------------------------------------------------------------------------------------------------
# a failure and a channel's max_pass_ratio (its T3 held until the T0 counts are known)
# --------------------------------------------------------------------------------------------------


def test_a_guarded_channel_gets_no_t3_on_failed_states_and_a_run_ends_failed_or_stopped(archive, site, tmp_path):
    spec = json.loads(json.dumps(FRAGILE))
    spec["channels"][0].update(t2=["T2Fragile"], max_pass_ratio=1.0)  # within its limit: only the failure holds its T3
    store = tmp_path / "store"
    args = ["run", str(write_workflow(tmp_path / "wf.yml", spec)), "--archive", str(archive), "--store", str(store), "--workers", "0", "--json"]
    proc = cli(site, *args, fail=str(STOCK))
    assert proc.returncode == 1, proc.stderr[-3000:]
    (hit,) = [t for t in state_files(store, "A").values() if STOCK in t.column("stock").to_pylist()]
    n = len(ids(hit))
    reason = f"T2 unit T2Fragile (channel A) failed on {n:,} states: ValueError: fragile: {n} states, one of stocks {STOCK} among them"
    assert proc.stderr.strip().splitlines()[-1] == f"Error: run failed: {reason}"
    out = last_json(proc)
    assert out["status"] == "failed" and out["t3"]["not_run"] == {"A": reason} and "stopped" not in out
    assert export(store, "A") is None and export(store, "B") is not None

    # a limit the channel exceeds as well: the run fails, and its line says both
    spec["channels"][0]["max_pass_ratio"] = 0.01
    args[1] = str(write_workflow(tmp_path / "wf.yml", spec))
    proc = cli(site, *args, fail=str(STOCK))
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and line.startswith(f"Error: run failed: {reason}; and channel A passed ") and "max_pass_ratio" in line
    assert last_json(proc)["status"] == "failed"

    # the unit fixed, the limit exceeded: the run is stopped (exit 1), its manifest and `status` say so
    proc = cli(site, *args)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and line.startswith("Error: run stopped: channel A passed ") and "T3Export" in line
    out = last_json(proc)
    assert out["status"] == "stopped" and out["failures"] == [] and out["stopped"] == line.removeprefix("Error: run stopped: ")
    manifest = json.loads((store / "runs" / f"{out['run_id']}.json").read_text())
    assert manifest["status"] == "stopped" and manifest["stopped"] == out["stopped"]
    status = cli(site, "status", out["run_id"], "--store", str(store))
    assert f"run {out['run_id']}: stopped;" in status.stdout and out["stopped"] in status.stdout
    assert export(store, "A") is None


# --------------------------------------------------------------------------------------------------
# T0 filters and T3 units
# --------------------------------------------------------------------------------------------------


def test_a_filter_or_t3_unit_that_raises_fails_the_run_naming_unit_and_channels(archive, site, tmp_path):
    broken = {"unit": "ExpressionFilter", "config": {"expr": "object_id > 3"}}  # a string column compared with a number
    report = {"unit": "T3HtmlReport", "config": {"sort_by": "T2Nope__score"}}  # a column no T2 unit makes
    spec = {"name": "t0t3", "channels": [{"name": "A", "filters": [broken]}, {"name": "B", "filters": [broken], "t2": ["T2LightCurveSummary"]},
                                         {"name": "C", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 2"}}],
                                          "t3": [report]}]}  # fmt: skip
    store = tmp_path / "store"
    proc = cli(site, "run", str(write_workflow(tmp_path / "wf.yml", spec)), "--archive", str(archive), "--store", str(store), "--workers", "0", "--json")
    alerts = sum(pq.read_metadata(f).num_rows for f in archive.glob("survey=ztf/*/part-*.parquet"))
    assert proc.returncode == 1 and alerts == 100
    assert proc.stderr.strip().splitlines()[-1] == (f"Error: run failed: T0 filter ExpressionFilter (channels A, B) failed on {alerts} alerts: "
                                                    "TypeError: '>' not supported between instances of 'str' and 'int'")  # fmt: skip
    out = last_json(proc)
    assert out["status"] == "failed" and out["channels"]["A"] == {"passed": 0, "rejected": 0, "not_processed": alerts}
    assert json.loads((store / "runs" / f"{out['run_id']}.json").read_text())["status"] == "failed"

    spec["channels"][0]["filters"] = spec["channels"][1]["filters"] = [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 1"}}]
    proc = cli(site, "run", str(write_workflow(tmp_path / "wf.yml", spec)), "--archive", str(archive), "--store", str(store), "--workers", "0")
    table = pa.concat_tables([pq.read_table(f, columns=["stock", "ndet"]) for f in archive.glob("survey=ztf/*/part-*.parquet")])
    objects = len({s for s, n in zip(table.column("stock").to_pylist(), table.column("ndet").to_pylist()) if n >= 2})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (f"Error: run failed: T3 unit T3HtmlReport (channel C) failed on {objects} objects: ValueError: "
                                                    "T3HtmlReport: sort_by column 'T2Nope__score' is not in the selection; T2 columns present: (none)")  # fmt: skip
    assert "Traceback" not in proc.stderr


def test_a_filter_that_raises_in_a_channel_alone_fails_the_run_as_beside_others(archive, site, tmp_path):
    """A workflow's only channel reads, filters and builds states in one task per work unit: a filter
    that raises there fails the run with the same line as in its own task, at every batch size."""
    spec = {"name": "t0alone", "batch_rows": 30, "channels": [{"name": "A", "filters": [{"unit": "ExpressionFilter", "config": {"expr": "object_id > 3"}}]}]}
    proc = cli(site, "run", str(write_workflow(tmp_path / "wf.yml", spec)), "--archive", str(archive), "--store", str(tmp_path / "store"), "--workers", "0", "--json")
    alerts = sum(pq.read_metadata(f).num_rows for f in archive.glob("survey=ztf/*/part-*.parquet"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (f"Error: run failed: T0 filter ExpressionFilter (channel A) failed on {alerts} alerts: "
                                                    "TypeError: '>' not supported between instances of 'str' and 'int'")  # fmt: skip
    assert last_json(proc)["channels"]["A"] == {"passed": 0, "rejected": 0, "not_processed": alerts}


# --------------------------------------------------------------------------------------------------
# the workflow field, and the isolation of failed states
# --------------------------------------------------------------------------------------------------


def test_on_error_is_validated_with_its_line(tmp_path):
    spec = json.loads(json.dumps(FRAGILE))
    spec["channels"][0]["t2"][1] = {"unit": "T2Fragile", "on_error": "ignore"}
    text = yaml.safe_dump(spec, sort_keys=False)
    with pytest.raises(WorkflowError) as err:
        load_workflow(write_workflow(tmp_path / "wf.yml", spec))
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "on_error" in ln)
    assert f"wf.yml:{line}: channels[0].t2[1].on_error: Input should be 'fail' or 'record'" in str(err.value)
    spec = json.loads(json.dumps(FRAGILE))
    spec["channels"][0]["filters"][0]["on_error"] = "record"  # a T2 setting only: a filter that raises fails the run
    text = yaml.safe_dump(spec, sort_keys=False)
    with pytest.raises(WorkflowError) as err:
        load_workflow(write_workflow(tmp_path / "wf.yml", spec))
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "on_error" in ln)
    assert f"wf.yml:{line}: channels[0].filters[0].on_error: Extra inputs are not permitted" in str(err.value)


def test_dependencies_the_channel_does_not_list_take_the_policy_of_their_readers(site):
    """T2FragileChild reads T2Fragile: listed alone, its dependency gets its policy; listed too, its own."""
    from ampel_dask.graph.plan import plan_channel
    from ampel_dask.graph.workflow import ChannelSpec
    from ampel_dask.tiers.registry import installed

    units_env(site)  # the dist-info, found on sys.path as a package's would be
    sys.path.insert(0, str(site))
    try:
        assert "T2Fragile" in installed(refresh=True)

        def policies(t2: list) -> list[tuple[str, str]]:
            plan = plan_channel(ChannelSpec.model_validate({"name": "X", "t2": t2}), 0)
            return [(u.name(), plan.on_error[u.identity.key]) for u in plan.t2]

        child = {"unit": "T2FragileChild", "on_error": "record"}
        assert policies([child]) == [("T2Fragile", "record"), ("T2FragileChild", "record")]
        assert policies(["T2FragileChild"]) == [("T2Fragile", "fail"), ("T2FragileChild", "fail")]
        assert policies([child, "T2Fragile"]) == [("T2Fragile", "fail"), ("T2FragileChild", "record")]
        assert policies([child, {"unit": "T2FragileChild"}]) == [("T2Fragile", "fail"), ("T2FragileChild", "fail")]  # twice: fail wins
    finally:
        sys.path.remove(str(site))
        installed(refresh=True)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), data=st.data())
def test_bisection_isolates_the_failing_states(n, data):
    """``attempt`` against its definition: rows that worked never include a failing one, every row is
    in exactly one piece, the calls stay within budget, and up to 8 failing rows stand alone. With
    ``piece`` (rows per call), the first calls are the batch in order, ceil(n / piece) runs of rows."""
    bad = set(data.draw(st.lists(st.integers(0, n - 1), max_size=min(n, 12), unique=True)))
    piece = data.draw(st.none() | st.integers(1, 4000))
    first = -(-n // piece) if piece else 1
    calls = []

    def fn(rows: np.ndarray) -> pa.Table:
        calls.append(rows.tolist())
        if bad & set(rows.tolist()):
            raise ValueError(f"bad among {len(rows)}")
        return pa.table({"row": rows})

    ok, failed = attempt(fn, n, isolate=True, piece=piece)
    good = np.concatenate([r for r, _ in ok]) if ok else np.empty(0, int)
    worse = np.concatenate([r for r, *_ in failed]) if failed else np.empty(0, int)
    assert sorted([*good.tolist(), *worse.tolist()]) == list(range(n))  # each row once
    assert not bad & set(good.tolist()) and all(t.column("row").to_pylist() == r.tolist() for r, t in ok)
    assert len(calls) <= first + BISECT_CALLS * int(np.ceil(np.log2(max(n, 2))))
    assert all(len(c) <= (piece or n) for c in calls)
    if len(bad) <= 8:
        assert sorted(worse.tolist()) == sorted(bad) and all(len(r) == 1 for r, *_ in failed)
        assert all(e == "ValueError: bad among 1" for _, e, _ in failed)
    calls.clear()
    ok, failed = attempt(fn, n, isolate=False, piece=piece)  # on_error: fail: no bisection
    assert len(calls) == first and sum(calls, []) == list(range(n))  # runs of rows, in order
    assert sorted(len(c) for c in calls)[-1] <= (piece or n)
    assert [r.tolist() for r, *_ in failed] == [c for c in calls if bad & set(c)]
    assert [r.tolist() for r, _ in ok] == [c for c in calls if not bad & set(c)]


# --------------------------------------------------------------------------------------------------
# the stores: recorded failures apart from the results (Parquet and a real Mongo-wire server)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parquet", "mongo"])
def test_stores_keep_recorded_failures_apart_from_results(kind, request, archive, tmp_path):
    from ampel_dask.graph.provenance import with_provenance
    from ampel_dask.io.stores import FAILURE, UNIT_FAILED
    from ampel_dask.tiers.units.t2_summary import T2LightCurveSummary

    from .t2_helpers import archive_states

    if kind == "mongo":
        from ampel_dask.io.stores.mongo import MongoStore

        store = MongoStore(request.getfixturevalue("mongo").uri, request.getfixturevalue("mongo_db").name, tmp_path)
    else:
        store = ParquetStore(tmp_path / "pq")
    states = archive_states(archive).slice(0, 7)  # real states; ids as T1 made them
    sid = states.column("state_id").to_pylist()
    assert len(set(sid)) == 7
    unit = T2LightCurveSummary()
    key = unit.identity.key

    def failures(rows: list[int], error: str) -> pa.Table:
        body = pa.table({"code": pa.array([UNIT_FAILED] * len(rows), pa.int32()), FAILURE: pa.array([error] * len(rows))})
        return with_provenance(body, states.take(pa.array(rows, pa.int64())), unit, "run1")

    def failed(stock: int | None = None) -> dict[bytes, str]:
        t = store.read_t2_failures(unit.name(), key, stock=stock)
        return {} if t is None else dict(zip(t.column("state_id").to_pylist(), t.column(FAILURE).to_pylist()))

    store.write_t2(unit.name(), key, "s1", with_provenance(unit.process(states.slice(0, 5)), states.slice(0, 5), unit, "run1"))
    store.write_t2_failures(unit.name(), key, "s1", failures([5, 6], "ValueError: x"))
    assert set(store.done_state_ids(unit.name(), key).tolist()) == set(sid[:5])  # failures are not done
    assert failed() == {sid[5]: "ValueError: x", sid[6]: "ValueError: x"} and store.t2_failure_units() == [(unit.name(), key)]
    stocks = states.column("stock").to_pylist()
    assert failed(stock=stocks[5]) == {sid[i]: "ValueError: x" for i in (5, 6) if stocks[i] == stocks[5]}
    store.write_t2_failures(unit.name(), key, "s1", failures([6], "ValueError: y"))  # the stage again: its own are replaced
    assert failed() == {sid[6]: "ValueError: y"}
    store.write_t2_failures(unit.name(), key, "s2", failures([6], "ValueError: z"))  # another stage's stay: one row per state
    assert list(failed()) == [sid[6]]
    store.write_t2_failures(unit.name(), key, "s1", pa.table({}))
    store.write_t2_failures(unit.name(), key, "s2", pa.table({}))
    assert failed() == {} and set(store.done_state_ids(unit.name(), key).tolist()) == set(sid[:5])
    assert store.read_t2(unit.name(), key).num_rows == 5  # results untouched by all of it

    # a T2PointUnit's: the same, by datapoint content id, apart from its results and from the states'
    from ampel_dask.graph.points import flat_points
    from ampel_dask.graph.provenance import with_point_provenance
    from ampel_dask.tiers.units.t2_point import T2PointPhotometry

    flat, stock, pid, _ = flat_points(states)
    first = np.array(sorted({bytes(b): i for i, b in reversed(list(enumerate(pid)))}.values()))  # the first row of each content
    points = pa.table({f.name: flat.field(f.name).take(pa.array(first)) for f in flat.type})
    punit = T2PointPhotometry()
    pkey = punit.identity.key

    def point_failures(rows: list[int], error: str) -> pa.Table:
        body = pa.table({"code": pa.array([UNIT_FAILED] * len(rows), pa.int32()), FAILURE: pa.array([error] * len(rows))})
        return with_point_provenance(body, points.take(pa.array(rows, pa.int64())), pid[first][rows], stock[first][rows], punit, "run1")

    def point_failed() -> dict[bytes, str]:
        t = store.read_t2_point_failures(punit.name(), pkey)
        return {} if t is None else dict(zip(t.column("point_id").to_pylist(), t.column(FAILURE).to_pylist()))

    ok = list(range(len(first) - 2))
    store.write_t2_points(punit.name(), pkey, "s1", with_point_provenance(punit.process(points.take(pa.array(ok))), points.take(pa.array(ok)),
                                                                      pid[first][ok], stock[first][ok], punit, "run1"))  # fmt: skip
    store.write_t2_point_failures(punit.name(), pkey, "s1", point_failures([len(first) - 2, len(first) - 1], "ValueError: p"))
    ids_all = [bytes(i) for i in pid[first]]
    assert set(store.done_point_ids(punit.name(), pkey).tolist()) == set(ids_all[:-2])  # failures are not done
    assert point_failed() == {ids_all[-2]: "ValueError: p", ids_all[-1]: "ValueError: p"}
    assert store.t2_point_failure_units() == [(punit.name(), pkey)] and store.t2_failure_units() == [(unit.name(), key)]
    store.write_t2_point_failures(punit.name(), pkey, "s2", point_failures([len(first) - 1], "ValueError: q"))  # another stage: one row per id
    assert len(point_failed()) == 2
    store.write_t2_point_failures(punit.name(), pkey, "s1", pa.table({}))
    assert point_failed() == {ids_all[-1]: "ValueError: q"}
    store.write_t2_point_failures(punit.name(), pkey, "s2", pa.table({}))
    assert point_failed() == {} and store.read_t2_points(punit.name(), pkey).num_rows == len(first) - 2


def test_recorded_failures_are_retried_on_a_mongo_store(archive, site, mongo, mongo_db, monkeypatch, tmp_path):  # noqa: F811
    """The record/retry cycle on MongoDB (in this process, the test units registered as a package)."""
    from ampel_dask.api import open_store
    from ampel_dask.graph.explain import explain
    from ampel_dask.graph.runner import RunOptions, run_workflow
    from ampel_dask.graph.workflow import Workflow
    from ampel_dask.tiers.registry import installed

    spec = json.loads(json.dumps(FRAGILE))
    spec["channels"][0]["t2"][1] = {"unit": "T2Fragile", "on_error": "record"}
    uri = f"{mongo.uri.rstrip('/')}/{mongo_db.name}"
    wf = Workflow.model_validate({**spec, "store": {"kind": "mongo", "uri": mongo.uri, "database": mongo_db.name, "path": str(tmp_path / "files")}})
    opts = RunOptions(archive=str(archive), workers=0, progress=False)
    units_env(site)
    monkeypatch.syspath_prepend(str(site))
    installed(refresh=True)
    monkeypatch.setenv(FAIL_ENV, str(STOCK))
    first = run_workflow(wf, opts)
    info = explain(POISON, uri)
    bad = {s["state_id"] for s in info["states"] if s["channel"] == "A"}
    assert len(bad) == 2 and first["status"] == "ok"
    assert first["t2_units"]["T2Fragile"]["failed"] == first["t2_units"]["T2Fragile"]["recorded"] == len(bad)
    assert {t["state_id"] for t in info["t2"] if t["unit"] == "T2Fragile" and t.get("recorded")} == bad
    objects = open_store(uri).objects("A")  # the notebook view: as T3 sees them
    row = objects[objects["stock"] == STOCK].iloc[0]
    assert row["T2Fragile__code"] == -1 and row["T2Fragile__failure"].startswith("ValueError: fragile") and np.isnan(row["T2Fragile__n_dps"])
    assert set(objects[objects["stock"] != STOCK]["T2Fragile__code"]) == {0}
    monkeypatch.delenv(FAIL_ENV)
    second = run_workflow(wf, opts)
    assert second["t2_units"]["T2Fragile"] == {"computed": len(bad), "reused": first["t2_units"]["T2Fragile"]["computed"], "failed": 0, "recorded": 0}
    assert {(t["state_id"], t["code"]) for t in explain(POISON, uri)["t2"] if t["unit"] == "T2Fragile"} == {(s, 0) for s in bad}
    installed(refresh=True)
