"""Back-test a workflow's channels on an archive (``ampel-dask backtest``): what each channel's T0 would pass.

Per channel and night: alerts (those the channel may see: alerts outside its data rights, of another
survey or program, are counted apart as ``unseen``), passed, pass ratio and objects passed; against a labels file (ELAsTiCC's
truth table, ZTF object labels: one class per object), purity and completeness per class, counted by
object: an object passes when any of its alerts passes; ``completeness(c)`` = labelled objects of class
``c`` that passed / those in the back-tested alerts; ``purity(c)`` = passed objects of class ``c`` /
labelled objects passed (objects without a label are counted apart, as ``unlabelled``). Nothing is
stored: the filters run on each archive part in turn (a batch each, the channel's data rights first, as
in a run), so the numbers are the run's T0 numbers; a channel's ``max_pass_ratio`` is shown against them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..io.archive import Archive
from ..io.files import atomic_target
from .batches import read_partition
from .plan import check_columns, plan_workflow
from .tasks import run_t0
from .workflow import Workflow, WorkflowError, parse_nights

# where a labels file keeps its object and its class, by the layouts we know (first present wins):
# ELAsTiCC truth (diaObjectId, GENTYPE), ZTF object labels (object_id, label, label_source), ...
OBJECT_COLUMNS = ("object_id", "objectId", "diaObjectId", "SNID")
LABEL_COLUMNS = ("GENTYPE", "label", "class", "type")


class LabelsError(ValueError):
    """A labels file that cannot be read as (object, class) pairs; the message names the file and why."""


@dataclass
class Labels:
    """One class per object (object ids as text, the archive's ``object_id``)."""

    path: str
    object_column: str
    label_column: str
    classes: dict[str, str]  # object id -> class
    source: str | None = None


def load_labels(path: str | Path, object_column: str | None = None, label_column: str | None = None, source: str | None = None) -> Labels:
    """(object, class) pairs from a CSV or Parquet file. An object with several rows takes the first one's
    class (file order); ``source`` keeps only rows whose ``label_source`` starts with it."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: no such labels file")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
        else:
            names = list(pd.read_csv(path, nrows=0).columns)
    except Exception as exc:
        raise LabelsError(f"{path}: not a CSV or Parquet table ({type(exc).__name__}: {exc})") from None
    obj = object_column or next((c for c in OBJECT_COLUMNS if c in names), None)
    lab = label_column or next((c for c in LABEL_COLUMNS if c in names), None)
    for what, col, known in (("object", obj, OBJECT_COLUMNS), ("label", lab, LABEL_COLUMNS)):
        if col is None or col not in names:
            raise LabelsError(f"{path}: no {what} column ({col or ' / '.join(known)}); columns: {', '.join(names[:20])}")
    cols = [obj, lab] + (["label_source"] if source is not None else [])
    if source is not None and "label_source" not in names:
        raise LabelsError(f"{path}: --label-source needs a label_source column")
    frame = pd.read_parquet(path, columns=cols) if path.suffix == ".parquet" else pd.read_csv(path, usecols=cols, dtype=str, keep_default_na=False)
    if source is not None:
        frame = frame[frame["label_source"].astype(str).str.startswith(source)]
    frame = frame[frame[obj].notna() & frame[lab].notna()]
    ids, labels = frame[obj].map(_as_text), frame[lab].map(_as_text)
    classes: dict[str, str] = {}
    for o, c in zip(ids, labels):
        if o and c:
            classes.setdefault(o, c)
    if not classes:
        raise LabelsError(f"{path}: no labelled object" + (f" with label_source {source!r}..." if source else ""))
    return Labels(str(path), obj, lab, classes, source)


def _as_text(value: Any) -> str:
    """An id or class as text: integral floats (a pandas round trip) without '.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass
class ChannelBacktest:
    name: str
    max_pass_ratio: float | None
    nights: dict[int, dict] = field(default_factory=dict)  # night -> alerts, passed, objects (set of ids)
    seen: set[str] = field(default_factory=set)  # objects of every back-tested alert
    passed: set[str] = field(default_factory=set)  # objects with a passing alert
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unseen: int = 0  # alerts outside the channel's data rights

    @property
    def alerts(self) -> int:
        return sum(n["alerts"] for n in self.nights.values())

    @property
    def passed_alerts(self) -> int:
        return sum(n["passed"] for n in self.nights.values())


@dataclass
class Backtest:
    """The result: per channel and night, and per class against labels (see the module docstring)."""

    workflow: str
    archive: str
    night_range: tuple[int, int] | None
    channels: list[ChannelBacktest]
    labels: Labels | None = None

    def classes(self, ch: ChannelBacktest) -> list[dict]:
        """Per class: objects present, passed, completeness and purity (None when undefined)."""
        if self.labels is None:
            return []
        lab = self.labels.classes
        present, passed = defaultdict(int), defaultdict(int)
        for o in ch.seen:
            if o in lab:
                present[lab[o]] += 1
                passed[lab[o]] += o in ch.passed
        total = sum(passed.values())
        return [{"class": c, "objects": present[c], "passed": passed[c], "completeness": passed[c] / present[c],
                 "purity": passed[c] / total if total else None} for c in sorted(present, key=_class_order)]  # fmt: skip

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"workflow": self.workflow, "archive": self.archive, "nights": list(self.night_range) if self.night_range else None,
                               "labels": None if self.labels is None else {"path": self.labels.path, "object_column": self.labels.object_column,
                                                                            "label_column": self.labels.label_column, "source": self.labels.source},
                               "channels": {}}  # fmt: skip
        for ch in self.channels:
            alerts, passed = ch.alerts, ch.passed_alerts
            ratio = passed / alerts if alerts else None
            lab = self.labels.classes if self.labels else {}
            out["channels"][ch.name] = {
                "alerts": alerts, "passed": passed, "pass_ratio": ratio, "objects": len(ch.passed), "unseen": ch.unseen,
                "max_pass_ratio": ch.max_pass_ratio, "over_limit": bool(ch.max_pass_ratio is not None and ratio is not None and ratio > ch.max_pass_ratio),
                "rejections": dict(sorted(ch.reasons.items(), key=lambda kv: -kv[1])),
                "nights": [{"night": night, "alerts": n["alerts"], "passed": n["passed"], "pass_ratio": n["passed"] / n["alerts"] if n["alerts"] else None,
                            "objects": len(n["objects"])} for night, n in sorted(ch.nights.items())],
                **({"labelled_passed": sum(o in lab for o in ch.passed), "unlabelled_passed": sum(o not in lab for o in ch.passed),
                    "classes": self.classes(ch)} if self.labels else {}),
            }  # fmt: skip
        return out

    def nights_frame(self) -> Any:
        """One row per channel and night: alerts, passed, pass_ratio, objects (pandas)."""
        import pandas as pd

        d = self.to_dict()["channels"]
        return pd.DataFrame([{"channel": name, **n} for name, ch in d.items() for n in ch["nights"]],
                            columns=["channel", "night", "alerts", "passed", "pass_ratio", "objects"])  # fmt: skip

    def classes_frame(self) -> Any:
        """One row per channel and class: objects, passed, completeness, purity (pandas; empty without labels)."""
        import pandas as pd

        d = self.to_dict()["channels"]
        return pd.DataFrame([{"channel": name, **c} for name, ch in d.items() for c in ch.get("classes", [])],
                            columns=["channel", "class", "objects", "passed", "completeness", "purity"])  # fmt: skip

    def table(self) -> str:
        """The report as text: a table per channel (nights, then the total), and its classes."""
        d = self.to_dict()
        lines = [f"backtest of {d['workflow']} on {d['archive']}" + (f", nights {d['nights'][0]}-{d['nights'][1]}" if d["nights"] else "")]
        for name, ch in d["channels"].items():
            limit = "" if ch["max_pass_ratio"] is None else f"; max_pass_ratio {ch['max_pass_ratio']:.2%}" + (" EXCEEDED" if ch["over_limit"] else "")
            lines += ["", f"channel {name}{limit}", f"  {'night':>10} {'alerts':>8} {'passed':>8} {'ratio':>8} {'objects':>8}"]
            for n in ch["nights"]:
                lines.append(f"  {n['night']:>10} {n['alerts']:>8} {n['passed']:>8} {_pct(n['pass_ratio']):>8} {n['objects']:>8}")
            lines.append(f"  {'all':>10} {ch['alerts']:>8} {ch['passed']:>8} {_pct(ch['pass_ratio']):>8} {ch['objects']:>8}")
            if ch["rejections"]:
                lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in ch["rejections"].items()))
            if ch["unseen"]:
                lines.append(f"  not counted: {ch['unseen']} alerts outside the channel's data rights")
            if "classes" in ch:
                lines += [f"  against {Path(d['labels']['path']).name} ({d['labels']['label_column']}): {ch['labelled_passed']} labelled and "
                          f"{ch['unlabelled_passed']} unlabelled objects passed",
                          f"  {'class':>24} {'objects':>8} {'passed':>8} {'complete':>9} {'purity':>8}"]  # fmt: skip
                for c in ch["classes"]:
                    lines.append(f"  {c['class'][:24]:>24} {c['objects']:>8} {c['passed']:>8} {_pct(c['completeness']):>9} {_pct(c['purity']):>8}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A PNG: per channel, the pass ratio per night (with its max_pass_ratio) and, against labels,
        completeness and purity per class."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = self.to_dict()["channels"]
        cols = 2 if self.labels else 1
        fig, axes = plt.subplots(len(d), cols, figsize=(6.5 * cols, 3.2 * len(d)), squeeze=False)
        for row, (name, ch) in enumerate(d.items()):
            ax = axes[row][0]
            nights = [str(n["night"]) for n in ch["nights"]]
            ax.bar(range(len(nights)), [n["pass_ratio"] or 0 for n in ch["nights"]], color="tab:blue")
            ax.set_xticks(range(len(nights)), nights, rotation=60, fontsize=6)
            ax.set_ylabel("pass ratio")
            ax.set_title(f"{name}: {ch['passed']} of {ch['alerts']} alerts ({_pct(ch['pass_ratio'])})", fontsize=9)
            if ch["max_pass_ratio"] is not None:
                ax.axhline(ch["max_pass_ratio"], color="tab:red", ls="--", lw=1, label="max_pass_ratio")
                ax.legend(fontsize=7)
            if self.labels:
                ax = axes[row][1]
                classes = ch["classes"]
                x = np.arange(len(classes))
                ax.bar(x - 0.2, [c["completeness"] for c in classes], 0.4, label="completeness", color="tab:green")
                ax.bar(x + 0.2, [c["purity"] or 0 for c in classes], 0.4, label="purity", color="tab:orange")
                ax.set_xticks(x, [f"{c['class']} ({c['objects']})" for c in classes], rotation=60, fontsize=6)
                ax.set_ylim(0, 1.05)
                ax.set_xlim(-0.8, max(len(classes), 2) - 0.2)
                ax.set_title(f"{name} against {self.labels.label_column}", fontsize=9)
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        with atomic_target(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        return path


def backtest(wf: Workflow, archive: str | Path | None = None, labels: Labels | None = None, nights: tuple[int, int] | None = None) -> Backtest:
    """Each channel's T0 over the archive's parts the workflow selects (and ``nights``, inclusive)."""
    root = archive or wf.archive.path
    if not root:
        raise WorkflowError("no archive: give --archive or archive.path in the workflow")
    arch = Archive(Path(root).resolve())
    if not arch.exists():
        raise WorkflowError(f"{root} is not an ampel-dask archive (run `ampel-dask ingest ... --archive {root}` first)")
    plans = plan_workflow(wf)
    parts = [p for p in arch.partitions() if wf.archive.wants(p.survey, p.night) and (nights is None or nights[0] <= p.night <= nights[1])]
    check_columns(wf, plans, {p.survey for p in parts})
    columns = sorted(set().union(*(c.columns for c in plans))) if all(c.columns is not None for c in plans) else None
    result = [ChannelBacktest(c.name, spec.max_pass_ratio) for c, spec in zip(plans, wf.channels)]
    for part in sorted(parts, key=lambda p: (p.night, p.path)):
        table = read_partition(str(arch.root), [part.path], columns)
        objects = np.asarray(pc.fill_null(table.column("object_id"), "").to_numpy(zero_copy_only=False), dtype=object)
        for plan, ch in zip(plans, result):
            t0 = run_t0(table, plan)
            ok = t0.verdict.accepted
            unseen = t0.counts.get("access", 0)
            ch.unseen += unseen
            if unseen == table.num_rows:
                continue
            v = t0.verdict
            visible = v.codes != v.reasons.index("access") + 1 if unseen else None
            n = ch.nights.setdefault(part.night, {"alerts": 0, "passed": 0, "objects": set()})
            n["alerts"] += table.num_rows - unseen
            n["passed"] += int(ok.sum())
            passed = set(objects[ok].tolist())
            n["objects"] |= passed
            ch.passed |= passed
            ch.seen |= set(objects.tolist() if visible is None else objects[visible].tolist())
            for reason, k in t0.counts.items():
                if reason not in ("accepted", "access"):
                    ch.reasons[reason] += k
    for ch in result:
        ch.seen.discard("")
        ch.passed.discard("")
    return Backtest(wf.name, str(arch.root), nights, result, labels)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _class_order(c: str) -> tuple:
    return (0, int(c), c) if c.isdigit() else (1, 0, c)


__all__ = ["Backtest", "ChannelBacktest", "Labels", "LabelsError", "backtest", "load_labels", "parse_nights"]
