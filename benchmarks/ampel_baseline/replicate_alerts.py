#!/usr/bin/env python
"""Build a larger ZTF alert tarball by replicating real alerts under new ids, without re-encoding.

    python replicate_alerts.py --tar A.tar.gz [--tar B.tar.gz ...] --n 10000 --out big.tar.gz

Needs fastavro (run it with the AMPEL venv's python; run_ampel.py does). Replica 0 is the input
unchanged; replica k >= 1 is every input alert with

* ``candid`` (top level), ``candidate.candid`` and every non-null ``prv_candidates[].candid`` shifted
  by ``k * 10**16``. Avro writes a long as a zigzag varint; a ZTF candid (~3e17..2.5e18) and the shifted
  value both take 9 bytes, so the bytes are replaced in place and the file keeps its length and stays
  a valid Avro container (the data block's byte count is unchanged; a deflate block would be re-deflated).
* ``objectId`` changed at one letter (ZTF name ``ZTFyyabcdefg``: the first letter after the year, which
  is ``a`` for every real ZTF object so far, is rotated by k), a same-length string replacement, so
  every replica is a distinct AMPEL stock. The year is kept (AMPEL's ZTFIdMapper only encodes 2017-2032).

Alerts are emitted replica by replica (all inputs, then replica 1, ...) and cut at ``--n``.
Every patched record is decoded again and compared field by field with the original record with the
expected substitutions (cutout bytes, photometry, everything else must be identical). All new ids are
checked to be unique across the whole output (and not to collide with any input id).
Only packets with one alert per file and codec null/deflate are supported (true for the ZTF tarballs here).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tarfile
import time
import zlib

import fastavro

CANDID_STEP = 10**16
MAGIC = b"Obj\x01"


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


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = z = 0
    while True:
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return (z >> 1) ^ -(z & 1), pos


def split_container(raw: bytes):
    """-> (header bytes incl. sync, codec, sync, [(count, data_start, data_end)])"""
    if raw[:4] != MAGIC:
        raise ValueError("not an Avro object container")
    # header: magic, metadata map<bytes> (blocks of key/value pairs, 0-terminated), 16-byte sync
    pos, meta = 4, {}
    while True:
        count, pos = read_varint(raw, pos)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = read_varint(raw, pos)  # block byte size
        for _ in range(count):
            klen, pos = read_varint(raw, pos)
            key = raw[pos:pos + klen].decode()
            pos += klen
            vlen, pos = read_varint(raw, pos)
            meta[key] = raw[pos:pos + vlen]
            pos += vlen
    codec = meta.get("avro.codec", b"null").decode()
    sync = raw[pos:pos + 16]
    hdr_end = pos + 16
    blocks = []
    pos = hdr_end
    while pos < len(raw):
        count, pos = read_varint(raw, pos)
        size, pos = read_varint(raw, pos)
        blocks.append((count, pos, pos + size))
        pos += size
        if raw[pos:pos + 16] != sync:
            raise ValueError("sync marker mismatch")
        pos += 16
    return raw[:hdr_end], codec, sync, blocks


def patch_bytes(data: bytes, repl: list[tuple[bytes, bytes]], what: str) -> bytes:
    for old, new in repl:
        if len(old) != len(new):
            raise ValueError(f"{what}: replacement changes length {old!r} -> {new!r}")
        if data.count(old) < 1:
            raise ValueError(f"{what}: pattern {old!r} not found")
        data = data.replace(old, new)
    return data


def new_object_id(oid: str, k: int) -> str:
    if len(oid) != 12 or not oid.startswith("ZTF") or not oid[5].isalpha():
        raise ValueError(f"unexpected ZTF objectId {oid!r}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    return oid[:5] + letters[(letters.index(oid[5]) + k) % 26] + oid[6:]


def expected_record(rec: dict, k: int) -> dict:
    e = copy.copy(rec)
    e["objectId"] = new_object_id(rec["objectId"], k)
    e["candid"] = rec["candid"] + k * CANDID_STEP
    e["candidate"] = dict(rec["candidate"], candid=rec["candidate"]["candid"] + k * CANDID_STEP)
    if rec.get("prv_candidates"):
        e["prv_candidates"] = [
            dict(p, candid=p["candid"] + k * CANDID_STEP) if p.get("candid") is not None else p
            for p in rec["prv_candidates"]
        ]
    return e


def same(a, b) -> bool:
    # NaN-safe deep equality
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[x], b[x]) for x in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def replicate_packet(raw: bytes, rec: dict, k: int) -> bytes:
    header, codec, sync, blocks = split_container(raw)
    if len(blocks) != 1 or blocks[0][0] != 1:
        raise ValueError("only one alert per packet is supported")
    _, s, e = blocks[0]
    data = raw[s:e]
    if codec == "deflate":
        data = zlib.decompress(data, -15)
    elif codec != "null":
        raise ValueError(f"codec {codec} not supported")
    repl = []
    oid = rec["objectId"]
    nid = new_object_id(oid, k)
    repl.append((zigzag_varint(len(oid.encode())) + oid.encode(), zigzag_varint(len(nid.encode())) + nid.encode()))
    ids = {rec["candid"], rec["candidate"]["candid"]}
    ids |= {p["candid"] for p in rec.get("prv_candidates") or () if p.get("candid") is not None}
    for c in sorted(ids):
        repl.append((zigzag_varint(c), zigzag_varint(c + k * CANDID_STEP)))
    data = patch_bytes(data, repl, f"candid {rec['candid']}")
    if codec == "deflate":
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        data = c.compress(data) + c.flush()
    return header + zigzag_varint(1) + zigzag_varint(len(data)) + data + sync


def iter_inputs(paths):
    for p in paths:
        with tarfile.open(p, "r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                raw = tar.extractfile(m).read()
                recs = list(fastavro.reader(io.BytesIO(raw)))
                if len(recs) != 1:
                    raise ValueError(f"{p}:{m.name}: {len(recs)} records (need 1)")
                yield p, m.name, raw, recs[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tar", action="append", required=True)
    ap.add_argument("--n", type=int, required=True, help="number of alerts in the output")
    ap.add_argument("--out", required=True, help="output .tar.gz (or .tar)")
    ap.add_argument("--compresslevel", type=int, default=6)
    ap.add_argument("--no-verify", action="store_true", help="skip decode-and-compare of each patched packet")
    a = ap.parse_args(argv)

    t_start = time.time()
    inputs = list(iter_inputs(a.tar))
    n_in = len(inputs)
    if n_in == 0:
        sys.exit("no alerts in input")
    n_rep = -(-a.n // n_in)
    if n_rep > 26:
        sys.exit(f"at most 26 replicas (objectId letter rotation); {a.n} alerts need {n_rep}")

    # id uniqueness: (replica, original id) -> new id must be injective, and never hit an input id
    seen_candid: dict[int, tuple[int, int]] = {}
    seen_oid: dict[str, tuple[int, str]] = {}
    for k in range(n_rep):
        for _, _, _, rec in inputs:
            ids = {rec["candid"], rec["candidate"]["candid"]}
            ids |= {p["candid"] for p in rec.get("prv_candidates") or () if p.get("candid") is not None}
            for c in ids:
                nc = c + k * CANDID_STEP
                if seen_candid.setdefault(nc, (k, c)) != (k, c):
                    sys.exit(f"candid collision: {nc} from {(k, c)} and {seen_candid[nc]}")
                if len(zigzag_varint(nc)) != len(zigzag_varint(c)):
                    sys.exit(f"candid {c} + {k}*step changes varint length")
            no = new_object_id(rec["objectId"], k)
            if seen_oid.setdefault(no, (k, rec["objectId"])) != (k, rec["objectId"]):
                sys.exit(f"objectId collision: {no}")

    mode = "w:gz" if a.out.endswith((".gz", ".tgz")) else "w"
    kw = {"compresslevel": a.compresslevel} if mode == "w:gz" else {}
    tmp = a.out + ".part"
    written = verified = 0
    with tarfile.open(tmp, mode, **kw) as out:
        for k in range(n_rep):
            for _, name, raw, rec in inputs:
                if written >= a.n:
                    break
                if k == 0:
                    data, member = raw, name
                else:
                    data = replicate_packet(raw, rec, k)
                    member = f"{rec['candid'] + k * CANDID_STEP}.avro"
                    if len(data) != len(raw) and not a.no_verify and split_container(raw)[1] == "null":
                        raise AssertionError("null-codec packet changed length")
                    if not a.no_verify:
                        got = list(fastavro.reader(io.BytesIO(data)))
                        if len(got) != 1 or not same(got[0], expected_record(rec, k)):
                            raise AssertionError(f"replica {k} of {name} does not decode as expected")
                        verified += 1
                ti = tarfile.TarInfo(member)
                ti.size = len(data)
                ti.mtime = 0
                out.addfile(ti, io.BytesIO(data))
                written += 1
    import os
    os.replace(tmp, a.out)
    print(json.dumps({"out": a.out, "alerts": written, "input_alerts": n_in, "replicas": n_rep,
                      "verified_packets": verified, "seconds": round(time.time() - t_start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
