"""The ``ampel-dask`` command."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__

EXIT_QUARANTINED = 3


def _emit_json(obj: dict) -> None:
    """Machine-readable result: always the last line of stdout."""
    sys.stdout.flush()
    click.echo(json.dumps(obj, sort_keys=False, default=str))


def _from(model: type, name: str, *decls: str, **kw: Any) -> Callable:
    """A click option for a field of an options model: its default and help come from the model (the
    one place they are declared); ``decls`` and ``kw`` add what only the command line has (flag names,
    click types for ranges and paths)."""
    info = model.model_fields[name]
    default = None if info.is_required() or info.default_factory is not None else info.default
    if default is not None and not isinstance(default, bool):
        kw.setdefault("show_default", True)
    if not info.is_required() and "is_flag" not in kw and not kw.get("multiple"):
        kw.setdefault("default", default)
    choices = _literal_choices(info.annotation)
    if choices and "type" not in kw:
        kw["type"] = click.Choice(choices)
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, help=info.description, **kw)


def _literal_choices(annotation: Any) -> list[str] | None:
    import typing

    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ampel-dask")
def main() -> None:
    """Analyse astronomical alert streams: columnar, content-addressed, on Dask."""


def _ingest_options(fn: Callable) -> Callable:
    """The ``ingest`` command's options, declared once in :class:`~ampel_dask.io.ingest.IngestOptions`."""
    from .io.ingest import IngestOptions as M

    decorators = [
        _from(M, "workers", type=click.IntRange(min=0)),
        _from(M, "chunk_mb", type=click.FloatRange(min=0, min_open=True)),
        _from(M, "schema_dirs", "--schema-dir", multiple=True, type=click.Path(exists=True, file_okay=False)),
        _from(M, "progress", "--progress/--no-progress"),
        _from(M, "follow_links", is_flag=True),
        _from(M, "max_file_mb", type=click.FloatRange(min=0, min_open=True)),
        _from(M, "max_packet_mb", type=click.FloatRange(min=0, min_open=True)),
        _from(M, "max_block_mb", type=click.FloatRange(min=0, min_open=True)),
        _from(M, "quarantine_keep_mb", type=click.FloatRange(min=0)),
        _from(M, "compact_rows", type=click.IntRange(min=0)),
        _from(M, "history", "--history/--no-history"),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--archive", "archive", required=True, type=click.Path(file_okay=False), help="archive folder (created if missing)")
@_ingest_options
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary as the last stdout line")
def ingest(sources, archive, as_json, **options) -> None:
    """Read alert packets (files, folders, globs, nightly tarballs, Parquet alert dumps) into a Parquet archive.

    Exit code 0 when every packet was ingested (or already there), 3 when some were quarantined
    (including anything past a size limit). Special files (FIFOs, devices, sockets) and symlinks out of
    the sources are skipped with the reason.
    """
    from .graph.ingest import IngestOptions, ingest as run_ingest
    from .io.sources import SourceError

    opts = IngestOptions(**{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})
    try:
        report = run_ingest(list(sources), archive, opts)
    except SourceError as exc:
        raise click.UsageError(str(exc)) from exc
    if report.skipped_files:
        click.echo(f"skipped {len(report.skipped_files)} file(s) that are not alert packets, e.g. {report.skipped_files[0]}", err=True)
    if report.skipped_reasons:
        click.echo(f"skipped {len(report.skipped_reasons)} file(s) that are not read:", err=True)
        for path, why in list(report.skipped_reasons.items())[:20]:
            click.echo(f"  {path!r}: {why}", err=True)  # repr: a name cannot move the terminal's cursor
        if len(report.skipped_reasons) > 20:
            click.echo(f"  ... and {len(report.skipped_reasons) - 20} more", err=True)
    line = (
        f"read {report.read}: ingested {report.ingested}, duplicates {report.duplicates}, "
        f"quarantined {report.quarantined}; {report.partitions} new partition(s) in {report.seconds:.1f} s"
    )
    click.echo(line, err=as_json)
    if report.compaction.get("nights"):
        c = report.compaction
        click.echo(f"compacted {c['nights']} night(s): {c['replaced']} part(s) merged into {c['written']} ({c['parts_after']} part(s) in those nights)", err=as_json)
    if report.history.get("error"):
        click.echo(f"warning: the archive's history was not updated ({report.history['error']}); history channels shuffle the parts it does not cover until the next ingest adds them", err=True)
    if report.history.get("parts"):
        h = report.history
        click.echo(f"history: {h['parts']} part(s) added in {h['segments']} segment(s), {h['merged']} merge(s), {h['seconds']:.1f} s", err=as_json)
    if report.quarantined:
        reasons = ", ".join(f"{k} ({v})" for k, v in sorted(report.quarantine_reasons.items()))
        click.echo(f"quarantined packets are in {archive}/quarantine: {reasons}", err=True)
    if as_json:
        _emit_json(report.summary() | {"skipped": len(report.skipped_files) + len(report.skipped_reasons)})
    sys.exit(EXIT_QUARANTINED if report.quarantined else 0)


@main.command("compact")
@click.argument("archive", type=click.Path(exists=True, file_okay=False))
@click.option("--target-rows", type=click.IntRange(min=1), default=25_000, show_default=True, help="rows per part written (a smaller night becomes one part)")
@click.option("--nights", default=None, help="only nights A..B (YYYYMMDD:YYYYMMDD, inclusive; or one night)")
@click.option("--grace", "grace_seconds", type=click.FloatRange(min=0), default=3600.0, show_default=True, help="seconds replaced files are kept for runs still reading them")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary as the last stdout line")
def compact_cmd(archive, target_rows, nights, grace_seconds, as_json) -> None:
    """Merge each night's parts below --target-rows into parts of that size (what ingest does for the
    nights it wrote); replaced files are deleted by a later compaction after --grace seconds."""
    from .graph.compact import CompactOptions, compact

    report = compact(archive, CompactOptions(target_rows=target_rows, grace_seconds=grace_seconds), night_range=_night_range(nights))
    click.echo(f"parts: {report.parts_before} before, {report.parts_after} after ({report.nights} night(s) compacted: "
               f"{report.replaced} parts merged into {report.written}; {len(report.deleted)} retired file(s) deleted) in {report.seconds:.1f} s", err=as_json)  # fmt: skip
    if as_json:
        _emit_json(report.summary() | {"deleted": len(report.deleted)})


@main.command("history")
@click.argument("archive", type=click.Path(exists=True, file_okay=False))
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Dask worker processes building segments (0: in this process)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary as the last stdout line")
def history_cmd(archive, workers, as_json) -> None:
    """Add every part the archive's object-bucketed history does not cover yet (what ingest does for
    the parts it wrote): an archive written before ingest kept it, or with --no-history. History
    channels read it instead of shuffling every archived datapoint at each run."""
    from .graph.history import update_history
    from .io.archive import Archive

    arch = Archive(archive)
    if not arch.exists():
        raise click.UsageError(f"{archive} is not an ampel-dask archive")
    if workers:
        from distributed import Client

        from .graph.workers import local_cluster

        with local_cluster(workers, dashboard_address=None) as cluster, Client(cluster) as client:
            done = update_history(arch, client)
    else:
        done = update_history(arch)
    click.echo(f"history: {done['parts']} part(s) added in {done['segments']} segment(s), {done['merged']} merge(s), {done['seconds']:.1f} s", err=as_json)
    if as_json:
        _emit_json(done)


def _load_mapping(path: str) -> dict:
    """A YAML/JSON file with a unit config; ``{unit: ..., config: {...}}`` (AMPEL style) works too."""
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} does not hold a mapping of config fields", param_hint="--config")
    if isinstance(data.get("config"), dict) and set(data) <= {"unit", "config", "name"}:
        data = data["config"]
    return data


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the unit list as JSON")
def units(as_json) -> None:
    """List installed units (entry points of group ampel_dask.units) with their config fields."""
    from .tiers.registry import catalogue

    cat = catalogue()
    if as_json:
        _emit_json_list([{k: u[k] for k in ("name", "tier", "version", "config")} for u in cat])
        return
    for u in cat:
        click.echo(f"{u['tier']}  {u['name']}  v{u['version']}  {u.get('doc') or u.get('error', '')}")
        for field, typ in u["config"].items():
            click.echo(f"      {field}: {typ}")


