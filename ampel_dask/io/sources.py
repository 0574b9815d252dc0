"""Where packets come from: files, directories (recursive), globs and nightly tarballs, cut into chunks.

Chunks are deterministic (input order and fixed size limits, never the number of workers), so the same
input always yields the same partitions and content hashes. Plain files are read by the worker that
decodes them; tarball members are streamed by the driver (a gzip stream cannot be split) and shipped.
"""

from __future__ import annotations

import glob
import gzip
import os
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from zlib_ng import gzip_ng

from . import parquet_alerts

PACKET_SUFFIXES = (".avro", ".avro.gz", ".avro.gzip")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


class SourceError(ValueError):
    """A source argument that names nothing readable (a usage error)."""


@dataclass
class Packet:
    """One packet file: read from ``path`` by the worker, or carried as ``data`` from a tarball."""

    source: str  # file path, or tarball path for members
    member: str | None = None
    data: bytes | None = None

    @property
    def label(self) -> str:
        return f"{self.source}::{self.member}" if self.member else self.source

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.source, "rb") as fh:
            return fh.read()


@dataclass
class Chunk:
    """A unit of decode work: packets, their input size, and any problems met while reading them."""

    index: int
    packets: list[Packet] = field(default_factory=list)
    nbytes: int = 0
    problems: list[tuple[str, str | None, str, bytes]] = field(default_factory=list)  # (source, member, reason, raw)
    slices: list[parquet_alerts.Slice] = field(default_factory=list)  # row groups of Parquet dumps


@dataclass
class Inputs:
    files: list[Path]
    tarballs: list[Path]
    skipped: list[Path]
    problems: list[tuple[str, str | None, str, bytes]] = field(default_factory=list)  # e.g. unreadable folders
    dumps: list[parquet_alerts.Dump] = field(default_factory=list)
    skip_reasons: dict[Path, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files + self.tarballs) + sum(b for d in self.dumps for _, b in d.row_groups)

    def skipped_files(self) -> list[str]:
        return [f"{p} ({self.skip_reasons[p]})" if p in self.skip_reasons else str(p) for p in self.skipped]


def _is_tar(p: Path) -> bool:
    return p.name.endswith(TAR_SUFFIXES)


def _is_packet(p: Path) -> bool:
    return p.name.endswith(PACKET_SUFFIXES)


def _is_parquet(p: Path) -> bool:
    return p.name.endswith(parquet_alerts.SUFFIXES)


