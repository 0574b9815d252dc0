"""Per-core speed of the nuclear-transient, neutrino and GW sky-map units on real ZTF alerts (no Dask, one process).

    .venv/bin/python benchmarks/bench_multimessenger_units.py [--replicate 100] [--json]

Alerts: the shared ZTF groups (2,400 alerts of schemas 1.3-4.02, with their packets' histories), ingested
into a temporary archive and replicated ``--replicate`` times; states: one per alert (the packet's
datapoints). NuclearFilter (AMPEL's defaults) on the alerts; T2NeutrinoCoincidence with 100 IceCube-like
alerts (1-deg rectangles at random places and times within the alerts' span, window +-365 d, every pair in
time) on the states; SkyMapFilter and T2GWCounterpart with a mock multi-order map (scripts/mock_skymap.py,
nside 512 at its finest, distance layers, a redshift column) on alerts / states. Best of 2 runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from ampel_dask.graph.ingest import IngestOptions, ingest  # noqa: E402
from ampel_dask.io.archive import Archive  # noqa: E402
from ampel_dask.tiers.states import T1PolicyConfig, build_states  # noqa: E402
from ampel_dask.tiers.units.t0_nuclear import NuclearFilter  # noqa: E402
from ampel_dask.tiers.units.t0_skymap import SkyMapFilter  # noqa: E402
from ampel_dask.tiers.units.t2_neutrino import T2NeutrinoCoincidence  # noqa: E402
from ampel_dask.tiers.units.t2_skymap import T2GWCounterpart  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GROUPS = ["ztf/ampel_core_real_201712.tar.gz", "ztf/fink_ztf_public_20181129.tar.gz", "ztf/fink_basic_alerts_2023_2025.tar.gz",
          "ztf/pitt_google", "ztf/kowalski", "ztf/alerce", "ztf/fink_local_202001", "ztf/boom"]  # fmt: skip


def timed(fn, repeat: int = 2) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicate", type=int, default=100)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import mock_skymap

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ingest([str(args.data / g) for g in GROUPS], tmp / "arch", IngestOptions(workers=0, progress=False))
        arch = Archive(tmp / "arch")
        alerts = pa.concat_tables([arch.read(p) for p in arch.partitions()], promote_options="permissive")
        states = build_states(alerts, T1PolicyConfig(), ["ZTF_PUB", "ZTF_PRIV"])
        big_alerts = pa.concat_tables([alerts] * args.replicate).combine_chunks()
        big_states = pa.concat_tables([states] * args.replicate).combine_chunks()
        big_states = big_states.append_column("z", pa.array(np.random.default_rng(1).uniform(0.01, 0.1, big_states.num_rows)))
        rng = np.random.default_rng(2)
        mjd = alerts.column("mjd").to_numpy()
        with open(tmp / "nu.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["name", "time", "ra", "dec", "ra_err_plus", "ra_err_minus", "dec_err_plus", "dec_err_minus"])
            for i in range(100):
                w.writerow([f"IC{i}", rng.uniform(mjd.min(), mjd.max()), rng.uniform(0, 360), np.degrees(np.arcsin(rng.uniform(-1, 1))), 1.0, -1.0, 1.0, -1.0])
        a0 = alerts.slice(0, 1).to_pylist()[0]
        sky = mock_skymap.write_skymap(tmp / "map.fits", a0["ra"], a0["dec"], 10.0, float(np.nanmin(mjd)) - 1, "NUNIQ", nside=512, dist_mu=150.0, dist_sigma=40.0)
        units = [
            ("NuclearFilter (T0, AMPEL defaults)", NuclearFilter(), big_alerts, "alerts"),
            ("T2NeutrinoCoincidence, 100 neutrino alerts", T2NeutrinoCoincidence(alerts=str(tmp / "nu.csv")), big_states, "states"),
            ("SkyMapFilter (T0), multi-order map", SkyMapFilter(skymap=str(sky), window_days=(-1e5, 1e5)), big_alerts, "alerts"),
            ("T2GWCounterpart, multi-order map + distance check", T2GWCounterpart(skymap=str(sky), redshift="column"), big_states, "states"),
        ]
        for name, unit, batch, what in units:
            run = (lambda u=unit, b=batch: u.verdict(b)) if what == "alerts" else (lambda u=unit, b=batch: u.process(b))
            (unit.verdict if what == "alerts" else unit.process)(batch.slice(0, 10))  # imports, map parsing: not timed
            sec = timed(run)
            rows.append({"unit": name, "items": batch.num_rows, "what": what, "seconds": round(sec, 3), "per_second": round(batch.num_rows / sec)})
    if args.json:
        print(json.dumps(rows))
    else:
        print("| unit | items | seconds | per second, 1 core |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['unit']} | {r['items']:,} {r['what']} | {r['seconds']} | {r['per_second']:,} {r['what']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
