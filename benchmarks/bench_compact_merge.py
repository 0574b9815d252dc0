"""Compaction's merge of a night larger than its target: pieces held in memory against every piece spilled.

    .venv/bin/python benchmarks/bench_compact_merge.py [--rounds 2]

Two archives, each compacted in a fresh process, alternating ``HOLD_BYTES`` = 0 (every piece of every
source part spilled to its own file and each part read twice: the merge before the byte budget) and the
default budget (``io/compact.HOLD_BYTES``):

- **tiny parts**: every real one-alert ZTF packet of three tarballs (1,993 alerts), shuffled with a fixed
  seed and ingested in chunks of 10 packets without compaction (~600 parts of 1-3 rows over 72 nights,
  as a stream cycling through nights leaves them), compacted to parts of 60 rows, so that most nights
  are larger than the target (the tests' archive, ``tests/test_compaction.py``);
- **500-row parts**: 200,000 replicated real ZTF alerts (``make_archive.build``, parts of 500 rows),
  compacted to the default 25,000 rows.

Seconds of ``compact`` and the process's peak RSS, per round.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / ".bench"
DATA = REPO.parent / "shared" / "data"
TARBALLS = ["ztf/fink_ztf_public_20181129.tar.gz", "ztf/fink_basic_alerts_2023_2025.tar.gz", "ztf/ampel_core_real_201712.tar.gz"]


def tiny_archive(root: Path) -> Path:
    from ampel_dask.graph.ingest import IngestOptions, ingest_packets
    from ampel_dask.io.sources import Packet

    if (root / "_index.parquet").exists():
        return root
    packets = []
    for rel in TARBALLS:
        with tarfile.open(DATA / rel) as tar:
            packets += [Packet(str(DATA / rel), m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name.endswith(".avro")]
    random.Random(3).shuffle(packets)
    ingest_packets(packets, root, IngestOptions(workers=0, progress=False, chunk_packets=10, compact_rows=0))
    return root


def one(source: str, target_rows: int, hold: int | None) -> None:
    """In a fresh process: compact a copy of ``source``; prints JSON."""
    import ampel_dask.io.compact as cm
    from ampel_dask.io.archive import Archive

    if hold is not None:
        cm.HOLD_BYTES = hold
    root = WORK / "compact-merge-copy"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source, root)
    before = len(Archive(root).partitions())
    t = time.perf_counter()
    cm.compact(root, cm.CompactOptions(target_rows=target_rows))
    dt = time.perf_counter() - t
    print(json.dumps({"hold_bytes": cm.HOLD_BYTES, "seconds": round(dt, 2), "parts": [before, len(Archive(root).partitions())],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), None if args.one[2] == "default" else int(args.one[2]))
        return
    from benchmarks.make_archive import build

    archives = {"tiny parts": (tiny_archive(WORK / "compact-merge-tiny"), 60),
                "500-row parts": (build(WORK / "compact-merge-500", 200_000, part_rows=500, nights=1, survey="ztf"), 25_000)}  # fmt: skip
    for r in range(args.rounds):
        for name, (src, target) in archives.items():
            for hold in ("0", "default"):
                p = subprocess.run([sys.executable, __file__, "--one", str(src), str(target), hold], capture_output=True, text=True, check=True)
                print(f"round {r + 1}, {name}, HOLD_BYTES {hold}: {p.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
