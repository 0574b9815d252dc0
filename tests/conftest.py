"""Shared fixtures: the real alert data in ../shared/data (required in CI, skipped elsewhere if absent)."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AMPEL_DASK_DATA", ROOT.parent / "shared" / "data"))


def _require_data() -> Path:
    if (DATA / "MANIFEST_alerts.csv").exists():
        return DATA
    if os.environ.get("CI"):
        pytest.fail(f"alert data not found at {DATA} (CI must provide ../shared/data)")
    pytest.skip(f"alert data not found at {DATA}; set AMPEL_DASK_DATA or put ../shared/data beside the repo")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require_data()


@pytest.fixture(scope="session")
def manifest(data_dir) -> dict[str, list[dict]]:
    """MANIFEST_alerts.csv rows by group."""
    groups: dict[str, list[dict]] = defaultdict(list)
    with open(data_dir / "MANIFEST_alerts.csv") as fh:
        for row in csv.DictReader(fh):
            groups[row["group"]].append(row)
    return dict(groups)


def group_location(rows: list[dict]) -> str:
    """The file or folder a manifest group lives in (tarball, or the group's top folder)."""
    first = rows[0]["file"]
    parts = first.split("/")
    return "/".join(parts[:2])


def dump_alert_ids(location: Path) -> list[int]:
    """Alert ids of the Parquet alert dumps at or under ``location`` (a folder's dumps are ingested with
    it), read with pyarrow alone: ZTF ``candidate.candid``, Rubin ``diaSource.diaSourceId``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = [location] if location.is_file() else sorted(location.rglob("*.parquet"))
    ids: list[int] = []
    for path in paths:
        if path.suffix != ".parquet":
            continue
        names = pq.read_schema(path).names
        col, key = ("candidate", "candid") if "candidate" in names else ("diaSource", "diaSourceId")
        ids += pc.struct_field(pq.read_table(path, columns=[col]).column(col), key).to_pylist()
    return ids


@pytest.fixture(scope="session")
def group_archives(tmp_path_factory, data_dir, manifest):
    """Every manifest group ingested into its own archive, in this process: {group: (root, report)}."""
    from ampel_dask.graph.ingest import IngestOptions, ingest

    out = {}
    for group, rows in sorted(manifest.items()):
        root = tmp_path_factory.mktemp(group)
        report = ingest([str(data_dir / group_location(rows))], root, IngestOptions(workers=0, progress=False))
        out[group] = (root, report)
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """``ampel-dask demo`` run once (workers 0: no cluster), as a user runs it: {out, report}, the report
    being the last line it printed."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "demo", "--out", str(out), "--workers", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = Path(proc.stdout.strip().splitlines()[-1])
    assert report.name == "index.html" and report.is_file() and report.is_relative_to(out / "store")
    return {"out": out, "report": report}


from .slurm_fixture import slurm  # noqa: E402,F401  (session fixture: the one-node SLURM of slurm/)
