"""Replicated real Rubin/LSST alerts for the design-scale benchmark (benchmarks/make_archive.py, survey lsst).

Oracles, all in plain Python on the base alerts as ingested: replica 0 is the base alert for alert (only
times moved, by a whole number of days per object, nights recomputed with a calendar); a replica k >= 1
has ids (alerts, datapoints, objects) disjoint from the base's and the other replicas', one-to-one with
the base's, and differs from the base only in flux and magnitude, consistently (a datapoint's jitter is
the same wherever it appears, flux and magnitude agree, errors unchanged); a built archive holds exactly
N alerts; and workflows/lsst_elasticc.yml gives each replicated alert a state with as many datapoints as
the corresponding base alert's (matched by content: position, band, flux error, ndet; not by ids).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from benchmarks.make_archive import base_table, build, replica
from tests.conftest import ROOT

TIMES = ("mjd", "first_det_mjd", "last_det_mjd", "night")
PHOTOMETRY = ("mag", "flux", "psfFlux")  # the trigger's: jittered with its datapoint
IDS = ("alert_id", "stock", "object_id", "diaObjectId", "ssObjectId", "parentDiaSourceId")
MATCH = ("ra", "dec", "band", "flux_err", "ndet")  # unique per base alert (checked): content, not ids


@pytest.fixture(scope="module")
def lsst_base(tmp_path_factory, data_dir) -> tuple[Path, pa.Table]:
    work = tmp_path_factory.mktemp("lsst-replicas")
    return work, base_table(work, data_dir, "lsst")


def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def calendar_night(mjd: float) -> int:
    """Rubin's dayObs: the date at UTC-12h of an MJD (independent of io/layout.night_of)."""
    d = dt.date(1858, 11, 17) + dt.timedelta(days=math.floor(mjd - 0.5))
    return d.year * 10000 + d.month * 100 + d.day


def whole(x: float) -> int:
    assert abs(x - round(x)) < 1e-6, x
    return round(x)


def test_replica_zero_is_the_base_moved_in_time(lsst_base):
    _, base = lsst_base
    rep = rows(replica(base, 0, np.random.default_rng(0), nights=1, survey="lsst"))
    shift_of: dict[int, int] = {}
    first_night: dict[int, int] = {}
    for b, r in zip(rows(base), rep):
        days = whole(r["mjd"] - b["mjd"])
        assert shift_of.setdefault(b["stock"], days) == days  # one whole-day shift per object
        for c in ("first_det_mjd", "last_det_mjd"):
            assert (b[c] is None and r[c] is None) or whole(r[c] - b[c]) == days
        assert r["night"] == calendar_night(r["mjd"])
        first_night[r["stock"]] = min(first_night.get(r["stock"], 99999999), r["night"])
        assert {k: v for k, v in r.items() if k not in TIMES + ("dps",)} == {k: v for k, v in b.items() if k not in TIMES + ("dps",)}
        assert len(r["dps"]) == len(b["dps"])
        for bd, rd in zip(b["dps"], r["dps"]):
            assert whole(rd["mjd"] - bd["mjd"]) == days
            assert {k: v for k, v in rd.items() if k != "mjd"} == {k: v for k, v in bd.items() if k != "mjd"}
    # nights=1: every object starts on the benchmark's first night, MJD 61000's evening in Chile
    assert set(first_night.values()) == {20251121}
    assert len(shift_of) > 500  # Rubin and ELAsTiCC objects


def test_replicas_new_ids_same_measurements(lsst_base):
    _, base = lsst_base
    rng = np.random.default_rng(0)
    base_rows = rows(base)
    ids = {"alert": {r["alert_id"] for r in base_rows}, "stock": {r["stock"] for r in base_rows},
           "dp": {d["dp_id"] for r in base_rows for d in r["dps"]}}  # fmt: skip
    seen = {k: set(v) for k, v in ids.items()}
    for k in (1, 2):
        rep = rows(replica(base, k, rng, nights=1, survey="lsst"))
        assert len(rep) == len(base_rows)
        mine = {"alert": {r["alert_id"] for r in rep}, "stock": {r["stock"] for r in rep}, "dp": {d["dp_id"] for r in rep for d in r["dps"]}}
        for kind in mine:
            assert len(mine[kind]) == len(ids[kind])  # one-to-one with the base's
            assert not mine[kind] & seen[kind]  # new: not the base's, not an earlier replica's
            seen[kind] |= mine[kind]
        dp_map: dict[int, int] = {}
        stock_map: dict[int, int] = {}
        jitter_of: dict[int, float] = {}  # per new datapoint id: flux ratio
        jittered = 0
        for b, r in zip(base_rows, rep):
            assert stock_map.setdefault(b["stock"], r["stock"]) == r["stock"]
            assert r["object_id"] == (str(r["stock"]) if r["stock"] > 0 else f"ss:{-r['stock']}")
            assert (r["diaObjectId"] or 0) == (r["stock"] if b["diaObjectId"] else b["diaObjectId"] or 0)
            assert (r["ssObjectId"] or 0) == (-r["stock"] if b["ssObjectId"] else b["ssObjectId"] or 0)
            same = {c for c in b if c not in TIMES + PHOTOMETRY + IDS + ("dps",)}
            assert {c: r[c] for c in same} == {c: b[c] for c in same}
            assert len(r["dps"]) == len(b["dps"])  # counts per alert
            for bd, rd in zip(b["dps"], r["dps"]):
                assert dp_map.setdefault(bd["dp_id"], rd["dp_id"]) == rd["dp_id"]
                assert (rd["dp_id"] < 0) == (bd["dp_id"] < 0)
                for c in ("band", "kind", "flux_err", "mag_err", "maglim", "ra", "dec", "flags", "rb", "programid"):
                    assert rd[c] == bd[c], c
                if bd["flux"] is None:
                    assert rd["flux"] is None
                    continue
                ratio = rd["flux"] / bd["flux"] if bd["flux"] else 1.0
                assert abs(jitter_of.setdefault(rd["dp_id"], ratio) - ratio) < 1e-12  # one jitter per measurement
                assert 10 ** (-0.4 * 0.3) < ratio < 10 ** (0.4 * 0.3)  # 10 sigma of 0.03 mag
                jittered += ratio != 1.0
                if bd["mag"] is not None:
                    assert rd["mag"] - bd["mag"] == pytest.approx(-2.5 * math.log10(ratio), abs=1e-9)
            trig = [d for d in r["dps"] if d["dp_id"] == r["alert_id"]]
            assert len(trig) == 1  # the alert id is its trigger's id, renumbered alike
            assert r["flux"] == trig[0]["flux"] and r["mag"] == trig[0]["mag"]
            assert r["psfFlux"] == pytest.approx(trig[0]["flux"], rel=1e-6)  # float32
        assert len(set(dp_map.values())) == len(dp_map) and len(set(stock_map.values())) == len(stock_map)
        assert jittered > 0.9 * sum(len(b["dps"]) for b in base_rows)


