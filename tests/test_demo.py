"""The demo: its stream looks like a survey's (irregular cadence, weather gaps, fields first observed on
different nights, single-band nights), and its report ranks the simulated transients above the periodic
variables. The cadence is read from the simulated packets with fastavro (not through ingest); the
classes are the simulator's truth."""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict

import fastavro
import numpy as np
import pytest

import ampel_dask as ad
from ampel_dask.demo.simulate import MJD0, truth

pytestmark = pytest.mark.slow


def visits(alerts_dir) -> dict[int, set[tuple[float, int]]]:
    """field -> {(mjd, band)}: every exposure seen in a packet (its candidate and its history)."""
    out: dict[int, set[tuple[float, int]]] = defaultdict(set)
    for path in sorted(alerts_dir.glob("ztf_public_*.tar.gz")):
        with tarfile.open(path) as tar:
            for member in tar:
                for rec in fastavro.reader(io.BytesIO(tar.extractfile(member).read())):
                    for p in [rec["candidate"], *(rec["prv_candidates"] or [])]:
                        out[p["pid"] % 10].add((round(p["jd"] - 2400000.5, 2), p["fid"]))  # the simulator's pid ends in the field
    return out


def test_demo_stream_has_a_survey_cadence(demo_run):
    by_field = visits(demo_run["out"] / "alerts")
    assert len(by_field) == 8
    nights = {f: sorted({int(mjd - MJD0) for mjd, _ in v}) for f, v in by_field.items()}
    first = [n[0] for n in nights.values()]
    assert len(set(first)) >= 4  # fields start on different nights
    every = sorted(set().union(*map(set, nights.values())))
    span = range(every[0], every[-1] + 1)
    weather = [n for n in span if n not in every]
    assert len(weather) >= 3  # nights when no field was observed
    for f, n in nights.items():
        gaps = np.diff(n)
        assert gaps.max() >= 3 and len(set(gaps.tolist())) >= 3, f  # no fixed cadence
        per_night = defaultdict(set)
        for mjd, band in by_field[f]:
            per_night[int(mjd - MJD0)].add(band)
        sizes = {len(b) for b in per_night.values()}
        assert sizes == {1, 2}, f  # some nights in g and r, some in one band


def test_demo_report_ranks_transients_above_periodic_variables(demo_run):
    objects = ad.open_store(demo_run["out"] / "store").objects("TRANSIENTS")
    kind = truth()
    ranked = objects.sort_values(["T2BazinFit__bazin_fit_reduced_chi2_r", "object_id"], na_position="last")
    classes = [kind[o] for o in ranked["object_id"]]
    assert set(classes[:20]) <= {"SN Ia", "SN II"}
    assert "variable" in classes and classes.index("variable") >= 40
    # the report shows those 20, in that order
    text = demo_run["report"].read_text()
    positions = [text.index(f'<tr id="{o}"') for o in ranked["object_id"][:20]]
    assert positions == sorted(positions) and text.count("<tr id=") == 20
