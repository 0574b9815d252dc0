"""Decode one chunk of packets into staged archive parts; what fails goes to quarantine.

This runs on Dask workers. Records are grouped by writer schema, decoded into Arrow by DataFusion (see
:mod:`.columnar`) and normalised with one columnar pass per group; if a group fails as a whole, its
records are retried one by one so that a single bad record is quarantined without taking its
neighbours with it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..keys import record_hash
from . import lsst, ztf
from .archive import Staged, stage
from .files import atomic_write, sync
from .avro import Block, Damage, Record, SchemaCache, WriterSchema, frame, iter_packet, single_record_container
from .columnar import decode_blocks, records_rows
from .normalize import Normalized, rows_where
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
    records: int = 1  # alerts it stands for (a damaged block may hold several)

    def key(self) -> str:
        return record_hash([self.source, self.member or "", str(self.offset), str(self.record), self.reason], self.raw)

    def write(self, qdir: Path) -> str:
        """Content-addressed: quarantining the same bad input twice writes the same two files."""
        key = self.key()
        meta = {
            "source": self.source,
            "member": self.member,
            "offset": self.offset,
            "record": self.record,
            "reason": self.reason,
            "records": self.records,
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
class _Origin:
    """Where one decoded record came from (for quarantine and the ``source`` column)."""

    packet: Packet
    index: int  # record number inside the packet
    offset: int  # byte offset of its block (container) or 0 (wire message)
    record: Record | None = None  # fastavro's decoding, when the careful path made it

    @property
    def label(self) -> str:
        return f"{self.packet.label}#{self.index}" if self.index else self.packet.label


@dataclass
class _Group:
    """Records of one writer schema: Arrow rows and, for each, where it came from."""

    survey: str
    schema: WriterSchema
    rows: pa.StructArray
    origins: list[_Origin] = field(default_factory=list)
    first: int = 0  # position in the chunk of its first packet


def decode_chunk(chunk: Chunk, tmp_dir: str, quarantine_dir: str, schema_dirs: list[str] | None = None) -> ChunkResult:
    """Packets -> staged parts. Whole containers of a known survey take the fast path (their blocks,
    undecoded, go to DataFusion by schema); anything else, and any batch DataFusion refuses, is decoded
    record by record with fastavro, so that damage is isolated and quarantined."""
    cache = schema_cache(schema_dirs)
    result = ChunkResult(chunk.index, nbytes=chunk.nbytes)
    qdir = Path(quarantine_dir)

    def quarantine(entry: QuarantineEntry) -> None:
        entry.write(qdir)
        result.quarantined += entry.records
        reason = entry.reason.split(":")[0].split(" (")[0]
        result.reasons[reason] = result.reasons.get(reason, 0) + entry.records

    for source, member, reason, raw in chunk.problems:
        result.read += 1
        quarantine(QuarantineEntry(source, member, None, None, reason, raw))

    # packets by position in the chunk: groups are normalised in the order their first packet came, so
    # of two copies of an alert id the first in the input is the one archived, whichever path they took
    fast: dict[str, list[tuple[int, Packet, WriterSchema, list[Block]]]] = defaultdict(list)
    careful: list[tuple[int, Packet, bytes]] = []
    for pos, packet in enumerate(chunk.packets):
        try:
            data = packet.read()
        except OSError as exc:
            result.read += 1
            quarantine(QuarantineEntry(packet.source, packet.member, None, None, f"unreadable file: {exc}"))
            continue
        framed = frame(data, cache)
        if framed is not None and survey_of(framed[0]) is not None:
            fast[framed[0].key].append((pos, packet, *framed))
        else:
            careful.append((pos, packet, data))
    fast_groups, refused = _fast_groups(fast, tmp_dir)
    result.read += sum(len(g.origins) for g in fast_groups)  # the careful path counts its own
    groups = fast_groups + _careful_groups(careful + refused, cache, tmp_dir, result, quarantine)

    by_survey: dict[str, list[Normalized]] = defaultdict(list)
    for group in sorted(groups, key=lambda g: g.first):
        for norm, bad in _normalize_group(group.survey, group.schema, group.rows, group.origins):
            by_survey[group.survey].append(norm)
            for origin, reason in bad:
                quarantine(QuarantineEntry(origin.packet.source, origin.packet.member, origin.offset, origin.index, f"cannot normalise: {reason}", _origin_raw(origin, cache)))

    for survey, norms in by_survey.items():
        alerts = [n.alerts for n in norms if n.alerts is not None and n.alerts.num_rows]
        if not alerts:
            continue
        table = pa.concat_tables(alerts)
        cutouts = pa.concat_tables([n.cutouts for n in norms if n.cutouts is not None])
        cutouts = rows_where(cutouts, np.asarray(_has_stamp(cutouts)))
        nights = table.column("night").to_numpy()
        _, first = np.unique(nights, return_index=True)
        for night in nights[np.sort(first)]:  # in order of appearance: of two copies of an alert, the first is kept
            part = rows_where(table, nights == night)
            result.staged.append(stage(part, cutouts if cutouts.num_rows else None, Path(tmp_dir), durable=False))  # stage() picks this night's cutouts
    if result.staged:
        sync()  # once per chunk: the files this worker staged, and their folder, durable before they are published
    return result


def _fast_groups(fast: dict[str, list], tmp_dir: str) -> tuple[list[_Group], list[tuple[int, Packet, bytes]]]:
    """One DataFusion read per writer schema of all its packets' blocks; the packets of a schema it
    refuses (e.g. a record that does not decode) are returned for the careful path."""
    groups, refused = [], []
    for items in fast.values():
        ws = items[0][2]
        try:
            rows = decode_blocks(ws, [(b.count, b.data) for *_, blocks in items for b in blocks], tmp_dir)
        except Exception:
            refused += [(pos, packet, packet.read()) for pos, packet, _, _ in items]
            continue
        group = _Group(survey_of(ws), ws, rows, first=items[0][0])
        for _, packet, _, blocks in items:
            n = 0
            for b in blocks:
                group.origins += [_Origin(packet, n + i, b.offset) for i in range(b.count)]
                n += b.count
        groups.append(group)
    return groups, refused


def _careful_groups(careful: list[tuple[int, Packet, bytes]], cache: SchemaCache, tmp_dir: str, result: ChunkResult, quarantine) -> list[_Group]:
    """fastavro record by record: damage and unknown schemas are quarantined one record at a time, the
    good records grouped by writer schema as on the fast path."""
    by_schema: dict[str, list[Record]] = defaultdict(list)
    origin_of: dict[int, _Origin] = {}
    first: dict[str, int] = {}
    for pos, packet, data in sorted(careful, key=lambda c: c[0]):
        for item in iter_packet(data, cache):
            if isinstance(item, Damage):  # a damaged block: all the alerts its header says it held
                result.read += item.records
                quarantine(QuarantineEntry(packet.source, packet.member, item.offset, item.index, item.reason, item.raw, item.records))
                continue
            result.read += 1
            if survey_of(item.schema) is None:
                reason = f"unknown alert schema {item.schema.name!r} (top-level fields: {', '.join(item.schema.top_fields[:12])})"
                quarantine(QuarantineEntry(packet.source, packet.member, item.offset, item.index, reason, _raw(item)))
                continue
            by_schema[item.schema.key].append(item)
            first.setdefault(item.schema.key, pos)
            origin_of[id(item)] = _Origin(packet, item.index, item.offset, item)
    return [_Group(survey_of(recs[0].schema), recs[0].schema, records_rows(recs, tmp_dir), [origin_of[id(r)] for r in recs], first[key])
            for key, recs in by_schema.items()]  # fmt: skip


def _normalize_group(survey: str, ws: WriterSchema, rows: pa.StructArray, origins: list[_Origin]) -> list[tuple[Normalized, list[tuple[_Origin, str]]]]:
    """Normalise a schema group at once; on failure, one record at a time to isolate the bad ones."""
    try:
        norm = NORMALIZERS[survey](rows, ws, [o.label for o in origins])
    except Exception as exc:  # a normaliser bug or a value no column can hold: find the culprit(s)
        if len(origins) == 1:
            return [(Normalized(None, None), [(origins[0], f"{type(exc).__name__}: {exc}")])]
        return [out for i, o in enumerate(origins) for out in _normalize_group(survey, ws, rows.slice(i, 1), [o])]
    return [(norm, [(origins[i], reason) for i, reason in norm.rejects])]


def _origin_raw(origin: _Origin, cache: SchemaCache) -> bytes:
    """What quarantine keeps of a record: a one-record container (fastavro decodes it again if it
    came by the fast path: rare, only for records that fail normalisation)."""
    rec = origin.record
    if rec is None:
        rec = next((r for r in iter_packet(origin.packet.read(), cache) if isinstance(r, Record) and r.index == origin.index), None)
        if rec is None:
            return origin.packet.read()
    return _raw(rec)


def _raw(rec: Record) -> bytes:
    try:
        return single_record_container(rec)
    except Exception:
        return rec.raw


def _has_stamp(cutouts: pa.Table) -> pa.Array:
    cols = [cutouts.column(n).is_valid() for n in ("cutout_science", "cutout_template", "cutout_difference")]
    return pc.or_(pc.or_(cols[0], cols[1]), cols[2])