def expand(sources: list[str]) -> Inputs:
    """Resolve SOURCE arguments; a directory (named, or matched by a glob) is searched recursively for
    packets, tarballs and Parquet dumps. A directory that cannot be read is a problem of the ingest, never
    skipped silently; a Parquet file that is not an alert dump is skipped with its reason, or refused
    when named on its own."""
    files: list[Path] = []
    parquet: list[tuple[Path, bool]] = []
    tarballs: list[Path] = []
    skipped: list[Path] = []
    problems: list[tuple[str, str | None, str, bytes]] = []
    seen: set[str] = set()

    def add(p: Path, real: str, explicit: bool) -> None:
        if real in seen:
            return
        seen.add(real)
        if _is_tar(p):
            tarballs.append(p)
        elif _is_parquet(p) or (explicit and parquet_alerts.has_magic(p)):
            parquet.append((p, explicit))
        elif explicit or _is_packet(p):
            files.append(p)
        else:
            skipped.append(p)

    def unreadable(exc: OSError) -> None:
        problems.append((str(exc.filename), None, f"unreadable directory: {exc.strerror}", b""))

    def walk(top: Path) -> None:
        for root, dirs, names in os.walk(top, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            real_root = os.path.realpath(root)  # once per folder, not per file: archives hold millions
            for name in sorted(names):
                if not name.startswith("."):
                    add(Path(root) / name, os.path.join(real_root, name), explicit=False)

    for src in sources:
        p = Path(src)
        if p.is_dir():
            walk(p)
        elif p.is_file():
            add(p, os.path.realpath(p), explicit=True)
        elif glob.has_magic(src):
            matches = sorted(glob.glob(src, recursive=True))
            if not matches:
                raise SourceError(f"no files match {src!r}")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    walk(mp)
                elif mp.is_file():
                    add(mp, os.path.realpath(mp), explicit=_is_packet(mp) or _is_tar(mp))
        else:
            raise SourceError(f"no such file or directory: {src}")
    inputs = Inputs(files, tarballs, skipped, problems)
    for p, named in parquet:
        try:
            inputs.dumps.append(parquet_alerts.open_dump(p))
        except parquet_alerts.NotAlertDump as exc:
            if named:
                raise SourceError(f"{p}: {exc}") from None
            skipped.append(p)
            inputs.skip_reasons[p] = str(exc)
        except (OSError, pa.ArrowException) as exc:
            problems.append((str(p), None, f"unreadable Parquet file: {type(exc).__name__}: {exc}", b""))
    return inputs


def chunks(inputs: Inputs, max_bytes: int, max_packets: int) -> Iterator[Chunk]:
    """Deterministic chunks: plain files first (in order), then each tarball's members as streamed."""
    index = 0
    cur = Chunk(index, problems=list(inputs.problems))

    def full() -> bool:
        return cur.nbytes >= max_bytes or len(cur.packets) >= max_packets

    for path in inputs.files:
        cur.packets.append(Packet(str(path)))
        cur.nbytes += path.stat().st_size
        if full():
            yield cur
            index += 1
            cur = Chunk(index)
    if cur.packets or cur.problems:
        yield cur
        index += 1
        cur = Chunk(index)
    rows = 0
    for dump in inputs.dumps:  # Parquet: whole row groups, gathered across files like packets
        for sl in parquet_alerts.slices(dump, max_bytes, max_packets):
            if cur.slices and (rows + sl.rows > max_packets or cur.nbytes + sl.nbytes > max_bytes):
                yield cur
                index += 1
                cur, rows = Chunk(index), 0
            cur.slices.append(sl)
            cur.nbytes += sl.nbytes
            rows += sl.rows
    if cur.slices:
        yield cur
        index += 1
        cur = Chunk(index)
    for tar_path in inputs.tarballs:
        for item in _members(tar_path):
            if isinstance(item, Packet):
                cur.packets.append(item)
                cur.nbytes += len(item.data or b"")
            else:
                cur.problems.append(item)
            if full():
                yield cur
                index += 1
                cur = Chunk(index)
        if cur.packets or cur.problems:
            yield cur
            index += 1
            cur = Chunk(index)


def _members(path: Path) -> Iterator[Packet | tuple[str, str | None, str, bytes]]:
    """Stream a tarball without unpacking it to disk; damage ends the stream with a problem record."""
    name = None
    try:
        # gzip's own reader checks the stream's CRC at its end (tarfile's does not): a corrupt
        # tarball is then reported, although its members have been read by that time
        with _open_tar(path) as tar:
            for member in tar:
                name = member.name
                if not member.isfile():
                    continue
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                if not data:
                    yield (str(path), member.name, "empty tar member (0 bytes)", b"")
                    continue
                yield Packet(str(path), member.name, data)
    except gzip.BadGzipFile as exc:
        if "CRC" in str(exc) or "length" in str(exc):
            yield (str(path), None, f"tarball corrupt: its gzip check failed at the end ({exc}); the alerts read from it may hold damaged bytes", b"")
        else:
            yield (str(path), name, f"tarball unreadable after member {name!r}: {type(exc).__name__}: {exc}", b"")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        where = f"after member {name!r}" if name else "at its start"
        yield (str(path), name, f"tarball unreadable {where}: {type(exc).__name__}: {exc}", b"")


@contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            fh.seek(0)
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                yield tar
            return
        fh.seek(0)
        with gzip_ng.GzipFile(fileobj=fh) as gz:  # zlib-ng: the driver's tar read 1.9x faster than zlib's
            with tarfile.open(fileobj=gz, mode="r|") as tar:
                yield tar
            while gz.read(1 << 20):  # to the gzip trailer, whose CRC is checked there
                pass
