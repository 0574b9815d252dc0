"""The demo's HTML report in a real browser: Debian's headless Chromium, driven by Playwright.

What a user sees is checked where they see it: every resource of every page loads (HTTP status,
failed requests, requests to other hosts, script errors), every image cell paints something that is not
background (a light curve shows band-coloured marks, a cutout shows structure, not a flat fill), the
cutouts shown for an object are exactly those its alert carries in the archive (read with pyarrow from
the archive's cutout files), the table fits a laptop screen, and clicking a header reorders the rows
as a pandas sort of the store's results orders them (missing values last, both directions).

Skipped outside CI when chromium or playwright is missing; in CI (``CI=1``) their absence fails.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ampel_dask as ad
from ampel_dask.testing.browser import chromium, chromium_path, serve

pytestmark = pytest.mark.slow

BAND_RGB = {"g": (0x1B, 0x9E, 0x3E), "r": (0xD6, 0x27, 0x28)}
RANK_BY = "T2BazinFit__bazin_fit_reduced_chi2_r"


def _need_browser() -> None:
    missing = []
    if chromium_path() is None:
        missing.append("chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{' and '.join(missing)} missing: .ci/run installs them")
        pytest.skip(f"{' and '.join(missing)} missing")


@pytest.fixture(scope="module")
def demo(request) -> dict:
    _need_browser()  # before the demo runs
    return request.getfixturevalue("demo_run")


@pytest.fixture(scope="module")
def expected(demo) -> pd.DataFrame:
    """The report's objects and order, derived from the store with pandas (not from the report's code):
    the channel's objects with their latest T2 results, lowest r-band Bazin chi2/dof first, ties and
    missing values by object id, the first 20."""
    objects = ad.open_store(demo["out"] / "store").objects("TRANSIENTS")
    objects["_missing"] = objects[RANK_BY].isna()
    return objects.sort_values(["_missing", RANK_BY, "object_id"]).head(20).reset_index(drop=True)


def archive_cutouts(archive: Path) -> dict[int, list[str]]:
    """alert_id -> the cutout kinds its packet carried, read straight from the archive's cutout files."""
    out: dict[int, list[str]] = {}
    for f in archive.rglob("_cutouts-*.parquet"):
        t = pq.read_table(f).to_pylist()
        for row in t:
            out[row["alert_id"]] = [k for k in ("science", "template", "difference") if row.get(f"cutout_{k}")]
    return out


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def band_marks(png: bytes) -> int:
    """Pixels painted in a band's colour (the marks of a light curve)."""
    img = pixels(png)
    return int(sum((np.abs(img - np.array(rgb)).max(axis=2) < 40).sum() for rgb in BAND_RGB.values()))


def structure(png: bytes) -> float:
    """The spread of grey levels a cutout shows (1st to 99th percentile); a blank or flat fill has ~0."""
    grey = pixels(png).mean(axis=2)
    return float(np.percentile(grey, 99) - np.percentile(grey, 1))


def row_ids(page) -> list[str]:
    return page.eval_on_selector_all("#candidates tbody tr td.oid", "cells => cells.map(c => c.textContent.trim())")


def header(page, text: str):
    return page.locator("#candidates thead th", has_text=text).first


def check_images(page, where: str) -> list:
    """Every <img> of the page loaded (decoded, with a size): returns their locators."""
    imgs = page.locator("img")
    states = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])")
    broken = [s for s, done, w in states if not (done and w > 0)]
    assert not broken, f"{where}: images that did not load: {broken}"
    return [imgs.nth(i) for i in range(imgs.count())]


