"""Per-core speed of the SN Ia units on real alerts (no Dask, one process).

    .venv/bin/python benchmarks/bench_sn_units.py [--states 120] [--json]

States: the labelled ELAsTiCC SNe Ia (shared data labels/elasticc_truth_sample, Fink's Parquet dump;
detections + forced photometry, ~20 points in 6 bands each), built as tests/test_units_sn.py builds
them. T2SNCosmoFit (SALT2 at a fixed z, SALT2 with z fitted, the Hsiao template) on the first
``--states`` states; T2RedshiftDigest over two catalog matches and CatalogVetoFilter (GCVS + SPICY, built
from the shared catalogs) on all 603 alerts replicated to 60,300. Each figure is the best of 2 runs
(the fits: one run, they take seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from ampel_dask.io import lsst  # noqa: E402
from ampel_dask.io.avro import WriterSchema  # noqa: E402
from ampel_dask.tiers.catalog import build_catalog  # noqa: E402
from ampel_dask.tiers.states import T1PolicyConfig, build_states  # noqa: E402
from ampel_dask.tiers.units.t0_catalog_veto import CatalogVetoFilter  # noqa: E402
from ampel_dask.tiers.units.t2_redshift import T2RedshiftDigest  # noqa: E402
from ampel_dask.tiers.units.t2_snfit import T2SNCosmoFit  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def states_and_alerts(data: Path) -> tuple[pa.Table, pa.Table]:
    truth = pq.read_table(data / "labels" / "elasticc_truth_sample" / "test_elasticc_earlysnia.parquet")
    keep = ["alertId", "diaSource", "prvDiaSources", "prvDiaForcedSources", "prvDiaNondetectionLimits", "diaObject"]
    rows = pa.StructArray.from_arrays([truth.column(c).combine_chunks() for c in keep], names=keep)
    alerts = lsst.normalize(rows, WriterSchema("e", {}, {"name": "elasticc.v0_9.alert"}), ["bench"] * len(rows)).alerts
    states = build_states(alerts, T1PolicyConfig(kinds=["detection", "forced"]), ["LSST"])
    return states.append_column("z", truth.column("ZHELIO")), alerts


def timed(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", type=int, default=120, help="states fitted per fit variant (default 120)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    states, alerts = states_and_alerts(args.data)
    fit_states = states.slice(0, args.states)
    big_alerts = pa.concat_tables([alerts] * 100)
    big_states = pa.concat_tables([states] * 100)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        import build_catalogs

        cats = build_catalogs.build(args.data / "catalogs", Path(tmp))
        hosts = build_catalog(pa.table({"ra": states.column("ra"), "dec": states.column("dec"), "z": states.column("z")}), Path(tmp) / "hosts.parquet")
        units = [
            ("T2SNCosmoFit SALT2, z fixed", T2SNCosmoFit(redshift="column"), fit_states, 1, "states"),
            ("T2SNCosmoFit SALT2, z fitted (0.05-0.8)", T2SNCosmoFit(redshift="fit", z_bounds=(0.05, 0.8)), fit_states, 1, "states"),
            ("T2SNCosmoFit Hsiao, z fixed", T2SNCosmoFit(model="hsiao", redshift="column"), fit_states, 1, "states"),
            ("T2RedshiftDigest, 2 catalog matches", T2RedshiftDigest(sources=[
                {"name": "HOSTS", "catalog": str(hosts), "group": 1, "radius_arcsec": 2.0},
                {"name": "PHOTOZ", "catalog": str(hosts), "group": 3, "radius_arcsec": 10.0}]), big_states, 2, "states"),
            ("CatalogVetoFilter, GCVS + SPICY (T0)", CatalogVetoFilter(catalogs=[
                {"name": "GCVS", "path": str(cats["gcvs"])}, {"name": "SPICY", "path": str(cats["spicy"])}]), big_alerts, 2, "alerts"),
        ]  # fmt: skip
        for name, unit, batch, repeat, what in units:
            if isinstance(unit, CatalogVetoFilter):
                unit.verdict(batch.slice(0, 10))
                sec = timed(lambda: unit.verdict(batch), repeat)
            else:
                unit.process(batch.slice(0, 2))  # model files parsed, catalogs opened: not timed
                sec = timed(lambda: unit.process(batch), repeat)
            rows.append({"unit": name, "items": batch.num_rows, "what": what, "seconds": round(sec, 3), "per_second": round(batch.num_rows / sec, 2)})
    if args.json:
        print(json.dumps(rows))
    else:
        print("| unit | items | seconds | per second, 1 core |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['unit']} | {r['items']:,} {r['what']} | {r['seconds']} | {r['per_second']:,} {r['what']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