def read_all(root: Path) -> pa.Table:
    from ampel_dask.io.archive import Archive

    arch = Archive(root)
    return pa.concat_tables([arch.read(p) for p in arch.partitions(["lsst"])], promote_options="default")


def states(archive: Path, store: Path) -> dict[int, int]:
    """alert_id -> datapoints in its state, from a run of workflows/lsst_elasticc.yml (no T2, no T3:
    states are what the history join makes)."""
    from ampel_dask.graph.runner import RunOptions, run_workflow
    from ampel_dask.graph.workflow import load_workflow
    from ampel_dask.io.stores import ParquetStore

    wf = load_workflow(ROOT / "workflows" / "lsst_elasticc.yml")
    assert [c.t1.config["history"] for c in wf.channels] == ["archive"]
    wf = wf.model_copy(update={"channels": [c.model_copy(update={"t2": [], "t3": []}) for c in wf.channels]})
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run_workflow(wf, RunOptions(archive=str(archive), store=str(store), progress=False, workers=0))
    finally:
        os.chdir(cwd)
    t = ParquetStore(store).read_states(wf.channels[0].name, columns=["alert_id", "dps"])
    return {a: len(d) for a, d in zip(t.column("alert_id").to_pylist(), t.column("dps").to_pylist())}


def test_built_archive_and_its_states(lsst_base, data_dir):
    work, base = lsst_base
    n_base = base.num_rows
    n = 3 * n_base - 100  # the last replica cut short
    # parts of 5,000 rows, at most 6,000 rows waiting for theirs: some nights written early, in pieces
    target = build(work / "archive", n, part_rows=5_000, nights=1, work=work, survey="lsst", data_dir=data_dir, buffer_rows=6_000)
    table = read_all(target)
    assert len({r["night"] for r in rows(table.select(["night"]))}) < json.loads((target / "_bench.json").read_text())["partitions"]
    base_rows, rep_rows = rows(base), rows(table)
    assert len(rep_rows) == n
    assert len({r["alert_id"] for r in rep_rows}) == n
    base_alerts = {r["alert_id"] for r in base_rows}
    base_dps = {d["dp_id"] for r in base_rows for d in r["dps"]}
    assert sum(r["alert_id"] in base_alerts for r in rep_rows) == n_base  # replica 0, whole
    for r in rep_rows:
        if r["alert_id"] not in base_alerts:
            assert not {d["dp_id"] for d in r["dps"]} & base_dps
    by_content = {tuple(r[c] for c in MATCH): r for r in base_rows}
    assert len(by_content) == n_base
    twin = {r["alert_id"]: by_content[tuple(r[c] for c in MATCH)] for r in rep_rows}  # replicated alert -> base alert
    copies = defaultdict(int)
    for b in twin.values():
        copies[b["alert_id"]] += 1
    assert sorted(set(copies.values())) == [2, 3] and sum(v == 2 for v in copies.values()) == 100

    base_states = states(work / "base-archive-lsst-1", work / "store-base")
    rep_states = states(target, work / "store-replicas")
    assert len(base_states) > 0.5 * n_base
    both = 0
    for a, count in rep_states.items():
        b = twin[a]["alert_id"]
        if a in base_alerts:
            assert a == b  # replica 0: the base alert itself, same state size
        if b in base_states:
            assert count == base_states[b], (a, b)
            both += 1
    r0 = {a: c for a, c in rep_states.items() if a in base_alerts}
    assert r0 == base_states  # no jitter in replica 0: the same alerts pass, with the same states
    assert both > 0.9 * len(rep_states)  # jitter flips a few near the snr cut, no more


def test_no_base_packets_is_an_error_not_an_endless_loop(tmp_path):
    """A checkout without ../shared/data beside it: building a replicated stream says so."""
    from benchmarks.replicate import build_stream, replicas

    with pytest.raises(ValueError, match="no real ZTF packets"):
        next(replicas([], 5))
    with pytest.raises(ValueError, match="no real ZTF packets to replicate in .*nothing-here"):
        build_stream(tmp_path / "stream", 5, data_dir=tmp_path / "nothing-here")
    assert list(replicas([], 0)) == []
