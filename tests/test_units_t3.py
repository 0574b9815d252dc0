"""Built-in T3 units on a selection made from real ZTF alerts: export, HTML report, webhook."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from functools import partial
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import xxhash

from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.io.stores import ParquetStore
from ampel_dask.tiers.base import T3Context, UnitConfigError
from ampel_dask.tiers.states import T1PolicyConfig, build_states
from ampel_dask.tiers.units.t3_export import T3Export
from ampel_dask.tiers.units.t3_report import T3HtmlReport
from ampel_dask.tiers.units.t3_webhook import T3Webhook, WebhookError

ALERT_COLUMNS = ["alert_id", "stock", "object_id", "survey", "mjd", "ra", "dec", "dps"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def archive_root(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("t3_archive")
    ingest([str(data_dir / "ztf/kowalski")], root, IngestOptions(workers=0, progress=False))
    return root


@pytest.fixture(scope="module")
def selection(archive_root) -> pa.Table:
    """One row per object (its latest alert and state) plus fabricated T2 result columns."""
    arch = Archive(archive_root)
    alerts = pa.concat_tables([arch.read(p, columns=ALERT_COLUMNS) for p in arch.partitions()])
    stock = alerts.column("stock").to_numpy()
    order = np.lexsort((alerts.column("alert_id").to_numpy(), alerts.column("mjd").to_numpy(), stock))
    last = order[np.r_[stock[order][1:] != stock[order][:-1], True]]
    latest = alerts.take(pa.array(last))
    states = build_states(latest, T1PolicyConfig(), access=["ZTF_PUB", "ZTF_PRIV"])
    n = states.num_rows
    assert n >= 20 and n == len(np.unique(stock))
    p_sn = np.random.default_rng(7).permutation(n) / n  # distinct known scores
    p_sn[[3, 11]] = np.nan  # no classification for two objects
    amp = np.linspace(0.1, 2.0, n)
    sel = states.select(["stock", "object_id", "survey", "alert_id", "mjd", "ra", "dec", "state_id", "dps"])
    t2 = {
        "T2Classifier__p_SN": pa.array(p_sn),
        "T2Classifier__code": pa.array(np.where(np.isnan(p_sn), 1, 0).astype(np.int64)),
        "T2Classifier__classes": pa.array([["SN Ia", "SN II"] if i % 2 else ["AGN"] for i in range(n)]),
        "T2LightCurveFeatures__amplitude_g": pa.array([None if i % 5 == 0 else float(a) for i, a in enumerate(amp)], pa.float64()),
        "T2BazinFit__rise_time_r": pa.array(np.arange(n, dtype=np.float64) * 1.5),
    }
    for name, col in t2.items():
        sel = sel.append_column(name, col)
    return sel


def context(tmp_path: Path, archive=None) -> T3Context:
    """As the framework makes it (graph/tasks.run_t3): with the mapper that spreads work from a worker."""
    from ampel_dask.graph.workers import cluster_map

    return T3Context(out_dir=tmp_path, run_id="run-42", channel="TEST_CHANNEL", archive=archive, mapper=cluster_map)


def same_values(a: list, b: list) -> bool:
    """Equal lists where NaN and None count as the same missing value."""
    def norm(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return [norm(x) for x in a] == [norm(y) for y in b]


# --- export ---------------------------------------------------------------------------------------


def test_export_parquet_and_csv_read_back_equal(selection, tmp_path):
    records = T3Export().react(selection, context(tmp_path))
    assert [r["format"] for r in records] == ["parquet", "csv"]
    assert all(r["kind"] == "file" and r["rows"] == selection.num_rows for r in records)
    assert {Path(r["path"]).name for r in records} == {"TEST_CHANNEL_export.parquet", "TEST_CHANNEL_export.csv"}
    expected = selection.drop_columns(["dps"])

    back = pq.read_table(records[0]["path"])
    assert back.schema.equals(expected.schema)
    for name in expected.column_names:  # (Arrow's equals treats NaN != NaN)
        assert same_values(back.column(name).to_pylist(), expected.column(name).to_pylist()), name

    binary = {f.name for f in expected.schema if pa.types.is_fixed_size_binary(f.type)}  # state_id: hex text in CSV
    flat_types = {f.name: pa.string() if f.name in binary else f.type for f in expected.schema if not pa.types.is_nested(f.type)}
    csv = pacsv.read_csv(records[1]["path"], convert_options=pacsv.ConvertOptions(column_types=flat_types))
    assert csv.column_names == expected.column_names and binary == {"state_id"}
    for name in expected.column_names:
        want = expected.column(name).to_pylist()
        got = csv.column(name).to_pylist()
        if name in binary:
            assert [bytes.fromhex(g) for g in got] == want, name
        elif name in flat_types:
            assert same_values(got, want), name
        else:  # nested T2 values are JSON text in CSV
            assert [json.loads(g) for g in got] == want, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TEST_CHANNEL_export.csv", "TEST_CHANNEL_export.parquet"]


def test_export_columns_and_dps_as_json(selection, tmp_path):
    unit = T3Export(formats=["parquet"], filename="cands", include=["object_id", "T2Classifier__*", "dps", "T2Missing__x"],
                    exclude=["*__classes"], dps="json")  # fmt: skip
    [rec] = unit.react(selection, context(tmp_path))
    assert rec["path"] == str(tmp_path / "cands.parquet")
    back = pq.read_table(rec["path"])
    assert back.column_names == ["object_id", "T2Classifier__p_SN", "T2Classifier__code", "dps", "T2Missing__x"]
    assert back.column("T2Missing__x").null_count == selection.num_rows  # absent T2 result: empty column
    dps = [json.loads(s) for s in back.column("dps").to_pylist()]
    orig = selection.column("dps").to_pylist()
    assert [len(d) for d in dps] == [len(d) for d in orig]
    assert [p["dp_id"] for p in dps[0]] == [p["dp_id"] for p in orig[0]]
    assert same_values([p["mag"] for p in dps[1]], [p["mag"] for p in orig[1]])


@pytest.mark.parametrize("size", [1, 3, 7, 10_000])
def test_export_in_batches_writes_the_files_of_the_whole_selection(selection, tmp_path, size):
    """A selection too large for one table comes in batches (``react_batches``); the files written
    batch by batch must be those of the whole selection: the same Parquet table, the same CSV bytes.
    Oracle: the export of the whole table (checked against the selection above)."""
    unit = T3Export(dps="json")
    whole = {r["format"]: r for r in unit.react(selection, context(tmp_path / "whole"))}
    batches = [selection.slice(i, size) for i in range(0, selection.num_rows, size)]
    parts = {r["format"]: r for r in unit.react_batches(iter(batches), context(tmp_path / "parts"))}
    assert {f: r["rows"] for f, r in parts.items()} == {f: r["rows"] for f, r in whole.items()} == {"parquet": selection.num_rows, "csv": selection.num_rows}
    got, want = pq.read_table(parts["parquet"]["path"]), pq.read_table(whole["parquet"]["path"])
    assert got.schema.equals(want.schema, check_metadata=True)
    for name in want.column_names:  # (Arrow's equals treats NaN != NaN)
        assert same_values(got.column(name).to_pylist(), want.column(name).to_pylist()), name
    assert pq.ParquetFile(parts["parquet"]["path"]).metadata.num_row_groups == len(batches)
    assert Path(parts["csv"]["path"]).read_bytes() == Path(whole["csv"]["path"]).read_bytes()


def test_export_config_is_checked():
    with pytest.raises(UnitConfigError, match="formats"):
        T3Export(formats=["xlsx"])
    with pytest.raises(UnitConfigError, match="filename"):
        T3Export(filename="../elsewhere")
    with pytest.raises(UnitConfigError, match="colums"):
        T3Export(colums=["object_id"])


# --- report ---------------------------------------------------------------------------------------


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.objects: list[str] = []
        self._in_oid = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "td" and a.get("class") == "oid":
            self._in_oid = True

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_oid = False

    def handle_data(self, data):
        if self._in_oid and data.strip():
            self.objects.append(data.strip())


def parse_page(path: Path) -> PageParser:
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def check_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def check_svg(path: Path) -> None:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(path.read_text(encoding="utf-8"))
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("viewBox"), path


def figures(folder: Path) -> list[str]:
    return [p.name for p in [*folder.glob("*.png"), *folder.glob("*.svg")]]


def report_files(index: Path) -> set[str]:
    """Every file the report's pages reference (index and object pages), relative to ``objects/``."""
    page = parse_page(index)
    names = {Path(s).name for s in page.imgs}
    for link in page.links:
        sub = parse_page(index.parent / link)
        names |= {link.split("/")[-1]} | {s for s in sub.imgs}
    return names