def _emit_json_list(obj: list) -> None:
    sys.stdout.flush()
    click.echo(json.dumps(obj, default=str))


@main.command(name="filter")
@click.argument("archive", type=click.Path(exists=True, file_okay=False))
@click.option("--unit", "unit_name", required=True, help="T0 filter unit name (see `ampel-dask units`)")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML/JSON unit config")
@click.option("--survey", "surveys", multiple=True, help="only these surveys (ztf, lsst)")
@click.option("--night", "nights", multiple=True, type=int, help="only these nights (YYYYMMDD)")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False), help="CSV with one row per alert: alert_id, stock, accepted, reason")
@click.option("--json", "as_json", is_flag=True, help="print counts by reason as JSON on the last stdout line")
def filter_cmd(archive, unit_name, config_path, surveys, nights, out_csv, as_json) -> None:
    """Try a T0 filter over an archive; stores nothing in the archive."""
    from .graph.try_filter import FilterFailure, try_filter
    from .tiers.base import T0Filter, UnitConfigError
    from .tiers.registry import UnknownUnit, load

    try:
        cls = load(unit_name)
    except UnknownUnit as exc:
        raise click.BadParameter(str(exc), param_hint="--unit") from None
    if not issubclass(cls, T0Filter):
        raise click.BadParameter(f"{unit_name} is a {cls.tier} unit, not a T0 filter", param_hint="--unit")
    try:
        unit = cls(_load_mapping(config_path) if config_path else {})
    except UnitConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        result = try_filter(archive, unit, list(surveys) or None, list(nights) or None, out_csv)
    except FilterFailure as exc:  # e.g. an expression naming a column this survey's alerts lack
        raise _failure(f"{unit_name} on {exc.part}", exc.error) from None
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    counts, total, accepted = result.counts, result.alerts, result.accepted
    reasons = {k: v for k, v in counts.items() if k != "accepted"}
    click.echo(f"{unit_name}: {accepted} of {total} alerts accepted", err=as_json)
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {reason}: {n}", err=as_json)
    if as_json:
        _emit_json({"alerts": total, "accepted": accepted, "rejected": total - accepted, "reasons": reasons})