def test_demo_report_in_chromium(demo, expected, tmp_path):
    folder = demo["report"].parent
    cutouts = archive_cutouts(demo["out"] / "archive")
    with serve(folder) as base, chromium(tmp_path / "profile", base=base) as (browser, problems):
        page = browser.new_page()
        page.goto(base + "index.html", wait_until="load")

        # the ranking: as pandas orders the store's results
        ids = row_ids(page)
        assert ids == expected["object_id"].tolist()
        # the table fits a laptop screen (1366 px wide): no horizontal scrolling
        assert page.evaluate("document.documentElement.scrollWidth") <= 1366

        # every image cell paints something that is not background
        page.mouse.move(0, 0)
        imgs = check_images(page, "index.html")
        lc = [i for i in imgs if i.get_attribute("src").endswith("_lc_small.svg")]
        stamps = [i for i in imgs if i.get_attribute("src").endswith(".png")]
        assert len(lc) == 20
        for img in lc:
            assert band_marks(img.screenshot()) >= 20, img.get_attribute("src")
        for img in stamps:
            assert structure(img.screenshot()) > 60, img.get_attribute("src")

        # the cutouts shown are exactly those the latest alert carries (a missing one is left out, not drawn blank)
        shown = page.eval_on_selector_all("#candidates tbody tr", "rows => rows.map(r => Array.from(r.querySelectorAll('td.cut img')).map(i => i.getAttribute('title')))")
        want = [[k.capitalize() for k in cutouts.get(a, [])] for a in expected["alert_id"]]
        assert shown == want
        assert any(0 < len(w) < 3 for w in want), "the demo stream should have objects with only a difference stamp"
        assert len(stamps) == sum(len(w) for w in want)

        # sorting: a numeric column, both ways; a text column; the rank restores the ranking
        peak = dict(zip(expected["object_id"], expected["T2LightCurveSummary__peak_mag"]))
        header(page, "Peak magnitude").click()
        assert row_ids(page) == sorted(ids, key=lambda o: peak[o]) != ids
        header(page, "Peak magnitude").click()
        assert row_ids(page) == sorted(ids, key=lambda o: -peak[o])
        header(page, "Object").click()
        assert row_ids(page) == sorted(ids)
        page.locator("#candidates thead th").first.click()
        assert row_ids(page) == ids

        # every object's page: its resources, its light curve large enough to read, its cutouts
        for oid, alert in zip(expected["object_id"], expected["alert_id"]):
            page.goto(f"{base}objects/{oid}.html", wait_until="load")
            imgs = check_images(page, oid)
            big = [i for i in imgs if i.get_attribute("src") == f"{oid}_lc.svg"]
            assert len(big) == 1 and big[0].bounding_box()["width"] >= 900
            assert band_marks(big[0].screenshot()) >= 100
            kinds = [i.get_attribute("src")[len(oid) + 1 : -4] for i in imgs if i.get_attribute("src").endswith(".png")]
            assert kinds == cutouts.get(alert, [])
            for img in imgs:
                if img.get_attribute("src").endswith(".png"):
                    assert structure(img.screenshot()) > 60
            assert page.locator("h1").inner_text().startswith(oid)
            text = page.locator("body").inner_text()
            row = expected[expected["object_id"] == oid].iloc[0]
            assert bytes(row["state_id"]).hex() in text and str(alert) in text  # the 128-bit state id in hex
    assert not problems, problems


@pytest.fixture(scope="module")
def scored(tmp_path_factory, data_dir) -> pa.Table:
    """Real ZTF alerts (one state per object) with a made-up score that is missing for some objects."""
    from ampel_dask.tiers.states import T1PolicyConfig, build_states

    _need_browser()
    root = tmp_path_factory.mktemp("kowalski")
    ad.ingest(data_dir / "ztf/kowalski", root)
    alerts = ad.open_archive(root).select(columns=["alert_id", "stock", "object_id", "survey", "mjd", "ra", "dec", "dps"]).to_arrow()
    latest = alerts.take(pa.array(alerts.to_pandas().reset_index().sort_values("mjd").groupby("stock")["index"].last().sort_values().to_numpy()))
    states = build_states(latest, T1PolicyConfig(), access=["ZTF_PUB", "ZTF_PRIV"])
    score = np.random.default_rng(3).permutation(states.num_rows).astype(float)
    score[::4] = np.nan
    return states.append_column("T2Demo__score", pa.array(score)), root


def test_sorting_puts_missing_values_last_both_ways(scored, tmp_path):
    from ampel_dask.io.archive import Archive
    from ampel_dask.tiers.base import T3Context
    from ampel_dask.tiers.units.t3_report import T3HtmlReport

    sel, root = scored
    [rec] = T3HtmlReport(sort_by="mjd", top_n=100).react(sel, T3Context(tmp_path / "t3", "run-1", "REAL", Archive(root)))
    score = dict(zip(sel.column("object_id").to_pylist(), sel.column("T2Demo__score").to_pylist()))
    have = [o for o in score if not np.isnan(score[o])]
    missing = [o for o in score if np.isnan(score[o])]
    assert have and missing
    with serve(Path(rec["path"]).parent) as base, chromium(tmp_path / "profile", base=base) as (browser, problems):
        page = browser.new_page()
        page.goto(base + "index.html", wait_until="load")
        check_images(page, "index.html")
        before = row_ids(page)
        header(page, "Score").click()
        after = row_ids(page)
        assert after[: len(have)] == sorted(have, key=score.get)
        assert sorted(after[len(have) :]) == sorted(missing)
        assert [o for o in after[len(have) :]] == [o for o in before if o in missing]  # a stable sort keeps their order
        header(page, "Score").click()
        after = row_ids(page)
        assert after[: len(have)] == sorted(have, key=lambda o: -score[o])
        assert sorted(after[len(have) :]) == sorted(missing)
        # real ZTF names link to the brokers' public pages (the page itself loads nothing from them)
        page.goto(f"{base}objects/{before[0]}.html", wait_until="load")
        links = page.eval_on_selector_all("a[href^=http]", "as => as.map(a => a.href)")
        assert links == [f"https://alerce.online/object/{before[0]}", f"https://fink-portal.org/{before[0]}",
                         f"https://lasair-ztf.lsst.ac.uk/objects/{before[0]}/"]  # fmt: skip
    assert not problems, problems
