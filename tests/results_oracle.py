"""What ``tests/test_results_identical.py`` compares: a run's states and T2 rows on the real ZTF alerts.

``PYTHONPATH=<worktree of main> .venv/bin/python tests/results_oracle.py OUT.json`` records them (the
fixture ``tests/data/results_oracle.json`` was recorded ONCE so, with the code of main at 2cec20f, before the loop work of issue #20 target 2: decode
histories once, dictionary-encoded strings; it is a regression oracle for that work). The test calls
:func:`run_rows` on the current code and compares.

The workflow is ``workflows/ztf_archive.yml`` without its T3 units (their outputs are files, not rows):
a packet channel (DecentFilter -> T2LightCurveFeatures, T2BazinFit, T2Classifier) and an archive-history
channel (ExpressionFilter -> T1Policy history: archive -> T2LightCurveFeatures, T2BazinFit), on every
real ZTF alert of ``../shared/data/ztf`` ingested into one archive.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "ztf_archive.yml"
PROVENANCE = {"state_id", "stock", "alert_id", "unit", "unit_version", "config_hash", "t2_key", "run_id"}


def _plain(v):
    """A JSON-able value; NaN and infinities as strings (JSON has none)."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return v.hex()
    return v


def ingest_ztf(data_dir: Path, archive: Path) -> Path:
    """Every real ZTF alert of ``data_dir/ztf`` in one archive."""
    from ampel_dask.graph.ingest import IngestOptions, ingest

    ingest([str(data_dir / "ztf")], archive, IngestOptions(workers=0, progress=False))
    return archive


def run_rows(data_dir: Path, work: Path, archive: Path | None = None, partitions: list[str] | None = None) -> dict:
    """Ingest ``data_dir/ztf`` (unless ``archive`` is given), run the workflow (no T3, workers 0; only
    ``partitions`` if given) and return its rows:
    ``{"states": {channel: {alert_id: state_id}}, "t2": {unit: {state_id: {column: value}}}}``."""
    import os

    from ampel_dask.graph.runner import RunOptions, run_workflow
    from ampel_dask.graph.workflow import load_workflow
    from ampel_dask.io.stores import ParquetStore
    from ampel_dask.keys import id_hex, id_values

    store = work / "store"
    archive = archive or ingest_ztf(data_dir, work / "archive")
    wf = load_workflow(WORKFLOW)
    wf = wf.model_copy(update={"channels": [c.model_copy(update={"t3": []}) for c in wf.channels]})
    cwd = os.getcwd()
    os.chdir(ROOT)  # the classifier's model path is relative to the repository
    try:
        run_workflow(wf, RunOptions(archive=str(archive), store=str(store), progress=False, workers=0, partitions=partitions))
    finally:
        os.chdir(cwd)
    st = ParquetStore(store)
    out: dict = {"states": {}, "t2": {}}
    for c in wf.channels:
        t = st.read_states(c.name, columns=["state_id", "alert_id"])
        ids = id_hex(id_values(t.column("state_id")))
        out["states"][c.name] = {str(a): s for a, s in sorted(zip(t.column("alert_id").to_pylist(), ids))}
    for unit, ukey in sorted(st.t2_units()):
        t = st.read_t2(unit, ukey)
        ids = id_hex(id_values(t.column("state_id")))
        body = t.drop_columns([c for c in t.column_names if c in PROVENANCE]).to_pylist()
        rows = {s: _plain(b) for s, b in zip(ids, body)}
        out["t2"][unit] = dict(sorted(rows.items()))
    return out


def main() -> None:
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_rows(data, Path(tmp))
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    header = (f"Recorded ONCE with the code of main at {commit}, BEFORE the loop work of issue #20 target 2 (histories decoded "
              "once, dictionary-encoded strings): a regression oracle for it. Made by `python tests/results_oracle.py OUT`; "
              "see tests/results_oracle.py.")  # fmt: skip
    Path(sys.argv[1]).write_text(json.dumps({"header": header, "commit": commit, **rows}, indent=0, sort_keys=True) + "\n")
    print({k: len(v) for k, v in rows["states"].items()}, {k: len(v) for k, v in rows["t2"].items()}, np.__version__)


if __name__ == "__main__":
    main()
