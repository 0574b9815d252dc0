"""Data rights in every tier, on real ZTF alerts: partnership data never changes a public channel.

The metamorphic relation: the real public packets, and the same packets with programid-2 detections and
upper limits added to their histories (plus a few partnership alerts with other copies of the public
datapoints; tests/private_packets.py), ingested and run end to end. Every output of a ``ZTF_PUB``
channel (filter decisions and counts, states, T2 rows, export files, report page and images, webhook
payloads) must be the same; the same channels with ``ZTF_ALL`` must change (so the test can fail).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ampel_dask.graph.runner import RunOptions, run_workflow
from ampel_dask.io.stores import ParquetStore
from ampel_dask.graph.workflow import Workflow
from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.tiers import registry
from ampel_dask.tiers.base import T3Context, T3Unit
from ampel_dask.tiers.rights import PROGRAMIDS, ChannelArchive, channel_view
from ampel_dask.tiers.states import ZTF_ACCESS
from ampel_dask.tiers.units.t0_filters import DecentFilter

from .private_packets import add_private_data
from .test_tiers import DECENT

SOURCES = ["ztf/fink_ztf_public_20181129.tar.gz", "ztf/pitt_google"]
# DecentFilter with a 20-day time-span cut and no galactic-plane cut: on these alerts the private data
# flips decisions both ways (old private detections widen the span, recent ones add detections)
DECENT_20 = {**DECENT, "max_tspan": 20, "min_gal_lat": -1}
HIST_EXPR = "ndet >= 3 and last_det_mjd - first_det_mjd < 25"


def channels(access: str, prefix: str, url: str) -> list[dict]:
    t3 = [{"unit": "T3Export", "config": {"formats": ["parquet", "csv"], "dps": "json"}},
          {"unit": "T3Webhook", "config": {"url": f"{url}/{prefix}_DECENT", "batch_size": 7, "retries": 0}}]  # fmt: skip
    return [
        {"name": f"{prefix}_DECENT", "access": [access], "filters": [{"unit": "DecentFilter", "config": DECENT_20}],
         "t2": ["T2LightCurveSummary", "T2LightCurveFeatures"],
         "t3": [*t3, {"unit": "T3HtmlReport", "config": {"top_n": 50, "sort_by": "T2LightCurveSummary__ndet"}}, "T3ArchiveDump"]},
        {"name": f"{prefix}_HIST", "access": [access], "filters": [{"unit": "ExpressionFilter", "config": {"expr": HIST_EXPR}}],
         "t1": {"unit": "T1Policy", "config": {"history": "archive"}}, "t2": ["T2LightCurveSummary"],
         "t3": [{"unit": "T3Export", "config": {"formats": ["parquet"], "dps": "json"}},
                {"unit": "T3Webhook", "config": {"url": f"{url}/{prefix}_HIST", "batch_size": 50, "retries": 0}}]},
    ]  # fmt: skip


class T3ArchiveDump(T3Unit):
    """A T3 unit that writes down everything it reads of the archive through its context: every alert
    with its history and aggregates, and a digest of every cutout."""

    version = "1"

    def react(self, selection: pa.Table, context: T3Context) -> list[dict]:
        arch = context.archive
        cols = ["alert_id", "stock", "mjd", "programid", "ndet", "first_det_mjd", "last_det_mjd", PROGRAMIDS, "dps"]
        rows = pa.concat_tables([arch.read(p, cols) for p in arch.partitions()])
        rows = rows.take(pc.sort_indices(rows, [("alert_id", "ascending")]))
        cutouts = {}
        for p in arch.partitions():
            for r in (t.to_pylist() if (t := arch.read_cutouts(p)) is not None else []):
                cutouts[str(r["alert_id"])] = [hashlib.sha256(r[f"cutout_{k}"] or b"").hexdigest() for k in ("science", "template", "difference")]
        pq.write_table(rows, Path(context.out_dir) / "archive.parquet")
        (Path(context.out_dir) / "cutouts.json").write_text(json.dumps(cutouts, sort_keys=True))
        return [{"kind": "file", "path": str(Path(context.out_dir) / "archive.parquet"), "rows": rows.num_rows}]


class Receiver:
    """A local HTTP endpoint that keeps every JSON body posted to it, by path."""

    def __init__(self):
        self.bodies: dict[str, list[dict]] = defaultdict(list)
        self.lock = threading.Lock()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with rec.lock:
                    rec.bodies[self.path].append(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self) -> dict[str, list[dict]]:
        with self.lock:
            out, self.bodies = dict(self.bodies), defaultdict(list)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def archives(tmp_path_factory, data_dir) -> dict:
    """The real packets and the same packets with private data, each ingested into its own archive."""
    tmp = tmp_path_factory.mktemp("rights")
    sources = [data_dir / s for s in SOURCES]
    stats = add_private_data(sources, tmp / "packets")
    out = {"stats": stats}
    for name, inputs in (("public", [str(s) for s in sources]), ("private", [str(tmp / "packets")])):
        report = ingest(inputs, tmp / name, IngestOptions(workers=0, progress=False))
        assert report.quarantined == 0 and report.ingested == report.read
        out[name] = tmp / name
    return out


@pytest.fixture(scope="module")
def runs(archives, tmp_path_factory) -> dict:
    """One workflow (public and all-data channels side by side) run end to end on each archive."""
    receiver = Receiver()
    out = {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
                mp.delenv(var, raising=False)
            real = registry.entry_points
            dump = EntryPoint("T3ArchiveDump", f"{__name__}:T3ArchiveDump", registry.GROUP)
            mp.setattr(registry, "entry_points", lambda group: [*real(group=group), dump])
            registry.installed(refresh=True)
            wf = Workflow.model_validate({"name": "rights", "channels": channels("ZTF_PUB", "PUB", receiver.url) + channels("ZTF_ALL", "ALL", receiver.url)})
            from ampel_dask.graph.plan import plan_workflow

            out["t2_units"] = {p.name: [(u.name(), u.identity.key) for u in p.t2] for p in plan_workflow(wf)}
            for name in ("public", "private"):
                store = tmp_path_factory.mktemp(f"store_{name}")
                summary = run_workflow(wf, RunOptions(archive=str(archives[name]), store=str(store), progress=False, workers=0))
                out[name] = {"summary": summary, "store": store, "posts": receiver.take()}
    finally:
        receiver.close()
        registry.installed(refresh=True)
    return out


# --- what a channel put out, with run ids, timestamps and paths taken out --------------------------


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def states(run: dict, channel: str) -> list[dict]:
    t = ParquetStore(run["store"]).read_states(channel)
    return sorted(_clean(t.to_pylist()), key=lambda r: r["alert_id"])


def t2_rows(run: dict, units: list[tuple[str, str]], channel: str) -> dict[str, list[dict]]:
    """The T2 results of the channel's states, per unit (the run id left out)."""
    store = ParquetStore(run["store"])
    sid = np.unique(store.read_states(channel).column("state_id").to_numpy())
    out = {}
    for name, key in units:
        rows = _clean(store.read_t2(name, key, sid).drop_columns(["run_id"]).to_pylist())
        out[name] = sorted(rows, key=lambda r: r["state_id"])
    return out


