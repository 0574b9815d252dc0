"""Make large alert streams out of the real ZTF packets in ../shared/data, for stable benchmark timings.

Each replica of a real packet gets a new candid by rewriting the zigzag-varint bytes of the candid in
place with another value of the same encoded length, so the Avro files stay valid and nothing is
re-encoded: 100,000 alerts take seconds, and every byte except the ids is the real packet's.
"""

from __future__ import annotations

import io
import shutil
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import fastavro
import numpy as np

from ampel_dask.io.layout import night_of

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CANDID_STEP = 10**13  # replica k adds k * CANDID_STEP to the candid (same varint length for ZTF candids)


def zigzag_varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = z & 0x7F
        z >>= 7
        if z:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def real_ztf_packets(data_dir: Path = DATA) -> Iterator[bytes]:
    """Single-alert, uncompressed-codec ZTF packet files (tarball members and loose files)."""
    for tar_path in sorted((data_dir / "ztf").glob("*.tar.gz")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.isfile():
                    yield tar.extractfile(m).read()
    for p in sorted((data_dir / "ztf").rglob("*.avro")):
        if p.is_file():
            yield p.read_bytes()


def base_packets(data_dir: Path = DATA) -> list[tuple[bytes, int, float]]:
    """(bytes, candid, jd) of every real one-alert ZTF packet whose candid can be patched in place."""
    out = []
    for data in real_ztf_packets(data_dir):
        try:
            reader = fastavro.reader(io.BytesIO(data))
            if reader.codec != "null":
                continue
            recs = list(reader)
        except Exception:
            continue
        if len(recs) != 1 or "candidate" not in recs[0]:
            continue
        candid = recs[0]["candidate"]["candid"]
        if candid is None or candid <= 0 or zigzag_varint(candid) not in data:
            continue
        out.append((data, candid, recs[0]["candidate"]["jd"]))
    return out


def replicas(bases: list[tuple[bytes, int, float]], n: int) -> Iterator[tuple[int, float, bytes]]:
    """n packets: the real ones first, then replicas with candid + k * CANDID_STEP (unique, same length)."""
    if n > 0 and not bases:  # else the loop below never ends
        raise ValueError("no real ZTF packets to replicate")
    seen: set[int] = set()
    k = 0
    produced = 0
    while produced < n:
        for data, candid, jd in bases:
            new = candid + k * CANDID_STEP
            old_enc, new_enc = zigzag_varint(candid), zigzag_varint(new)
            if new in seen or len(old_enc) != len(new_enc):
                continue
            seen.add(new)
            yield new, jd, data.replace(old_enc, new_enc)
            produced += 1
            if produced >= n:
                return
        k += 1


def build_stream(target: Path, n: int, data_dir: Path = DATA) -> Path:
    """Write n single-alert files into target/<night>/ like ZTF's nightly archive (cached when complete)."""
    marker = target / "_stream.json"
    if marker.exists() and json.loads(marker.read_text()).get("alerts") == n:
        return target
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    bases = base_packets(data_dir)
    if not bases:
        raise ValueError(f"no real ZTF packets to replicate in {data_dir} (../shared/data beside the checkout)")
    total = 0
    for candid, jd, data in replicas(bases, n):
        sub = target / f"ztf_public_{int(night_of(np.array([jd - 2400000.5]), 'ztf')[0])}"
        sub.mkdir(exist_ok=True)
        (sub / f"{candid}.avro").write_bytes(data)
        total += len(data)
    marker.write_text(json.dumps({"alerts": n, "bases": len(bases), "bytes": total}))
    return target
