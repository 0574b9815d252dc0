"""The same small job timed in this working tree and in an earlier commit, alternating, in fresh processes.

    .venv/bin/python benchmarks/bench_ab.py --ref HEAD~1 [--case ingest-tiny compact-tiny] [--rounds 3]

The host's speed drifts by a quarter from one minute to the next, so a before/after of a small change
is only worth its numbers when the two run side by side. ``--ref`` is checked out as a git worktree
under ``.bench/ab-<rev>`` and imported first in its processes (this script stays the one that times).

Cases (the tests' archive of tiny parts, ``benchmarks/bench_compact_merge.py``):

- ``ingest-tiny``: every real one-alert ZTF packet of three tarballs (1,993 alerts), shuffled with a
  fixed seed, ingested in one process in chunks of 10 packets without compaction (what a live stream of
  small micro-batches, or a folder of per-alert files from many nights, costs per chunk);
- ``compact-tiny``: that archive (~600 parts of 1-3 rows over 72 nights) compacted to parts of 60 rows.

Seconds per run, and each case's median per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".bench"
CASES = ("ingest-tiny", "compact-tiny")


def one(case: str, source: str) -> None:
    """In a fresh process whose ``sys.path`` starts with the tree under test (and its children's too, e.g.
    the DataFusion helper): time ``case``; prints JSON."""
    from benchmarks.bench_compact_merge import DATA, TARBALLS  # this tree's, before the tree under test

    tree = os.environ["AB_TREE"]
    sys.path.insert(0, tree)
    os.environ["PYTHONPATH"] = os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])
    import ampel_dask

    assert Path(ampel_dask.__file__).resolve().is_relative_to(Path(os.environ["AB_TREE"]).resolve()), ampel_dask.__file__
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        if case == "ingest-tiny":
            from ampel_dask.graph.ingest import IngestOptions, ingest_packets

            packets = tiny_packets(DATA, TARBALLS)
            t = time.perf_counter()
            ingest_packets(packets, Path(tmp) / "a", IngestOptions(workers=0, progress=False, chunk_packets=10, compact_rows=0))
        else:
            from ampel_dask.io.compact import CompactOptions, compact

            shutil.copytree(source, Path(tmp) / "a")
            t = time.perf_counter()
            compact(Path(tmp) / "a", CompactOptions(target_rows=60))
        print(json.dumps({"seconds": round(time.perf_counter() - t, 3)}))


def tiny_packets(data: Path, tarballs: list[str]) -> list:
    from ampel_dask.io.sources import Packet

    packets = []
    for rel in tarballs:
        with tarfile.open(data / rel) as tar:
            packets += [Packet(str(data / rel), m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name.endswith(".avro")]
    random.Random(3).shuffle(packets)
    return packets


def worktree(ref: str) -> Path:
    rev = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    path = WORK / f"ab-{rev}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO, capture_output=True, check=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", default="HEAD~1", help="the earlier commit (default HEAD~1)")
    ap.add_argument("--case", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(*args.one)
        return
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_compact_merge import tiny_archive

    WORK.mkdir(exist_ok=True)
    source = tiny_archive(WORK / "compact-merge-tiny")
    trees = {"this tree": REPO, args.ref: worktree(args.ref)}
    seconds: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for case in args.case:
            for name, tree in trees.items():
                env = {**os.environ, "AB_TREE": str(tree), "PYTHONPATH": str(REPO)}
                p = subprocess.run([sys.executable, __file__, "--one", case, str(source)], capture_output=True, text=True, env=env)
                if p.returncode:
                    sys.exit(f"{case} in {name} failed:\n{p.stderr[-3000:]}")
                s = json.loads(p.stdout.strip().splitlines()[-1])["seconds"]
                seconds.setdefault((case, name), []).append(s)
                print(f"round {r + 1}, {case}, {name}: {s:.2f} s", flush=True)
    for case in args.case:
        med = {name: statistics.median(seconds[(case, name)]) for name in trees}
        print(f"{case}: median {med['this tree']:.2f} s in this tree, {med[args.ref]:.2f} s at {args.ref}: "
              f"{med[args.ref] / med['this tree']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