def t3_files(run: dict, channel: str) -> dict[str, object]:
    """Every T3 file of the channel as ``<unit>/<path in the unit's folder>`` (the folder is named by
    the T3 key, which follows the archive's content), as comparable content."""
    out = {}
    for folder in sorted((Path(run["store"]) / "t3" / channel).iterdir()):
        unit = pq.read_table(folder / "objects.parquet").column("unit")[0].as_py()
        for f in sorted(folder.rglob("*")):
            if not f.is_file():
                continue
            rel = f"{unit}/{f.relative_to(folder).as_posix()}"
            if f.suffix == ".parquet":
                t = pq.read_table(f)
                out[rel] = _clean(t.drop_columns([c for c in ("run_id", "t3_key") if c in t.column_names]).to_pylist())
            elif f.suffix in (".csv", ".svg"):
                out[rel] = f.read_text()
            elif f.suffix == ".html":
                text = re.sub(r"\d{8}T\d{6}-[0-9a-f]{6}", "RUN", f.read_text())  # run ids (index and object pages)
                out[rel] = re.sub(r"written \d{4}-\d\d-\d\d \d\d:\d\d UTC", "written TIME", text)
            else:
                out[rel] = f.read_bytes()
    return out


def posts(run: dict, channel: str) -> list[dict]:
    return [{**b, "run_id": "RUN"} for b in _clean(run["posts"].get(f"/{channel}", []))]


