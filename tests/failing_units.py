"""Units for the failure tests, made available to ``ampel-dask`` subprocesses (and their Dask workers) as
a package would: a ``.dist-info`` with entry points on ``PYTHONPATH`` (:func:`units_env`).

They are switched by environment variables, so that a second run "with the unit fixed" is the same
workflow, the same unit identity and the same keys, with the variable unset:

- ``AMPEL_DASK_TEST_FAIL_STOCKS``: comma-separated stocks; :class:`T2Fragile` raises on any batch that
  holds a state of one of them (``all``: on every batch).
- ``AMPEL_DASK_TEST_FAIL_DPS``: comma-separated datapoint ids; :class:`T2FragilePoint` (a T2PointUnit)
  raises on any batch of datapoints that holds one of them (``all``: on every batch).
- ``AMPEL_DASK_TEST_GATE``: a folder; :class:`T2Gate` creates ``entered`` there and waits until ``open``
  exists (a batch that is surely in progress when a test signals the process).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ampel_dask.tiers.base import T2PointUnit, T2StateUnit

ROOT = Path(__file__).resolve().parents[1]
FAIL_ENV = "AMPEL_DASK_TEST_FAIL_STOCKS"
FAIL_DPS_ENV = "AMPEL_DASK_TEST_FAIL_DPS"
GATE_ENV = "AMPEL_DASK_TEST_GATE"
UNITS = {"T2Fragile": "T2Fragile", "T2FragileChild": "T2FragileChild", "T2FragilePoint": "T2FragilePoint", "T2Gate": "T2Gate"}


def _n_dps(states: pa.Table) -> pa.Array:
    return pc.list_value_length(states.column("dps")).cast(pa.int64())


class T2Fragile(T2StateUnit):
    """The number of datapoints of each state; raises on batches holding the stocks of FAIL_ENV."""

    def process(self, states, inputs=None):
        wanted = os.environ.get(FAIL_ENV, "")
        stock = states.column("stock").to_numpy()
        if wanted == "all" or (wanted and np.isin(stock, [int(s) for s in wanted.split(",")]).any()):
            raise ValueError(f"fragile: {len(stock)} states, one of stocks {wanted} among them")
        return pa.table({"n_dps": _n_dps(states), "code": pa.array(np.zeros(states.num_rows, np.int32))})


class T2FragileChild(T2StateUnit):
    """Twice T2Fragile's ``n_dps`` (a unit that reads another's results)."""

    def dependencies(self):
        return [T2Fragile()]

    def process(self, states, inputs=None):
        parent = inputs["T2Fragile"].column("n_dps").to_numpy()
        return pa.table({"twice": pa.array(2 * parent), "code": pa.array(np.zeros(states.num_rows, np.int32))})


class T2FragilePoint(T2PointUnit):
    """Each datapoint's band; raises on batches holding the datapoint ids of FAIL_DPS_ENV."""

    def process(self, points):
        wanted = os.environ.get(FAIL_DPS_ENV, "")
        if wanted == "all":
            raise ValueError("fragile point: all")
        dp = points.column("dp_id").to_numpy()
        hit = np.isin(dp, [int(s) for s in wanted.split(",")]) if wanted else np.zeros(len(dp), bool)
        if hit.any():
            raise ValueError(f"fragile point: dp_id {int(dp[hit][0])} among {len(dp)} datapoints")
        return pa.table({"band": points.column("band"), "code": pa.array(np.zeros(points.num_rows, np.int32))})


class T2Gate(T2StateUnit):
    """Blocks until the test opens the gate (see the module docstring); then as T2Fragile without failing."""

    def process(self, states, inputs=None):
        gate = Path(os.environ[GATE_ENV])
        (gate / "entered").touch()
        deadline = time.monotonic() + 120
        while not (gate / "open").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test never opened {gate}")
            time.sleep(0.02)
        return pa.table({"n_dps": _n_dps(states)})


def units_env(site: Path, **variables: str) -> dict[str, str]:
    """Register these units (entry points of a dist-info in ``site``) and return the environment of a
    subprocess that finds them: ``site`` and the repository on PYTHONPATH, plus ``variables``."""
    dist = site / "ampel_dask_failure_test_units-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ampel-dask-failure-test-units\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[ampel_dask.units]\n" + "".join(f"{k} = tests.failing_units:{v}\n" for k, v in UNITS.items()))
    path = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k not in (FAIL_ENV, FAIL_DPS_ENV, GATE_ENV)}
    return {**env, "PYTHONPATH": path, **variables}
