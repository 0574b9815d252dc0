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
from ..io.stores import POINT_PROVENANCE, PROVENANCE, open_store, store_spec
from ..keys import id_hex


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
    if journal is not None:
        for r in journal.to_pylist():
            runs_by_alert.setdefault((r["channel"], r["alert_id"]), set()).add(r["run_id"])
    for channel in store.channels():
        states = _filter_stock(store.read_states(channel, columns=["state_id", "stock", "alert_id", "mjd", "dps"], stock=stock), stock)
        if states is None:
            continue
        for r in states.to_pylist():
            out["states"].append({"channel": channel, "state_id": id_hex(r["state_id"]), "alert_id": r["alert_id"], "mjd": r["mjd"],
                                  "datapoints": len(r["dps"]), "runs": sorted(runs_by_alert.get((channel, r["alert_id"]), []))})  # fmt: skip
    for unit, key in store.t2_units():
        res = _filter_stock(store.read_t2(unit, key, stock=stock), stock)
        if res is None:
            continue
        for r in res.to_pylist():
            body = {k: v for k, v in r.items() if k not in PROVENANCE}
            out["t2"].append({"unit": unit, "unit_version": r["unit_version"], "config_hash": r["config_hash"], "state_id": id_hex(r["state_id"]),
                              "code": r["code"], "run_id": r["run_id"], "body": body})  # fmt: skip
    for unit, key in store.t2_point_units():
        res = _filter_stock(store.read_t2_points(unit, key, stock=stock), stock)
        if res is None:
            continue
        for r in res.sort_by("dp_id").to_pylist():
            body = {k: v for k, v in r.items() if k not in POINT_PROVENANCE}
            out["t2_points"].append({"unit": unit, "unit_version": r["unit_version"], "config_hash": r["config_hash"], "dp_id": r["dp_id"],
                                     "point_id": id_hex(r["point_id"]), "code": r["code"], "run_id": r["run_id"], "body": body})  # fmt: skip
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
            if t["state_id"] == sid:
                body = ", ".join(f"{k}={_fmt(v)}" for k, v in list(t["body"].items())[:6])
                lines.append(f"      T2 {t['unit']} v{t['unit_version']} (config {t['config_hash'][:16]}) code {t['code']}  run {t['run_id']}: {body}")
    points = info.get("t2_points", [])
    lines.append(f"  T2 per datapoint: {len(points)}")
    for t in points:
        body = ", ".join(f"{k}={_fmt(v)}" for k, v in list(t["body"].items())[:6])
        lines.append(f"    datapoint {t['dp_id']}  T2 {t['unit']} v{t['unit_version']} (config {t['config_hash'][:16]}) code {t['code']}  run {t['run_id']}: {body}")
    lines.append(f"  T3: {len(info['t3'])}")
    for t in info["t3"]:
        lines.append(f"    {t['channel']} / {t['unit']}  state {t['state_id'][:16]}  run {t['run_id']}  -> {', '.join(p for p in t['outputs'] if p) or '-'}")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
