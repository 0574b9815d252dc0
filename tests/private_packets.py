"""Real ZTF packets with partnership (programid 2) data added: for the data-rights metamorphic tests.

Every packet is rewritten with fastavro under its own writer schema, its records otherwise untouched:

- each object gets private datapoints, consistent across its packets (a packet carries those before its
  own time, as ZTF's 30-day history would): a detection 0.3 d before each of its alerts, an upper limit
  1.1 d before each, and for every other object two old detections 9 and 7.5 d before its first alert
  (a longer detection history: a time-span cut decides otherwise on it);
- each object with several alerts gets one partnership *alert* 0.2 d before its first one: a copy of
  that first packet with programid 2, a new candid, a brighter magnitude, and its public history carried
  with different values (magpsf + 0.05: a different copy of the same datapoints) besides the private
  points.

Nothing public is removed or changed, so a channel that may see only programid 1 must see exactly what
it sees in the original packets.
"""

from __future__ import annotations

import copy
import io
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import fastavro

PRIVATE_CANDID = 9_000_000_000_000_000_000  # above any real ZTF candid (~1e18-2e18)
NEAR, LIMIT, OLD = 0.3, 1.1, (26.0, 21.5)
PRIVATE_ALERT_LEAD = 0.2


def packets(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every .avro file in a tarball or a folder, in name order."""
    if path.is_file():
        with tarfile.open(path) as tar:
            for m in sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".avro")), key=lambda m: m.name):
                yield m.name, tar.extractfile(m).read()
    else:
        for f in sorted(path.rglob("*.avro")):
            yield str(f.relative_to(path)), f.read_bytes()


def _read(data: bytes) -> tuple[dict, str, list[dict]]:
    reader = fastavro.reader(io.BytesIO(data))
    return reader.writer_schema, reader.codec, list(reader)


def _write(schema: dict, codec: str, records: list[dict]) -> bytes:
    out = io.BytesIO()
    fastavro.writer(out, fastavro.parse_schema(copy.deepcopy(schema)), records, codec=codec)
    return out.getvalue()


def _prv_fields(schema: dict) -> dict[str, bool]:
    """Field name -> nullable, of the prv_candidate record in a ZTF writer schema."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "record" and str(node.get("name", "")).endswith("prv_candidate"):
                found.update({f["name"]: isinstance(f["type"], list) and "null" in f["type"] for f in node["fields"]})
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    if not found:
        raise ValueError("no prv_candidate record in the writer schema")
    return found


def _candid(object_id: str, jd: float, kind: str) -> int:
    return PRIVATE_CANDID + zlib.crc32(f"{object_id}:{kind}:{jd:.6f}".encode())


def _private_points(object_id: str, jds: list[float]) -> list[tuple[float, str]]:
    """(jd, kind) of an object's private datapoints: kind 'det', 'limit' or 'alert' (the detection
    that triggered its partnership alert, carried by its later packets)."""
    points = {(j - NEAR, "det") for j in jds} | {(j - LIMIT, "limit") for j in jds}
    if zlib.crc32(object_id.encode()) % 2 == 0:
        points |= {(min(jds) - d, "det") for d in OLD}
    if len(jds) > 1:
        points.add((min(jds) - PRIVATE_ALERT_LEAD, "alert"))
    return sorted(points)


def _entry(cand: dict, fields: dict[str, bool], jd: float, kind: str, object_id: str) -> dict:
    """A prv_candidates entry made from the packet's candidate, as programid 2."""
    e = {k: cand.get(k) for k in fields}
    e.update(jd=jd, programid=2, pid=int(cand["pid"]) + 7)
    if "programpi" in fields:
        e["programpi"] = "Kulkarni"
    if kind != "limit":
        e.update(candid=_candid(object_id, jd, kind), magpsf=float(cand["magpsf"]) + 0.4, sigmapsf=0.08, isdiffpos="t", rb=0.9)
        if "drb" in fields:
            e["drb"] = 0.95
    else:
        for k, nullable in fields.items():
            if nullable and k not in ("jd", "fid", "pid", "diffmaglim", "programid", "programpi", "field", "rcid", "nid", "pdiffimfilename"):
                e[k] = None
        e["diffmaglim"] = 20.25
    return e


def add_private_data(sources: list[Path], out: Path) -> dict[str, int]:
    """Write every packet of ``sources`` to ``out`` with private data added (see the module doc)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [(src, name, data) for src in sources for name, data in packets(src)]
    alerts: dict[str, list[tuple[float, int]]] = defaultdict(list)  # object -> (jd, file index)
    for i, (_, _, data) in enumerate(files):
        for rec in _read(data)[2]:
            alerts[rec["objectId"]].append((float(rec["candidate"]["jd"]), i))
    stats = {"packets": 0, "private_dets": 0, "private_limits": 0, "private_alerts": 0, "private_alert_dets": 0, "private_alert_limits": 0}
    written: dict[str, bytes] = {}
    for i, (src, name, data) in enumerate(files):
        schema, codec, records = _read(data)
        fields = _prv_fields(schema)
        new = []
        for rec in records:
            oid, cand = rec["objectId"], rec["candidate"]
            jd = float(cand["jd"])
            extra = [_entry(cand, fields, t, kind, oid) for t, kind in _private_points(oid, [j for j, _ in alerts[oid]]) if jd - 30 < t < jd]
            stats["private_dets"] += sum(1 for e in extra if e["candid"] is not None)
            stats["private_limits"] += sum(1 for e in extra if e["candid"] is None)
            rec = dict(rec, prv_candidates=sorted([*(rec.get("prv_candidates") or []), *extra], key=lambda e: e["jd"]))
            new.append(rec)
            first_jd, first_file = min(alerts[oid])
            if len(alerts[oid]) > 1 and first_file == i and jd == first_jd:
                alert = private_alert(rec, fields, oid)
                written[f"private/{oid}.avro"] = _write(schema, codec, [alert])
                stats["private_alerts"] += 1
                mine = [e for e in alert["prv_candidates"] if e["programid"] == 2]  # the private points it carries
                stats["private_alert_dets"] += sum(1 for e in mine if e["candid"] is not None)
                stats["private_alert_limits"] += sum(1 for e in mine if e["candid"] is None)
        written[f"{src.name}/{name}".replace("/", "__")] = _write(schema, codec, new)
        stats["packets"] += 1
    for rel, data in written.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return stats


def private_alert(rec: dict, fields: dict[str, bool], object_id: str) -> dict:
    """A partnership alert of the object 0.2 d before ``rec`` (a packet with private data added)."""
    cand = dict(rec["candidate"])
    jd = float(cand["jd"]) - PRIVATE_ALERT_LEAD
    cand.update(jd=jd, candid=_candid(object_id, jd, "alert"), programid=2, magpsf=float(cand["magpsf"]) - 0.3)
    if "programpi" in cand:
        cand["programpi"] = "Kulkarni"
    history = []
    for e in rec.get("prv_candidates") or []:
        if e["jd"] >= jd:
            continue
        e = dict(e)
        if e.get("candid") is not None and e.get("programid") == 1 and e.get("magpsf") is not None:
            e["magpsf"] = float(e["magpsf"]) + 0.05  # another copy of a public detection
        history.append(e)
    return dict(rec, candidate=cand, candid=cand["candid"], prv_candidates=history)