def test_report_top_n_by_t2_score_with_cutouts(selection, archive_root, tmp_path):
    unit = T3HtmlReport(sort_by="T2Classifier__p_SN", top_n=5, title="Best SN candidates")
    [rec] = unit.react(selection, context(tmp_path, Archive(archive_root)))
    index = Path(rec["path"])
    assert index == tmp_path / "TEST_CHANNEL_report" / "index.html"
    page = parse_page(index)
    p_sn = selection.column("T2Classifier__p_SN").to_numpy()
    ids = selection.column("object_id").to_pylist()
    ranked = sorted((i for i in range(len(ids)) if not np.isnan(p_sn[i])), key=lambda i: -p_sn[i])
    assert page.objects == [ids[i] for i in ranked[:5]]
    # every object has a small light curve in the table and (the archive keeps ZTF's three stamps) its cutouts;
    # its own page has the large light curve and the same stamps
    stamps = [s for s in page.imgs if s.endswith(".png")]
    assert sum(s.endswith("_lc_small.svg") for s in page.imgs) == 5 and len(stamps) == 15 and len(page.imgs) == 20
    assert rec["objects"] == 5 and rec["images"] == 5 * 2 + 15
    assert sorted(Path(s).name.rsplit("_", 1)[1] for s in stamps) == ["difference.png"] * 5 + ["science.png"] * 5 + ["template.png"] * 5
    assert page.links == [f"objects/{i}.html" for i in page.objects for _ in ("name", "light curve")]
    for src in page.imgs:
        (check_png if src.endswith(".png") else check_svg)(index.parent / src)
    for link in dict.fromkeys(page.links):
        sub = parse_page(index.parent / link)
        assert [s for s in sub.imgs if s.endswith(".svg")] == [link.split("/")[1].replace(".html", "_lc.svg")]
        assert sorted(s for s in sub.imgs if s.endswith(".png")) == sorted(Path(s).name for s in stamps if Path(s).name.startswith(link.split("/")[1][:-5] + "_"))
        assert all((index.parent / "objects" / s).exists() for s in sub.imgs)
    objects = index.parent / "objects"
    assert sorted(figures(objects)) == sorted(n for n in report_files(index) if not n.endswith(".html"))
    assert not list(index.parent.rglob("*.tmp"))
    text = index.read_text()
    assert "Best SN candidates" in text and "run-42" in text
    # columns without a declared label get their name made readable; the raw name is the header's tooltip
    assert 'title="T2BazinFit__rise_time_r">Rise time r<' in text and 'title="T2LightCurveFeatures__amplitude_g">Half amplitude (g)<br><span class="sub">[mag]</span>' in text

    from PIL import Image

    with Image.open(index.parent / stamps[0]) as im:  # a ZTF stamp at its own size, 63x63 grey
        assert im.mode == "L" and im.size == (63, 63)


