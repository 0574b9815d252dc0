"""T3 HTML report: a run's top candidates on a sortable page, and a page per object.

A scientist scans a night's best candidates in a browser: ``index.html`` ranks the objects (by a T2
score, or the latest alert time) in a table that fits a laptop screen and sorts by any column in the
browser; each row shows a small light curve and the latest alert's cutouts, and links to the object's
own page (``objects/<id>.html``) with the full light curve, every T2 result with its label and unit,
the cutouts, the run and state ids, and links to the object's pages at public brokers. Pages are
rendered by :mod:`..helpers.report_html`, light curves by :mod:`..helpers.lightcurve_svg`, cutouts by
:mod:`..helpers.stamps`; a cutout that is missing or does not decode is left out, not drawn blank.

What the report shows comes from the selection (the states the channel may see, with its T2 results)
and, for the cutouts, from ``context.archive``: the light curves are the states' datapoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from ...io.files import atomic_target, atomic_write
from ...io.layout import DETECTION
from ..base import T3Context, T3Unit, UnitConfig
from ..helpers.lightcurve_svg import LARGE, SMALL, light_curve_svg
from ..helpers.report_html import CUTOUT_NAMES, Column, Entry, index_page, object_page
from ..helpers.stamps import stamp_png
from ..labels import label_of, prettify
from .t3_export import match_columns, safe_name, t2_columns

log = logging.getLogger(__name__)

CUTOUT_KINDS = tuple(CUTOUT_NAMES)
# alert columns a report may rank by, as its header shows them
FIXED_LABELS = {"mjd": ("Last alert", "MJD"), "ra": ("RA", "deg"), "dec": ("Dec", "deg"), "object_id": ("Object", ""),
                "alert_id": ("Alert id", ""), "stock": ("Stock", "")}  # fmt: skip


class T3HtmlReportConfig(UnitConfig):
    title: str = Field("Candidates", description="page title")
    sort_by: str = Field("mjd", description="column to rank by (any selection column, e.g. 'T2Classifier__p_SN')")
    descending: bool = Field(True, description="highest first; missing values (null/NaN) always go last")
    top_n: int = Field(20, ge=1, description="objects shown")
    columns: list[str] | None = Field(
        None,
        description="T2 columns in the candidate table (shell patterns allowed); None = the sort column and the first "
        "max_columns other T2 columns (result codes left out). Every T2 result is on the object's own page",
    )
    max_columns: int = Field(5, ge=1, le=50, description="T2 columns in the table, the sort column included, when columns is None (a laptop screen fits 5-6)")
    cutouts: bool = Field(True, description="show the latest alert's cutouts when the context has an archive")
    broker_links: bool = Field(True, description="link each object to its pages at ALeRCE, Fink and Lasair (real survey ids only)")
    dirname: str | None = Field(None, description="report folder inside out_dir; default '<channel>_report'")

    @field_validator("dirname")
    @classmethod
    def _folder_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or "\\" in v or v in (".", "..")):
            raise ValueError("dirname is one folder name inside out_dir, e.g. 'nightly_report'")
        return v


class T3HtmlReport(T3Unit):
    """Static HTML report of the top-N objects: a sortable table, and a page per object."""

    Config = T3HtmlReportConfig
    version = "2"

    def ranked(self, selection: pa.Table) -> pa.Table:
        """The top-N rows in report order (missing sort values last, ties by object id)."""
        return selection.take(pa.array(self.top_rows(selection)))

    def dps_rows(self, selection: pa.Table) -> np.ndarray:
        """Only the reported objects' light curves are drawn."""
        return self.top_rows(selection)

    def top_rows(self, selection: pa.Table) -> np.ndarray:
        """The rows of :meth:`ranked`, in its order."""
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
        return np.concatenate(parts)[: c.top_n]

    def shown(self, names: list[str]) -> list[str]:
        """The T2 columns of the candidate table, the sort column first."""
        c = self.config
        lead = [c.sort_by] if c.sort_by in names and c.sort_by not in FIXED_LABELS else []
        if c.columns is not None:
            cols = match_columns(names, c.columns)
        else:
            cols = [n for n in t2_columns(names) if not n.endswith("__code") and n != c.sort_by][: c.max_columns - len(lead)]
        return lead + [n for n in cols if n != c.sort_by]

    def react(self, selection: pa.Table, context: T3Context) -> list[dict]:
        c = self.config
        out = Path(context.out_dir) / (c.dirname or f"{safe_name(context.channel)}_report")
        folder = out / "objects"
        folder.mkdir(parents=True, exist_ok=True)
        top = self.ranked(selection) if selection.num_rows else selection
        results = [column(selection.schema.field(n)) for n in t2_columns(selection.column_names)]
        by_name = {col.name: col for col in results}
        shown = [by_name.get(n) or column(selection.schema.field(n)) for n in self.shown(selection.column_names)]
        if c.sort_by in selection.column_names:
            rank_by = by_name.get(c.sort_by) or column(selection.schema.field(c.sort_by))
        else:  # an empty selection (ranked() checks the column when there are rows)
            rank_by = Column(c.sort_by, prettify(c.sort_by), "", True)
        stamps = {}
        if c.cutouts and context.archive is not None and top.num_rows:
            stamps = load_cutouts(context.archive, top.column("alert_id").to_pylist())
        entries = self.entries(top, [col.name for col in results])
        jobs = []
        for en in entries:
            atomic_write(folder / f"{en.stem}_lc.svg", light_curve_svg(en.dps, en.object_id, en.mjd, LARGE).encode(), durable=False)
            atomic_write(folder / f"{en.stem}_lc_small.svg", light_curve_svg(en.dps, en.object_id, en.mjd, SMALL).encode(), durable=False)
            if stamps.get(en.alert_id):
                jobs.append((en, CutoutJob(folder, en.stem, stamps[en.alert_id])))
        # decoding stamps is most of a big report's time: chunks of them go to the cluster's workers when there is one
        chunks = [[j for _, j in jobs[k : k + FIGURES_PER_TASK]] for k in range(0, len(jobs), FIGURES_PER_TASK)]
        drawn = [kinds for part in context.map(draw_cutouts, chunks) for kinds in part]
        for (en, _), kinds in zip(jobs, drawn):
            en.stamps = kinds
        for i, en in enumerate(entries):
            prev, nxt = (entries[i - 1] if i else None), (entries[i + 1] if i + 1 < len(entries) else None)
            page = object_page(c.title, context.channel, context.run_id, en, results, len(entries), prev, nxt, c.broker_links)
            atomic_write(folder / f"{en.stem}.html", page.encode(), durable=False)
        index = out / "index.html"
        page = index_page(c.title, context.channel, context.run_id, entries, shown, rank_by, c.descending, selection.num_rows)
        with atomic_target(index) as tmp:
            tmp.write_text(page, encoding="utf-8")
        keep = {f"{en.stem}{suffix}" for en in entries for suffix in (".html", "_lc.svg", "_lc_small.svg")}
        keep |= {f"{en.stem}_{k}.png" for en in entries for k in en.stamps}
        _remove_stale(folder, keep)
        images = sum(2 + len(en.stamps) for en in entries)
        return [{"kind": "html", "path": str(index), "images": images, "objects": len(entries)}]

    @staticmethod
    def entries(top: pa.Table, results: list[str]) -> list[Entry]:
        """The rows of the report, with file-name-safe stems that are unique within it."""
        base = {k: top.column(k).to_pylist() if k in top.column_names else [None] * top.num_rows
                for k in ("object_id", "stock", "survey", "alert_id", "state_id", "ra", "dec", "mjd")}  # fmt: skip
        values = {k: top.column(k).to_pylist() for k in results}
        dps_col = top.column("dps").combine_chunks() if "dps" in top.column_names else None
        out, used = [], set()
        for i in range(top.num_rows):
            rec = {k: v[i] for k, v in base.items()}
            stem = safe_name(rec["object_id"])
            stem = stem if stem not in used else f"{stem}_{rec['stock']}"
            used.add(stem)
            dps = dps_col[i].values if dps_col is not None and dps_col[i].is_valid else None
            out.append(Entry(rank=i + 1, stem=stem, latest=latest_mag(dps), values={k: v[i] for k, v in values.items()}, dps=dps,
                             survey=str(rec.pop("survey") or ""), **rec))  # fmt: skip
        return out