RUN_KEYS = ("run_id", "status", "alerts", "channels", "t2", "t2_units", "t3", "failures", "stopped", "tasks", "seconds")


@main.command()
@click.argument("workflow", type=click.Path(exists=True, dir_okay=False))
@click.option("--archive", type=click.Path(file_okay=False), help="archive folder (overrides archive.path)")
@click.option("--store", type=click.Path(file_okay=False), help="Parquet result store folder (overrides store.path)")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="local worker processes (default: all cores)")
@click.option("--cluster", type=click.Choice(["local", "slurm", "address"]), default=None, help="override cluster.kind")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="SLURM worker jobs (with --cluster slurm)")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: on a terminal)")
@click.option("--run-id", default=None, hidden=True, help="use this run id (set by `submit`)")
@click.option("--wait", type=click.FloatRange(min=0), default=0, show_default=True,
              help="seconds to wait while another run holds the store (then exit 2 naming it)")
@click.option("--json", "as_json", is_flag=True, help="print the run summary as JSON on the last stdout line")
def run(workflow, archive, store, workers, cluster, jobs, progress, run_id, wait, as_json) -> None:
    """Run a workflow over an archive: T0 filters, T1 states, T2 units, T3 reactions.

    Exit code 0 when every unit succeeded (or its failures were recorded: on_error: record), 1 when a
    unit failed or a channel passed more than its max_pass_ratio (the last stderr line says why; the
    summary is printed first), 2 on a usage error or when another run holds the store (after --wait
    seconds): one run per store at a time.
    """
    from .graph.failures import RunFailed
    from .graph.guard import PassRatioExceeded
    from .graph.runner import RunOptions, run_workflow
    from .graph.watchdog import StalledRun
    from .graph.workflow import WorkflowError, load_workflow
    from .io.locks import Busy

    try:
        wf = load_workflow(workflow)
        summary = run_workflow(
            wf,
            RunOptions(archive=archive, store=store, workers=workers, cluster=cluster, jobs=jobs, progress=progress,
                       run_id=run_id, wait=wait, echo=lambda line: click.echo(line, err=True)),  # fmt: skip
        )
    except Busy as exc:
        raise StoreBusy(f"{exc}; try again later, or give --wait SECONDS") from None
    except WorkflowError as exc:
        raise click.UsageError(str(exc)) from None
    except StalledRun as exc:
        raise click.ClickException(str(exc)) from None
    except PassRatioExceeded as exc:  # guarded channels' T3 not run: what the run did, then why
        if exc.summary:
            _report_run(exc.summary, as_json)
        raise click.ClickException(f"run stopped: {exc}") from None
    except RunFailed as exc:  # a unit failed: what the run did, then the one line that says why
        _report_run(exc.summary, as_json)
        if os.environ.get("AMPEL_DASK_DEBUG"):
            for f in exc.summary["failures"]:
                if f.get("traceback"):
                    click.echo(f["traceback"], err=True)
        raise click.ClickException(f"run failed: {exc}") from None
    except Exception as exc:  # anything else on the way (the task's own error)
        raise _failure("run failed", exc) from None
    _report_run(summary, as_json)


