"""``ampel-dask demo``: simulate a stream, ingest it, run the demo workflow; no servers, no ../shared."""

from __future__ import annotations

from pathlib import Path

from ..graph.runner import RunOptions, run_workflow
from ..graph.workflow import load_workflow
from ..graph.ingest import IngestOptions, ingest
from .simulate import simulate

WORKFLOW = Path(__file__).with_name("workflow.yml")


def run_demo(out: str | Path, workers: int | None = None, progress: bool | None = None, echo=print) -> dict:
    out = Path(out).resolve()
    alerts = out / "alerts"
    if not any(alerts.glob("ztf_public_*.tar.gz")):
        echo(f"simulating a ZTF-like alert stream into {alerts} ...")
        simulate(alerts)
    echo(f"ingesting {alerts} -> {out / 'archive'}")
    report = ingest([str(alerts)], out / "archive", IngestOptions(workers=workers, progress=progress))
    echo(f"  read {report.read}, ingested {report.ingested}, duplicates {report.duplicates}, quarantined {report.quarantined}")
    echo(f"running {WORKFLOW.name} -> {out / 'store'}")
    summary = run_workflow(load_workflow(WORKFLOW), RunOptions(archive=str(out / "archive"), store=str(out / "store"), workers=workers, progress=progress, echo=echo))
    summary["ingest"] = report.summary()
    html = [p for p in summary.get("t3_outputs", []) if str(p).endswith(".html")]
    if not html:  # a re-run with nothing new: the report of the earlier run is still the current one
        html = sorted(str(p) for p in (out / "store" / "t3").glob("*/*/*/index.html"))
    summary["report"] = html[0] if html else None
    return summary