def column(field: pa.Field) -> Column:
    """How a selection column is shown: its label and unit from the field's metadata (the selection
    carries them, from the unit that computed it), else from the unit's declaration, else its name."""
    numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
    if field.name in FIXED_LABELS:
        return Column(field.name, *FIXED_LABELS[field.name], numeric)
    found = label_of(field)
    if found is None and "__" in field.name:
        unit, col = field.name.split("__", 1)
        found = declared_label(unit, col)
    return Column(field.name, *(found or (prettify(field.name), "")), numeric)


def declared_label(unit: str, col: str) -> tuple[str, str]:
    """(label, unit of measure) a registered T2 unit declares for a column, for its default config."""
    from ..base import T2StateUnit
    from ..registry import UnknownUnit, load

    try:
        cls = load(unit)
    except (UnknownUnit, TypeError, ImportError):
        return prettify(col), ""
    return cls.label(col) if issubclass(cls, T2StateUnit) else (prettify(col), "")


FIGURES_PER_TASK = 5


@dataclass
class CutoutJob:
    """One object's stamps and where to write them."""

    out: Path
    stem: str
    stamps: dict[str, bytes | None]


def draw_cutouts(jobs: list[CutoutJob]) -> list[list[str]]:
    """Each job's stamps as ``<stem>_<kind>.png``; returns the kinds written per job (missing ones and
    those that do not decode have no file)."""
    out = []
    for j in jobs:
        kinds = []
        for kind in CUTOUT_KINDS:
            png = stamp_png(j.stamps.get(kind))
            if png is not None:
                atomic_write(j.out / f"{j.stem}_{kind}.png", png, durable=False)
                kinds.append(kind)
        out.append(kinds)
    return out


def load_cutouts(archive: Any, alert_ids: list[int]) -> dict[int, dict[str, bytes | None]]:
    """Cutouts of these alerts from the archive: only parts whose alert-id range holds one are opened,
    and only the wanted rows are read (Parquet filter on alert_id)."""
    wanted = np.array(sorted({int(a) for a in alert_ids if a is not None}), dtype=np.int64)
    out: dict[int, dict[str, bytes | None]] = {}
    if not len(wanted):
        return out
    for part in archive.partitions():
        if not part.cutout_files:
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


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Drop the pages and figures of objects an earlier run showed and this one does not."""
    for p in [*folder.glob("*.html"), *folder.glob("*.png"), *folder.glob("*.svg")]:
        if p.name not in keep:
            p.unlink(missing_ok=True)


__all__ = ["T3HtmlReport", "T3HtmlReportConfig", "draw_cutouts", "load_cutouts"]