def test_report_figures_drawn_across_workers_are_the_same_files(selection, archive_root, tmp_path):
    """Inside a Dask worker the report hands its stamps to the cluster (T3Context.map): same pages,
    same figure bytes as drawn in one process, and the stamp chunks really ran as their own tasks."""
    from distributed import Client, LocalCluster, get_task_stream

    unit = T3HtmlReport(sort_by="T2Classifier__p_SN", top_n=12)
    local = tmp_path / "local"
    [rec_local] = unit.react(selection, context(local, Archive(archive_root)))
    remote = tmp_path / "remote"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, Client(cl) as client:
        with get_task_stream(client) as ts:
            [rec_remote] = client.submit(unit.react, selection, context(remote, Archive(archive_root))).result()
    assert sum(str(t["key"]).startswith("draw_cutouts") for t in ts.data) == 3  # 12 objects with stamps, 5 per task
    assert {k: v for k, v in rec_remote.items() if k != "path"} == {k: v for k, v in rec_local.items() if k != "path"}
    a, b = Path(rec_local["path"]).parent / "objects", Path(rec_remote["path"]).parent / "objects"
    names = sorted(p.name for p in a.iterdir())
    assert len(names) == 12 * (3 + 3) and names == sorted(p.name for p in b.iterdir())  # page, 2 light curves, 3 stamps
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert parse_page(a.parent / "index.html").objects == parse_page(b.parent / "index.html").objects


