"""T3 HTML report: the top candidates of a run, each with its light curve and cutouts, on one static page.

A scientist scans a night's best candidates in a browser: a table sorted by any column (a T2 score, or
the latest alert time), a light-curve SVG per object (:mod:`.lightcurve_svg`) and the alert's
science/template/difference stamps when the archive has them. Stamps are drawn with matplotlib's object
API (``Figure`` rendered by the Agg canvas), so no pyplot state is kept between objects and the caller's
backend is untouched.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import html
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from ...io.files import atomic_target, atomic_write
from ...io.layout import DETECTION
from ..base import T3Context, T3Unit, UnitConfig
from ..helpers.lightcurve_svg import light_curve_svg
from .t3_export import json_safe, match_columns, safe_name, t2_columns

log = logging.getLogger(__name__)

CUTOUT_KINDS = ("science", "template", "difference")
_FIXED = ("object_id", "ra", "dec", "mjd")


class T3HtmlReportConfig(UnitConfig):
    title: str = Field("Candidates", description="page title")
    sort_by: str = Field("mjd", description="column to rank by (any selection column, e.g. 'T2Classifier__p_SN')")
    descending: bool = Field(True, description="highest first; missing values (null/NaN) always go last")
    top_n: int = Field(20, ge=1, description="objects shown")
    columns: list[str] | None = Field(
        None, description="T2 columns shown in the table (shell patterns allowed); None = every T2 column"
    )
    cutouts: bool = Field(True, description="draw the alert's cutouts when the context has an archive")
    dirname: str | None = Field(None, description="report folder inside out_dir; default '<channel>_report'")
    dpi: int = Field(80, ge=20, le=300, description="resolution of the cutout PNGs")

    @field_validator("dirname")
    @classmethod
    def _folder_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or "\\" in v or v in (".", "..")):
            raise ValueError("dirname is one folder name inside out_dir, e.g. 'nightly_report'")
        return v


class T3HtmlReport(T3Unit):
    """Static HTML page of the top-N objects: table of key values and T2 results, light curves, cutouts."""

    Config = T3HtmlReportConfig
    version = "1"

    def ranked(self, selection: pa.Table) -> pa.Table:
        """The top-N rows in report order (missing sort values last, ties by object id)."""
        c = self.config
        if c.sort_by not in selection.column_names:
            raise ValueError(
                f"{self.name()}: sort_by column {c.sort_by!r} is not in the selection; "
                f"T2 columns present: {', '.join(t2_columns(selection.column_names)) or '(none)'}"
            )
        key = selection.column(c.sort_by)
        if pa.types.is_floating(key.type):  # NaN sorts like a missing value
            key = pc.if_else(pc.is_nan(key), pa.scalar(None, key.type), key)
        oid = selection.column("object_id")
        valid = np.asarray(pc.is_valid(key))
        parts = []
        for mask, keys in ((valid, [("k", "descending" if c.descending else "ascending")]), (~valid, [])):
            rows = np.flatnonzero(mask)
            sub = pa.table({"k": key.filter(pa.array(mask)), "o": oid.filter(pa.array(mask))})
            parts.append(rows[np.asarray(pc.sort_indices(sub, sort_keys=[*keys, ("o", "ascending")]))])
        return selection.take(pa.array(np.concatenate(parts)[: c.top_n]))

    def react(self, selection: pa.Table, context: T3Context) -> list[dict]:
        c = self.config
        out = Path(context.out_dir) / (c.dirname or f"{safe_name(context.channel)}_report")
        top = self.ranked(selection) if selection.num_rows else selection
        shown = match_columns(selection.column_names, c.columns) if c.columns is not None else t2_columns(selection.column_names)
        if c.sort_by not in shown and c.sort_by not in _FIXED:
            shown = [c.sort_by, *shown]
        stamps = {}
        if c.cutouts and context.archive is not None and top.num_rows:
            stamps = load_cutouts(context.archive, top.column("alert_id").to_pylist())
        base = {k: top.column(k).to_pylist() for k in ("object_id", "stock", "alert_id", "ra", "dec", "mjd")}
        values = {k: top.column(k).to_pylist() for k in shown}
        dps_col = top.column("dps").combine_chunks() if "dps" in top.column_names else None
        rows, jobs, used = [], [], set()
        for i in range(top.num_rows):
            rec = {k: v[i] for k, v in base.items()}
            stem = safe_name(rec["object_id"])
            stem = stem if stem not in used else f"{stem}_{rec['stock']}"
            used.add(stem)
            dps = dps_col[i].values if dps_col is not None else None
            rec.update(latest=latest_mag(dps), values=[values[k][i] for k in shown], lc=f"{stem}_lc.svg", cutouts=None)
            atomic_write(out / rec["lc"], light_curve_svg(dps, rec["object_id"], rec["mjd"]).encode(), durable=False)
            rows.append(rec)
            if stamps.get(rec["alert_id"]):
                jobs.append((rec, CutoutJob(out, stem, stamps[rec["alert_id"]])))
        # stamp figures are most of a report's time: chunks of them go to the cluster's workers when there is one
        chunks = [[j for _, j in jobs[k : k + FIGURES_PER_TASK]] for k in range(0, len(jobs), FIGURES_PER_TASK)]
        drawn = [f for part in context.map(partial(draw_cutouts, dpi=c.dpi), chunks) for f in part]
        for (rec, _), cut in zip(jobs, drawn):
            rec["cutouts"] = cut
        images = len(rows) + sum(1 for cut in drawn if cut)
        index = out / "index.html"
        page = render_page(c, context, rows, shown, selection.num_rows)
        with atomic_target(index) as tmp:
            tmp.write_text(page, encoding="utf-8")
        _remove_stale(out, {r["lc"] for r in rows} | {r["cutouts"] for r in rows if r["cutouts"]})
        return [{"kind": "html", "path": str(index), "images": images, "objects": len(rows)}]



FIGURES_PER_TASK = 5


@dataclass
class CutoutJob:
    """One object's stamps and where to write their figure."""

    out: Path
    stem: str
    stamps: dict[str, bytes | None]


