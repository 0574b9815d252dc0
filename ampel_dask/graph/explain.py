"""Provenance of one object: its alerts -> states per channel -> T2 results -> T3 outputs, with run ids."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io.archive import Archive
from ..io.layout import ztf_name, ztf_stock
from ..io.stores import FAILURE, POINT_PROVENANCE, PROVENANCE, open_store, store_spec
from ..keys import id_hex
from .failures import run_reason


def resolve_stock(obj: str) -> tuple[int, str]:
    """ZTF name, LSST diaObjectId, ss:<ssObjectId>, or a stock integer -> (stock, display name)."""
    if re.fullmatch(r"ZTF\d\d[a-z]{7}", obj):
        return ztf_stock(obj), obj
    if obj.startswith("ss:") and obj[3:].isdigit():
        return -int(obj[3:]), obj
    if re.fullmatch(r"-?\d+", obj):
        return int(obj), obj
    raise ValueError(f"{obj!r} is neither a ZTF name, an LSST diaObjectId, ss:<ssObjectId> nor a stock number")


def _filter_stock(table: pa.Table | None, stock: int) -> pa.Table | None:
    if table is None:
        return None
    return table.filter(pc.equal(table.column("stock"), stock))


def explain(obj: str, store_dir: str | Path, archive_dir: str | Path | None = None) -> dict:
    """``store_dir``: a Parquet store folder or a ``mongodb://host:port/DB`` URI."""
    stock, name = resolve_stock(obj)
    store = open_store(store_spec(store_dir))
    manifests = store.manifests()
    if not manifests:  # else a wrong path would look like an object that was never processed
        raise FileNotFoundError(f"{store_dir}: no result store here (no run manifests); give --store the folder or mongodb:// URI a run wrote to")
    store.check_format()
    if archive_dir is None and manifests:
        archive_dir = manifests[-1].get("archive")
    out: dict = {"object": name, "stock": stock, "alerts": [], "states": [], "t2": [], "t2_points": [], "t3": []}
    if archive_dir and Archive(archive_dir).exists():
        arch = Archive(archive_dir)
        rows = []
        for part in arch.partitions():
            t = pq.read_table(arch.root / part.path, columns=["alert_id", "stock", "object_id", "mjd", "band", "mag", "source"], filters=[("stock", "=", stock)])
            rows += [{**r, "partition": part.path} for r in t.to_pylist()]
        out["alerts"] = sorted(rows, key=lambda r: r["mjd"])
        if rows and rows[0].get("object_id"):
            out["object"] = rows[0]["object_id"]
        elif stock > 0 and not rows and re.fullmatch(r"\d+", obj) and stock < 100 * 26**7:
            out["object"] = ztf_name(stock)
    journal = _filter_stock(store.read_journal(stock=stock), stock)
    runs_by_alert: dict[tuple, set] = {}
    failed_on: list[dict] = []  # (unit, state, run) where a T2 unit failed, from the journal (no state: per datapoint)
    if journal is not None:
        for r in journal.to_pylist():
            runs_by_alert.setdefault((r["channel"], r["alert_id"]), set()).add(r["run_id"])
            if r["tier"] == 2 and r["action"] in ("failed", "failed:point"):
                sid = id_hex(r["state_id"]) if r["action"] == "failed" else None
                failed_on.append({"unit": r["unit"], "state_id": sid, "run_id": r["run_id"]})
    for channel in store.channels():
        states = _filter_stock(store.read_states(channel, columns=["state_id", "stock", "alert_id", "mjd", "dps"], stock=stock), stock)
        if states is None:
            continue
        for r in states.to_pylist():
            out["states"].append({"channel": channel, "state_id": id_hex(r["state_id"]), "alert_id": r["alert_id"], "mjd": r["mjd"],
                                  "datapoints": len(r["dps"]), "runs": sorted(runs_by_alert.get((channel, r["alert_id"]), []))})  # fmt: skip
    done: dict[str, set] = {}
    for unit, key in store.t2_units():
        res = _filter_stock(store.read_t2(unit, key, stock=stock), stock)
        if res is None:
            continue
        for r in res.to_pylist():
            body = {k: v for k, v in r.items() if k not in PROVENANCE}
            done.setdefault(key, set()).add(r["state_id"])
            out["t2"].append({"unit": unit, "unit_version": r["unit_version"], "config_hash": r["config_hash"], "state_id": id_hex(r["state_id"]),
                              "code": r["code"], "run_id": r["run_id"], "body": body})  # fmt: skip
    for unit, key in store.t2_failure_units():  # recorded failures (on_error: record) not since computed
        fails = _filter_stock(store.read_t2_failures(unit, key, stock=stock), stock)
        for r in fails.to_pylist() if fails is not None else []:
            if r["state_id"] not in done.get(key, ()):
                out["t2"].append({"unit": unit, "unit_version": r["unit_version"], "config_hash": r["config_hash"], "state_id": id_hex(r["state_id"]),
                                  "code": r["code"], "run_id": r["run_id"], "body": {}, FAILURE: r[FAILURE], "recorded": True})  # fmt: skip
    for unit, key in store.t2_point_units():
        res = _filter_stock(store.read_t2_points(unit, key, stock=stock), stock)
        if res is None:
            continue
        for r in res.sort_by("dp_id").to_pylist():
            body = {k: v for k, v in r.items() if k not in POINT_PROVENANCE}
            done.setdefault(key, set()).add(r["point_id"])
            out["t2_points"].append({"unit": unit, "unit_version": r["unit_version"], "config_hash": r["config_hash"], "dp_id": r["dp_id"],
                                     "point_id": id_hex(r["point_id"]), "code": r["code"], "run_id": r["run_id"], "body": body})  # fmt: skip
    for unit, key in store.t2_point_failure_units():  # a T2PointUnit's recorded failures, as above
        fails = _filter_stock(store.read_t2_point_failures(unit, key, stock=stock), stock)
        for r in fails.sort_by("dp_id").to_pylist() if fails is not None else []:
            if r["point_id"] not in done.get(key, ()):
                out["t2_points"].append({"unit": unit, "unit_version": r["unit_version"], "config_hash": r["config_hash"], "dp_id": r["dp_id"],
                                         "point_id": id_hex(r["point_id"]), "code": r["code"], "run_id": r["run_id"], "body": {},
                                         FAILURE: r[FAILURE], "recorded": True})  # fmt: skip
    # failures of runs that did not record them (on_error: fail), on states still without a T2 row
    reasons = {m["run_id"]: m for m in manifests if m.get("status") == "failed"}
    have = {(t["unit"], t["state_id"]) for t in out["t2"]}
    for f in failed_on:
        m = reasons.get(f["run_id"])
        if f["state_id"] is not None and (f["unit"], f["state_id"]) not in have and m is not None:
            err = next((x["error"] for x in m.get("failures", []) if x["unit"] == f["unit"]), "")
            out["t2"].append({"unit": f["unit"], "state_id": f["state_id"], "run_id": f["run_id"], "code": None, "body": {},
                              FAILURE: err, "recorded": False})  # fmt: skip
            have.add((f["unit"], f["state_id"]))
    out["failed_runs"] = [{"run_id": r, "reason": run_reason(reasons[r]["failures"])} for r in sorted({f["run_id"] for f in failed_on} & set(reasons))]
    t3 = _filter_stock(store.read_t3_objects(stock=stock), stock)
    if t3 is not None:
        for r in t3.to_pylist():
            info = store.task_info(r["t3_key"]) or {}
            out["t3"].append({"channel": r["channel"], "unit": r["unit"], "state_id": id_hex(r["state_id"]), "run_id": r["run_id"],
                              "outputs": [o.get("path") for o in info.get("outputs", [])]})  # fmt: skip
    return out