def test_light_curve_svg_marks_every_datapoint_of_a_real_object(selection):
    """One mark per plotted datapoint (detections, upper limits, forced photometry with S/N >= 3),
    inside the plot area, brighter magnitudes higher; the alert's time is a line; objects differ."""
    import xml.etree.ElementTree as ET

    from ampel_dask.io.layout import DETECTION, FORCED, UPPER_LIMIT
    from ampel_dask.tiers.helpers.lightcurve_svg import BAND_COLORS as BAND_ORDER, BOTTOM, LEFT, RIGHT, TOP, light_curve_svg

    ns = {"s": "http://www.w3.org/2000/svg"}
    n = selection.num_rows
    texts = [light_curve_svg(selection.column("dps")[i].values, selection.column("object_id")[i].as_py(), selection.column("mjd")[i].as_py()) for i in range(n)]
    assert len(set(texts)) == n
    checked = 0
    for i, text in enumerate(texts):
        root = ET.fromstring(text)
        dps = selection.column("dps")[i].values
        kind = dps.field("kind").to_numpy(zero_copy_only=False)
        mag = np.asarray(dps.field("mag").to_numpy(zero_copy_only=False), dtype=float)
        mjd = np.asarray(dps.field("mjd").to_numpy(zero_copy_only=False), dtype=float)
        det = (kind == DETECTION) & np.isfinite(mag) & np.isfinite(mjd)
        circles = root.findall(".//s:g[@class='det']/s:circle", ns)
        assert len(circles) == det.sum()
        cx = np.array([float(c.get("cx")) for c in circles])
        cy = np.array([float(c.get("cy")) for c in circles])
        assert ((cx >= LEFT) & (cx <= RIGHT) & (cy >= TOP) & (cy <= BOTTOM)).all()
        if det.sum() >= 2 and np.ptp(mag[det]) > 0.1 and np.ptp(mjd[det]) > 0.1:
            # circles come band by band in datapoint order: y grows with magnitude (brighter is higher), x with time
            band = np.asarray(dps.field("band").to_pylist(), dtype=object)
            order = np.concatenate([np.flatnonzero(det & (band == b)) for b in dict.fromkeys(band[det])])
            order = order[np.argsort([list(BAND_ORDER).index(b) if b in BAND_ORDER else 99 for b in band[order]], kind="stable")]
            assert np.corrcoef(cy, mag[order])[0, 1] > 0.999 and np.corrcoef(cx, mjd[order])[0, 1] > 0.999
            checked += 1
        ul = (kind == UPPER_LIMIT) & np.isfinite(dps.field("maglim").to_numpy(zero_copy_only=False).astype(float)) & np.isfinite(mjd)
        drawn_ul = sum(p.get("d").count("z") for p in root.findall(".//s:path[@class='ul']", ns))
        assert drawn_ul == ul.sum()
        flux = dps.field("flux").to_numpy(zero_copy_only=False).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            fp = (kind == FORCED) & (flux / dps.field("flux_err").to_numpy(zero_copy_only=False).astype(float) >= 3) & (flux > 0) & np.isfinite(mjd)
        assert sum(p.get("d").count("z") for p in root.findall(".//s:path[@class='fp']", ns)) == fp.sum()
        assert len(root.findall(".//s:path[@class='alert']", ns)) == 1
        assert selection.column("object_id")[i].as_py() in text
    assert checked >= 3
    empty = ET.fromstring(light_curve_svg(None, "ZTFnothing", None))
    assert "no photometry" in "".join(empty.itertext()) and not empty.findall(".//s:circle", ns)