def outputs(runs: dict, name: str, channel: str) -> dict:
    run = runs[name]
    s = run["summary"]
    return {
        "passed": s["channels"][channel]["passed"],
        "reasons": {k: v for k, v in s["rejections"][channel].items() if k != "access"},
        "states": states(run, channel),
        "t2": t2_rows(run, runs["t2_units"][channel], channel),
        "t3": t3_files(run, channel),
        "webhook": posts(run, channel),
    }


# --- the metamorphic tests ------------------------------------------------------------------------


def test_private_data_was_added(archives):
    """The modified archive really holds what the test is about: private detections, upper limits and
    alerts, as many as the rewriting put in."""
    stats = archives["stats"]
    assert stats["private_dets"] > 1000 and stats["private_limits"] > 500 and stats["private_alerts"] >= 3
    rows = {}
    for name in ("public", "private"):
        a = Archive(archives[name])
        rows[name] = pa.concat_tables([a.read(p, ["alert_id", "programid", "dps"]) for p in a.partitions()])
    pub, priv = rows["public"], rows["private"]
    assert priv.num_rows == pub.num_rows + stats["private_alerts"]
    assert pc.sum(pc.equal(priv.column("programid"), 2)).as_py() == stats["private_alerts"]
    flat = pc.list_flatten(priv.column("dps")).combine_chunks()
    pid, kind = flat.field("programid").to_numpy(zero_copy_only=False), flat.field("kind").to_numpy(zero_copy_only=False)
    flat_pub = pc.list_flatten(pub.column("dps")).combine_chunks()
    assert set(flat_pub.field("programid").to_pylist()) == {1}
    # the private points the rewriting put in every packet, the private alerts' own and their triggers
    assert ((pid == 2) & (kind == 0)).sum() == stats["private_dets"] + stats["private_alert_dets"] + stats["private_alerts"]
    assert ((pid == 2) & (kind == 1)).sum() == stats["private_limits"] + stats["private_alert_limits"]


@pytest.mark.parametrize("kind", ["DECENT", "HIST"])
def test_public_channel_outputs_do_not_change_with_private_data(runs, kind):
    channel = f"PUB_{kind}"
    before, after = outputs(runs, "public", channel), outputs(runs, "private", channel)
    assert before["passed"] >= 10 and before["states"] and before["webhook"]
    assert before["t3"] and all(before["t3"].values())
    for what in before:
        assert after[what] == before[what], f"{channel}: {what} changed when private data was added"
    if kind == "DECENT":  # the report: pages, a light curve per object and the cutout stamps
        names = list(before["t3"])
        objects = len({s["stock"] for s in before["states"]})
        assert sum(n.endswith("_lc.svg") for n in names) == objects and any(n.endswith(("_science.png", "_difference.png")) for n in names)


def test_private_alerts_are_rejected_for_access(runs, archives):
    """The partnership alerts are counted, as rejected for 'access', and nothing else moves."""
    n = archives["stats"]["private_alerts"]
    for kind in ("DECENT", "HIST"):
        before = runs["public"]["summary"]["rejections"][f"PUB_{kind}"]
        after = runs["private"]["summary"]["rejections"][f"PUB_{kind}"]
        assert "access" not in before and after["access"] == n
        assert runs["private"]["summary"]["channels"][f"PUB_{kind}"]["rejected"] == runs["public"]["summary"]["channels"][f"PUB_{kind}"]["rejected"] + n


@pytest.mark.parametrize("kind", ["DECENT", "HIST"])
def test_all_data_channel_outputs_do_change(runs, kind):
    """The control: a channel that may see the partnership data decides and reports otherwise, so the
    test above would fail if the public channel saw it."""
    channel = f"ALL_{kind}"
    before, after = outputs(runs, "public", channel), outputs(runs, "private", channel)
    # on the public packets the two channels see the same: their outputs agree but for their names
    assert before["states"] == outputs(runs, "public", f"PUB_{kind}")["states"]
    accepted = {s["alert_id"] for s in before["states"]}, {s["alert_id"] for s in after["states"]}
    assert accepted[0] - accepted[1] and accepted[1] - accepted[0]  # decisions flip both ways
    for what in ("states", "t2", "t3", "webhook"):
        assert after[what] != before[what], f"{channel}: {what} did not change"


