"""T3 push units against local servers that speak the documented APIs (tests/push_servers.py): the TNS AT
report writer and the SkyPortal/Fritz publisher, on a selection made from real ZTF alerts (kowalski's,
with forced photometry). What they send is checked against the raw packets read with fastavro; secrets
never reach a log line, a record, a file or an error message; re-runs post nothing new."""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pytest
from astropy.time import Time

from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.io.archive import Archive
from ampel_dask.tiers.base import T3Context, UnitConfigError
from ampel_dask.tiers.helpers.push import PushError
from ampel_dask.tiers.states import T1PolicyConfig, build_states
from ampel_dask.tiers.units.t2_summary import T2LightCurveSummary
from ampel_dask.tiers.units.t3_skyportal import T3SkyPortal
from ampel_dask.tiers.units.t3_tns import T3TNSReport

from .push_servers import FakeSkyPortal, FakeTNS, check_at_reports

API_KEY = "tns-K3y-0123456789abcdef"
BOT_ID, BOT_NAME = 123456, "ampel_dask_test_bot"
TOKEN = "sp-T0ken-fedcba9876543210"
TNS_FILTER = {1: 110, 2: 111, 3: 112}  # TNS filter ids of ZTF g, r, i
JD0 = 2400000.5
NJY = 31.4  # AB zero point of nJy


@pytest.fixture(scope="module")
def packets(data_dir) -> dict[int, dict]:
    out = {}
    for f in sorted((data_dir / "ztf" / "kowalski").rglob("*.avro")):
        with open(f, "rb") as fh:
            for rec in fastavro.reader(fh):
                out[rec["candid"]] = rec
    return out


@pytest.fixture(scope="module")
def selection(tmp_path_factory, data_dir) -> pa.Table:
    """Each object's latest alert as a state (detections, upper limits, forced photometry; every ZTF
    program), with real T2LightCurveSummary results as T2 columns: what a channel's T3 gets."""
    root = tmp_path_factory.mktemp("push_archive")
    ingest([str(data_dir / "ztf" / "kowalski")], root, IngestOptions(workers=0, progress=False))
    arch = Archive(root)
    alerts = pa.concat_tables([arch.read(p, columns=["alert_id", "stock", "object_id", "survey", "mjd", "ra", "dec", "dps"]) for p in arch.partitions()])
    stock = alerts.column("stock").to_numpy()
    order = np.lexsort((alerts.column("alert_id").to_numpy(), alerts.column("mjd").to_numpy(), stock))
    latest = alerts.take(pa.array(order[np.r_[stock[order][1:] != stock[order][:-1], True]]))
    states = build_states(latest, T1PolicyConfig(kinds=["detection", "upper_limit", "forced"]), access=["ZTF_ALL"])
    summary = pa.table(T2LightCurveSummary().process(states))
    for name in ("ndet", "first_mjd", "latest_mag"):
        states = states.append_column(f"T2LightCurveSummary__{name}", summary.column(name))
    return states


def context(tmp_path: Path, journal=None) -> T3Context:
    ctx = T3Context(out_dir=tmp_path, run_id="run-7", channel="INFANT")
    if journal is not None:  # the store's delivery journal, as the framework hands it (branch durable's protocol)
        ctx.deliveries = lambda unit_key: journal.setdefault(unit_key, Journal())  # type: ignore[attr-defined]
    return ctx


class Journal:
    """A delivery journal (the protocol of io.stores' Deliveries): which keys were delivered."""

    def __init__(self):
        self.keys: dict[str, str] = {}

    def delivered(self, keys):
        return np.array([k in self.keys for k in keys], dtype=bool)

    def record(self, request_key, keys, stocks, run_id, status):
        assert status == 200
        self.keys.update({k: request_key for k in keys})


