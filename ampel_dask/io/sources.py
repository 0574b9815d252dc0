"""Where packets come from: files, directories (recursive), globs and nightly tarballs, cut into chunks.

Chunks are deterministic (input order and fixed size limits, never the number of workers), so the same
input always yields the same partitions and content hashes. Plain files are read by the worker that
decodes them; tarball members are streamed by the driver (a gzip stream cannot be split) and shipped.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class Inputs:
    files: list[Path]
    tarballs: list[Path]
    skipped: list[Path]

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files + self.tarballs)


def _is_tar(p: Path) -> bool:
    return p.name.endswith(TAR_SUFFIXES)


def _is_packet(p: Path) -> bool:
    return p.name.endswith(PACKET_SUFFIXES)


def expand(sources: list[str]) -> Inputs:
    """Resolve SOURCE arguments; a directory is searched recursively for packets and tarballs."""
    files: list[Path] = []
    tarballs: list[Path] = []
    skipped: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path, explicit: bool) -> None:
        rp = p.resolve()
        if rp in seen:
            return
        seen.add(rp)
        if _is_tar(p):
            tarballs.append(p)
        elif explicit or _is_packet(p):
            files.append(p)
        else:
            skipped.append(p)

    for src in sources:
        p = Path(src)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        add(Path(root) / name, explicit=False)
        elif p.is_file():
            add(p, explicit=True)
        elif glob.has_magic(src):
            matches = sorted(glob.glob(src, recursive=True))
            if not matches:
                raise SourceError(f"no files match {src!r}")
            for m in matches:
                mp = Path(m)
                if mp.is_file():
                    add(mp, explicit=_is_packet(mp) or _is_tar(mp))
        else:
            raise SourceError(f"no such file or directory: {src}")
    return Inputs(files, tarballs, skipped)


def chunks(inputs: Inputs, max_bytes: int, max_packets: int) -> Iterator[Chunk]:
    """Deterministic chunks: plain files first (in order), then each tarball's members as streamed."""
    index = 0
    cur = Chunk(index)

    def full() -> bool:
        return cur.nbytes >= max_bytes or len(cur.packets) >= max_packets

    for path in inputs.files:
        cur.packets.append(Packet(str(path)))
        cur.nbytes += path.stat().st_size
        if full():
            yield cur
            index += 1
            cur = Chunk(index)
    if cur.packets:
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
        with tarfile.open(path, mode="r|*") as tar:
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
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f"after member {name!r}" if name else "at its start"
        yield (str(path), name, f"tarball unreadable {where}: {type(exc).__name__}: {exc}", b"")