class StoreBusy(click.ClickException):
    """Another run holds the store: exit 2, one line naming it (pid, host, run id, since)."""

    exit_code = 2


def _failure(what: str, exc: Exception) -> click.ClickException:
    """One line with the reason; the traceback only when AMPEL_DASK_DEBUG is set (re-raised as is)."""
    if os.environ.get("AMPEL_DASK_DEBUG"):
        raise exc
    return click.ClickException(f"{what}: {type(exc).__name__}: {exc} (AMPEL_DASK_DEBUG=1 shows the traceback)")


def _report_run(summary: dict, as_json: bool) -> None:
    from .graph.failures import reason

    out = sys.stderr if as_json else sys.stdout
    print(f"run {summary['run_id']}: {summary['alerts']} alerts, {summary['tasks']} tasks, {summary['seconds']:.1f} s", file=out)
    for name, c in summary["channels"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["rejections"][name].items(), key=lambda kv: -kv[1])[:6])
        missing = f", not processed {c['not_processed']}" if c.get("not_processed") else ""
        print(f"  channel {name}: passed {c['passed']}, rejected {c['rejected']}" + (f" ({reasons})" if reasons else "") + missing, file=out)
    t2 = summary["t2"]
    failed = f", failed {t2['failed']}" + (f" (recorded {t2['recorded']}, retried by the next run)" if t2.get("recorded") else "") if t2.get("failed") else ""
    print(f"  T2: computed {t2['computed']}, reused {t2['reused']}{failed}; T3 outputs: {summary['t3']['outputs']}", file=out)
    for unit, c in summary.get("t2_units", {}).items():
        if c.get("failed"):
            print(f"  T2 unit {unit}: computed {c['computed']}, reused {c['reused']}, failed {c['failed']} (recorded {c['recorded']})", file=out)
    for f in summary.get("failures", []):
        print(f"  {'recorded' if f['policy'] == 'record' else 'FAILED'}: {reason(f)}", file=out)
    for channel, why in summary["t3"].get("not_run", {}).items():
        print(f"  T3 of channel {channel} not run: {why}", file=out)
    for p in summary.get("t3_outputs", []):
        print(f"  output: {p}", file=out)
    if summary.get("note"):
        print(f"  {summary['note']}", file=out)
    if as_json:
        _emit_json({k: summary[k] for k in RUN_KEYS if k in summary} | ({"note": summary["note"]} if summary.get("note") else {}))


