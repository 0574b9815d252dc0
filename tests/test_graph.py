"""Workflows on real alerts: no repeated work, shared T2, incremental runs, worker loss, provenance."""

from __future__ import annotations

import json
import re
import shutil
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import yaml

from ampel_dask.graph.plan import check_columns, plan_workflow
from ampel_dask.graph.runner import RunOptions, run_workflow
from ampel_dask.io.stores import ParquetStore
from ampel_dask.graph.workflow import Workflow, WorkflowError, load_workflow
from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.graph.workers import WORKER_MALLOC

from .test_tiers import DECENT

TARBALLS = ["ztf/fink_ztf_public_20181129.tar.gz", "ztf/fink_basic_alerts_2023_2025.tar.gz"]
WORKFLOW = {
    "name": "test-multi",
    "channels": [
        {"name": "DECENT", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "DecentFilter", "config": DECENT}],
         "t2": ["T2LightCurveSummary"], "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"]}}]},
        {"name": "BRIGHT", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 2 and mag < 19"}}],
         "t2": ["T2LightCurveSummary"]},
        {"name": "FULLHIST", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 3"}}],
         "t1": {"unit": "T1Policy", "config": {"history": "archive"}}, "t2": ["T2LightCurveSummary"]},
    ],
}  # fmt: skip


def wf(**changes) -> Workflow:
    return Workflow.model_validate({**WORKFLOW, **changes})


def run(archive: Path, store: Path, workflow: Workflow | None = None, **kw) -> dict:
    return run_workflow(workflow or wf(), RunOptions(archive=str(archive), store=str(store), progress=False, **kw))


def t2_rows(store: Path) -> set[tuple]:
    """Every T2 result as (unit, state id, body...) without run-dependent provenance (run id, and
    which of several alerts with the same state happened to be computed first)."""
    s = ParquetStore(store)
    out = set()
    for unit, key in s.t2_units():
        t = s.read_t2(unit, key)
        body = [c for c in t.column_names if c not in ("run_id", "t2_key", "alert_id")]
        for r in t.select(body).to_pylist():
            out.add((unit, key, tuple((k, None if isinstance(v, float) and np.isnan(v) else v) for k, v in sorted(r.items()))))
    return out