def test_report_default_order_without_archive_and_rerun(selection, tmp_path):
    ctx = context(tmp_path)
    [rec] = T3HtmlReport(top_n=4, columns=["T2Classifier__p_SN"]).react(selection, ctx)
    page = parse_page(Path(rec["path"]))
    mjd, ids = selection.column("mjd").to_numpy(), selection.column("object_id").to_pylist()
    expected = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-mjd[i], ids[i]))[:4]]
    assert page.objects == expected
    assert rec["images"] == 8 and len(page.imgs) == 4 and all(s.endswith("_lc_small.svg") for s in page.imgs)  # no archive: no cutouts
    text = Path(rec["path"]).read_text()
    assert "T2Classifier__p_SN" in text and "T2BazinFit__rise_time_r" not in text
    assert "T2BazinFit__rise_time_r" not in text and "rise_time_r" in Path(rec["path"]).with_name("objects").joinpath(f"{expected[0]}.html").read_text()

    # ascending p_SN: objects without a score come last; the earlier run's pages and figures are removed
    subset = selection.take([12, 11, 4, 3, 2])  # rows 3 and 11 have p_SN = NaN
    [rec2] = T3HtmlReport(sort_by="T2Classifier__p_SN", descending=False, top_n=100).react(subset, ctx)
    page2 = parse_page(Path(rec2["path"]))
    p_sn = selection.column("T2Classifier__p_SN").to_numpy()
    scored = sorted([12, 4, 2], key=lambda i: p_sn[i])
    assert page2.objects == [ids[i] for i in scored] + sorted([ids[3], ids[11]])
    folder = Path(rec2["path"]).parent / "objects"
    assert sorted(p.name for p in folder.iterdir()) == sorted(report_files(Path(rec2["path"])))
    assert len(list(folder.glob("*.html"))) == 5


def test_report_errors_and_empty(selection, tmp_path):
    with pytest.raises(ValueError, match="T2Nope__score"):
        T3HtmlReport(sort_by="T2Nope__score").react(selection, context(tmp_path))
    with pytest.raises(UnitConfigError, match="top_n"):
        T3HtmlReport(top_n=0)
    [rec] = T3HtmlReport().react(selection.slice(0, 0), context(tmp_path))
    assert rec["images"] == 0 and "0 of 0" in Path(rec["path"]).read_text()


# --- webhook --------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[int] = []  # statuses to answer next (then 200)
        self.lock = threading.Lock()


