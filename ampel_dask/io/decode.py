"""Decode one chunk of packets into staged archive parts; what fails goes to quarantine.

This runs on Dask workers. Records are grouped by writer schema, decoded into Arrow by DataFusion (see
:mod:`.columnar`) and normalised with one columnar pass per group; if a group fails as a whole, its
records are retried one by one so that a single bad record is quarantined without taking its
neighbours with it. Rows of Parquet alert dumps (:mod:`.parquet_alerts`) take the same normalisers, batch
by batch.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..keys import record_hash
from . import lsst, parquet_alerts, ztf
from .archive import Staged, stage
from .files import atomic_write, sync
from .avro import Block, Damage, Record, SchemaCache, WriterSchema, frame, iter_packet, single_record_container
from .columnar import decode_blocks, records_rows
from .limits import Limits, TooLarge
from .normalize import Normalized, rows_where
from .sources import Chunk, Packet

NORMALIZERS = {"ztf": ztf.normalize, "lsst": lsst.normalize}
_NUMBER = re.compile(r"\d+")
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

    def write(self, qdir: Path, keep: int | None = None) -> str:
        """Content-addressed: quarantining the same bad input twice writes the same two files. Of the
        raw bytes (as they came: compressed where they were), the first ``keep`` are kept."""
        size = len(self.raw)
        if keep is not None and size > keep:
            self.raw = self.raw[:keep]
        key = self.key()
        meta = {
            "source": self.source,
            "member": self.member,
            "offset": self.offset,
            "record": self.record,
            "reason": self.reason,
            "records": self.records,
            "raw_bytes": size,
            "raw_file": f"{key}.bin" if self.raw else None,
        }
        if len(self.raw) < size:
            meta["raw_kept"] = len(self.raw)  # the first bytes only (``quarantine_bytes``)
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


def decode_chunk(chunk: Chunk, tmp_dir: str, quarantine_dir: str, schema_dirs: list[str] | None = None, limits: Limits | None = None) -> ChunkResult:
    """Packets -> staged parts. Whole containers of a known survey take the fast path (their blocks,
    undecoded, go to DataFusion by schema); anything else, and any batch DataFusion refuses, is decoded
    record by record with fastavro, so that damage is isolated and quarantined. Packets are taken in
    rounds of at most ``limits.packet_bytes`` inflated (one round for any real chunk), so that a chunk
    of packets each just under the limits never holds more than that at once."""
    limits = limits or Limits()
    cache = schema_cache(schema_dirs)
    result = ChunkResult(chunk.index, nbytes=chunk.nbytes)
    qdir = Path(quarantine_dir)

    def quarantine(entry: QuarantineEntry) -> None:
        entry.write(qdir, limits.quarantine_bytes)
        result.quarantined += entry.records
        reason = _NUMBER.sub("N", entry.reason.split(":")[0].split(" (")[0])  # one kind, wherever it was
        result.reasons[reason] = result.reasons.get(reason, 0) + entry.records

    def read(packet: Packet) -> bytes | None:
        """A packet's bytes, or None once it is quarantined (unreadable, not a regular file, too large)."""
        try:
            return packet.read(limits.file_bytes)
        except TooLarge as exc:
            reason = f"{'tar member' if packet.member else 'file'} {exc}"
            quarantine(QuarantineEntry(packet.source, packet.member, None, None, reason, exc.head))
        except OSError as exc:
            quarantine(QuarantineEntry(packet.source, packet.member, None, None, f"unreadable file: {exc}"))
        result.read += 1
        return None

    for source, member, reason, raw in chunk.problems:
        result.read += 1
        quarantine(QuarantineEntry(source, member, None, None, reason, raw))

    # packets by position in the chunk: groups are normalised in the order their first packet came, so
    # of two copies of an alert id the first in the input is the one archived, whichever path they took
    fast: dict[str, list[tuple[int, Packet, WriterSchema, list[Block]]]] = defaultdict(list)
    careful: list[tuple[int, Packet, bytes]] = []
    held = 0
    for pos, packet in enumerate(chunk.packets):
        data = read(packet)
        if data is None:
            continue
        framed = frame(data, cache, limits)
        if framed is not None and survey_of(framed[0]) is not None:
            fast[framed[0].key].append((pos, packet, *framed))
            held += sum(len(b.data) for b in framed[1])
        else:
            careful.append((pos, packet, data))
            held += len(data)
        if held >= limits.packet_bytes and pos + 1 < len(chunk.packets):
            _decode_round(fast, careful, cache, tmp_dir, result, quarantine, read, limits)
            fast, careful, held = defaultdict(list), [], 0
    _decode_round(fast, careful, cache, tmp_dir, result, quarantine, read, limits)
    if chunk.slices:
        _decode_slices(chunk.slices, tmp_dir, result, quarantine)
    if result.staged:
        sync()  # once per chunk: the files this worker staged, and their folder, durable before they are published
    return result


def _decode_round(fast: dict, careful: list, cache: SchemaCache, tmp_dir: str, result: ChunkResult, quarantine, read, limits: Limits) -> None:
    """Decode, normalise and stage one round of a chunk's packets."""
    fast_groups, refused = _fast_groups(fast, tmp_dir)
    result.read += sum(len(g.origins) for g in fast_groups)  # the careful path counts its own
    refused = [(pos, packet, data) for pos, packet in refused if (data := read(packet)) is not None]
    groups = fast_groups + _careful_groups(careful + refused, cache, tmp_dir, result, quarantine, limits)

    by_survey: dict[str, list[Normalized]] = defaultdict(list)
    for group in sorted(groups, key=lambda g: g.first):
        for norm, bad in _normalize_group(group.survey, group.schema, group.rows, group.origins):
            by_survey[group.survey].append(norm)
            for origin, reason in bad:
                quarantine(QuarantineEntry(origin.packet.source, origin.packet.member, origin.offset, origin.index, f"cannot normalise: {reason}", _origin_raw(origin, cache, limits)))

    _stage(by_survey, tmp_dir, result)


