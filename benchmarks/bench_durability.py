"""What making files durable costs a run: fsync calls and seconds (every process's own files; io/files.py).

``python -m benchmarks.bench_durability WORK [--alerts N]``: an archive in WORK (the real ZTF alerts of
../shared/data, or N replicated ones: make_archive), then tests/test_graph.py's workflow on a fresh store
in one process (workers=0) with os.fsync and syncfs timed. Not part of ``python -m benchmarks``. Wall
and CPU of whole runs are best compared by running the same command on two checkouts in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--alerts", type=int, default=None, help="replicated alerts (default: the real ZTF alerts)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from ampel_dask.graph.ingest import IngestOptions, ingest
    from ampel_dask.graph.runner import RunOptions, run_workflow
    from ampel_dask.graph.workflow import Workflow
    from ampel_dask.io import files
    from tests.test_graph import WORKFLOW

    archive = args.work / "archive"
    if not (archive / "_index.parquet").exists():
        if args.alerts:
            from benchmarks.make_archive import build

            build(archive, args.alerts, work=args.work)
        else:
            ingest([str(REPO.parent / "shared" / "data" / "ztf")], archive, IngestOptions(workers=0, progress=False))
    spent = {"fsync": [0, 0.0], "syncfs": [0, 0.0]}

    def timed(kind: str, fn):
        def call(fd: int):
            t = time.perf_counter()
            try:
                return fn(fd)
            finally:
                spent[kind][0] += 1
                spent[kind][1] += time.perf_counter() - t

        return call

    os.fsync = timed("fsync", os.fsync)
    if files._SYNCFS is not None:
        files._SYNCFS = timed("syncfs", files._SYNCFS)
    store = args.work / "store-durability"
    shutil.rmtree(store, ignore_errors=True)
    t = time.perf_counter()
    summary = run_workflow(Workflow.model_validate({**WORKFLOW, "batch_rows": 2000}), RunOptions(archive=str(archive), store=str(store), workers=0, progress=False))
    wall = time.perf_counter() - t
    out = {"alerts": summary["alerts"], "tasks": summary["tasks"], "files": sum(1 for p in store.rglob("*") if p.is_file()), "wall_s": round(wall, 3),
           **{f"{k}_calls": v[0] for k, v in spent.items()}, **{f"{k}_s": round(v[1], 3) for k, v in spent.items()}}  # fmt: skip
    print(json.dumps(out))
    shutil.rmtree(store)


if __name__ == "__main__":
    main()