def expected_keys(channel: str, unit_key: str, sel: pa.Table) -> list[str]:
    """(channel, stock, state, unit) -> xxh3-128 of their canonical JSON (a state id as hex), computed here."""
    import xxhash

    return [xxhash.xxh3_128_hexdigest(json.dumps([channel, s, st.hex() if isinstance(st, bytes) else st, unit_key], separators=(",", ":")).encode())
            for s, st in zip(sel.column("stock").to_pylist(), sel.column("state_id").to_pylist())]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def no_secret_anywhere(secret: str, *texts: str, folder: Path | None = None) -> None:
    for t in texts:
        assert secret not in t
    if folder is not None:
        for p in folder.rglob("*"):
            if p.is_file():
                assert secret.encode() not in p.read_bytes(), p


# --- TNS ---------------------------------------------------------------------------------------------


TNS_CONFIG = {"reporting_group_id": 48, "discovery_data_source_id": 48, "reporter": "A. Tester (Somewhere) on behalf of ampel-dask"}


def tns_oracle(packet: dict) -> dict:
    """The AT report's discovery, photometry and non-detection, read off the raw packet."""
    cand = packet["candidate"]
    dets = {cand["candid"]: cand}
    dets.update({p["candid"]: p for p in packet.get("prv_candidates") or [] if p.get("candid") is not None})
    dets = sorted((p for p in dets.values() if p.get("magpsf") is not None and p["jd"] <= cand["jd"]), key=lambda p: (p["jd"], p["candid"]))
    first, last = dets[0], dets[-1]
    uls = [p for p in packet.get("prv_candidates") or [] if p.get("candid") is None and p.get("diffmaglim") is not None and p["jd"] < first["jd"]]
    iso = lambda jd: Time(jd, format="jd", scale="utc").iso  # noqa: E731
    out = {"discovery": iso(first["jd"]), "points": [(iso(p["jd"]), round(p["magpsf"], 3), TNS_FILTER[p["fid"]]) for p in ([first, last] if len(dets) > 1 else [first])]}
    if uls:
        u = max(uls, key=lambda p: p["jd"])
        out["non_detection"] = (iso(u["jd"]), round(u["diffmaglim"], 3), TNS_FILTER[u["fid"]])
    return out


def test_tns_report_file_matches_the_raw_packets(selection, packets, tmp_path):
    records = T3TNSReport(TNS_CONFIG).react(selection, context(tmp_path))
    [rec] = records
    data = json.loads(Path(rec["path"]).read_text())
    assert rec["path"] == str(tmp_path / "tns_at_report.json") and check_at_reports(data) == []
    reports = [data["at_report"][str(i)] for i in range(len(data["at_report"]))]
    assert len(reports) == rec["reports"] == selection.num_rows  # every object has a detection
    with_nondet = 0
    for r, alert_id in zip(reports, selection.column("alert_id").to_pylist()):
        pkt = packets[alert_id]
        want = tns_oracle(pkt)
        assert r["internal_name"] == pkt["objectId"]
        assert r["ra"]["value"] == pkt["candidate"]["ra"] and r["dec"]["value"] == pkt["candidate"]["dec"]
        assert (r["reporting_group_id"], r["discovery_data_source_id"], r["at_type"]) == ("48", "48", "1")
        assert r["discovery_datetime"] == want["discovery"]
        points = [r["photometry"]["photometry_group"][str(k)] for k in range(len(r["photometry"]["photometry_group"]))]
        assert [(p["obsdate"], p["flux"], int(p["filter_value"])) for p in points] == want["points"]
        assert all(p["instrument_value"] == "196" and p["flux_units"] == "1" for p in points)
        nd = r["non_detection"]
        if "non_detection" in want:
            with_nondet += 1
            assert (nd["obsdate"], nd["limiting_flux"], int(nd["filter_value"])) == want["non_detection"]
        else:
            assert nd == {"archiveid": "0", "archival_remarks": T3TNSReport(TNS_CONFIG).config.archival_remarks}
    assert 0 < with_nondet < len(reports)  # both forms occur


@pytest.fixture
def tns(monkeypatch):
    server = FakeTNS(API_KEY, BOT_ID, BOT_NAME)
    monkeypatch.setenv("AMPEL_DASK_SECRET_TNS_KEY", API_KEY)
    monkeypatch.setenv("AMPEL_DASK_SECRET_TNS_BOT", str(BOT_ID))
    yield server
    server.close()


