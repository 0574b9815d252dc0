"""Decode one chunk of packets into staged archive parts; what fails goes to quarantine.

This runs on Dask workers. Records are grouped by writer schema so that each group is normalised with
one columnar pass; if a group fails as a whole, its records are retried one by one so that a single
bad record is quarantined without taking its neighbours with it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from . import lsst, ztf
from .archive import Staged, atomic_write, stage
from .avro import Damage, Record, SchemaCache, WriterSchema, iter_packet, single_record_container
from .normalize import Normalized
from .sources import Chunk, Packet

NORMALIZERS = {"ztf": ztf.normalize, "lsst": lsst.normalize}
_CACHE: SchemaCache | None = None  # one per worker process: parsed schemas survive across chunks


def schema_cache(schema_dirs: list[str] | None = None) -> SchemaCache:
    global _CACHE
    if _CACHE is None or (schema_dirs and [str(d) for d in _CACHE.dirs[: len(schema_dirs)]] != schema_dirs):
        _CACHE = SchemaCache([Path(d) for d in schema_dirs or []])
    return _CACHE


def survey_of(ws: WriterSchema) -> str | None:
    """Which normaliser understands records of this writer schema (by their top-level fields)."""
    top = set(ws.top_fields)
    if "candidate" in top and top & {"objectId", "alertId", "candid"}:
        return "ztf"
    if "diaSource" in top:
        return "lsst"
    return None


@dataclass
class QuarantineEntry:
    source: str
    member: str | None
    offset: int | None
    record: int | None
    reason: str
    raw: bytes = b""

    def key(self) -> str:
        h = xxhash.xxh3_64()
        for part in (self.source, self.member or "", str(self.offset), str(self.record), self.reason):
            h.update(part.encode() + b"\0")
        h.update(self.raw)
        return h.hexdigest()

    def write(self, qdir: Path) -> str:
        """Content-addressed: quarantining the same bad input twice writes the same two files."""
        key = self.key()
        meta = {
            "source": self.source,
            "member": self.member,
            "offset": self.offset,
            "record": self.record,
            "reason": self.reason,
            "raw_bytes": len(self.raw),
            "raw_file": f"{key}.bin" if self.raw else None,
        }
        if self.raw and not (qdir / f"{key}.bin").exists():
            atomic_write(qdir / f"{key}.bin", self.raw)
        if not (qdir / f"{key}.json").exists():
            atomic_write(qdir / f"{key}.json", (json.dumps(meta, indent=1) + "\n").encode())
        return key


@dataclass
class ChunkResult:
    index: int
    read: int = 0
    quarantined: int = 0
    nbytes: int = 0
    staged: list[Staged] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Item:
    record: Record
    packet: Packet


def decode_chunk(chunk: Chunk, tmp_dir: str, quarantine_dir: str, schema_dirs: list[str] | None = None) -> ChunkResult:
    cache = schema_cache(schema_dirs)
    result = ChunkResult(chunk.index, nbytes=chunk.nbytes)
    qdir = Path(quarantine_dir)
    groups: dict[tuple[str, str], list[_Item]] = defaultdict(list)

    def quarantine(entry: QuarantineEntry) -> None:
        entry.write(qdir)
        result.quarantined += 1
        reason = entry.reason.split(":")[0]
        result.reasons[reason] = result.reasons.get(reason, 0) + 1

    for source, member, reason, raw in chunk.problems:
        result.read += 1
        quarantine(QuarantineEntry(source, member, None, None, reason, raw))

    for packet in chunk.packets:
        try:
            data = packet.read()
        except OSError as exc:
            result.read += 1
            quarantine(QuarantineEntry(packet.source, packet.member, None, None, f"unreadable file: {exc}"))
            continue
        for item in iter_packet(data, cache):
            result.read += 1
            if isinstance(item, Damage):
                quarantine(QuarantineEntry(packet.source, packet.member, item.offset, item.index, item.reason, item.raw))
                continue
            survey = survey_of(item.schema)
            if survey is None:
                reason = f"unknown alert schema {item.schema.name!r} (top-level fields: {', '.join(item.schema.top_fields[:12])})"
                quarantine(QuarantineEntry(packet.source, packet.member, item.offset, item.index, reason, _raw(item)))
                continue
            groups[(survey, item.schema.key)].append(_Item(item, packet))

    by_survey: dict[str, list[Normalized]] = defaultdict(list)
    for (survey, _), items in groups.items():
        for norm, bad in _normalize_group(survey, items):
            by_survey[survey].append(norm)
            for it, reason in bad:
                p, r = it.packet, it.record
                quarantine(QuarantineEntry(p.source, p.member, r.offset, r.index, f"cannot normalise: {reason}", _raw(r)))

    for survey, norms in by_survey.items():
        alerts = [n.alerts for n in norms if n.alerts is not None and n.alerts.num_rows]
        if not alerts:
            continue
        table = pa.concat_tables(alerts)
        cutouts = pa.concat_tables([n.cutouts for n in norms if n.cutouts is not None])
        cutouts = cutouts.filter(_has_stamp(cutouts))
        nights = table.column("night")
        for night in pc.unique(nights).to_pylist():
            mask = pc.equal(nights, night)
            part = table.filter(mask)
            ids = part.column("alert_id")
            cut = cutouts.filter(pc.is_in(cutouts.column("alert_id"), value_set=ids))
            result.staged.append(stage(part, cut if cut.num_rows else None, Path(tmp_dir)))
    return result


def _normalize_group(survey: str, items: list[_Item]) -> list[tuple[Normalized, list[tuple[_Item, str]]]]:
    """Normalise a schema group at once; on failure, one record at a time to isolate the bad ones."""
    records = [it.record for it in items]
    try:
        norm = NORMALIZERS[survey](records, records[0].schema, [_label(it) for it in items])
    except Exception as exc:  # a normaliser bug or a value no column can hold: find the culprit(s)
        if len(items) == 1:
            return [(Normalized(None, None), [(items[0], f"{type(exc).__name__}: {exc}")])]
        return [out for it in items for out in _normalize_group(survey, [it])]
    return [(norm, [(items[i], reason) for i, reason in norm.rejects])]


def _label(it: _Item) -> str:
    label = it.packet.label
    return f"{label}#{it.record.index}" if it.record.index else label


def _raw(rec: Record) -> bytes:
    try:
        return single_record_container(rec)
    except Exception:
        return rec.raw


def _has_stamp(cutouts: pa.Table) -> pa.Array:
    cols = [cutouts.column(n).is_valid() for n in ("cutout_science", "cutout_template", "cutout_difference")]
    return pc.or_(pc.or_(cols[0], cols[1]), cols[2])