# --- the channel's view, against a plain-Python reference --------------------------------------


def reference_view(rows: list[dict], access: list[str]) -> dict[int, tuple]:
    """Per alert a channel may see: (ndet, first, last detection time, visible datapoint ids), one
    alert and one datapoint at a time, from the access table alone."""
    allowed = set().union(*(ZTF_ACCESS.get(t, set()) for t in access))
    out = {}
    for r in rows:
        if r["programid"] not in allowed and "ALL" not in access:
            continue
        dps = [d for d in r["dps"] if d["programid"] in allowed or "ALL" in access]
        det = [d["mjd"] for d in dps if d["kind"] == 0]
        mask = sum({1 << d["programid"] for d in dps})  # programids 1 and 2 only in this data
        out[r["alert_id"]] = (len(det), min(det) if det else None, max(det) if det else None, mask, [d["dp_id"] for d in dps])
    return out


def view_rows(view: pa.Table) -> dict[int, tuple]:
    ids = [[d["dp_id"] for d in dps] for dps in view.column("dps").to_pylist()] if "dps" in view.column_names else None
    out = {}
    for i, r in enumerate(view.select(["alert_id", "ndet", "first_det_mjd", "last_det_mjd", PROGRAMIDS]).to_pylist()):
        out[r["alert_id"]] = (r["ndet"], r["first_det_mjd"], r["last_det_mjd"], r[PROGRAMIDS], ids[i] if ids else None)
    return out


@pytest.fixture(scope="module")
def private_rows(archives) -> pa.Table:
    a = Archive(archives["private"])
    return pa.concat_tables([a.read(p) for p in a.partitions()])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(access=st.lists(st.sampled_from([*ZTF_ACCESS, "ALL", "LSST"]), min_size=1, max_size=3, unique=True),
       older=st.booleans(), with_dps=st.booleans())  # fmt: skip
def test_channel_view_matches_a_plain_python_reference(private_rows, access, older, with_dps):
    """Any access tags; the archive as written (aggregates and programid mask from ingest) or as an
    older archive without them (computed from the history); a filter that reads ``dps`` or not."""
    table = private_rows
    if older:
        table = table.drop_columns(["ndet", "first_det_mjd", "last_det_mjd", PROGRAMIDS])
    hist = table.column("dps")
    batch = table if with_dps else table.drop_columns(["dps"])
    view, seen = channel_view(batch, access, lambda t: t.append_column("dps", hist))
    expected = reference_view(table.select(["alert_id", "programid", "dps"]).to_pylist(), access)
    assert view.column("alert_id").to_pylist() == [a for a, ok in zip(table.column("alert_id").to_pylist(), seen) if ok]
    assert sorted(expected) == sorted(view.column("alert_id").to_pylist())
    got = view_rows(view)
    for alert_id, (ndet, first, last, mask, ids) in expected.items():
        g = got[alert_id]
        assert g[:4] == (ndet, first, last, mask), alert_id
        if with_dps:
            assert g[4] == ids, alert_id
    assert ("dps" in view.column_names) == with_dps


def test_programid_mask_is_the_history_programids(archives, private_rows):
    """The ingest's mask, bit by bit, from each history's programids (a Python loop)."""
    a = Archive(archives["public"])
    public = pa.concat_tables([a.read(p, ["dps", PROGRAMIDS]) for p in a.partitions()])
    for table, masks in ((public, {0b10}), (private_rows, {0b110})):  # programid 1; every packet got private points
        got = table.column(PROGRAMIDS).to_pylist()
        for mask, dps in zip(got, table.column("dps").to_pylist()):
            expect = 0
            for d in dps:
                p = d["programid"]
                expect |= 1 << (p if p is not None and 0 <= p < 15 else 15)
            assert mask == expect
        assert set(got) == masks