def nan_free(value):
    """``value`` with every NaN float (also inside lists and structs) as None: comparable with ``==``."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, list):
        return [nan_free(v) for v in value]
    if isinstance(value, dict):
        return {k: nan_free(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("graph_archive")
    ingest([str(data_dir / t) for t in TARBALLS] + [str(data_dir / "ztf/pitt_google")], root, IngestOptions(workers=0, progress=False))
    return root


@pytest.fixture(scope="module")
def first_run(archive, tmp_path_factory) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("store")
    return store, run(archive, store, workers=0)


def test_counts_reconcile_and_manifest_has_provenance(first_run, archive):
    store, summary = first_run
    alerts = sum(p.rows for p in Archive(archive).partitions())
    assert summary["alerts"] == alerts == 810 + 367 + 100
    for name, c in summary["channels"].items():
        assert c["passed"] + c["rejected"] == alerts, name
        assert sum(summary["rejections"][name].values()) == c["rejected"]
    from ampel_dask.tiers.units.t0_filters import DecentFilter

    table = pa.concat_tables([Archive(archive).read(p) for p in Archive(archive).partitions()])
    assert summary["channels"]["DECENT"]["passed"] == DecentFilter(DECENT).verdict(table).accepted.sum() >= 22
    manifest = json.loads((store / "runs" / f"{summary['run_id']}.json").read_text())
    assert manifest["workflow_hash"] == wf().hash and manifest["ampel_dask"]
    assert {i["content_hash"] for i in manifest["inputs"]} == {p.content_hash for p in Archive(archive).partitions()}
    assert any(u["unit"] == "DecentFilter" and u["version"] for u in manifest["units"].values())
    s = ParquetStore(store)
    seen: set[str] = set()
    for unit, key in s.t2_units():
        t = s.read_t2(unit, key)
        for col in ("run_id", "unit_version", "config_hash", "state_id", "t2_key"):
            assert t.column(col).null_count == 0
        assert set(t.column("run_id").to_pylist()) == {summary["run_id"]}
        keys = t.column("t2_key").to_pylist()  # one key per (unit config, state), 128 bits: 32 hex digits
        assert len(set(keys)) == t.num_rows and all(len(k) == 32 and int(k, 16) >= 0 for k in keys)
        assert t.schema.field("state_id").type == pa.binary(16) and len(key) == 32  # 128-bit state and unit ids
        assert not seen & set(keys)
        seen |= set(keys)
    assert summary["t3"]["outputs"] == 1


def test_shared_t2_config_is_computed_once(first_run):
    store, summary = first_run
    s = ParquetStore(store)
    states = {c: set(s.read_states(c).column("state_id").to_pylist()) for c in ("DECENT", "BRIGHT", "FULLHIST")}
    union = set().union(*states.values())
    assert states["DECENT"] & states["BRIGHT"]  # the channels share states ...
    assert summary["t2"]["computed"] == len(union) < sum(len(v) for v in states.values())  # ... computed once
    (unit, key), = s.t2_units()
    assert s.read_t2(unit, key).num_rows == len(union)


def t2_row_counts(store: Path) -> Counter:
    """Every stored T2 row (without run-dependent provenance) with how often it is stored: a result
    written twice counts twice (a set would hide it)."""
    s = ParquetStore(store)
    out: Counter = Counter()
    for unit, key in s.t2_units():
        for f in s.t2_files(unit, key):
            t = pq.read_table(f)
            body = [c for c in t.column_names if c not in ("run_id", "t2_key", "alert_id")]
            out.update((unit, key, repr(sorted(r.items()))) for r in t.select(body).to_pylist())
    return out


def store_content(store: Path) -> dict:
    """What a store holds, run ids aside: T2 rows with multiplicity, each channel's states (every column,
    datapoints included), T3 members, finished-task markers."""
    s = ParquetStore(store)
    states = {c: sorted(repr(_nan_free(r)) for r in s.read_states(c).to_pylist()) for c in s.channels()}  # every column, datapoints too
    t3 = s.read_t3_objects()
    members = sorted(zip(*(t3.column(k).to_pylist() for k in ("channel", "unit", "t3_key", "stock", "state_id")))) if t3 is not None else []
    return {"t2": t2_row_counts(store), "states": states, "t3": members, "tasks": sorted(p.name for p in (store / "tasks").glob("*.json"))}


def _nan_free(v):
    """NaN as None, inside rows and datapoint lists (NaN != NaN would make equal states differ)."""
    if isinstance(v, dict):
        return {k: _nan_free(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_free(x) for x in v]
    return None if isinstance(v, float) and v != v else v


def test_rerun_computes_nothing_and_leaves_what_a_fresh_store_run_makes(first_run, archive, tmp_path):
    store, summary = first_run
    again = run(archive, store, workers=0)
    assert again["t2"]["computed"] == 0 and again["t2"]["reused"] == summary["t2"]["computed"] + summary["t2"]["reused"]
    assert again["tasks"] == 0 and "nothing to compute" in again["note"]
    assert again["channels"] == summary["channels"]
    fresh = tmp_path / "fresh"
    once = run(archive, fresh, workers=0)
    assert once["t2"]["computed"] == summary["t2"]["computed"]
    ran_twice, ran_once = store_content(store), store_content(fresh)
    assert ran_twice["states"].keys() == ran_once["states"].keys() == {"DECENT", "BRIGHT", "FULLHIST"}
    assert ran_twice == ran_once


def test_store_deleted_between_runs_in_one_process_is_computed_again(first_run, archive, tmp_path):
    """Workers cache which results exist; a store deleted while they live on must not count as done."""
    import shutil

    store = tmp_path / "store"
    first = run(archive, store, workers=0)
    shutil.rmtree(store)
    again = run(archive, store, workers=0)
    assert again["t2"]["computed"] == first["t2"]["computed"] > 0 and again["t2"]["reused"] == first["t2"]["reused"]
    assert t2_rows(store) == t2_rows(first_run[0])


def test_archive_with_histories_inside_parquet_gives_identical_results(first_run, archive, tmp_path, data_dir):
    """An archive of the earlier layout (history nested in each part's Parquet file, no history files,
    an index without their column) is read the same: identical states and T2 results."""
    import shutil

    import pyarrow.parquet as pq

    from ampel_dask.io.archive import INDEX, parquet_bytes

    old = tmp_path / "old_layout"
    shutil.copytree(archive, old)
    arch = Archive(old)
    for part in arch.partitions():
        assert part.dps and "dps" not in pq.read_schema(old / part.path).names  # the current layout
        table = arch.read(part)
        (old / part.dps).unlink()
        (old / part.path).write_bytes(parquet_bytes(table))
    pq.write_table(arch.index().drop_columns(["dps", "cutout_refs"]), old / INDEX)  # as written before either existed
    assert all(p.dps is None for p in arch.partitions())
    store = tmp_path / "store"
    summary = run(old, store, workers=0)
    assert summary["channels"] == first_run[1]["channels"]
    assert t2_rows(store) == t2_rows(first_run[0])
    for channel in ("DECENT", "FULLHIST"):
        a, b = ParquetStore(store).read_states(channel), ParquetStore(first_run[0]).read_states(channel)
        assert a.sort_by("state_id").equals(b.sort_by("state_id")), channel
    # a new night ingested into the old archive is written in the current layout beside the old parts
    report = ingest([str(data_dir / "ztf" / "fink_local_202001")], old, IngestOptions(workers=0, progress=False))
    assert report.ingested > 0
    parts = Archive(old).partitions()
    assert {p.dps is None for p in parts} == {True, False}
    again = run(old, store, workers=0)
    assert again["alerts"] == summary["alerts"] + report.ingested
    assert again["partitions"]["skipped"] == len([p for p in parts if p.dps is None])  # the old parts: done
    assert all(c["passed"] + c["rejected"] == again["alerts"] for c in again["channels"].values())


def test_history_channel_joins_archived_datapoints(first_run):
    """ZTF21abiuvdk (34 alerts): with history: archive a state holds datapoints older than its packet."""
    store, _ = first_run
    assert not (store / "_shuffle").exists(), "the history shuffle's scratch files outlive the run"
    s = ParquetStore(store)
    import pyarrow.parquet as pq

    files = sorted((store / "states" / "FULLHIST").glob("*.parquet"))
    assert files and all("dps" not in pq.read_schema(f).names and (f.parent / f"_dps-{f.name[:-8]}.arrow").exists() for f in files)
    full = s.read_states("FULLHIST")
    packet = s.read_states("BRIGHT")
    obj = pc.equal(full.column("object_id"), "ZTF21abiuvdk")
    fh = full.filter(obj)
    assert fh.num_rows > 10
    for mjd, dps in zip(fh.column("mjd").to_pylist(), fh.column("dps").to_pylist()):
        assert all(d["mjd"] <= mjd + 1e-6 for d in dps)  # never a later datapoint
    latest = fh.take([int(np.argmax(fh.column("mjd").to_numpy()))]).to_pylist()[0]
    pk = packet.filter(pc.equal(packet.column("alert_id"), latest["alert_id"])).to_pylist()
    span = lambda dps: max(d["mjd"] for d in dps) - min(d["mjd"] for d in dps)  # noqa: E731
    assert span(latest["dps"]) > 30 and (not pk or len(latest["dps"]) > len(pk[0]["dps"]))


def test_history_bucket_count_changes_no_state_or_result(first_run, archive, tmp_path):
    """A large selection gets more object buckets (a bucket's states are held by one task): the bucket
    count must change nothing a run gives. The archive keeps its history, so ``kept_history_bucket_rows``
    sets the count, not ``history_bucket_rows`` (the shuffle's). Oracle: the module's run with the
    default 16 buckets."""
    store16, _ = first_run
    rows = pq.read_table(archive / "_index.parquet", columns=["rows"]).column("rows").to_numpy().sum()  # the selection: every alert
    for w, buckets in ((wf(history_buckets=1), 1), (wf(history_buckets=1, history_bucket_rows=100, kept_history_bucket_rows=200), -(-int(rows) // 200))):
        store = tmp_path / f"b{buckets}"
        run(archive, store, w, workers=0)
        markers = [json.loads(p.read_text()) for p in (store / "tasks").glob("*.json")]
        assert sum(m.get("kind") == "t1h" for m in markers) == buckets > 0
        for ch in ("FULLHIST", "DECENT"):
            got, want = ParquetStore(store).read_states(ch), ParquetStore(store16).read_states(ch)
            key = lambda t: sorted(zip(t.column("alert_id").to_pylist(), t.column("state_id").to_pylist()))  # noqa: E731
            assert key(got) == key(want), (ch, buckets)
        assert t2_rows(store) == t2_rows(store16)


def test_history_states_and_results_do_not_depend_on_the_pieces_a_bucket_is_built_in(first_run, archive, tmp_path, monkeypatch):
    """A bucket's states built, and its T2 units called, on pieces of 5 alerts (``tasks.SLICE_ROWS``)
    change no state and no result. Oracle: the module's run, where each bucket is one piece."""
    import ampel_dask.graph.tasks as tasks

    store16, _ = first_run
    monkeypatch.setattr(tasks, "SLICE_ROWS", 5)  # in-process run (workers=0): every bucket in many pieces
    store = tmp_path / "sliced"
    run(archive, store, wf(), workers=0)
    for ch in ("FULLHIST", "DECENT"):
        got, want = ParquetStore(store).read_states(ch), ParquetStore(store16).read_states(ch)
        key = lambda t: sorted(zip(t.column("alert_id").to_pylist(), t.column("state_id").to_pylist()))  # noqa: E731
        assert key(got) == key(want), ch
        assert ch != "FULLHIST" or got.num_rows > 5 * 16  # buckets of more than one piece
    assert t2_rows(store) == t2_rows(store16)


def test_t2_stages_over_groups_of_work_units_change_no_state_or_result(first_run, archive, tmp_path):
    """The packet channels' T2 stages each compute the states of a group of work units
    (``stage_rows``): with each part its own work unit, grouped stages and one stage per work unit must
    give the same states and T2 results. Oracle: the module's run (a work unit per month)."""
    store1, _ = first_run
    markers = lambda store: [json.loads(p.read_text()) for p in (store / "tasks").glob("*.json")]  # noqa: E731
    months = len({p.night // 100 for p in Archive(archive).partitions()})
    packet_stages = {}
    for name, w in (("grouped", wf(batch_rows=1)), ("per_unit", wf(batch_rows=1, stage_rows=1))):
        store = tmp_path / name
        run(archive, store, w, workers=0)
        t1 = [m for m in markers(store) if m.get("kind") == "t1"]
        assert len(t1) == 2 * len(Archive(archive).partitions()) > 2 * months  # DECENT and BRIGHT: a T1 per part
        packet_stages[name] = sum(m.get("kind") == "t2" for m in markers(store)) - sum(m.get("kind") == "t1h" for m in markers(store))
        for ch in ("DECENT", "BRIGHT", "FULLHIST"):
            got, want = ParquetStore(store).read_states(ch), ParquetStore(store1).read_states(ch)
            key = lambda t: sorted(zip(t.column("alert_id").to_pylist(), t.column("state_id").to_pylist()))  # noqa: E731
            assert key(got) == key(want), (name, ch)
        assert t2_rows(store) == t2_rows(store1), name
    assert packet_stages == {"grouped": months, "per_unit": len(Archive(archive).partitions())}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ztf", "lsst"]), st.sampled_from([20240101, 20240115, 20240201, 20250101]), st.integers(1, 50)), max_size=30),
       st.integers(1, 120))  # fmt: skip
def test_stage_groups_are_maximal_runs_of_one_month_within_the_row_limit(parts, max_rows):
    """Checked against the definition: the groups, joined, are the work units in order; a group is
    one survey and month, within ``max_rows`` alerts unless it is one unit; and no group could have
    taken the next unit (same month, and still within the limit)."""
    from ampel_dask.graph.compile import WorkUnit, stage_groups
    from ampel_dask.io.archive import Partition

    units = [WorkUnit((Partition(s, n, f"p{i}", f"h{i}", r, 0.0, 1.0, 0, 1, None),)) for i, (s, n, r) in enumerate(parts)]
    groups = stage_groups(units, max_rows)
    month = lambda u: (u.parts[0].survey, u.parts[0].night // 100)  # noqa: E731
    assert [u for g in groups for u in g] == units and all(groups)
    for g in groups:
        assert len({month(u) for u in g}) == 1
        assert len(g) == 1 or sum(u.rows for u in g) <= max_rows
    for g, h in zip(groups, groups[1:]):
        assert month(g[-1]) != month(h[0]) or sum(u.rows for u in g) + h[0].rows > max_rows


def test_a_stage_grouping_new_and_finished_work_units_reads_the_finished_ones_states(tmp_path, data_dir):
    """A night added to a month joins the month's last T2 stage group: the finished work units' states
    come from the store (their T1 tasks do not run again: the second run's journal accepts only the
    new night's alerts), and the store ends as a run from scratch over the whole archive leaves it.
    Oracles: the alerts of each ingest (read with fastavro), and the scratch run."""
    files = sorted((data_dir / "ztf/pitt_google").rglob("*.avro"))
    jd = {f: next(fastavro.reader(open(f, "rb")))["candidate"]["jd"] for f in files}
    late = {f for f in files if jd[f] > 2459448.5}  # from 2021-08-20
    (tmp_path / "early").mkdir()
    for f in files:
        if f not in late:
            shutil.copy(f, tmp_path / "early" / f.name)
    late_ids = {next(fastavro.reader(open(f, "rb")))["candid"] for f in late}
    w = wf(channels=WORKFLOW["channels"][:2], batch_rows=1)  # each part its own work unit: the early ones stay as they are
    archive, store = tmp_path / "a", tmp_path / "s"
    ingest([str(tmp_path / "early")], archive, IngestOptions(workers=0, progress=False))
    first = run(archive, store, w, workers=0)
    ingest([str(f) for f in sorted(late)], archive, IngestOptions(workers=0, progress=False))
    months = {(p.night // 100) for p in Archive(archive).partitions()}
    early_months = {p.night // 100 for p in Archive(archive).partitions() if p.night < 20210820}
    assert months & early_months  # a month both nights' parts fall in: its stage group holds both
    second = run(archive, store, w, workers=0)
    journal = ParquetStore(store).read_journal()
    accepted = journal.filter(pc.and_(pc.equal(journal.column("run_id"), second["run_id"]), pc.equal(journal.column("tier"), 0)))
    assert accepted.num_rows and set(accepted.column("alert_id").to_pylist()) <= late_ids
    assert second["t2"]["reused"] >= first["t2"]["computed"] > 0
    scratch = tmp_path / "scratch"
    run(archive, scratch, w, workers=0)
    for channel in ("DECENT", "BRIGHT"):
        got = pq.read_table(store / "states" / channel, columns=["alert_id", "state_id"])
        fresh = pq.read_table(scratch / "states" / channel, columns=["alert_id", "state_id"])
        assert sorted(got.to_pylist(), key=str) == sorted(fresh.to_pylist(), key=str), channel
    assert t2_rows(store) == t2_rows(scratch)


def test_selection_holds_each_objects_latest_state_for_packet_and_history_channels(first_run):
    """T3's population, read set by set for a history channel (its states are large): each object's
    latest state (latest time, then alert id), against a plain-Python pass over every stored state."""
    from ampel_dask.graph.selection import latest_states

    store, _ = first_run
    s = ParquetStore(store)
    for ch, by_set in (("FULLHIST", True), ("FULLHIST", False), ("DECENT", False), ("DECENT", True)):
        keys = sorted(p.stem for p in (store / "states" / ch).glob("*.parquet"))
        want: dict[int, tuple] = {}
        for r in s.read_states(ch).select(["stock", "mjd", "alert_id", "state_id"]).to_pylist():
            if r["stock"] not in want or (r["mjd"], r["alert_id"]) > want[r["stock"]][:2]:
                want[r["stock"]] = (r["mjd"], r["alert_id"], r["state_id"])
        got = latest_states(s, ch, keys, by_set=by_set)
        assert got.column("stock").to_pylist() == sorted(want), (ch, by_set)
        assert got.column("state_id").to_pylist() == [want[k][2] for k in sorted(want)], (ch, by_set)
        assert len(keys) > 1 and got.column("dps").null_count == 0
        every = s.read_states(ch)  # each chosen state's datapoints are the stored state's own
        dps_of = dict(zip(every.column("state_id").to_pylist(), every.column("dps").to_pylist()))
        assert got.column("dps").to_pylist() == [dps_of[want[k][2]] for k in sorted(want)], (ch, by_set)
        light = latest_states(s, ch, keys, by_set=by_set, dps=False)  # without datapoints: all else the same
        assert light.equals(got.drop_columns(["dps"])), (ch, by_set)


def test_t3_selection_holds_datapoints_only_when_a_t3_unit_reads_them(first_run):
    """A channel's selection carries ``dps`` (for a history channel each object's whole light curve)
    only if one of its T3 units reads them; which units do is hand-checked from their configs."""
    from ampel_dask.graph.plan import ChannelPlan
    from ampel_dask.graph.selection import selection
    from ampel_dask.tiers.units.t3_export import T3Export
    from ampel_dask.tiers.units.t3_report import T3HtmlReport
    from ampel_dask.tiers.units.t3_webhook import T3Webhook

    reads = {
        T3Export({}): False, T3Export({"dps": "json"}): True, T3Export({"dps": "json", "include": ["stock"]}): False,
        T3Export({"dps": "json", "include": ["d*"]}): True, T3Export({"dps": "json", "exclude": ["dps"]}): False,
        T3Export({"include": ["dps"]}): False, T3Webhook({"url": "http://x"}): False,
        T3Webhook({"url": "http://x", "columns": ["*"]}): True, T3HtmlReport({"sort_by": "mjd"}): True,
    }  # fmt: skip
    assert {repr(u.config): u.reads_dps for u in reads} == {repr(u.config): want for u, want in reads.items()}
    # a report draws its top objects' light curves only: it reads some rows' datapoints, not all
    assert {repr(u.config): u.reads_all_dps for u in reads} == {repr(u.config): want and not isinstance(u, T3HtmlReport) for u, want in reads.items()}
    store, _ = first_run
    s = ParquetStore(store)
    base = plan_workflow(wf())
    for plan in base:
        keys = sorted(p.stem for p in (store / "states" / plan.name).glob("*.parquet"))
        sels = {}
        for n, t3 in enumerate(([T3Export({})], [T3Export({}), T3HtmlReport({"sort_by": "mjd"})], [T3Export({"dps": "json"})])):
            p = ChannelPlan(plan.name, plan.access, plan.filters, plan.t1, plan.t2, t3)
            sels[n] = selection(s, p, keys)
        assert "dps" not in sels[0].column_names and "dps" not in sels[1].column_names and "dps" in sels[2].column_names, plan.name
        assert sels[0].equals(sels[1]) and sels[0].equals(sels[2].drop_columns(["dps"])), plan.name


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_a_unit_reading_some_rows_datapoints_gets_those_of_the_whole_selection(first_run, tmp_path_factory, data):
    """``with_dps`` gives the rows asked for the datapoints a selection with every row's holds (the
    oracle: the selection read with ``dps``, as plain Python lists), null in the others; and a report
    run through ``run_t3`` on a selection without datapoints writes the same files as its ``react`` on
    the selection with them."""
    from ampel_dask.graph.plan import ChannelPlan
    from ampel_dask.graph.selection import selection, with_dps
    from ampel_dask.graph.tasks import run_t3
    from ampel_dask.tiers.base import T3Context
    from ampel_dask.tiers.units.t3_export import T3Export
    from ampel_dask.tiers.units.t3_report import T3HtmlReport

    store, _ = first_run
    s = ParquetStore(store)
    plan = plan_workflow(wf())[data.draw(st.sampled_from([0, 2]), label="channel")]  # DECENT (packet), FULLHIST (history)
    keys = sorted(p.stem for p in (store / "states" / plan.name).glob("*.parquet"))
    full = selection(s, ChannelPlan(plan.name, plan.access, plan.filters, plan.t1, plan.t2, [T3Export({"dps": "json"})]), keys)
    bare = full.drop_columns(["dps"])
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, full.num_rows - 1), max_size=40), label="rows")), dtype=np.int64)
    got = with_dps(s, plan.name, keys, bare, rows).column("dps").to_pylist()
    want = full.column("dps").to_pylist()
    assert [nan_free(got[i]) for i in range(full.num_rows)] == [nan_free(want[i]) if i in set(rows.tolist()) else None for i in range(full.num_rows)]
    top_n = data.draw(st.integers(1, 30), label="top_n")
    report = T3HtmlReport({"sort_by": "mjd", "top_n": top_n, "cutouts": False})
    out = tmp_path_factory.mktemp("report")
    report.react(full, T3Context(out_dir=out / "oracle", run_id="r", channel=plan.name))
    p = ChannelPlan(plan.name, plan.access, plan.filters, plan.t1, plan.t2, [report])
    shutil.copytree(store, out / "store")  # the run's store (its states), written to apart from the module's
    run_t3({"kind": "parquet", "path": str(out / "store")}, p, 0, "t3key", "r", bare, None, keys)
    def files(root: Path) -> dict:  # the pages say when they were written (to the minute): not compared
        return {f.relative_to(root): re.sub(rb"written \d{4}-\d\d-\d\d \d\d:\d\d UTC", b"", f.read_bytes())
                for f in root.rglob("*") if f.is_file() and f.name != "objects.parquet"}  # fmt: skip

    made, oracle = files(out / "store" / "t3" / plan.name / "t3key"), files(out / "oracle")
    assert made == oracle and any(str(f).endswith("_lc.svg") for f in made)


def test_a_selection_in_batches_is_the_whole_selection(first_run, tmp_path):
    """A selection of more than ``rows`` objects comes as batches of whole objects on scratch files
    (T2 results read once, file by file, each row sent to its batch): joined, they must be the
    selection read as one table, schema and labels included, also where a batch holds no result of a
    unit (result files removed from a copy of the store: those columns are nulls there). Oracle: the
    whole selection (checked against plain Python in the tests above)."""
    from ampel_dask.graph.selection import Batches, selection, selection_in_batches
    from ampel_dask.tiers.units.t3_export import T3Export

    store, _ = first_run
    rows = 3
    partial = tmp_path / "partial"  # the results of each channel's first batch of objects gone: null there
    shutil.copytree(store, partial)
    gone = set()
    for plan in plan_workflow(wf()):
        keys = sorted(p.stem for p in (store / "states" / plan.name).glob("*.parquet"))
        gone |= set(selection(ParquetStore(store), plan, keys).column("stock").to_pylist()[:rows])
    for f in sorted((partial / "t2").rglob("*.parquet")):
        t = pq.read_table(f)
        kept = t.filter(pc.invert(pc.is_in(t.column("stock"), pa.array(sorted(gone), t.schema.field("stock").type))))
        if kept.num_rows:
            pq.write_table(kept, f)
        else:
            f.unlink()
    for root in (store, partial):
        s = ParquetStore(root)
        for plan in plan_workflow(wf()):
            if plan.name == "BRIGHT":
                plan.t3.append(T3Export({"dps": "json"}))  # a T3 unit that reads every row's dps
            keys = sorted(p.stem for p in (root / "states" / plan.name).glob("*.parquet"))
            whole = selection(s, plan, keys)
            got = selection_in_batches(s, plan, keys, tmp_path / "scratch" / root.name / plan.name, rows=rows)
            assert isinstance(got, Batches) and whole.num_rows > 2 * rows, plan.name
            batches = list(got)
            assert [b.num_rows for b in batches] == [min(rows, whole.num_rows - i) for i in range(0, whole.num_rows, rows)]
            assert all(b.schema.equals(whole.schema, check_metadata=True) for b in batches), plan.name
            joined = pa.concat_tables(batches)
            for name in whole.column_names:  # (Arrow's equals treats NaN != NaN)
                assert nan_free(joined.column(name).to_pylist()) == nan_free(whole.column(name).to_pylist()), (root.name, plan.name, name)
                assert joined.column(name).is_null().equals(whole.column(name).is_null()), (root.name, plan.name, name)  # null is not NaN
            assert got.keys.equals(whole.select(["stock", "object_id", "state_id"])) and got.num_rows == whole.num_rows
            assert ("dps" in whole.column_names) == (plan.name == "BRIGHT")
            if root == partial:  # some batches were written without the unit's columns, and given them as nulls
                assert 0 < whole.column("T2LightCurveSummary__code").null_count < whole.num_rows
                assert any("T2LightCurveSummary__code" not in pa.ipc.open_file(f).schema.names for f in got.files), plan.name
    small = selection_in_batches(s, plan, keys, tmp_path / "small", rows=whole.num_rows)  # fits: one table, no scratch
    assert isinstance(small, pa.Table) and not (tmp_path / "small").exists()


def _spread_selection(spec: dict, plan, keys: list[str], scratch: str, rows: int):
    """What the selection task does on a worker, with batches of ``rows`` objects."""
    from ampel_dask.graph.selection import selection_in_batches
    from ampel_dask.io.stores import open_store

    return selection_in_batches(open_store(spec), plan, keys, scratch, rows=rows, spec=spec)


def test_a_selection_spread_over_a_cluster_is_the_whole_selection(first_run, tmp_path, monkeypatch):
    """A large selection's steps are tasks on the cluster (``cluster_map``): each group of state sets'
    latest states, each share of a unit's T2 results, each batch's join. Submitted to 2 workers with
    batches of 3 objects, its batches must be the selection read as one table in this process, and
    its steps must have run as tasks on both workers. In-process, with 1 or 2 sets per group, the
    latest states must be those read set after set (ties across groups go to the same row). Oracle:
    the whole selection and ``latest_states`` (checked against plain Python in the tests above)."""
    from distributed import Client, get_task_stream

    from ampel_dask.graph import selection as S
    from ampel_dask.graph.workers import local_cluster
    from ampel_dask.io.stores import store_spec

    store, _ = first_run
    s = ParquetStore(store)
    plans = plan_workflow(wf())
    keys = {p.name: sorted(f.stem for f in (store / "states" / p.name).glob("*.parquet")) for p in plans}
    per_task = S.SETS_PER_TASK  # the workers' (the patches below are this process's)
    assert all(len(k) >= 2 for k in keys.values()) and max(map(len, keys.values())) > 2  # groups of 1 or 2 sets are not one group
    for per in (1, 2):
        monkeypatch.setattr(S, "SETS_PER_TASK", per)
        for plan in plans:
            scratch = tmp_path / f"groups-{per}" / plan.name
            scratch.mkdir(parents=True)
            got = S._spread_states(s, s, plan, keys[plan.name], scratch)
            want = S.latest_states(s, plan.name, keys[plan.name], by_set=plan.history, dps=any(u.reads_dps for u in plan.t3))
            assert got.schema.equals(want.schema) and nan_free(got.to_pylist()) == nan_free(want.to_pylist()), (per, plan.name)
            assert not list(scratch.iterdir())  # the groups' files went once read
    with local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client, get_task_stream(client) as ts:
        for plan in plans:
            whole = S.selection(s, plan, keys[plan.name])
            got = client.submit(_spread_selection, store_spec(store), plan, keys[plan.name], str(tmp_path / "c" / plan.name), 3, pure=False).result()
            assert isinstance(got, S.Batches) and len(got.files) > 2, plan.name
            joined = pa.concat_tables(list(got))
            assert joined.schema.equals(whole.schema, check_metadata=True), plan.name
            assert nan_free(joined.to_pylist()) == nan_free(whole.to_pylist()), plan.name
    steps = Counter((d["key"] if isinstance(d["key"], str) else d["key"][0]).split("-")[0] for d in ts.data)
    units = sum(len([u for u in p.t2]) for p in plans)
    groups = sum(-(-len(k) // per_task) for k in keys.values() if len(k) > per_task)  # one group: read in the task
    assert groups and steps["_group_latest"] == groups, steps
    assert steps["_scatter_t2"] == units * S.SHARES and steps["_join_batch"] > 2 * len(plans), steps
    assert len({d["worker"] for d in ts.data if not str(d["key"]).startswith("_spread_selection")}) == 2
    # sets of fewer states than a batch holds are read in the selection's own task: no step on the cluster
    for plan in plans:
        states = sum(pq.read_metadata(store / "states" / plan.name / f"{k}.parquet").num_rows for k in keys[plan.name])
        assert S._states_in(s, keys[plan.name]) == states  # the T1 markers' counts, against the files' row counts
    with local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client, get_task_stream(client) as ts:
        for plan in plans:
            got = client.submit(_spread_selection, store_spec(store), plan, keys[plan.name], str(tmp_path / "one" / plan.name), 10**6, pure=False).result()
            whole = S.selection(s, plan, keys[plan.name])
            assert got.schema.equals(whole.schema, check_metadata=True) and nan_free(got.to_pylist()) == nan_free(whole.to_pylist()), plan.name
    assert {(d["key"] if isinstance(d["key"], str) else d["key"][0]).split("-")[0] for d in ts.data} == {"_spread_selection"}


def test_t3_over_a_selection_in_batches_exports_what_one_table_does(first_run, archive, tmp_path, monkeypatch):
    """A run whose selections come in batches of 3 objects (``selection.SELECTION_ROWS``): T3Export
    writes them batch by batch, and its file and the T3 objects must be the module's run's, whose
    selection was one table (metamorphic)."""
    import ampel_dask.graph.selection as selection

    store16, summary16 = first_run
    monkeypatch.setattr(selection, "SELECTION_ROWS", 3)  # in-process run (workers=0)
    summary = run(archive, tmp_path / "b", wf(), workers=0)
    (got,), (want,) = summary["t3_outputs"], summary16["t3_outputs"]
    got, want = pq.read_table(got), pq.read_table(want)
    assert got.num_rows > 2 * 3 and pq.ParquetFile(summary["t3_outputs"][0]).metadata.num_row_groups > 2  # written in batches
    assert got.schema.equals(want.schema, check_metadata=True)
    assert nan_free(got.to_pylist()) == nan_free(want.to_pylist())
    objects = lambda root: sorted(ParquetStore(root).read_t3_objects().drop_columns(["run_id"]).to_pylist(), key=str)  # noqa: E731
    assert objects(tmp_path / "b") == objects(store16)
    assert not (tmp_path / "b" / "_shuffle").exists()  # the batches' scratch files went with the run


def test_adding_a_night_computes_only_new_states(tmp_path, data_dir):
    archive, store = tmp_path / "a", tmp_path / "s"
    ingest([str(data_dir / TARBALLS[0])], archive, IngestOptions(workers=0, progress=False))
    w = wf(channels=WORKFLOW["channels"][:2])
    first = run(archive, store, w, workers=0)
    ingest([str(data_dir / TARBALLS[1])], archive, IngestOptions(workers=0, progress=False))
    second = run(archive, store, w, workers=0)
    s = ParquetStore(store)
    all_states = set().union(*(set(s.read_states(c).column("state_id").to_pylist()) for c in ("DECENT", "BRIGHT")))
    assert second["t2"]["reused"] == first["t2"]["computed"]
    assert second["t2"]["computed"] == len(all_states) - first["t2"]["computed"] > 0
    assert second["partitions"]["skipped"] == len(first_run_parts(archive, TARBALLS[0]))


def test_a_night_added_inside_a_month_leaves_one_state_per_alert(tmp_path, data_dir):
    """A night added to a month already run changes that month's work unit (and every history bucket):
    their states are written anew under new keys. The copies they replace are removed, so the store
    holds what a run from scratch over the whole archive holds: one state per alert and channel."""
    files = sorted((data_dir / "ztf/pitt_google").rglob("*.avro"))
    late = {f for f in files if next(fastavro.reader(open(f, "rb")))["candidate"]["jd"] > 2459448.5}  # from 2021-08-20
    assert 0 < len(late) < len(files)
    (tmp_path / "early").mkdir()
    for f in files:
        if f not in late:
            shutil.copy(f, tmp_path / "early" / f.name)
    archive, store = tmp_path / "a", tmp_path / "s"
    ingest([str(tmp_path / "early")], archive, IngestOptions(workers=0, progress=False))
    run(archive, store, workers=0)
    ingest([str(f) for f in sorted(late)], archive, IngestOptions(workers=0, progress=False))
    second = run(archive, store, workers=0)
    manifest = json.loads((store / "runs" / f"{second['run_id']}.json").read_text())
    assert manifest["superseded_state_sets"].get("FULLHIST", 0) > 0 and manifest["superseded_state_sets"].get("BRIGHT", 0) > 0
    scratch = tmp_path / "scratch"
    run(archive, scratch, workers=0)
    for channel in ("DECENT", "BRIGHT", "FULLHIST"):
        states = pq.read_table(store / "states" / channel, columns=["alert_id", "state_id"])  # as any Parquet reader sees it
        assert len(set(states.column("alert_id").to_pylist())) == states.num_rows, channel
        fresh = pq.read_table(scratch / "states" / channel, columns=["alert_id", "state_id"])
        assert sorted(states.to_pylist(), key=str) == sorted(fresh.to_pylist(), key=str), channel


def test_manifest_names_the_parts_a_history_join_read_beyond_the_selection(archive, tmp_path):
    nights = {"from": 20210901, "to": 20210930}
    w = wf(archive={"nights": nights}, channels=[WORKFLOW["channels"][2]])
    summary = run(archive, tmp_path / "s", w, workers=0)
    manifest = json.loads((tmp_path / "s" / "runs" / f"{summary['run_id']}.json").read_text())
    selected = {p["path"] for p in manifest["inputs"]}
    extra = {p["path"]: p["content_hash"] for p in manifest["history_inputs"]}
    assert selected and extra and not selected & set(extra)
    assert all(p.content_hash == extra[p.path] for p in Archive(archive).partitions() if p.path in extra)
    assert any(p.night < 20210901 for p in Archive(archive).partitions() if p.path in extra)


def first_run_parts(archive: Path, tarball: str) -> list:
    return [p for p in Archive(archive).partitions() if p.night == 20181129]


def unit_alerts(archive: Path, batch_rows: int) -> set[frozenset]:
    """The alert ids each work unit reads (how the graph splits the work)."""
    from ampel_dask.graph.compile import work_units

    arch = Archive(archive)
    return {frozenset(i for p in u.parts for i in arch.read(p, ["alert_id"]).column("alert_id").to_pylist())
            for u in work_units(arch.partitions(), batch_rows)}  # fmt: skip


def test_results_identical_with_1_and_2_workers_and_other_partition_sizes(first_run, archive, tmp_path, data_dir):
    store1, _ = first_run
    small = tmp_path / "small_parts"
    ingest([str(data_dir / t) for t in TARBALLS] + [str(data_dir / "ztf/pitt_google")], small, IngestOptions(workers=0, progress=False, chunk_packets=150, compact_rows=0))  # parts as chunked
    assert len(Archive(small).partitions()) > len(Archive(archive).partitions())
    # smaller parts, and read 64 alerts at a time instead of 10,000: other work units, more of them
    default, split = unit_alerts(archive, WORKFLOW.get("batch_rows", 10_000)), unit_alerts(small, 64)
    assert len(split) > len(default) and split != default and set().union(*split) == set().union(*default)
    for workers, src, w in ((1, archive, wf()), (2, small, wf(batch_rows=64))):
        store = tmp_path / f"store{workers}"
        summary = run(src, store, w, workers=workers)
        assert t2_row_counts(store) == t2_row_counts(store1), (workers, src)
        assert summary["channels"] == first_run[1]["channels"]
        manifest = json.loads((store / "runs" / f"{summary['run_id']}.json").read_text())
        assert len(manifest["workers"]) == workers and all(w["malloc"] == WORKER_MALLOC for w in manifest["workers"])  # graph/workers.py
        assert all(w["profiler"] is False for w in manifest["workers"])  # QUIET: no 100 Hz stack sampling


def test_a_channel_alone_runs_one_task_per_work_unit_and_gives_what_it_gives_beside_others(first_run, archive, tmp_path):
    """DECENT alone: a work unit's read, T0 and T1 are one task (no read or t0 task in its graph). Its
    counts, states and T2 results are those of the first run, where it shared each work unit's read
    with two other channels in tasks of their own."""
    from ampel_dask.graph.compile import compile_run, work_units
    from ampel_dask.keys import READ, T0, T1, stage_of

    store1, summary1 = first_run
    alone = wf(channels=[WORKFLOW["channels"][0]])
    arch = Archive(archive)
    graph = compile_run(plan_workflow(alone), arch, arch.partitions(), ParquetStore(tmp_path / "empty"), "r").graph
    kinds = Counter(stage_of(k) for k, v in graph.items() if isinstance(v, tuple))
    assert kinds[READ] == kinds[T0] == 0 and kinds[T1] == len(work_units(arch.partitions(), alone.batch_rows)) > 1
    summary = run(archive, tmp_path / "store", alone, workers=0)
    assert summary["channels"]["DECENT"] == summary1["channels"]["DECENT"]
    ids = lambda store: sorted(ParquetStore(store).read_states("DECENT", columns=["state_id"]).column("state_id").to_pylist())  # noqa: E731
    assert ids(tmp_path / "store") == ids(store1) and ids(store1)
    rows = t2_rows(tmp_path / "store")
    assert rows and rows <= t2_rows(store1)  # the first run also has the other channels' states
    assert {dict(r[2])["state_id"] for r in rows} == set(ids(store1))


def test_catalog_units_run_on_workers_and_a_rebuilt_catalog_is_not_reused(archive, tmp_path):
    """DecentFilter's Gaia veto and T2CatalogMatch run on a worker process (their catalog travels as path +
    content hash), and a catalog rebuilt at the same path gives new T0 and T2 keys: the veto's new
    verdicts and new matches, nothing reused from the old catalog."""
    from ampel_dask.tiers.catalog import build_catalog

    parts = Archive(archive).partitions()
    alerts = pa.concat_tables([pq.read_table(f"{archive}/{p.path}", columns=["ra", "dec"]) for p in parts])
    gaia = {"ra": alerts.column("ra").to_numpy()[::2], "dec": alerts.column("dec").to_numpy()[::2]}  # on every other alert
    m = len(gaia["ra"])
    path = tmp_path / "gaia.parquet"

    def catalog(version: int) -> None:
        """version 0: no source is a star; 1: every other one is (significant parallax), new source ids"""
        zeros, ones = np.zeros(m), np.ones(m)
        plx = np.where(np.arange(m) % 2 == 0, 10.0 * version, 0.0)
        build_catalog(pa.table({**gaia, "source_id": np.arange(m) + version * 10**6, "Mag_G": np.full(m, 15.0), "PMRA": zeros, "ErrPMRA": ones,
                                "PMDec": zeros, "ErrPMDec": ones, "Plx": plx, "ErrPlx": ones, "ExcessNoiseSig": zeros}), path)  # fmt: skip

    w = wf(channels=[{"name": "GAIA", "access": ["ZTF_PUB", "ZTF_PRIV"], "filters": [{"unit": "DecentFilter", "config": {**DECENT, "gaia_rs": 2, "gaia_catalog": str(path)}}],
                      "t2": [{"unit": "T2CatalogMatch", "config": {"catalog": str(path), "radius_arcsec": 1, "columns": ["source_id"]}}]}])  # fmt: skip
    catalog(0)
    first = run(archive, tmp_path / "store", w, workers=1)
    catalog(1)
    second = run(archive, tmp_path / "store", w, workers=1)
    assert 0 < second["channels"]["GAIA"]["passed"] < first["channels"]["GAIA"]["passed"]  # the new catalog's stars are vetoed
    assert first["t2"]["computed"] > 0 and second["t2"]["computed"] > 0 and second["t2"]["reused"] == 0
    s = ParquetStore(tmp_path / "store")
    res = [s.read_t2("T2CatalogMatch", key) for _, key in s.t2_units()]
    ids = sorted((set(t.column("cat_source_id").drop_null().to_pylist()) for t in res), key=min)
    assert len(ids) == 2 and max(ids[0]) < 10**6 <= min(ids[1])  # each run's matches come from its own catalog


def test_workers_get_the_malloc_settings_after_a_plain_cluster_in_this_process():
    """distributed copies its MALLOC_TRIM_THRESHOLD_ into the starting process's environment and reads
    the environment over its config: a plain LocalCluster started first must not undo ours."""
    from distributed import Client, LocalCluster

    from ampel_dask.graph.workers import local_cluster

    with LocalCluster(n_workers=1, processes=True, dashboard_address=None):
        pass
    with local_cluster(1, dashboard_address=None) as cluster, Client(cluster) as client:
        seen = client.run(lambda: {k: os.environ.get(k) for k in WORKER_MALLOC})
    assert list(seen.values()) == [WORKER_MALLOC]


def test_cluster_profile_option_keeps_the_worker_profiler(archive, tmp_path):
    """Workers run without Dask's profiler unless the workflow asks for it (cluster.profile)."""
    for profile in (False, True):
        summary = run(archive, tmp_path / f"store{profile}", wf(cluster={"workers": 1, "profile": profile}, channels=WORKFLOW["channels"][:1]))
        manifest = json.loads((tmp_path / f"store{profile}" / "runs" / f"{summary['run_id']}.json").read_text())
        assert [w["profiler"] for w in manifest["workers"]] == [profile]


def test_worker_killed_mid_run_still_completes_identically(tmp_path, data_dir):
    from distributed import Client, LocalCluster

    archive = tmp_path / "elasticc"
    ingest([str(data_dir / "lsst/elasticc_v0_9_alerce.tar.gz")], archive, IngestOptions(workers=0, progress=False))
    w = Workflow.model_validate({"name": "elasticc", "archive": {"nights": {"from": 20220101, "to": 20220731}}, "batch_rows": 1, "channels": [
        {"name": "ALL", "access": ["LSST"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 2"}}], "t2": ["T2LightCurveSummary"]}]})  # fmt: skip
    reference = run(archive, tmp_path / "ref", w, workers=0)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(run(archive, tmp_path / "killed", w, client=client)))
        t.start()
        tasks_dir = tmp_path / "killed" / "tasks"
        deadline = time.time() + 120
        while time.time() < deadline and len(list(tasks_dir.glob("*.json"))) < 40:
            time.sleep(0.05)
        victim = next(iter(cluster.workers.values())).process.process.pid
        assert t.is_alive(), "the run finished before a worker could be killed"
        os.kill(victim, signal.SIGKILL)
        t.join(timeout=300)
    assert not t.is_alive() and result, "the run did not complete after a worker was killed"
    assert reference["partitions"]["total"] > 80
    assert result["channels"] == reference["channels"]
    assert t2_rows(tmp_path / "killed") == t2_rows(tmp_path / "ref")


def test_paused_workers_fail_the_run_with_the_reason_and_a_rerun_completes(first_run, archive, tmp_path):
    """A worker near its memory limit pauses; when no worker can run for stall_timeout seconds the run
    fails with a reason instead of waiting for ever, and a later run on a healthy cluster completes."""
    import dask
    from distributed import Client, LocalCluster
    from distributed.core import Status

    from ampel_dask.graph.watchdog import StalledRun, Watchdog

    w = wf(cluster={"stall_timeout": 2})
    # the worker's memory monitor would resume a worker that is in fact far below its limit: off here
    no_auto_resume = dask.config.set({"distributed.worker.memory.pause": False})
    with no_auto_resume, LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        async def set_status(dask_worker, status):  # in the worker's event loop, as its memory monitor does
            dask_worker.status = status

        client.run(set_status, status=Status.paused)  # what a worker does above 80% of its memory limit
        deadline = time.monotonic() + 10
        while Watchdog(client, [], None).workers_state()[1] != {"paused": 1} and time.monotonic() < deadline:
            time.sleep(0.05)
        t = time.monotonic()
        with pytest.raises(StalledRun, match=r"2 s \(1 paused\).*memory limit"):
            run(archive, tmp_path / "store", w, client=client)
        assert time.monotonic() - t < 60
        client.run(set_status, status=Status.running)
        summary = run(archive, tmp_path / "store", w, client=client)
    assert summary["channels"] == first_run[1]["channels"]
    assert t2_rows(tmp_path / "store") == t2_rows(first_run[0])


def test_t3_waits_for_its_own_channel_only(archive, tmp_path):
    """A channel's T3 depends on the tasks that write its states and T2 results: without any T2 unit it
    waits for its T1 tasks, and a packet channel's T3 does not wait for another channel's history join."""
    from ampel_dask.graph.compile import compile_run
    from ampel_dask.graph.plan import plan_workflow
    from ampel_dask.io.stores import open_store

    export = {"unit": "T3Export", "config": {"formats": ["parquet"]}}
    arch = Archive(archive)

    def t3_deps(w: Workflow, channel: str) -> tuple[set[str], dict]:
        run = compile_run(plan_workflow(w), arch, arch.partitions(), open_store({"kind": "parquet", "path": str(tmp_path / "s")}), "r", 4, 100)
        (key,) = [k for k, v in run.graph.items() if k.startswith("t3-") and isinstance(v, tuple) and run.graph[v[2]].name == channel]
        sel = run.graph[key][6]  # the channel's selection, shared by its T3 units
        return set(run.graph[sel][5:]), run  # after the scratch folder of a large selection

    only = wf(channels=[{**WORKFLOW["channels"][1], "name": "NO_T2", "t2": [], "t3": [export]}])
    deps, run = t3_deps(only, "NO_T2")
    assert deps == {f"t1-{n}" for n in run.t1_names["NO_T2"]}
    deps, run = t3_deps(wf(channels=[{**WORKFLOW["channels"][0], "t3": [export]}, WORKFLOW["channels"][2]]), "DECENT")
    from ampel_dask.graph.tasks import run_t1_history  # a history bucket's T2 stage builds its states in the same task

    hist_stages = {k for k, v in run.graph.items() if k.startswith("t2-") and isinstance(v, tuple)
                   and any(isinstance(a, tuple) and a[:1] == (run_t1_history,) for a in v)}  # fmt: skip
    assert deps and hist_stages and not deps & hist_stages
    run_workflow(only, RunOptions(archive=str(archive), store=str(tmp_path / "store"), progress=False, workers=0))
    s = ParquetStore(tmp_path / "store")
    assert s.read_t3_objects().num_rows == len(set(s.read_states("NO_T2").column("stock").to_pylist())) > 0


def test_explain_a_real_object(first_run):
    store, summary = first_run
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "explain", "ZTF21abiuvdk", "--store", str(store), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["object"] == "ZTF21abiuvdk" and len(info["alerts"]) == 34
    assert info["states"] and all(summary["run_id"] in s["runs"] for s in info["states"] if s["channel"] == "BRIGHT")
    state_ids = {s["state_id"] for s in info["states"]}
    assert info["t2"] and {t["state_id"] for t in info["t2"]} <= state_ids
    assert all(t["run_id"] == summary["run_id"] and t["unit"] == "T2LightCurveSummary" for t in info["t2"])
    text = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "explain", "ZTF21abiuvdk", "--store", str(store)], capture_output=True, text=True).stdout
    assert "alerts: 34" in text and "T2 T2LightCurveSummary" in text
    wrong = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "explain", "ZTF21abiuvdk", "--store", str(store / "nope")], capture_output=True, text=True)
    assert wrong.returncode == 2 and "no result store here" in wrong.stderr  # not "alerts: 0" as if never processed


def test_run_command_json_and_bad_workflow_errors(first_run, archive, tmp_path):
    store, _ = first_run
    path = tmp_path / "wf.yml"
    path.write_text(yaml.safe_dump(WORKFLOW, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "run", str(path), "--archive", str(archive), "--store", str(store), "--json", "--workers", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) >= {"run_id", "alerts", "channels", "t2", "t3", "tasks", "seconds"} and out["t2"]["computed"] == 0
    bad = yaml.safe_dump(WORKFLOW, sort_keys=False).replace("min_gal_lat: 14", "min_gal_lat: fourteen").replace("name: BRIGHT", "name: BRIGHT\n  colour: blue")
    path.write_text(bad)
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    line = next(i for i, ln in enumerate(bad.splitlines(), 1) if "colour" in ln)
    assert f"wf.yml:{line}: channels[1].colour" in str(err.value)
    fixed = bad.replace("  colour: blue\n", "")
    with pytest.raises(WorkflowError) as err:  # a unit's own config: validated at planning, still with its line
        run_workflow(load_workflow_text(path, fixed), RunOptions(archive=str(archive), store=str(store)))
    gal = next(i for i, ln in enumerate(fixed.splitlines(), 1) if "min_gal_lat" in ln)
    assert f"wf.yml:{gal}: channels[0] (DECENT).filters[0].config.min_gal_lat: Input should be a valid number" in str(err.value), err.value
    path.write_text(bad)
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "run", str(path), "--archive", str(archive)], capture_output=True, text=True)
    assert proc.returncode == 2 and f"wf.yml:{line}: channels[1].colour" in proc.stderr


def test_unit_failures_are_one_line_errors(archive, tmp_path):
    """A model file that is not there fails at planning and names the field (exit 2); a filter that fails
    on the data fails the run with the unit's own reason in one line, no traceback of ours (exit 1)."""
    path = tmp_path / "wf.yml"
    missing = {"name": "m", "channels": [{"name": "A", "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 2"}}],
                                          "t2": [{"unit": "T2Classifier", "config": {"model": str(tmp_path / "nope.joblib")}}]}]}  # fmt: skip
    path.write_text(yaml.safe_dump(missing))
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "run", str(path), "--archive", str(archive), "--store", str(tmp_path / "s")], capture_output=True, text=True)
    assert proc.returncode == 2 and "channels[0] (A).t2[0] (T2Classifier): FileNotFoundError" in proc.stderr, proc.stderr
    unknown = {"name": "u", "channels": [{"name": "A", "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 2 and nosuchcol > 1"}}]}]}
    text = yaml.safe_dump(unknown, sort_keys=False)
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "run", str(path), "--archive", str(archive), "--store", str(tmp_path / "s"), "--workers", "0"], capture_output=True, text=True)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "config:" in ln)  # a column no survey has: before the run starts
    assert proc.returncode == 2 and f"wf.yml:{line}: channels[0] (A).filters[0]: ExpressionFilter uses column(s) nosuchcol, which ztf alerts do not have" in proc.stderr, proc.stderr
    assert not (tmp_path / "s" / "manifests").exists() or not any((tmp_path / "s" / "manifests").iterdir())
    wrong_type = {"name": "t", "channels": [{"name": "A", "filters": [{"unit": "ExpressionFilter", "config": {"expr": "object_id > 3"}}]}]}
    path.write_text(yaml.safe_dump(wrong_type))
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "run", str(path), "--archive", str(archive), "--store", str(tmp_path / "s"), "--workers", "0"], capture_output=True, text=True)
    assert proc.returncode == 1 and "Error: run failed: T0 filter ExpressionFilter (channel A) failed on" in proc.stderr, proc.stderr
    assert "TypeError" in proc.stderr and "str" in proc.stderr
    assert "ampel_dask/cli.py" not in proc.stderr  # the CLI's own traceback is not printed
    assert "Compute Failed" not in proc.stderr  # nor Dask's, once per failed task