@main.command(name="backtest")
@click.argument("workflow", type=click.Path(exists=True, dir_okay=False))
@click.option("--archive", type=click.Path(file_okay=False), help="archive folder (overrides archive.path)")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False), help="labels file (CSV/Parquet: ELAsTiCC truth, ZTF object labels)")
@click.option("--nights", "nights", default=None, help="only nights A..B (YYYYMMDD:YYYYMMDD, inclusive; or one night)")
@click.option("--object-column", default=None, help="labels: the object id column (default: object_id, objectId, diaObjectId, SNID)")
@click.option("--label-column", default=None, help="labels: the class column (default: GENTYPE, label, class, type)")
@click.option("--label-source", default=None, help="labels: only rows whose label_source starts with this (e.g. 'alerce')")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="PNG file (default: <workflow name>-backtest.png)")
@click.option("--no-plot", is_flag=True, help="no PNG")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON on the last stdout line")
def backtest_cmd(workflow, archive, labels_path, nights, object_column, label_column, label_source, plot_path, no_plot, as_json) -> None:
    """What each channel's filters would pass: per channel and night alerts, passed, pass ratio, objects;
    against labels, purity and completeness per class. Stores nothing."""
    from .graph.backtest import LabelsError, backtest, load_labels
    from .graph.workflow import WorkflowError, load_workflow

    night_range = _night_range(nights)
    try:
        labels = load_labels(labels_path, object_column, label_column, label_source) if labels_path else None
        wf = load_workflow(workflow)
        result = backtest(wf, archive, labels, night_range)
    except (ValueError, LabelsError, WorkflowError) as exc:  # WorkflowError and LabelsError are ValueErrors
        raise click.UsageError(str(exc)) from None
    except Exception as exc:  # a filter failing on the data
        raise _failure("backtest failed", exc) from None
    click.echo(result.table(), err=as_json)
    if not no_plot:
        path = result.plot(plot_path or f"{wf.name}-backtest.png")
        click.echo(f"plot: {path}", err=as_json)
    if as_json:
        _emit_json(result.to_dict())


@main.command(name="export-hats")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--archive", type=click.Path(exists=True, file_okay=False), help="export the archive's alerts (flat columns)")
@click.option("--store", type=click.Path(file_okay=False), help="export a channel's objects with their latest T2 columns (with --channel)")
@click.option("--channel", default=None, help="the channel whose objects to export (with --store)")
@click.option("--survey", "surveys", multiple=True, help="only these surveys (archive export)")
@click.option("--nights", default=None, help="only these nights, FROM:TO as YYYYMMDD (archive export)")
@click.option("--margin-arcsec", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True, help="margin cache width")
def export_hats(out, archive, store, channel, surveys, nights, margin_arcsec) -> None:
    """Write alerts, or a channel's results, as a HATS catalog (with margin) that lsdb.open_catalog opens."""
    import ampel_dask as ad

    if bool(archive) == bool(store) or (store and not channel):
        raise click.UsageError("give --archive, or --store with --channel")
    try:
        if archive:
            view = ad.open_archive(archive).select(surveys=list(surveys) or None, nights=_night_range(nights))
            path = view.to_hats(out)
        else:
            path = ad.open_store(store).to_hats(channel, out)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(str(path))


def _night_range(text: str | None) -> tuple[int, int] | None:
    """``--nights A:B`` (or one night) as a range, or a usage error."""
    from .graph.workflow import parse_nights

    if not text:
        return None
    try:
        return parse_nights(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--nights") from None


@main.command()
@click.argument("obj", metavar="OBJECT")
@click.option("--store", default="store", show_default=True, type=click.Path(file_okay=False), help="result store folder")
@click.option("--archive", type=click.Path(file_okay=False), help="archive folder (default: the one of the latest run)")
@click.option("--json", "as_json", is_flag=True, help="print the chain as JSON on the last stdout line")
def explain(obj, store, archive, as_json) -> None:
    """Show the chain for one object: alerts -> states -> T2 results -> T3 outputs, with run ids.

    OBJECT is a ZTF name (ZTF18abcdefg), an LSST diaObjectId, ss:<ssObjectId>, or a stock number.
    """
    from .graph.explain import explain as run_explain, render

    from .io.stores import StoreFormatError

    try:
        info = run_explain(obj, store, archive)
    except StoreFormatError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="OBJECT") from None
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None
    click.echo(render(info), err=as_json)
    if as_json:
        _emit_json(info)