def draw_cutouts(jobs: list[CutoutJob], dpi: int) -> list[str | None]:
    """The stamps figure of each job; returns the file names written (None: no stamp decodes)."""
    canvas = CutoutCanvas(dpi) if jobs else None
    out = []
    for j in jobs:
        fig = canvas.render(j.stamps)
        cut = None
        if fig is not None:
            cut = f"{j.stem}_cutouts.png"
            _save(fig, j.out / cut)
        out.append(cut)
    return out


def _save(fig: Any, path: Path) -> None:
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", pil_kwargs={"compress_level": 1})  # zlib level 6 costs a third more time for ~10% smaller files


# --- figures --------------------------------------------------------------------------------------


def _figure(w: float, h: float, dpi: int, **margins: float) -> Any:
    """A figure with fixed margins (an automatic layout engine would double the drawing time)."""
    from matplotlib.figure import Figure  # imported here: only reports with stamps pay for matplotlib's canvas

    fig = Figure(figsize=(w, h), dpi=dpi)
    fig.subplots_adjust(**margins)
    return fig


def fits_image(blob: bytes) -> np.ndarray | None:
    """First 2-d image of a (possibly gzipped) FITS stamp, as float; None if it does not decode."""
    from astropy.io import fits

    try:
        if blob[:2] == b"\x1f\x8b":
            blob = gzip.decompress(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(blob), memmap=False) as hdul:
                for hdu in hdul:
                    if hdu.data is not None and np.ndim(hdu.data) >= 2:
                        data = np.asarray(hdu.data, dtype=np.float64)
                        return data.reshape(-1, *data.shape[-2:])[0]  # first plane of a cube
    except Exception as exc:  # a broken stamp must not stop the report
        log.debug("cutout did not decode: %s", exc)
    return None


class CutoutCanvas:
    """Science, template and difference stamps side by side (1-99.5 percentile stretch).

    One figure is kept and only its image data is swapped per object: building axes is most of the
    cost of a matplotlib figure, drawing three 63x63 images is cheap.
    """

    def __init__(self, dpi: int):
        self.fig = _figure(6.0, 2.2, dpi, left=0.01, right=0.99, bottom=0.01, top=0.88, wspace=0.04)
        self.axes = dict(zip(CUTOUT_KINDS, self.fig.subplots(1, len(CUTOUT_KINDS))))
        self.images = {}
        for kind, ax in self.axes.items():
            ax.set_axis_off()
            ax.set_title(kind, fontsize="small")
            self.images[kind] = ax.imshow(np.zeros((2, 2)), cmap="gray", origin="lower", interpolation="nearest")

    def render(self, blobs: dict[str, bytes | None]) -> Any | None:
        """The figure showing these stamps, or None when none of them decodes."""
        data = {k: fits_image(b) for k, b in blobs.items() if b}
        data = {k: v for k, v in data.items() if v is not None and np.isfinite(v).any()}
        if not data:
            return None
        for kind, im in self.images.items():
            img = data.get(kind)
            im.set_visible(img is not None)
            if img is None:
                continue
            lo, hi = np.nanpercentile(img, [1.0, 99.5])
            h, w = img.shape
            im.set_data(img)
            im.set_extent((-0.5, w - 0.5, -0.5, h - 0.5))
            im.set_clim(lo, hi if hi > lo else lo + 1)
            self.axes[kind].set_xlim(-0.5, w - 0.5)
            self.axes[kind].set_ylim(-0.5, h - 0.5)
        return self.fig


