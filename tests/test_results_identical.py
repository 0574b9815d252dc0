"""Results identical before and after the loop's optimisations (issue #20, target 2).

Oracle: ``tests/data/results_oracle.json``, the states and T2 rows of ``workflows/ztf_archive.yml``
(without T3) on every real ZTF alert of ../shared/data, recorded once with main's code before that work
(see ``tests/results_oracle.py``). The current code must give the same state ids for the same alerts
(ids are content hashes of the datapoints: an encoding change must not move them) and the same T2
result bodies, floats to a relative 1e-9.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from .results_oracle import run_rows

FIXTURE = Path(__file__).parent / "data" / "results_oracle.json"


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def rows(data_dir, tmp_path_factory) -> dict:
    return run_rows(data_dir, tmp_path_factory.mktemp("identical"))


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(FIXTURE.read_text())


def test_same_states_for_the_same_alerts(rows, recorded):
    assert set(rows["states"]) == set(recorded["states"]) == {"DECENT", "FULL_LIGHTCURVES"}
    for channel, want in recorded["states"].items():
        assert len(want) > 20, channel  # the oracle holds real work on both channels
        assert rows["states"][channel] == want, channel


def test_same_t2_rows(rows, recorded):
    assert set(rows["t2"]) == set(recorded["t2"]) == {"T2LightCurveFeatures", "T2BazinFit", "T2Classifier"}
    for unit, want in recorded["t2"].items():
        got = rows["t2"][unit]
        assert got.keys() == want.keys(), unit
        bad = [s for s in want if not same(got[s], want[s])]
        assert not bad, f"{unit}: {len(bad)} of {len(want)} results differ, e.g. {bad[0]}: {got[bad[0]]} != {want[bad[0]]}"


def test_the_comparison_bites(recorded):
    """A changed float beyond the tolerance, a changed id, a missing column: each is seen."""
    body, col = next((b, k) for r in recorded["t2"].values() for b in r.values() for k, v in b.items() if isinstance(v, float) and v != 0)
    assert same(body, dict(body))
    assert not same(body, {**body, col: body[col] * (1 + 1e-6)})
    assert not same(body, {k: v for k, v in body.items() if k != col})
    states = recorded["states"]["DECENT"]
    alert = next(iter(states))
    assert {**states, alert: "0" * 32} != states
