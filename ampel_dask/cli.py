"""The ``ampel-dask`` command."""

from __future__ import annotations

import json
import sys

import click

from . import __version__

EXIT_QUARANTINED = 3


def _emit_json(obj: dict) -> None:
    """Machine-readable result: always the last line of stdout."""
    sys.stdout.flush()
    click.echo(json.dumps(obj, sort_keys=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ampel-dask")
def main() -> None:
    """Analyse astronomical alert streams: columnar, content-addressed, on Dask."""


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--archive", "archive", required=True, type=click.Path(file_okay=False), help="archive folder (created if missing)")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Dask worker processes (default: all cores; 0 = no cluster)")
@click.option("--chunk-mb", type=click.FloatRange(min=0, min_open=True), default=32.0, show_default=True, help="input MB per decode task")
@click.option("--schema-dir", "schema_dirs", multiple=True, type=click.Path(exists=True, file_okay=False), help="extra Rubin schema folder (wire format)")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: on a terminal)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary as the last stdout line")
def ingest(sources, archive, workers, chunk_mb, schema_dirs, progress, as_json) -> None:
    """Read alert packets (files, folders, globs, nightly tarballs) into a Parquet archive.

    Exit code 0 when every packet was ingested (or already there), 3 when some were quarantined.
    """
    from .io.ingest import IngestOptions, ingest as run_ingest
    from .io.sources import SourceError

    opts = IngestOptions(workers=workers, chunk_mb=chunk_mb, schema_dirs=list(schema_dirs), progress=progress)
    try:
        report = run_ingest(list(sources), archive, opts)
    except SourceError as exc:
        raise click.UsageError(str(exc)) from exc
    if report.skipped_files:
        click.echo(f"skipped {len(report.skipped_files)} file(s) that are not alert packets, e.g. {report.skipped_files[0]}", err=True)
    line = (
        f"read {report.read}: ingested {report.ingested}, duplicates {report.duplicates}, "
        f"quarantined {report.quarantined}; {report.partitions} new partition(s) in {report.seconds:.1f} s"
    )
    click.echo(line, err=as_json)
    if report.quarantined:
        reasons = ", ".join(f"{k} ({v})" for k, v in sorted(report.quarantine_reasons.items()))
        click.echo(f"quarantined packets are in {archive}/quarantine: {reasons}", err=True)
    if as_json:
        _emit_json(report.summary())
    sys.exit(EXIT_QUARANTINED if report.quarantined else 0)


if __name__ == "__main__":
    main()