def _stage(by_survey: dict[str, list[Normalized]], tmp_dir: str, result: ChunkResult) -> None:
    """Normalised rows -> one staged part per survey and night."""
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


@dataclass
class _Row:
    """Where one Parquet row came from (the ``source`` column and quarantine)."""

    label: str
    index: int  # position in its batch


def _decode_slices(slices: list[parquet_alerts.Slice], tmp_dir: str, result: ChunkResult, quarantine) -> None:
    """Parquet dumps: record batches, conformed to the Avro path's Arrow shapes, normalised as its
    schema groups are (a bad row is quarantined alone) and staged every ``batch_rows`` alerts, so that
    a big row group is never held whole."""
    by_survey: dict[str, list[Normalized]] = defaultdict(list)
    held = 0
    for sl in slices:
        result.read += sl.rows
        for batch in parquet_alerts.read(sl):
            if isinstance(batch, parquet_alerts.BadRows):
                quarantine(QuarantineEntry(sl.path, None, None, batch.row, batch.reason, records=batch.records))
                continue
            rows = [_Row(batch.label(i), i) for i in range(len(batch.rows))]
            for norm, bad in _normalize_group(sl.dump.survey, sl.dump.schema, batch.rows, rows):
                by_survey[sl.dump.survey].append(norm)
                for row, reason in bad:
                    entry = f"cannot normalise: {reason}{batch.note(row.index)}"
                    quarantine(QuarantineEntry(sl.path, None, None, batch.first_row + row.index, entry, batch.raw(row.index)))
            held += len(rows)
            if held >= sl.batch_rows:
                _stage(by_survey, tmp_dir, result)
                by_survey.clear()
                held = 0
    _stage(by_survey, tmp_dir, result)


def _fast_groups(fast: dict[str, list], tmp_dir: str) -> tuple[list[_Group], list[tuple[int, Packet]]]:
    """One DataFusion read per writer schema of all its packets' blocks; the packets of a schema it
    refuses (e.g. a record that does not decode) are returned for the careful path (to be read again)."""
    groups, refused = [], []
    for items in fast.values():
        ws = items[0][2]
        try:
            rows = decode_blocks(ws, [(b.count, b.data) for *_, blocks in items for b in blocks], tmp_dir)
        except Exception:
            refused += [(pos, packet) for pos, packet, _, _ in items]
            continue
        group = _Group(survey_of(ws), ws, rows, first=items[0][0])
        for _, packet, _, blocks in items:
            n = 0
            for b in blocks:
                group.origins += [_Origin(packet, n + i, b.offset) for i in range(b.count)]
                n += b.count
        groups.append(group)
    return groups, refused


def _careful_groups(careful: list[tuple[int, Packet, bytes]], cache: SchemaCache, tmp_dir: str, result: ChunkResult, quarantine, limits: Limits) -> list[_Group]:
    """fastavro record by record: damage and unknown schemas are quarantined one record at a time, the
    good records grouped by writer schema as on the fast path."""
    by_schema: dict[str, list[Record]] = defaultdict(list)
    origin_of: dict[int, _Origin] = {}
    first: dict[str, int] = {}
    for pos, packet, data in sorted(careful, key=lambda c: c[0]):
        for item in iter_packet(data, cache, limits):
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


def _normalize_group(survey: str, ws: WriterSchema, rows: pa.StructArray, origins: list) -> list[tuple[Normalized, list[tuple]]]:
    """Normalise a schema group at once; on failure, one record at a time to isolate the bad ones.
    ``origins`` (one per record, with a ``label``) come back with the reasons of the records refused."""
    try:
        norm = NORMALIZERS[survey](rows, ws, [o.label for o in origins])
    except Exception as exc:  # a normaliser bug or a value no column can hold: find the culprit(s)
        if len(origins) == 1:
            return [(Normalized(None, None), [(origins[0], f"{type(exc).__name__}: {exc}")])]
        return [out for i, o in enumerate(origins) for out in _normalize_group(survey, ws, rows.slice(i, 1), [o])]
    return [(norm, [(origins[i], reason) for i, reason in norm.rejects])]


def _origin_raw(origin: _Origin, cache: SchemaCache, limits: Limits) -> bytes:
    """What quarantine keeps of a record: a one-record container (fastavro decodes it again if it
    came by the fast path: rare, only for records that fail normalisation)."""
    rec = origin.record
    if rec is None:
        try:
            data = origin.packet.read(limits.file_bytes)
        except (OSError, TooLarge):
            return b""  # gone or changed since it was decoded: the entry still names it
        rec = next((r for r in iter_packet(data, cache, limits) if isinstance(r, Record) and r.index == origin.index), None)
        if rec is None:
            return data
    return _raw(rec)


def _raw(rec: Record) -> bytes:
    try:
        return single_record_container(rec)
    except Exception:
        return rec.raw


def _has_stamp(cutouts: pa.Table) -> pa.Array:
    cols = [cutouts.column(n).is_valid() for n in ("cutout_science", "cutout_template", "cutout_difference")]
    return pc.or_(pc.or_(cols[0], cols[1]), cols[2])