def render(info: dict) -> str:
    """Human-readable chain."""
    lines = [f"{info['object']} (stock {info['stock']})"]
    lines.append(f"  alerts: {len(info['alerts'])}")
    for a in info["alerts"]:
        mag = f"{a['mag']:.2f}" if a.get("mag") is not None and np.isfinite(a["mag"]) else "-"
        lines.append(f"    alert {a['alert_id']}  mjd {a['mjd']:.5f}  {a['band']} {mag}  [{a['partition']}]")
    states_by_id: dict[str, list] = {}
    for s in info["states"]:
        states_by_id.setdefault(s["state_id"], []).append(s)
    lines.append(f"  states: {len(states_by_id)}")
    for sid, ss in states_by_id.items():
        chans = ", ".join(sorted({s['channel'] for s in ss}))
        runs = sorted({r for s in ss for r in s["runs"]})
        s0 = ss[0]
        lines.append(f"    state {sid[:16]}  alert {s0['alert_id']}  {s0['datapoints']} datapoints  channels: {chans}  runs: {', '.join(runs) or '-'}")
        for t in info["t2"]:
            if t["state_id"] == sid and t.get("recorded"):
                lines.append(f"      T2 {t['unit']} v{t['unit_version']} (config {t['config_hash'][:16]}) FAILED (code {t['code']}, recorded; "
                             f"the next run retries it)  run {t['run_id']}: {t[FAILURE]}")  # fmt: skip
            elif t["state_id"] == sid and FAILURE in t:
                lines.append(f"      T2 {t['unit']} FAILED in run {t['run_id']} (not recorded: that run failed; the next run retries it): {t[FAILURE]}")
            elif t["state_id"] == sid:
                body = ", ".join(f"{k}={_fmt(v)}" for k, v in list(t["body"].items())[:6])
                lines.append(f"      T2 {t['unit']} v{t['unit_version']} (config {t['config_hash'][:16]}) code {t['code']}  run {t['run_id']}: {body}")
    points = info.get("t2_points", [])
    lines.append(f"  T2 per datapoint: {len(points)}")
    for t in points:
        head = f"    datapoint {t['dp_id']}  T2 {t['unit']} v{t['unit_version']} (config {t['config_hash'][:16]})"
        if t.get("recorded"):
            lines.append(f"{head} FAILED (code {t['code']}, recorded; the next run retries it)  run {t['run_id']}: {t[FAILURE]}")
        else:
            body = ", ".join(f"{k}={_fmt(v)}" for k, v in list(t["body"].items())[:6])
            lines.append(f"{head} code {t['code']}  run {t['run_id']}: {body}")
    for r in info.get("failed_runs", []):
        lines.append(f"  run {r['run_id']} failed: {r['reason']}")
    lines.append(f"  T3: {len(info['t3'])}")
    for t in info["t3"]:
        lines.append(f"    {t['channel']} / {t['unit']}  state {t['state_id'][:16]}  run {t['run_id']}  -> {', '.join(p for p in t['outputs'] if p) or '-'}")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