@pytest.fixture
def hook():
    rec = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with rec.lock:
                rec.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                status = rec.script.pop(0) if rec.script else 200
            msg = b'{"ok":true}' if status < 300 else b"invalid_payload"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield rec, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_webhook_batches_values_and_env_header(selection, hook, monkeypatch, caplog, tmp_path):
    rec, url = hook
    monkeypatch.setenv("AMPEL_DASK_SECRET_TEST_TOKEN", "s3cret-value")
    unit = T3Webhook(url=url, batch_size=10, columns=["T2Classifier__*"], headers_from_env={"X-Api-Key": "AMPEL_DASK_SECRET_TEST_TOKEN"})
    with caplog.at_level(logging.DEBUG):
        records = unit.react(selection, context(tmp_path))
    n = selection.num_rows
    assert len(rec.requests) == len(records) == math.ceil(n / 10)
    assert [r["objects"] for r in records] == [min(10, n - i) for i in range(0, n, 10)]
    assert all(r == {"kind": "webhook", "url": url, "objects": r["objects"], "status": 200} for r in records)
    assert all(r["headers"]["X-Api-Key"] == "s3cret-value" for r in rec.requests)
    assert all(r["headers"]["Content-Type"] == "application/json" and r["path"] == "/hook" for r in rec.requests)
    assert "s3cret-value" not in caplog.text and "s3cret-value" not in json.dumps(records)

    bodies = [r["body"] for r in rec.requests]
    assert all(b["channel"] == "TEST_CHANNEL" and b["run_id"] == "run-42" for b in bodies)
    objects = [o for b in bodies for o in b["objects"]]
    assert [o["object_id"] for o in objects] == selection.column("object_id").to_pylist()
    assert set(objects[0]) == {"idempotency_key", "object_id", "stock", "ra", "dec", "mjd",
                               "T2Classifier__p_SN", "T2Classifier__code", "T2Classifier__classes"}  # fmt: skip
    assert [o["stock"] for o in objects] == selection.column("stock").to_pylist()
    assert [o["ra"] for o in objects] == selection.column("ra").to_pylist()
    assert [o["T2Classifier__classes"] for o in objects] == selection.column("T2Classifier__classes").to_pylist()
    p_sn = selection.column("T2Classifier__p_SN").to_pylist()
    assert objects[3]["T2Classifier__p_SN"] is None and objects[11]["T2Classifier__p_SN"] is None  # NaN -> null
    assert same_values([o["T2Classifier__p_SN"] for o in objects], p_sn)


def test_webhook_default_columns_are_t2_columns(selection, hook, tmp_path):
    rec, url = hook
    T3Webhook(url=url).react(selection.slice(0, 3), context(tmp_path))
    [req] = rec.requests
    obj = req["body"]["objects"][0]
    assert "T2BazinFit__rise_time_r" in obj and "T2LightCurveFeatures__amplitude_g" in obj
    assert "dps" not in obj and "state_id" not in obj
    assert req["body"]["objects"][0]["T2LightCurveFeatures__amplitude_g"] is None  # null stays null


def test_webhook_retries_after_503(selection, hook, tmp_path, caplog):
    rec, url = hook
    rec.script = [503, 502]
    with caplog.at_level(logging.WARNING):
        records = T3Webhook(url=url, backoff=0.01).react(selection.slice(0, 2), context(tmp_path))
    assert [r["status"] for r in records] == [200]
    assert len(rec.requests) == 3 and rec.requests[0]["body"] == rec.requests[2]["body"]
    assert "HTTP 503" in caplog.text and "retry 1/3" in caplog.text


def test_webhook_4xx_is_a_clear_error(selection, hook, tmp_path):
    rec, url = hook
    rec.script = [400]
    with pytest.raises(WebhookError, match=r"was refused: HTTP 400 .*invalid_payload") as err:
        T3Webhook(url=url, backoff=0.01).react(selection.slice(0, 2), context(tmp_path))
    assert err.value.status == 400
    assert len(rec.requests) == 1  # no retry of a bad request


def test_webhook_redirect_and_partial_delivery(selection, hook, tmp_path):
    rec, url = hook
    rec.script = [200, 302]  # the second batch is redirected: an error, the first batch was delivered
    with pytest.raises(WebhookError, match=r"redirect \(HTTP 302\).*1 earlier batches were delivered") as err:
        T3Webhook(url=url, batch_size=2).react(selection.slice(0, 4), context(tmp_path))
    assert [r["objects"] for r in err.value.sent] == [2]
    assert len(rec.requests) == 2


def test_webhook_gives_up_after_retries(selection, hook, tmp_path):
    rec, url = hook
    rec.script = [500, 500, 500]
    with pytest.raises(WebhookError, match="failed after 3 attempts; last: HTTP 500"):
        T3Webhook(url=url, retries=2, backoff=0.01).react(selection.slice(0, 1), context(tmp_path))
    assert len(rec.requests) == 3


