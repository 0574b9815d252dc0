"""Per-core speed of the infant-supernova units and the back-test on real ZTF alerts (no Dask, one process).

    .venv/bin/python benchmarks/bench_infant_units.py [--copies 100] [--json]

Alerts: the three real ZTF tarballs of ../shared/data/ztf (1,993 alerts, histories included), ingested
into a temporary archive and replicated ``--copies`` times in memory for InfantSNFilter (which reads the
nested histories). T3 units: each object's latest alert as a state with T2LightCurveSummary columns
(~1,900 objects, replicated 5 times; SkyPortal: the first 500), T3TNSReport writing its report file, and
both HTTP units against the local servers of tests/push_servers.py on loopback (TNS: 50 reports per
request; SkyPortal: 3-4 requests per object; the servers run in this process, on its core), so the
figures are this code's cost plus loopback HTTP, not a real service's latency. The back-test: an
InfantSNFilter channel over the archive, from disk. Best of 3 (HTTP: one run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampel_dask.graph.ingest import IngestOptions, ingest  # noqa: E402
from ampel_dask.io.archive import Archive  # noqa: E402
from ampel_dask.tiers.base import T3Context  # noqa: E402
from ampel_dask.tiers.states import T1PolicyConfig, build_states  # noqa: E402
from ampel_dask.tiers.units.t0_infant import InfantSNFilter  # noqa: E402
from ampel_dask.tiers.units.t2_summary import T2LightCurveSummary  # noqa: E402
from ampel_dask.tiers.units.t3_skyportal import T3SkyPortal  # noqa: E402
from ampel_dask.tiers.units.t3_tns import T3TNSReport  # noqa: E402
from tests.push_servers import FakeSkyPortal, FakeTNS  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TNS = {"reporting_group_id": 48, "discovery_data_source_id": 48, "reporter": "bench"}


def timed(fn, repeat: int = 3) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def selection(alerts: pa.Table, copies: int) -> pa.Table:
    stock = alerts.column("stock").to_numpy()
    order = np.lexsort((alerts.column("alert_id").to_numpy(), alerts.column("mjd").to_numpy(), stock))
    latest = alerts.take(pa.array(order[np.r_[stock[order][1:] != stock[order][:-1], True]]))
    states = build_states(latest, T1PolicyConfig(), access=["ZTF_ALL"])
    summary = pa.table(T2LightCurveSummary().process(states))
    for name in summary.column_names:
        states = states.append_column(f"T2LightCurveSummary__{name}", summary.column(name))
    parts = []
    for k in range(copies):  # distinct objects (names and stocks) per copy
        ids = [f"{o}_{k}" for o in states.column("object_id").to_pylist()]
        parts.append(states.set_column(states.column_names.index("object_id"), "object_id", pa.array(ids))
                     .set_column(states.column_names.index("stock"), "stock", pa.array(states.column("stock").to_numpy() * 10 + k)))  # fmt: skip
    return pa.concat_tables(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=100, help="replications of the 1,993 alerts for the filter (default 100)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ingest([str(p) for p in sorted((args.data / "ztf").glob("*.tar.gz"))], tmp / "archive", IngestOptions(workers=0, progress=False))
        arch = Archive(tmp / "archive")
        cols = ["alert_id", "stock", "object_id", *InfantSNFilter.columns]
        alerts = pa.concat_tables([arch.read(p, columns=cols) for p in arch.partitions()], promote_options="permissive")
        big = pa.concat_tables([alerts] * args.copies)
        unit = InfantSNFilter()
        unit.verdict(alerts.slice(0, 10))
        sec = timed(lambda: unit.verdict(big))
        rows.append(("InfantSNFilter (T0, reads the histories)", big.num_rows, "alerts", sec))
        from ampel_dask.tiers.rights import channel_view

        sec = timed(lambda: unit.verdict(channel_view(big, ["ZTF_PUB"])[0]))
        rows.append(("InfantSNFilter on a ZTF_PUB channel's view (view made in the timing)", big.num_rows, "alerts", sec))

        sel = selection(alerts, 5)
        out = tmp / "t3"
        sec = timed(lambda: T3TNSReport(TNS).react(sel, T3Context(out_dir=out, run_id="b", channel="C")))
        rows.append(("T3TNSReport, report file", sel.num_rows, "objects", sec))

        tns = FakeTNS("k" * 32, 1, "bench_bot")
        os.environ.update(AMPEL_DASK_SECRET_BENCH_KEY="k" * 32, AMPEL_DASK_SECRET_BENCH_BOT="1")
        try:
            unit = T3TNSReport({**TNS, "url": tns.url, "bot_id_env": "AMPEL_DASK_SECRET_BENCH_BOT", "bot_name": "bench_bot",
                                "api_key_env": "AMPEL_DASK_SECRET_BENCH_KEY"})  # fmt: skip
            sec = timed(lambda: unit.react(sel, T3Context(out_dir=out, run_id="b", channel="C")), 1)
            rows.append(("T3TNSReport, file + submission (local server)", sel.num_rows, "objects", sec))
        finally:
            tns.close()

        sp = FakeSkyPortal("t" * 32, {1}, {1})
        os.environ["AMPEL_DASK_SECRET_BENCH_TOKEN"] = "t" * 32
        small = sel.slice(0, 500)
        try:
            unit = T3SkyPortal(url=sp.url, token_env="AMPEL_DASK_SECRET_BENCH_TOKEN", filter_ids=[1], instrument_ids={"ztf": 1}, group_ids=[1])
            sec = timed(lambda: unit.react(small, T3Context(out_dir=out, run_id="b", channel="C")), 1)
            rows.append(("T3SkyPortal, first publication (local server)", small.num_rows, "objects", sec))
            sec = timed(lambda: unit.react(small, T3Context(out_dir=out, run_id="b", channel="C")), 1)
            rows.append(("T3SkyPortal, re-run: nothing new (local server)", small.num_rows, "objects", sec))
        finally:
            sp.close()

        from ampel_dask.graph.backtest import backtest
        from ampel_dask.graph.workflow import Workflow

        wf = Workflow.model_validate({"name": "bt", "archive": {"surveys": ["ztf"]},
                                      "channels": [{"name": "INFANT", "access": ["ZTF_PUB"], "filters": ["InfantSNFilter"]}]})  # fmt: skip
        sec = timed(lambda: backtest(wf, tmp / "archive"))
        rows.append(("backtest, one InfantSNFilter channel (from disk)", alerts.num_rows, "alerts", sec))
    out_rows = [{"unit": u, "items": n, "what": w, "seconds": round(s, 3), "per_second": round(n / s, 1)} for u, n, w, s in rows]
    if args.json:
        print(json.dumps(out_rows))
    else:
        print("| unit | items | seconds | per second, 1 core |\n|---|---:|---:|---:|")
        for r in out_rows:
            print(f"| {r['unit']} | {r['items']:,} {r['what']} | {r['seconds']} | {r['per_second']:,} {r['what']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
