"""What one input may cost: bytes read per file, inflated per packet and per Avro block, kept by quarantine.

A 23 KB bzip2 block inflates to gigabytes, a 2 MB gzip file to 6 GB, and a symlink to /dev/zero never
ends. Everything here reads or inflates incrementally and stops one byte past its cap, so an input
costs at most its cap in memory; the caller quarantines it with :class:`TooLarge`'s reason (and the
original, compressed bytes, cut to ``quarantine_bytes``). A normal block or file is still one call.
"""

from __future__ import annotations

import bz2
import lzma
import os
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from zlib_ng import zlib_ng  # inflates the same bytes as zlib, 1.5-2x faster

MiB = 1 << 20
_PIECE = 8 * MiB  # inflated bytes per step: a bomb costs its cap plus one piece, never twice its cap


@dataclass(frozen=True)
class Limits:
    """Caps on what one input may cost; every default is far above any real alert packet (ZTF's are
    20-300 KB, Rubin's up to a few MB, a Spark container of a hundred alerts ~10 MB)."""

    file_bytes: int = 256 * MiB  # a packet file or tarball member, as read
    packet_bytes: int = 256 * MiB  # a packet inflated: a gzipped packet unpacked, and all its Avro blocks together
    block_bytes: int = 64 * MiB  # one Avro block inflated
    quarantine_bytes: int = 16 * MiB  # of the original bytes kept with a quarantine entry


class TooLarge(ValueError):
    """An input past its cap; ``head`` holds its first bytes as read (for quarantine)."""

    def __init__(self, message: str, head: bytes = b""):
        super().__init__(message)
        self.head = head


def beyond(cap: int) -> str:
    return f"inflates beyond {cap} bytes"


def larger(cap: int) -> str:
    return f"larger than {cap} bytes"


def inflate_block(codec: str, data: bytes, cap: int) -> bytes:
    """An Avro block's bytes decompressed by its codec, at most ``cap`` of them (else :class:`TooLarge`)."""
    if codec == "null":
        if len(data) > cap:
            raise TooLarge(f"holds more than {cap} bytes")
        return data
    if codec == "deflate":
        return _zlib(zlib_ng.decompressobj(-15), data, cap)
    if codec == "bzip2":
        return _streams(bz2.BZ2Decompressor, data, cap, "bzip2")
    if codec == "xz":
        return _streams(lzma.LZMADecompressor, data, cap, "xz")
    if codec == "snappy":
        return _snappy(data, cap)
    if codec == "zstandard":
        return _zstd(data, cap)
    raise ValueError(f"unsupported Avro codec {codec!r}")


def gunzip(data: bytes, cap: int) -> bytes:
    """A gzip file's content (every member, as gzip reads them), at most ``cap`` bytes (else :class:`TooLarge`).
    Damage raises ``zlib_ng.error`` / ``EOFError``."""
    pieces: list[bytes] = []
    rest = data
    while True:
        d = zlib_ng.decompressobj(31)  # gzip header and trailer: zlib checks the CRC and length
        pieces += _zlib_pieces(d, rest, cap - sum(map(len, pieces)), "gzip")
        rest = d.unused_data
        if not rest.strip(b"\0"):  # gzip allows zero padding after the last member
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)


@contextmanager
def open_regular(path) -> Iterator[BinaryIO]:
    """A regular file opened for reading: opened without blocking and checked once open, so a FIFO or
    device (even one put in a file's place after it was listed) is refused with ``OSError``, never read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({file_kind(mode)}): {path}")
        yield fh


def read_regular(path, cap: int) -> bytes:
    """A regular file's bytes, at most ``cap`` of them (else :class:`TooLarge` with its first bytes)."""
    with open_regular(path) as fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise TooLarge(larger(cap), data)
    return data


def file_kind(mode: int) -> str:
    """What a stat mode is, in words."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def _zlib_pieces(d, data: bytes, cap: int, name: str) -> list[bytes]:
    """A zlib decompressor's output for ``data`` in pieces, stopping one byte past ``cap``."""
    pieces: list[bytes] = []
    total = 0
    while True:
        step = min(_PIECE, cap - total + 1)
        piece = d.decompress(data, step)
        data = d.unconsumed_tail
        total += len(piece)
        if total > cap:
            raise TooLarge(beyond(cap))
        pieces.append(piece)
        if d.eof:
            return pieces
        if not data and len(piece) < step:
            raise EOFError(f"{name} stream ends before its end marker (truncated)")


def _zlib(d, data: bytes, cap: int) -> bytes:
    pieces = _zlib_pieces(d, data, cap, "deflate")
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _streams(factory, data: bytes, cap: int, name: str) -> bytes:
    """bzip2 / xz: one or more concatenated streams, inflated a piece at a time up to ``cap + 1`` bytes."""
    pieces: list[bytes] = []
    total = 0
    while data:
        d = factory()
        while True:
            piece = d.decompress(data, min(_PIECE, cap - total + 1))
            data = b""
            total += len(piece)
            if total > cap:
                raise TooLarge(beyond(cap))
            pieces.append(piece)
            if d.eof:
                break
            if d.needs_input:
                raise EOFError(f"{name} stream ends before its end marker (truncated)")
        data = d.unused_data
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # no stream at all: b""


def _snappy(data: bytes, cap: int) -> bytes:
    """Raw snappy declares its length up front (checked before inflating) and a CRC32 of the result
    follows it in Avro's framing (checked after)."""
    import cramjam

    body, crc = data[:-4], data[-4:]
    if len(crc) < 4:
        raise ValueError("snappy block shorter than its CRC")
    n = cramjam.snappy.decompress_raw_len(body)
    if n > cap:
        raise TooLarge(beyond(cap) + f" (declares {n})")
    out = bytes(cramjam.snappy.decompress_raw(body))
    if zlib.crc32(out) != int.from_bytes(crc, "big"):
        raise ValueError("snappy block's CRC32 does not match its content")
    return out


def _zstd(data: bytes, cap: int) -> bytes:
    """zstd streamed by Arrow, a piece at a time: a frame need not declare its size."""
    import pyarrow as pa

    out: list[bytes] = []
    total = 0
    with pa.CompressedInputStream(pa.BufferReader(data), "zstd") as stream:
        while piece := stream.read(min(_PIECE, cap - total + 1)):
            total += len(piece)
            if total > cap:
                raise TooLarge(beyond(cap))
            out.append(piece)
    return b"".join(out)
