"""The example notebooks run, top to bottom, in a fresh Jupyter kernel (nbclient), so they never go stale.

The notebooks check themselves where a number can be checked (counts reconcile, the channel accepts
what the filter accepted on the frame, the plotted detections are the ones the T2 summary counted); a
cell that raises fails the test with the cell's traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))

pytestmark = pytest.mark.slow


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["quickstart.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, data_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat") if not os.environ.get("CI") else __import__("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("AMPEL_DASK_DATA", str(data_dir))  # the kernel inherits it
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # the last cell drew the light curve
    assert any("image/png" in o.get("data", {}) for o in nb.cells[-1].outputs)
    # the run's report exists where the notebook said
    report = [o for c in nb.cells if c.cell_type == "code" and "run.outputs" in c.source for o in c.outputs if o.output_type == "execute_result"]
    paths = eval(report[0]["data"]["text/plain"])  # a list of path strings, as the cell showed it
    assert len(paths) == 1 and paths[0].endswith("index.html") and Path(paths[0]).exists()