def test_webhook_connection_error_is_retried(selection, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unit = T3Webhook(url=f"http://127.0.0.1:{port}/hook", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(WebhookError, match="failed after 2 attempts"):
        unit.react(selection.slice(0, 1), context(tmp_path))


def test_webhook_secrets_from_environment(selection, hook, monkeypatch, tmp_path):
    rec, url = hook
    monkeypatch.setenv("AMPEL_DASK_SECRET_HOOK_URL", url + "/T0KEN123")
    records = T3Webhook(url_env="AMPEL_DASK_SECRET_HOOK_URL").react(selection.slice(0, 1), context(tmp_path))
    assert rec.requests[0]["path"] == "/hook/T0KEN123"
    assert "T0KEN123" not in records[0]["url"] and "AMPEL_DASK_SECRET_HOOK_URL" in records[0]["url"]

    monkeypatch.delenv("AMPEL_DASK_SECRET_HOOK_URL")
    with pytest.raises(WebhookError, match="AMPEL_DASK_SECRET_HOOK_URL"):
        T3Webhook(url_env="AMPEL_DASK_SECRET_HOOK_URL").react(selection.slice(0, 1), context(tmp_path))
    with pytest.raises(WebhookError, match="AMPEL_DASK_SECRET_MISSING_KEY.*Authorization"):
        T3Webhook(url=url, headers_from_env={"Authorization": "AMPEL_DASK_SECRET_MISSING_KEY"}).react(selection.slice(0, 1), context(tmp_path))
    assert T3Webhook(url=url).react(selection.slice(0, 0), context(tmp_path)) == []


def test_webhook_config_is_checked():
    with pytest.raises(UnitConfigError, match="exactly one of url and url_env"):
        T3Webhook()
    with pytest.raises(UnitConfigError, match="http"):
        T3Webhook(url="ftp://example.org/x")
    with pytest.raises(UnitConfigError, match="batch_size"):
        T3Webhook(url="http://example.org/x", batch_size=0)
    with pytest.raises(UnitConfigError, match="token"):
        T3Webhook(url="http://example.org/x", token="not here")


# --- webhook: idempotency keys and the delivery journal ---------------------------------------------


def object_key(channel: str, stock: int, state_id: object, unit_key: str) -> str:
    """The documented idempotency key, computed here with xxhash and json (not keys.delivery_keys):
    xxh3-128 of the compact JSON list [channel, stock, state id (hex if binary), unit delivery key]."""
    sid = state_id.hex() if isinstance(state_id, bytes) else state_id
    return xxhash.xxh3_128_hexdigest(json.dumps([channel, stock, sid, unit_key], separators=(",", ":")).encode())


def journal_context(tmp_path: Path, store: ParquetStore, channel: str = "TEST_CHANNEL", run_id: str = "run-42") -> T3Context:
    """As graph/tasks.run_t3 makes it: the store's delivery journal of the channel."""
    return T3Context(out_dir=tmp_path, run_id=run_id, channel=channel, deliveries=partial(store.deliveries, channel))


def header(request: dict, name: str) -> str | None:
    return next((v for k, v in request["headers"].items() if k.lower() == name.lower()), None)


def posted(rec: Recorder) -> list[dict]:
    return [o for r in rec.requests for o in r["body"]["objects"]]


def test_webhook_keys_in_payload_and_header_and_nothing_posted_twice(selection, hook, tmp_path):
    rec, url = hook
    store = ParquetStore(tmp_path / "store")
    unit = T3Webhook(url=url, batch_size=7)
    stock, sid = selection.column("stock").to_pylist(), selection.column("state_id").to_pylist()
    expected = [object_key("TEST_CHANNEL", s, i, unit.delivery_key) for s, i in zip(stock, sid)]
    assert len(set(expected)) == selection.num_rows

    records = unit.react(selection, journal_context(tmp_path, store))
    assert sum(r["objects"] for r in records) == selection.num_rows == len(posted(rec))
    assert [o["idempotency_key"] for o in posted(rec)] == expected
    for r in rec.requests:  # the request's key: xxh3-128 of its objects' keys, sorted, one per line
        keys = sorted(o["idempotency_key"] for o in r["body"]["objects"])
        assert header(r, "Idempotency-Key") == xxhash.xxh3_128_hexdigest("\n".join(keys).encode())

    # a re-run (another run id), and the unit with other transport settings: nothing is posted again
    rec.requests.clear()
    assert unit.react(selection, journal_context(tmp_path, store, run_id="run-43")) == []
    assert T3Webhook(url=url, batch_size=3, timeout=5, retries=0).react(selection, journal_context(tmp_path, store)) == []
    assert rec.requests == []

    # two objects reach a new state (here: each other's state id): one request with exactly those two
    new_sid = list(sid)
    new_sid[4], new_sid[9] = sid[9], sid[4]
    changed = selection.set_column(selection.column_names.index("state_id"), "state_id", pa.array(new_sid, selection.schema.field("state_id").type))
    records = unit.react(changed, journal_context(tmp_path, store, run_id="run-44"))
    assert [r["objects"] for r in records] == [2] and len(rec.requests) == 1
    assert [(o["stock"], o["idempotency_key"]) for o in posted(rec)] == [
        (stock[i], object_key("TEST_CHANNEL", stock[i], new_sid[i], unit.delivery_key)) for i in (4, 9)]

    # another channel, or another destination, is another delivery: everything is posted
    rec.requests.clear()
    unit.react(selection, journal_context(tmp_path, store, channel="OTHER"))
    assert len(posted(rec)) == selection.num_rows
    assert T3Webhook(url=url + "/other").delivery_key != unit.delivery_key


def test_webhook_failed_request_is_counted_and_posted_by_the_next_run(selection, hook, tmp_path):
    rec, url = hook
    store = ParquetStore(tmp_path / "store")
    sel = selection.slice(0, 12)
    unit = T3Webhook(url=url, batch_size=5, retries=0)
    rec.script = [200, 500]  # the second request fails (no retry): 12 - 5 objects are not delivered
    with pytest.raises(WebhookError, match=r"1 earlier batches were delivered; 7 objects not delivered: the next run posts them"):
        unit.react(sel, journal_context(tmp_path, store))
    first = [o["idempotency_key"] for o in rec.requests[0]["body"]["objects"]]
    rec.requests.clear()
    records = unit.react(sel, journal_context(tmp_path, store, run_id="run-43"))
    assert [r["objects"] for r in records] == [5, 2]
    again = [o["idempotency_key"] for o in posted(rec)]
    keys = [object_key("TEST_CHANNEL", s, i, unit.delivery_key) for s, i in zip(sel.column("stock").to_pylist(), sel.column("state_id").to_pylist())]
    assert first == keys[:5] and again == keys[5:]  # every object delivered once, none twice
    journal = store.deliveries("TEST_CHANNEL", unit.delivery_key)
    assert journal.delivered(keys).all() and not journal.delivered(["0" * 32]).any()


def test_delivery_journal_compacts_and_keeps_every_key(tmp_path):
    from ampel_dask.io.stores.deliveries import COMPACT_AT

    journal = ParquetStore(tmp_path / "store").deliveries("C", "unit")
    keys = [[f"{i:04d}{j:028d}" for j in range(3)] for i in range(COMPACT_AT + 5)]
    for i, ks in enumerate(keys):
        journal.record(f"req{i}", ks, [i] * 3, "run", 200)
    assert len(list(journal.folder.glob("*.parquet"))) == COMPACT_AT + 5
    flat = [k for ks in keys for k in ks]
    assert journal.delivered(flat + ["f" * 32]).tolist() == [True] * len(flat) + [False]
    assert len(list(journal.folder.glob("*.parquet"))) == 1  # merged into one file
    assert sorted(pq.read_table(next(journal.folder.glob("*.parquet"))).column("key").to_pylist()) == sorted(flat)