def load_cutouts(archive: Any, alert_ids: list[int]) -> dict[int, dict[str, bytes | None]]:
    """Cutouts of these alerts from the archive: only parts whose alert-id range holds one are opened,
    and only the wanted rows are read (Parquet filter on alert_id)."""
    wanted = np.array(sorted({int(a) for a in alert_ids if a is not None}), dtype=np.int64)
    out: dict[int, dict[str, bytes | None]] = {}
    if not len(wanted):
        return out
    for part in archive.partitions():
        if not part.cutouts:
            continue
        ids = wanted[(wanted >= part.min_alert_id) & (wanted <= part.max_alert_id)]
        if not len(ids):
            continue
        try:
            t = archive.read_cutouts(part, ids.tolist())  # a channel's archive gives only the alerts it may see
        except Exception as exc:
            log.warning("cutouts of %s not readable: %s", part.path, exc)
            continue
        if t is None:
            continue
        keep = set(ids.tolist())
        for row in t.to_pylist():
            if row["alert_id"] in keep:
                out[row["alert_id"]] = {k: row.get(f"cutout_{k}") for k in CUTOUT_KINDS}
    return out


def latest_mag(dps: pa.StructArray | None) -> str:
    """'19.12 (r)' for the latest detection with a magnitude, '' without one."""
    if dps is None or not len(dps):
        return ""
    mjd = pc.cast(dps.field("mjd"), pa.float64()).to_numpy(zero_copy_only=False)
    mag = pc.cast(dps.field("mag"), pa.float64()).to_numpy(zero_copy_only=False)
    ok = (dps.field("kind").to_numpy(zero_copy_only=False) == DETECTION) & np.isfinite(mag) & np.isfinite(mjd)
    if not ok.any():
        return ""
    i = np.flatnonzero(ok)[np.argmax(mjd[ok])]
    return f"{mag[i]:.2f} ({dps.field('band')[i].as_py()})"


# --- page -----------------------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:middle}th{background:#eee}
td.num{text-align:right;font-family:monospace}img{display:block}"""


def fmt(value: Any, digits: str = ".6g") -> str:
    """A table cell: numbers compact, missing values as a dash, nested values as short JSON."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, float):
        return html.escape(format(value, digits))
    if isinstance(value, (list, dict)):
        text = json.dumps(json_safe(value), separators=(",", ":"))
        return html.escape(text if len(text) <= 80 else text[:77] + "...")
    return html.escape(str(value))


def render_page(c: T3HtmlReportConfig, context: T3Context, rows: list[dict], shown: list[str], total: int) -> str:
    e = html.escape
    head = ["#", "object", "ra", "dec", "mjd", "latest mag", *shown, "light curve", "cutouts"]
    lines = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(c.title)}</title><style>{_CSS}</style></head><body>',
        f"<h1>{e(c.title)}</h1>",
        f"<p>channel <b>{e(context.channel)}</b>, run <code>{e(str(context.run_id))}</code>: {len(rows)} of {total} "
        f"objects by <code>{e(c.sort_by)}</code> ({'descending' if c.descending else 'ascending'}); "
        f"written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}</p>",
        '<table id="candidates"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>",
    ]
    for rank, r in enumerate(rows, 1):
        lc, cut = e(r["lc"]), e(r["cutouts"]) if r["cutouts"] else None
        cells = [
            f'<td class="num">{rank}</td>',
            f'<td class="oid"><a href="{lc}">{e(str(r["object_id"]))}</a></td>',
            f'<td class="num">{fmt(r["ra"], ".5f")}</td>',
            f'<td class="num">{fmt(r["dec"], ".5f")}</td>',
            f'<td class="num">{fmt(r["mjd"], ".4f")}</td>',
            f'<td class="num">{e(r["latest"]) or "&ndash;"}</td>',
            *(f'<td class="num">{fmt(v)}</td>' for v in r["values"]),
            f'<td><a href="{lc}"><img src="{lc}" width="300" alt="light curve of {e(str(r["object_id"]))}"></a></td>',
            f'<td><a href="{cut}"><img src="{cut}" width="300" alt="cutouts"></a></td>' if cut else "<td>&ndash;</td>",
        ]
        lines.append(f'<tr id="{e(safe_name(r["object_id"]))}">' + "".join(cells) + "</tr>")
    lines += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(lines)


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Drop figures of earlier runs that this page no longer shows (PNG light curves of older versions too)."""
    for p in [*folder.glob("*.png"), *folder.glob("*.svg")]:
        if p.name not in keep and p.name.endswith(("_lc.png", "_lc.svg", "_cutouts.png")):
            p.unlink(missing_ok=True)


__all__ = ["T3HtmlReport", "T3HtmlReportConfig", "CutoutCanvas", "draw_cutouts", "load_cutouts"]
