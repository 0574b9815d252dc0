"""Avro framing for alert packets: object container files and Confluent wire messages.

fastavro's ``reader`` parses the writer schema of every file again; alert archives are millions of
one-alert files sharing a handful of schemas, so here the container framing is read directly and each
distinct writer schema is parsed once per process. Reading block by block also lets a damaged block be
skipped (resynchronising on the sync marker) without losing the good records around it.

A container names its own writer schema and record counts, so both are checked before anything is
decoded: a schema that would crash or hang a decoder is refused (:mod:`.schema_check`), a block's count
must fit its bytes, and no block or packet may inflate past its limit (:mod:`.limits`).
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fastavro
from fastavro import parse_schema, schemaless_reader
from fastavro._read import HEADER_SCHEMA

from ..keys import digest16
from .limits import Limits, TooLarge, beyond, gunzip, inflate_block
from .schema_check import Refused, min_record_bytes

MAGIC = b"Obj\x01"
SYNC_SIZE = 16
DEFAULT_LIMITS = Limits()


def packaged_schemas() -> Path | None:
    """Rubin's own schema tree (``<major>/<minor>/lsst.vM_m.alert.avsc``) as installed by
    lsst-alert-packet, found without importing it (its import pulls in the LSST stack's utilities)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("lsst-alert-packet").locate_file("lsst/alert/packet/schema"))
    except PackageNotFoundError:
        return None
    return path if path.is_dir() else None


@dataclass(frozen=True)
class WriterSchema:
    """A parsed writer schema and what it says about the alert it carries."""

    key: str
    parsed: dict
    raw: dict
    refused: str | None = None  # why no record of it may be decoded (:mod:`.schema_check`)
    min_bytes: int = 1  # the least bytes a record takes: bounds the records a block of N bytes can hold

    @classmethod
    def of(cls, key: str, raw) -> WriterSchema:
        """Parsed and checked: a schema that could crash or hang a decoder carries its reason."""
        try:
            parsed = parse_schema(raw)
            return cls(key, parsed, raw, min_bytes=min_record_bytes(parsed))
        except Refused as exc:
            return cls(key, {}, raw, refused=str(exc))
        except RecursionError:
            return cls(key, {}, raw, refused="it nests too deep to parse")

    @property
    def name(self) -> str:
        return str(self.raw.get("name", "?")) if isinstance(self.raw, dict) else "?"

    @property
    def top_fields(self) -> list[str]:
        fields = self.raw.get("fields", []) if isinstance(self.raw, dict) else []
        return [str(f.get("name")) for f in fields if isinstance(f, dict)] if isinstance(fields, list) else []


@dataclass
class Record:
    """One decoded alert record and where its bytes came from (for quarantine and provenance)."""

    value: dict
    schema: WriterSchema
    offset: int  # byte offset of the record's block (container) or 0 (wire message)
    index: int  # record number inside the packet
    raw: bytes  # the record's schemaless Avro bytes


@dataclass
class Damage:
    """A region of a packet that could not be decoded."""

    offset: int
    reason: str
    raw: bytes
    index: int | None = None
    records: int = 1  # alerts lost with it: a damaged block's record count, where its header is trustworthy


class SchemaCache:
    """Parsed writer schemas by their JSON text, and wire schemas by Confluent id."""

    def __init__(self, schema_dirs: list[Path] | None = None):
        self._by_text: dict[bytes, WriterSchema] = {}
        self._by_id: dict[int, WriterSchema | None] = {}
        self._headers: list[tuple[bytes, WriterSchema, str]] = []  # recent container headers (without sync)
        env = os.environ.get("AMPEL_DASK_SCHEMA_DIR")
        self.dirs = [Path(d) for d in (schema_dirs or [])]
        if env:
            self.dirs += [Path(p) for p in env.split(os.pathsep) if p]
        packaged = packaged_schemas()
        if packaged is not None:
            self.dirs.append(packaged)

    def from_text(self, text: bytes) -> WriterSchema:
        ws = self._by_text.get(text)
        if ws is None:
            ws = WriterSchema.of(text.decode(), json.loads(text))
            self._by_text[text] = ws
        return ws

    def header(self, data: bytes) -> tuple[WriterSchema, str, bytes, int]:
        """A container's (writer schema, codec, sync marker, header length). Packets of one stream
        share their header up to the sync marker byte for byte, so a known one is recognised by a
        prefix comparison instead of being decoded again (raises on an unreadable header)."""
        for prefix, ws, codec in self._headers:
            if data.startswith(prefix) and len(data) >= len(prefix) + SYNC_SIZE:
                return ws, codec, data[len(prefix) : len(prefix) + SYNC_SIZE], len(prefix) + SYNC_SIZE
        bio = io.BytesIO(data)
        header = schemaless_reader(bio, HEADER_SCHEMA, None)
        meta = header["meta"]
        ws = self.from_text(meta["avro.schema"])
        codec = meta.get("avro.codec", b"null").decode()
        end = bio.tell()
        self._headers = [(data[: end - SYNC_SIZE], ws, codec), *self._headers[:7]]
        return ws, codec, header["sync"], end

    def from_id(self, schema_id: int) -> WriterSchema | None:
        if schema_id not in self._by_id:
            self._by_id[schema_id] = self._load_id(schema_id)
        return self._by_id[schema_id]

    def _load_id(self, schema_id: int) -> WriterSchema | None:
        major, minor = divmod(schema_id, 100)
        name = f"lsst.v{major}_{minor}.alert"
        for d in self.dirs:
            for cand in (d / f"{name}.json", d / f"{name}.avsc", d / str(major) / str(minor) / f"{name}.avsc"):
                if cand.exists():
                    if cand.suffix == ".json":
                        text = cand.read_text()
                    else:  # upstream layout: resolve the sibling record files
                        text = fastavro.schema.to_parsing_canonical_form(fastavro.schema.load_schema(str(cand)))
                    return WriterSchema.of(text, json.loads(text))
        return None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise EOFError("unexpected end of data inside a block header")
        c = buf[pos]
        pos += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint in block header")


def packet_kind(data: bytes) -> str:
    """'container', 'wire', 'gzip' or 'unknown', from the first bytes."""
    if data[:4] == MAGIC:
        return "container"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if len(data) > 5 and data[0] == 0:
        return "wire"
    return "unknown"


def iter_packet(data: bytes, cache: SchemaCache, limits: Limits = DEFAULT_LIMITS) -> Iterator[Record | Damage]:
    """Decode one packet (container file, Confluent wire message, or either gzipped). What quarantine
    gets of a gzipped packet's damage is the packet as it came (compressed), never its inflated bytes."""
    kind = packet_kind(data)
    original = None
    if kind == "gzip":
        try:
            original, data = data, gunzip(data, limits.packet_bytes)
        except TooLarge as exc:
            yield Damage(0, f"gzip packet {exc}", data)
            return
        except Exception as exc:  # zlib's errors, a truncated stream, bytes after it that are not gzip
            yield Damage(0, f"gzip stream unreadable: {exc}", data)
            return
        kind = packet_kind(data)
    if kind == "container":
        items = _iter_container(data, cache, limits)
    elif kind == "wire":
        items = _iter_wire(data, cache)
    elif not data:
        items = iter([Damage(0, "empty packet (0 bytes)", data)])
    else:
        items = iter([Damage(0, f"neither an Avro container nor a Confluent wire message (starts with {data[:8]!r})", data)])
    for item in items:
        if original is not None and isinstance(item, Damage):
            item.raw = original
        yield item


def _iter_wire(data: bytes, cache: SchemaCache) -> Iterator[Record | Damage]:
    schema_id = struct.unpack(">I", data[1:5])[0]
    ws = cache.from_id(schema_id)
    if ws is None:
        yield Damage(0, f"unknown Confluent schema id {schema_id} (no lsst.v{schema_id // 100}_{schema_id % 100}.alert schema in {', '.join(map(str, cache.dirs))})", data)
        return
    if ws.refused:
        yield Damage(0, f"writer schema refused: {ws.refused} (Confluent schema id {schema_id})", data)
        return
    bio = io.BytesIO(data)
    bio.seek(5)
    try:
        value = schemaless_reader(bio, ws.parsed, None)
    except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError, ...
        yield Damage(0, f"wire message body does not decode with schema id {schema_id}: {type(exc).__name__}: {exc}", data)
        return
    if bio.tell() != len(data):
        yield Damage(0, f"wire message has {len(data) - bio.tell()} trailing bytes after the record (schema id {schema_id})", data)
        return
    yield Record(value, ws, 0, 0, data[5:])


@dataclass
class Block:
    """A container block: where it starts, how many records it holds, its decompressed bytes."""

    offset: int
    count: int
    data: bytes
    packed: bytes | None = None  # its bytes as written, where a codec compressed them (for quarantine)


def frame(data: bytes, cache: SchemaCache, limits: Limits = DEFAULT_LIMITS) -> tuple[WriterSchema, list[Block]] | None:
    """A packet's writer schema and blocks, without decoding a record; None unless it is a whole,
    undamaged container (gzipped or not) within the limits: everything else takes :func:`iter_packet`'s
    careful path."""
    if packet_kind(data) == "gzip":
        try:
            data = gunzip(data, limits.packet_bytes)
        except Exception:
            return None
    if packet_kind(data) != "container":
        return None
    blocks: list[Block] = []
    ws = None
    for item in _blocks(data, cache, limits):
        if isinstance(item, Damage):
            return None
        ws, block = item
        blocks.append(block)
    return (ws, blocks) if ws is not None else None


def _blocks(data: bytes, cache: SchemaCache, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[WriterSchema, Block] | Damage]:
    """A container's blocks, decompressed; a damaged block is skipped to the next sync marker. A block's
    record count is checked against its bytes (a record takes at least ``ws.min_bytes``), and no block,
    nor the packet's blocks together, may inflate past the limits."""
    try:
        ws, codec, sync, pos = cache.header(data)
    except Exception as exc:
        yield Damage(0, f"Avro container header unreadable: {type(exc).__name__}: {exc}", data)
        return
    if ws.refused:  # never decoded: all the records its blocks plausibly declare go to quarantine with it
        yield Damage(0, f"writer schema refused: {ws.refused}", data, 0, _declared_records(data, pos, sync, codec, ws.min_bytes))
        return
    n = 0
    end = len(data)
    inflated = 0
    over = ""  # once the packet has inflated past its limit, the reason for each later block
    while pos < end:
        start = pos
        most = None  # the most records the block's bytes can hold, once known
        try:
            count, pos = _varint(data, pos)
            size, pos = _varint(data, pos)
            if count < 0 or size < 0:
                raise ValueError(f"block header declares {count} records in {size} bytes (negative)")
            if pos + size + SYNC_SIZE > end:
                raise EOFError(f"block of {size} bytes runs past the end of the file (truncated?)")
            packed = data[pos : pos + size]
            pos += size
            if data[pos : pos + SYNC_SIZE] != sync:
                raise ValueError("sync marker mismatch after block")
            pos += SYNC_SIZE
            if over:
                raise TooLarge(over)
            room = limits.packet_bytes - inflated
            try:
                block = inflate_block(codec, packed, min(limits.block_bytes, room))
            except TooLarge as exc:
                over = f"packet {beyond(limits.packet_bytes)}" if room < limits.block_bytes else ""
                raise TooLarge(over or f"block {exc}") from None
            inflated += len(block)
            most = len(block) // ws.min_bytes
            if count > most or (count == 0 and block):
                raise ValueError(f"block declares {count} records in {len(block)} bytes (a record takes at least {ws.min_bytes})")
        except Exception as exc:
            nxt = data.find(sync, start)
            resume = end if nxt < 0 else nxt + SYNC_SIZE
            # the block's own marker damaged: the next intact one ends the block after it, which
            # starts where this block's header says its marker was
            after = _declared_end(data, start, end)
            if after is not None and nxt >= 0 and _block_ends_at(data, after, nxt):
                resume = after
            lost = _trusted_count(data, start, resume, nxt)
            if lost > (most if most is not None else _most_records(data, start, codec, ws.min_bytes)):
                lost = 0  # more than its bytes can hold: the count itself is what is damaged
            what = f"{lost} records" if lost > 1 else "1 record" if lost else "record count unknown"
            if isinstance(exc, TooLarge):
                reason = f"{exc} (container block at byte {start}, {what})"
            else:
                reason = f"damaged container block at byte {start} ({what}): {exc}"
            yield Damage(start, reason, data[start:resume], n, max(lost, 1))
            n += max(lost, 1)  # record numbers after it stay the file's own where the count is known
            pos = resume
            continue
        yield ws, Block(start, count, block, None if codec == "null" else packed)
        n += count


def _most_records(data: bytes, start: int, codec: str, min_bytes: int) -> int:
    """The most records the block at ``start`` can hold by its size: a record takes at least
    ``min_bytes`` uncompressed, and (by a plausibility bound, not a law) a byte compressed."""
    head = _block_header(data, start)
    return 0 if head is None else head[2] // (min_bytes if codec == "null" else 1)


def _declared_records(data: bytes, pos: int, sync: bytes, codec: str, min_bytes: int) -> int:
    """The records a container's blocks declare, block by block while their framing holds and each
    count fits its bytes (at least 1): what a packet stands for when none of it is decoded."""
    total = 0
    while (head := _block_header(data, pos)) is not None:
        count, start, size = head
        stop = start + size
        if data[stop : stop + SYNC_SIZE] != sync or count > size // (min_bytes if codec == "null" else 1):
            break
        total += count
        pos = stop + SYNC_SIZE
    return max(total, 1)


def _block_header(data: bytes, start: int) -> tuple[int, int, int] | None:
    """A block's (record count, offset of its data, data size) as its header says; None if unreadable."""
    try:
        count, pos = _varint(data, start)
        size, pos = _varint(data, pos)
    except Exception:
        return None
    return (count, pos, size) if count >= 0 and size >= 0 else None


def _declared_end(data: bytes, start: int, end: int) -> int | None:
    """Where the block at ``start`` ends, marker included, by its own header (None if it does not
    read or points past the end)."""
    head = _block_header(data, start)
    stop = head[1] + head[2] + SYNC_SIZE if head else -1
    return stop if start < stop <= end else None


def _trusted_count(data: bytes, start: int, resume: int, marker: int) -> int:
    """The record count a damaged block's header declares, if the header agrees with the file's structure
    (its data ends at the sync marker reading resumes after, or its own damaged marker ends where
    reading resumes); else 0 (unknown: the header itself may be what is damaged)."""
    head = _block_header(data, start)
    if head is None or head[0] <= 0:
        return 0
    end = head[1] + head[2]
    return head[0] if end == marker or end + SYNC_SIZE == resume else 0


def _block_ends_at(data: bytes, start: int, marker: int) -> bool:
    """Does a block header at ``start`` describe a block whose data ends exactly at ``marker``?"""
    head = _block_header(data, start)
    return head is not None and head[0] > 0 and head[1] + head[2] == marker


def _iter_container(data: bytes, cache: SchemaCache, limits: Limits = DEFAULT_LIMITS) -> Iterator[Record | Damage]:
    n = 0
    for item in _blocks(data, cache, limits):
        if isinstance(item, Damage):
            yield item
            n += item.records
            continue
        ws, blk = item
        start, count, block = blk.offset, blk.count, blk.data
        bb = io.BytesIO(block)
        records: list[Record] = []
        for i in range(count):
            rstart = bb.tell()
            try:
                value = schemaless_reader(bb, ws.parsed, None)
            except Exception as exc:
                lost = count - i
                yield from records
                yield Damage(start, f"record {n + i} in block at byte {start} does not decode ({lost} record(s) of the block lost): {type(exc).__name__}: {exc}",
                             blk.packed or block[rstart:], n + i, lost)  # fmt: skip
                break
            records.append(Record(value, ws, start, n + i, block[rstart : bb.tell()]))
        else:
            if bb.tell() == len(block):
                yield from records
            else:  # the records end before the block does: its count or a length inside is damaged
                yield Damage(start, f"damaged container block at byte {start} ({count} record(s)): {len(block) - bb.tell()} bytes after its last record (its record count or a length is damaged)",
                             blk.packed or block, n, count)  # fmt: skip
        n += count


def single_record_container(rec: Record) -> bytes:
    """A standalone Avro file holding just this record (what quarantine keeps of a bad record)."""
    out = io.BytesIO()
    sync = digest16(rec.raw)  # deterministic: same record, same file
    fastavro.writer(out, rec.schema.parsed, [rec.value], codec="null", sync_marker=sync)
    return out.getvalue()