def test_decent_filter_in_public_view_equals_public_archive(archives, private_rows):
    """T0 alone, exactly as the graph's T0 task builds its input: the same decisions, alert by alert,
    and the private data would flip some of them (so the view is what makes them equal)."""
    a = Archive(archives["public"])
    public = pa.concat_tables([a.read(p) for p in a.partitions()])
    f = DecentFilter(DECENT_20)

    def decisions(t: pa.Table, access: list[str]) -> dict[int, str | None]:
        view, _ = channel_view(t, access)
        return dict(zip(view.column("alert_id").to_pylist(), f.verdict(view).reason_of()))

    base = decisions(public, ["ZTF_PUB"])
    assert decisions(private_rows, ["ZTF_PUB"]) == base
    leaked = dict(zip(private_rows.column("alert_id").to_pylist(), f.verdict(private_rows).reason_of()))
    assert sum(leaked[k] != v for k, v in base.items()) >= 5


def test_t3_archive_gives_only_what_the_channel_may_see(archives):
    """What a T3 unit reads through its context: the public view of the modified archive is the public
    archive (rows, histories, aggregates, cutouts); the partnership alerts' cutouts are not given."""
    pub, priv = Archive(archives["public"]), Archive(archives["private"])
    view = ChannelArchive(priv, ["ZTF_PUB"])
    cols = ["alert_id", "stock", "mjd", "programid", "ndet", "first_det_mjd", "last_det_mjd", "dps"]

    def by_id(tables: list[pa.Table]) -> list[dict]:
        return sorted(_clean(pa.concat_tables(tables).to_pylist()), key=lambda r: r["alert_id"])

    assert by_id([view.read(p, cols) for p in view.partitions()]) == by_id([pub.read(p, cols) for p in pub.partitions()])
    whole = by_id([view.read(p) for p in view.partitions()])
    assert all(d["programid"] == 1 for r in whole for d in r["dps"]) and {r["programid"] for r in whole} == {1}
    cut = {r["alert_id"]: r for p in view.partitions() if (t := view.read_cutouts(p)) is not None for r in t.to_pylist()}
    cut_pub = {r["alert_id"]: r for p in pub.partitions() if (t := pub.read_cutouts(p)) is not None for r in t.to_pylist()}
    assert cut == cut_pub
    private_ids = [r["alert_id"] for p in priv.partitions() for r in priv.read(p, ["alert_id", "programid"]).to_pylist() if r["programid"] == 2]
    assert len(private_ids) == archives["stats"]["private_alerts"]
    asked = {r["alert_id"] for p in priv.partitions() if (t := priv.read_cutouts(p, private_ids)) is not None for r in t.to_pylist()}
    assert asked == set(private_ids)  # the archive itself has them ...
    assert not {r["alert_id"] for p in view.partitions() if (t := view.read_cutouts(p, private_ids)) is not None for r in t.to_pylist()}  # ... the view not


def test_archive_without_the_mask_gives_the_same_public_outputs(archives, runs, tmp_path):
    """An archive written before the programid mask and the history aggregates (every other part
    rewritten without them, so work units mix both layouts): the public channels' decisions, states
    and T2 results are those of the public archive (the view computes the aggregates from ``dps``)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(archives["private"], old)
    arch = Archive(old)
    for i, part in enumerate(arch.partitions()):
        if i % 2 == 0:
            path = old / part.path
            t = pq.read_table(path)
            pq.write_table(t.drop_columns(["ndet", "first_det_mjd", "last_det_mjd", PROGRAMIDS]), path)
    assert PROGRAMIDS not in pq.read_schema(old / arch.partitions()[0].path).names
    wf = Workflow.model_validate({"name": "old", "channels": [{k: v for k, v in c.items() if k != "t3"} for c in channels("ZTF_PUB", "PUB", "http://unused")]})
    summary = run_workflow(wf, RunOptions(archive=str(old), store=str(tmp_path / "store"), progress=False, workers=0))
    run = {"summary": summary, "store": tmp_path / "store"}
    for channel in ("PUB_DECENT", "PUB_HIST"):
        expect = outputs(runs, "public", channel)
        assert summary["channels"][channel]["passed"] == expect["passed"]
        assert {k: v for k, v in summary["rejections"][channel].items() if k != "access"} == expect["reasons"]
        assert states(run, channel) == expect["states"]
        assert t2_rows(run, runs["t2_units"][channel], channel) == expect["t2"]
