"""Per-core speed of the built-in units on batches loaded from Parquet (no Dask, one process).

    .venv/bin/python benchmarks/bench_units.py [--alerts 1000000] [--json]

T0: DecentFilter (AMPEL's HU cuts), an expression filter and the LSST quality filter, timed on the
columns they declare (as the graph reads them), on the archive's night-sized parts (>= 10k alerts; a
tiny batch costs ~1 ms of fixed per-call overhead whatever its size). T2: T2LightCurveFeatures and T2BazinFit on the states
of replicated real ZTF alerts (all alerts' states, not only the filtered ones, for a stable count).
Each figure is the best of 3 runs over the same in-memory batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.io.archive import Archive  # noqa: E402
from ampel_dask.tiers.states import T1PolicyConfig, build_states  # noqa: E402
from ampel_dask.tiers.units.t0_filters import DecentFilter, ExpressionFilter, LSSTQualityFilter  # noqa: E402
from ampel_dask.tiers.units.t2_fit import T2BazinFit  # noqa: E402
from ampel_dask.tiers.units.t2_lightcurve import T2LightCurveFeatures  # noqa: E402
from benchmarks.make_archive import build  # noqa: E402

DECENT = dict(min_ndet=2, min_tspan=-666, max_tspan=5, min_rb=0.3, max_fwhm=5.5, max_elong=1.4, max_magdiff=1, max_nbad=0,
              min_sso_dist=20, min_gal_lat=14, ps1_sgveto_rad=1, ps1_sgveto_th=0.8, ps1_confusion_rad=3, ps1_confusion_sg_tol=0.1)  # fmt: skip


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def load(archive: Path, columns: list[str] | None, min_rows: int = 0) -> list[pa.Table]:
    arch = Archive(archive)
    out = []
    for p in arch.partitions():
        if p.rows < min_rows:
            continue
        names = set(pq.read_schema(arch.root / p.path).names) | {"dps"}  # dps: the part's history file
        out.append(arch.read(p, [c for c in columns if c in names] if columns else None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alerts", type=int, default=1_000_000)
    ap.add_argument("--states", type=int, default=100_000, help="states for the T2 figures")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    archive = build(REPO / ".bench" / f"pipeline-archive-{args.alerts}", args.alerts)
    rows = []
    for name, unit in (("DecentFilter", DecentFilter(DECENT)),
                       ("ExpressionFilter", ExpressionFilter({"expr": "rb > 0.5 and ndethist >= 2 and ndet >= 2 and magdiff < 0.5"})),
                       ("LSSTQualityFilter (on ZTF columns)", LSSTQualityFilter({}))):  # fmt: skip
        # night-sized batches (the archive's parts of >= 10k alerts), as the graph's T0 tasks see them
        batches = load(archive, sorted(set(unit.columns) | {"alert_id", "stock", "survey", "programid"}), min_rows=10_000)
        n = sum(b.num_rows for b in batches)
        dt = best(lambda: [unit.verdict(b) for b in batches])
        rows.append({"unit": name, "tier": "T0", "items": n, "seconds": round(dt, 3), "per_s": round(n / dt)})
    # T2 on states of the first partitions, up to --states
    batches, n = [], 0
    for b in load(archive, None):
        batches.append(build_states(b, T1PolicyConfig(), ["ZTF_ALL"]))
        n += b.num_rows
        if n >= args.states:
            break
    states = pa.concat_tables(batches)
    for name, unit in (("T2LightCurveFeatures", T2LightCurveFeatures()), ("T2BazinFit", T2BazinFit())):
        dt = best(lambda: unit.process(states), repeat=3 if name != "T2BazinFit" else 1)
        rows.append({"unit": name, "tier": "T2", "items": states.num_rows, "seconds": round(dt, 3), "per_s": round(states.num_rows / dt)})
    print(f"{'unit':<36}{'tier':<6}{'items':>10}{'seconds':>10}{'per s (1 core)':>16}")
    for r in rows:
        print(f"{r['unit']:<36}{r['tier']:<6}{r['items']:>10,}{r['seconds']:>10.3f}{r['per_s']:>16,}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