@main.command()
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False), help="where alerts, archive and store go")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Dask worker processes (default: all cores)")
@click.option("--progress/--no-progress", default=None, help="progress bars (default: on a terminal)")
def demo(out, workers, progress) -> None:
    """Simulate a ZTF-like stream, ingest it, run an example workflow; prints the T3 report path last."""
    from .demo.run import run_demo
    from .graph.failures import RunFailed

    try:
        summary = run_demo(out, workers=workers, progress=progress, echo=lambda line: click.echo(line, err=True))
    except RunFailed as exc:
        _report_run(exc.summary, as_json=False)
        raise click.ClickException(f"run failed: {exc}") from None
    _report_run(summary, as_json=False)
    if not summary.get("report"):
        raise click.ClickException("the demo produced no report")
    click.echo(summary["report"])


@main.command()
@click.argument("workflow", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", default="store", show_default=True, type=click.Path(file_okay=False), help="result store folder")
@click.option("--archive", type=click.Path(file_okay=False), help="archive folder (overrides archive.path)")
@click.option("--cluster", type=click.Choice(["local", "slurm", "address"]), default=None, help="cluster inside the driver job (default: the workflow's)")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="SLURM worker jobs")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="local workers inside the driver job")
@click.option("--partition", default=None, help="SLURM partition of the driver job")
@click.option("--time", "walltime", default="04:00:00", show_default=True, help="driver job time limit")
@click.option("--mem", default="2G", show_default=True, help="driver job memory")
@click.option("--cpus", default=1, show_default=True, help="driver job CPUs (for --cluster local, the workers' cores)")
@click.option("--json", "as_json", is_flag=True, help="print the submission as JSON on the last stdout line")
def submit(workflow, store, archive, cluster, jobs, workers, partition, walltime, mem, cpus, as_json) -> None:
    """Submit a driver job that runs WORKFLOW inside a SLURM allocation; prints the job id."""
    from .graph.submit import SlurmError, submit as do_submit

    try:
        rec = do_submit(workflow, store, archive, cluster, jobs, workers, {"partition": partition, "time": walltime, "mem": mem, "cpus": cpus})
    except SlurmError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"submitted job {rec['job_id']} for run {rec['run_id']} (log: {rec['log']}); follow with `ampel-dask status {rec['run_id']} --store {store}`", err=True)
    if as_json:
        _emit_json(rec)
    else:
        click.echo(rec["job_id"])


@main.command()
@click.argument("run_id")
@click.option("--store", default="store", show_default=True, type=click.Path(file_okay=False), help="result store folder")
@click.option("--json", "as_json", is_flag=True, help="print the status as JSON on the last stdout line")
def status(run_id, store, as_json) -> None:
    """State of a run: its SLURM job (if submitted) and, once finished, its manifest's counts."""
    from .graph.submit import status as get_status

    try:
        info = get_status(run_id, store)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    line = f"run {run_id}: {info['state']}"
    if "job_id" in info:
        line += f" (SLURM job {info['job_id']}: {info.get('slurm_state')})"
    if info["state"] in ("finished", "failed", "stopped"):
        line += f"; {info['alerts']} alerts, T2 computed {info['t2']['computed']}, reused {info['t2']['reused']}"
        line += f", failed {info['t2']['failed']}" if info["t2"].get("failed") else ""
        line += f", {info['seconds']} s"
    if info["state"] == "failed":
        from .graph.failures import run_reason

        line += f"; {run_reason(info['failures'])}"
    if info.get("stopped"):
        line += f"; {info['stopped']}"
    click.echo(line, err=as_json)
    if as_json:
        _emit_json(info)