def test_filter_columns_are_checked_against_the_selected_surveys(tmp_path):
    """A ZTF-only column in an expression is fine for a ZTF selection and an error naming its line for a
    selection that holds LSST alerts (found at planning, not in the first batch of a started run)."""
    path = tmp_path / "wf.yml"
    text = yaml.safe_dump({"name": "c", "channels": [{"name": "Z", "filters": [{"unit": "ExpressionFilter", "config": {"expr": "drb > 0.9 and ndet >= 2 and mag < 19"}}]}]}, sort_keys=False)
    wf = load_workflow_text(path, text)
    plans = plan_workflow(wf)
    check_columns(wf, plans, {"ztf"})
    with pytest.raises(WorkflowError) as err:
        check_columns(wf, plans, {"ztf", "lsst"})
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "config:" in ln)
    assert f"wf.yml:{line}: channels[0] (Z).filters[0]: ExpressionFilter uses column(s) drb, which lsst alerts do not have" in str(err.value)
    assert "ztf alerts" not in str(err.value) and "archive.surveys" in str(err.value)


def load_workflow_text(path: Path, text: str) -> Workflow:
    path.write_text(text)
    return load_workflow(path)


@pytest.mark.parametrize("history", ["packet", "archive"])
def test_channels_that_differ_only_in_name_each_get_their_states_and_t3(history, data_dir, tmp_path):
    """Two channels with the same filters and T1 policy share T0 work but each writes its own states
    (the T1 key covers the channel): both hold every alert the cut passes, counted from the raw part
    files, and both channels' T3 exports them; the shared states are computed once."""
    import ampel_dask as ad

    archive = tmp_path / "archive"
    ad.ingest([data_dir / "ztf" / "pitt_google"], archive)
    parts = [pq.read_table(f, columns=["alert_id", "rb", "programid"]) for f in sorted(archive.glob("survey=*/night=*/part-*.parquet"))]
    expected = sorted(a for t in parts for a, rb in zip(t.column("alert_id").to_pylist(), t.column("rb").to_pylist()) if rb is not None and rb > 0.3)

    def channel(name: str) -> dict:
        return {"name": name, "access": ["ZTF_ALL"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "rb > 0.3"}}],
                "t1": {"unit": "T1Policy", "config": {"history": history}}, "t2": ["T2LightCurveSummary"], "t3": [{"unit": "T3Export", "config": {"formats": ["csv"]}}]}  # fmt: skip

    run = ad.run({"name": "twins", "store": {"path": str(tmp_path / "store")}, "channels": [channel("A"), channel("B")]}, archive=archive, workers=0)
    store = ad.open_store(tmp_path / "store")
    for name in ("A", "B"):
        assert sorted(store.states(name)["alert_id"]) == expected, name
    assert run.summary["t2"]["computed"] == len(expected)  # one computation per distinct state, both channels
    exports = sorted(p for p in run.outputs if p.endswith(".csv"))
    assert len(exports) == 2 and all(Path(p).exists() for p in exports)