def tns_unit(server: FakeTNS, **kw) -> T3TNSReport:
    return T3TNSReport({**TNS_CONFIG, "url": server.url, "bot_id_env": "AMPEL_DASK_SECRET_TNS_BOT", "bot_name": BOT_NAME,
                        "api_key_env": "AMPEL_DASK_SECRET_TNS_KEY", "backoff": 0.01, **kw})  # fmt: skip


def test_tns_submission_is_the_documented_request_and_never_shows_the_key(selection, tns, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        records = tns_unit(tns, batch_size=10).react(selection, context(tmp_path))
    n = selection.num_rows
    assert tns.violations == []
    assert len(tns.requests) == math.ceil(n / 10)
    assert all(r["method"] == "POST" and r["path"] == "/api/set/bulk-report" for r in tns.requests)
    file_reports = json.loads((tmp_path / "tns_at_report.json").read_text())["at_report"]
    assert tns.reports == [file_reports[str(i)] for i in range(n)]  # what TNS got is the file, in order
    subs = [r for r in records if r["kind"] == "tns"]
    assert [s["report_id"] for s in subs] == [str(1000 + i + 1) for i in range(len(subs))]
    assert sum(s["reports"] for s in subs) == n
    submitted = json.loads((tmp_path / "tns_at_report_submitted.json").read_text())
    assert [o for s in submitted for o in s["objects"]] == selection.column("object_id").to_pylist()
    no_secret_anywhere(API_KEY, caplog.text, json.dumps(records), folder=tmp_path)


def test_tns_errors_are_clear_retried_and_redacted(selection, tns, tmp_path, caplog):
    tns.script, tns.echo_errors = [503], True  # a transient failure is retried
    with caplog.at_level(logging.WARNING):
        tns_unit(tns).react(selection.slice(0, 2), context(tmp_path))
    assert len(tns.requests) == 2 and "HTTP 503" in caplog.text and tns.violations == []
    tns.script = [400]  # a server that echoes the request (with the key) in its error
    with pytest.raises(PushError, match=r"refused: HTTP 400") as err:
        tns_unit(tns).react(selection.slice(0, 2), context(tmp_path / "b"))
    assert "***" in str(err.value) and err.value.status == 400
    no_secret_anywhere(API_KEY, str(err.value), caplog.text)
    with pytest.raises(PushError, match="HTTP 401"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AMPEL_DASK_SECRET_TNS_KEY", "not-the-key")
            tns_unit(tns).react(selection.slice(0, 2), context(tmp_path / "c"))
    with pytest.raises(PushError, match="AMPEL_DASK_SECRET_TNS_BOT .* not a number"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AMPEL_DASK_SECRET_TNS_BOT", "12a")
            tns_unit(tns).react(selection.slice(0, 2), context(tmp_path / "d"))


def test_tns_reports_each_state_once_with_the_delivery_journal(selection, tns, tmp_path):
    journal: dict = {}
    unit = tns_unit(tns, batch_size=7)
    unit.react(selection, context(tmp_path / "1", journal))
    sent = len(tns.reports)
    assert sent == selection.num_rows
    [book] = journal.values()
    assert set(book.keys) == set(expected_keys("INFANT", unit.delivery_key, selection))
    assert unit.react(selection, context(tmp_path / "2", journal)) == []  # nothing new: no request, no file
    assert len(tns.reports) == sent and not (tmp_path / "2").exists()
    ids = selection.column("state_id").to_pylist()
    new = [(s[:-1] + bytes([s[-1] ^ 1]) if isinstance(s, bytes) else s + 1) if i == 3 else s for i, s in enumerate(ids)]  # another state of object 3
    changed = selection.set_column(selection.column_names.index("state_id"), "state_id", pa.array(new, selection.column("state_id").type))
    unit.react(changed, context(tmp_path / "3", journal))  # one object in a new state: reported again
    assert [r["internal_name"] for r in tns.reports[sent:]] == [selection.column("object_id")[3].as_py()]


def test_tns_config_is_checked(monkeypatch):
    with pytest.raises(UnitConfigError, match="bot_id_env, bot_name and api_key_env"):
        T3TNSReport({**TNS_CONFIG, "url": "https://sandbox.wis-tns.org"})
    with pytest.raises(UnitConfigError, match="not readable by a workflow"):
        T3TNSReport({**TNS_CONFIG, "url": "https://sandbox.wis-tns.org", "bot_id_env": "AMPEL_DASK_SECRET_B", "bot_name": "b",
                     "api_key_env": "AMPEL_DASK_KAFKA_SASL_PASSWORD"})  # fmt: skip
    with pytest.raises(UnitConfigError, match="bot_name"):
        T3TNSReport({**TNS_CONFIG, "bot_name": 'x", "tns_id": 1'})
    with pytest.raises(UnitConfigError, match="url"):
        T3TNSReport({**TNS_CONFIG, "url": "https://sandbox.wis-tns.org/api/set/bulk-report?x=1"})
    with pytest.raises(UnitConfigError, match="reporter"):
        T3TNSReport({"reporting_group_id": 1, "discovery_data_source_id": 1})


def test_tns_band_without_a_filter_id_is_an_error_naming_it(selection, tmp_path):
    with pytest.raises(ValueError, match=r"no TNS filter id for ztf band 'g' \(config filter_ids.ztf\)"):
        T3TNSReport({**TNS_CONFIG, "filter_ids": {"ztf": {"r": 111, "i": 112}}}).react(selection, context(tmp_path))


# --- SkyPortal ---------------------------------------------------------------------------------------

SP_CONFIG = {"token_env": "AMPEL_DASK_SECRET_FRITZ_TOKEN", "filter_ids": [3, 4], "instrument_ids": {"ztf": 1}, "group_ids": [7],
             "stream_ids": [2], "backoff": 0.01}  # fmt: skip


@pytest.fixture
def sp(monkeypatch):
    server = FakeSkyPortal(TOKEN, filters={3, 4}, instruments={1})
    monkeypatch.setenv("AMPEL_DASK_SECRET_FRITZ_TOKEN", TOKEN)
    yield server
    server.close()


def sp_unit(server: FakeSkyPortal, **kw) -> T3SkyPortal:
    return T3SkyPortal({**SP_CONFIG, "url": server.url, **kw})


def photometry_oracle(packet: dict) -> list[tuple]:
    """(mjd, filter, flux, fluxerr, origin) of the state's datapoints, from the raw packet: detections and
    upper limits of candidate + prv_candidates, forced photometry of fp_hists (procstatus 0, a flux)."""
    cand = packet["candidate"]
    band = {1: "ztfg", 2: "ztfr", 3: "ztfi"}
    out = {}
    for p in [cand, *(packet.get("prv_candidates") or [])]:
        sign = 1.0 if str(p.get("isdiffpos")).lower() in ("t", "1", "true", "none") else -1.0
        if p.get("candid") is not None:
            f = sign * 10 ** (-0.4 * (p["magpsf"] - NJY))
            out[("d", p["candid"])] = (p["jd"] - JD0, band[p["fid"]], f, abs(f) * p["sigmapsf"] * math.log(10) / 2.5, None)
        elif p.get("diffmaglim") is not None:
            out[("u", p["jd"], p["fid"])] = (p["jd"] - JD0, band[p["fid"]], None, 10 ** (-0.4 * (p["diffmaglim"] - NJY)) / 5, None)
    for p in packet.get("fp_hists") or []:
        if str(p.get("procstatus")).strip() == "0" and p.get("forcediffimflux") not in (None, -99999.0):
            scale = 10 ** (-0.4 * (p["magzpsci"] - NJY))
            out[("f", p["jd"], p["fid"])] = (p["jd"] - JD0, band[p["fid"]], p["forcediffimflux"] * scale, p["forcediffimfluxunc"] * scale, "alert_fp")
    return sorted((r for r in out.values() if r[0] <= cand["jd"] - JD0 + 1e-6), key=point_order)


def point_order(r: tuple) -> tuple:
    """A total order of photometry points (one exposure may hold two detections of an object)."""
    return (r[0], r[1], r[4] or "", -math.inf if r[2] is None else r[2], r[3])


def test_skyportal_first_publication_sends_the_documented_requests(selection, packets, sp, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        [rec] = sp_unit(sp).react(selection, context(tmp_path))
    n = selection.num_rows
    assert sp.violations == []
    assert rec == {"kind": "skyportal", "url": sp.url, "objects": n, "candidates": 2 * n, "photometry_points": len(sp.photometry),
                   "annotations_posted": n, "annotations_updated": 0}  # fmt: skip
    assert [(r["method"], r["path"].split("/")[2]) for r in sp.requests] == [("GET", "candidates"), ("POST", "candidates"), ("PUT", "photometry"),
                                                                             ("POST", "sources")] * n  # fmt: skip
    assert all(r["headers"]["Authorization"] == f"token {TOKEN}" for r in sp.requests)
    for alert_id, obj in zip(selection.column("alert_id").to_pylist(), selection.column("object_id").to_pylist()):
        pkt = packets[alert_id]
        cands = [c for c in sp.candidates if c["obj_id"] == obj]
        assert sorted(c["filter_id"] for c in cands) == [3, 4] and {c["passing_alert_id"] for c in cands} == {alert_id}
        passed = datetime.fromisoformat(cands[0]["passed_at"])
        assert abs((passed - Time(pkt["candidate"]["jd"], format="jd").datetime).total_seconds()) < 1e-3
        assert sp.objs[obj] == {"ra": pkt["candidate"]["ra"], "dec": pkt["candidate"]["dec"]}
        got = sorted(((k[2], k[3], k[4], k[5], k[6]) for k in sp.photometry if k[0] == obj), key=point_order)
        want = photometry_oracle(pkt)
        assert len(got) == len(want) > 0, obj
        for g, w in zip(got, want):
            assert g[0] == pytest.approx(w[0], abs=1e-7) and g[1] == w[1] and g[4] == w[4]
            assert (g[2] is None) == (w[2] is None) and (g[2] is None or g[2] == pytest.approx(w[2], rel=1e-5))
            assert g[3] == pytest.approx(w[3], rel=1e-5)
    assert any(k[6] == "alert_fp" for k in sp.photometry) and any(k[4] is None for k in sp.photometry)  # forced points and limits
    assert all(v["group_ids"] == [7] and v["stream_ids"] == [2] and v["zp"] == NJY for v in sp.photometry.values())
    t2 = {c: selection.column(c).to_pylist() for c in selection.column_names if c.startswith("T2LightCurveSummary__")}
    for i, obj in enumerate(selection.column("object_id").to_pylist()):
        [a] = [a for a in sp.annotations.values() if a["obj_id"] == obj]
        assert a["origin"] == "ampel_dask" and a["data"] == {k: v[i] for k, v in t2.items() if v[i] is not None and v[i] == v[i]}
    no_secret_anywhere(TOKEN, caplog.text, json.dumps(rec), folder=tmp_path)


def test_skyportal_rerun_posts_nothing_new_and_updates_changed_annotations(selection, sp, tmp_path):
    unit = sp_unit(sp)
    unit.react(selection, context(tmp_path))
    state = (len(sp.candidates), len(sp.photometry), json.dumps(sp.annotations, sort_keys=True))
    first = len(sp.requests)
    [rec] = unit.react(selection, context(tmp_path))  # no journal: SkyPortal's answers keep it idempotent
    again = sp.requests[first:]
    assert {(r["method"], r["path"].split("/")[2]) for r in again} == {("GET", "candidates"), ("PUT", "photometry")}
    assert (len(sp.candidates), len(sp.photometry), json.dumps(sp.annotations, sort_keys=True)) == state and sp.violations == []
    assert rec["candidates"] == rec["annotations_posted"] == rec["annotations_updated"] == 0
    col = selection.column_names.index("T2LightCurveSummary__latest_mag")
    mags = selection.column(col).to_pylist()
    changed = selection.set_column(col, "T2LightCurveSummary__latest_mag", pa.array([m + 0.5 if i < 2 else m for i, m in enumerate(mags)]))
    [rec] = unit.react(changed, context(tmp_path))
    assert rec["annotations_updated"] == 2 and rec["annotations_posted"] == 0 and len(sp.candidates) == state[0]
    objs = selection.column("object_id").to_pylist()
    assert [a["data"]["T2LightCurveSummary__latest_mag"] for a in sp.annotations.values() if a["obj_id"] in objs[:2]] == [mags[0] + 0.5, mags[1] + 0.5]


def test_skyportal_with_the_delivery_journal_asks_nothing_twice(selection, sp, tmp_path):
    journal: dict = {}
    unit = sp_unit(sp)
    unit.react(selection, context(tmp_path, journal))
    first = len(sp.requests)
    [book] = journal.values()
    assert set(book.keys) == set(expected_keys("INFANT", unit.delivery_key, selection))
    assert unit.react(selection, context(tmp_path, journal)) == [] and len(sp.requests) == first


def test_skyportal_auth_failure_and_a_new_alert_of_a_known_object(selection, sp, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AMPEL_DASK_SECRET_FRITZ_TOKEN", "wrong-" + TOKEN)
    with pytest.raises(PushError, match=r"GET .*/api/candidates/.* was refused: HTTP 401") as err:
        sp_unit(sp).react(selection.slice(0, 1), context(tmp_path))
    no_secret_anywhere(TOKEN, str(err.value), caplog.text)
    monkeypatch.setenv("AMPEL_DASK_SECRET_FRITZ_TOKEN", TOKEN)
    unit = sp_unit(sp, filter_ids=[3])
    unit.react(selection.slice(0, 1), context(tmp_path))
    later = selection.slice(0, 1)  # the same object passing again with another alert: a new candidate row
    later = later.set_column(later.column_names.index("alert_id"), "alert_id", pa.array([later.column("alert_id")[0].as_py() + 1]))
    later = later.set_column(later.column_names.index("mjd"), "mjd", pa.array([later.column("mjd")[0].as_py() + 1.0]))
    [rec] = unit.react(later, context(tmp_path))
    assert rec["candidates"] == 1 and len(sp.candidates) == 2 and sp.violations == []


def test_skyportal_config_is_checked():
    with pytest.raises(UnitConfigError, match="exactly one of url and url_env"):
        T3SkyPortal(SP_CONFIG)
    with pytest.raises(UnitConfigError, match="origin"):
        T3SkyPortal({**SP_CONFIG, "url": "https://fritz.science", "origin": "-bad"})
    with pytest.raises(UnitConfigError, match="not readable by a workflow"):
        T3SkyPortal({**SP_CONFIG, "url": "https://fritz.science", "token_env": "HOME"})
    with pytest.raises(UnitConfigError, match="group_ids"):
        T3SkyPortal({k: v for k, v in SP_CONFIG.items() if k != "group_ids"} | {"url": "https://fritz.science"})



def test_skyportal_when_configured_sends_nothing_until_the_secrets_are_set(selection, sp, tmp_path, monkeypatch):
    cfg = {**SP_CONFIG, "url_env": "AMPEL_DASK_SECRET_FRITZ_URL", "when_configured": True}
    monkeypatch.delenv("AMPEL_DASK_SECRET_FRITZ_TOKEN")
    [rec] = T3SkyPortal(cfg).react(selection, context(tmp_path))
    assert rec["objects"] == 0 and "AMPEL_DASK_SECRET_FRITZ_URL, AMPEL_DASK_SECRET_FRITZ_TOKEN unset" in rec["skipped"]
    assert sp.requests == []
    monkeypatch.setenv("AMPEL_DASK_SECRET_FRITZ_URL", sp.url + "/")
    monkeypatch.setenv("AMPEL_DASK_SECRET_FRITZ_TOKEN", TOKEN)
    [rec] = T3SkyPortal(cfg).react(selection.slice(0, 2), context(tmp_path))
    assert rec["objects"] == 2 and sp.violations == [] and rec["url"] == f"{sp.url}/...($AMPEL_DASK_SECRET_FRITZ_URL)"  # host only