def _properties(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter("takes KEY=VALUE (an argument without '=' is not echoed: it may hold a secret)", param_hint="-X")
        out[key.strip()] = val
    return out


def _live_logging(redactor) -> None:
    """Batch lines (and librdkafka's, redacted) on stderr; secrets never reach a log line."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(redactor.filter())
    logger = logging.getLogger("ampel_dask")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _live_options(fn: Callable) -> Callable:
    """The ``live`` command's options, declared once in :class:`~ampel_dask.graph.live.LiveOptions`."""
    from .graph.live_options import LiveOptions as M

    decorators = [
        _from(M, "bootstrap", required=True, envvar="AMPEL_DASK_KAFKA_BOOTSTRAP"),
        _from(M, "topics", "--topic", multiple=True, required=True),
        _from(M, "group"),
        _from(M, "interval", type=click.FloatRange(min=0, min_open=True)),
        _from(M, "max_batch", type=click.IntRange(min=1)),
        _from(M, "batches", type=click.IntRange(min=1)),
        _from(M, "until_idle", is_flag=True),
        _from(M, "archive", type=click.Path(file_okay=False)),
        _from(M, "store", type=click.Path(file_okay=False)),
        _from(M, "workers", type=click.IntRange(min=0)),
        _from(M, "cluster"),
        _from(M, "jobs", type=click.IntRange(min=1)),
        _from(M, "schema_dirs", "--schema-dir", multiple=True, type=click.Path(exists=True, file_okay=False)),
        _from(M, "schema_registry"),
        _from(M, "secrets_file", "--secrets", type=click.Path(exists=True, dir_okay=False)),
        _from(M, "properties", "-X", "--property", multiple=True),
        _from(M, "offset_reset"),
        _from(M, "t3_scope"),
        _from(M, "metrics_file", type=click.Path(dir_okay=False)),
        _from(M, "metrics_port", type=click.IntRange(min=0)),
        _from(M, "metrics_host"),
        _from(M, "join_timeout", type=click.FloatRange(min=0)),
        _from(M, "store_wait", type=click.FloatRange(min=0)),
        _from(M, "compact_every", type=click.IntRange(min=0)),
        _from(M, "compact_rows", type=click.IntRange(min=1)),
        _from(M, "history", "--history/--no-history"),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


@main.command()
@click.argument("workflow", type=click.Path(exists=True, dir_okay=False))
@_live_options
@click.option("--json", "as_json", is_flag=True, help="print the totals as JSON on the last stdout line")
def live(workflow, as_json, **options) -> None:
    """Consume alerts from Kafka in micro-batches: archive, run WORKFLOW, then commit (exactly-once results).

    SIGTERM (or Ctrl-C) finishes the current batch and stops; a second one abandons it uncommitted.
    A unit that fails on a batch (on_error: fail) stops live mode before that batch's commit (exit 1).
    Credentials (SASL/TLS) come from AMPEL_DASK_KAFKA_* variables or --secrets, never from the workflow.
    """
    from .graph.live import BatchFailed, LiveOptions, StopFlag, run_live
    from .graph.workflow import WorkflowError, load_workflow
    from .io.kafka import KafkaFailure
    from .io.kafka_auth import CredentialsError, KafkaCredentials, Redactor
    from .io.locks import Busy
    from .io.schema_registry import RegistryError

    try:
        redactor = Redactor(KafkaCredentials.load(options["secrets_file"]).secrets())
    except CredentialsError as exc:
        raise click.UsageError(str(exc)) from None
    options["properties"] = _properties(options["properties"])
    _live_logging(redactor)
    try:
        wf = load_workflow(workflow)
        opts = LiveOptions(**{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})
        with StopFlag().installed() as stop:
            totals = run_live(wf, opts, stop)
    except (WorkflowError, CredentialsError) as exc:
        raise click.UsageError(redactor(exc)) from None
    except Busy as exc:
        raise StoreBusy(redactor(exc)) from None
    except (KafkaFailure, RegistryError, BatchFailed) as exc:
        raise click.ClickException(redactor(exc)) from None
    except Exception as exc:  # anything else: a redacted one-line reason, never a raw message
        raise click.ClickException(f"live mode failed: {type(exc).__name__}: {redactor(exc)}") from None
    line = (f"live: {totals['batches']} batch(es) ({totals['empty_batches']} empty), {totals['alerts']} alerts, "
            f"quarantined {totals['quarantined']}, T2 computed {totals['t2']['computed']}, reused {totals['t2']['reused']}, "
            f"failed {totals['t2']['failed']} (recorded {totals['t2']['recorded']}); "
            f"stopped: {totals['stopped']}")  # fmt: skip
    click.echo(line, err=True)
    if as_json:
        _emit_json(totals)


if __name__ == "__main__":
    main()
