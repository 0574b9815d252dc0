"""Where packets come from: files, directories (recursive), globs and nightly tarballs, cut into chunks.

Chunks are deterministic (input order and fixed size limits, never the number of workers), so the same
input always yields the same partitions and content hashes. Plain files are read by the worker that
decodes them; tarball members are streamed by the driver (a gzip stream cannot be split) and shipped.

Only regular files are read: a FIFO never ends (or never starts), /dev/zero never ends, and a symlink out
of the given sources would copy a file nobody named into the archive's quarantine. Such entries are
skipped with the reason (``Inputs.refused``); links out of the sources are followed only when asked.
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from . import parquet_alerts
from .gzip_stream import GzipStream
from .limits import Limits, TooLarge, file_kind, larger, open_regular, read_regular

PACKET_SUFFIXES = (".avro", ".avro.gz", ".avro.gzip")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
DEFAULT_LIMITS = Limits()
_INFLATE_READ = 1 << 20  # inflated bytes per read of a gzip tarball's stream
#: bytes per read of tarfile's stream buffer: it joins and slices its whole buffer on every read, so 1 MB
#: copied ~1 MB per header and per member (10,000 ZTF members: 2.7 s against 1.6 s at 64 KB, of which
#: inflating is 1.2 s); tarfile's 10 KB made skipping a 3 GiB member 300k reads (49k here)
_TAR_READ = 1 << 16


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

    def read(self, cap: int | None = None) -> bytes:
        """Its bytes; a file is read only if it is a regular file, and at most ``cap`` bytes of it
        (raises :class:`~.limits.TooLarge` past that, ``OSError`` for anything else)."""
        if self.data is not None:
            if cap is not None and len(self.data) > cap:
                raise TooLarge(larger(cap), self.data)
            return self.data
        return read_regular(self.source, cap if cap is not None else DEFAULT_LIMITS.file_bytes)


@dataclass
class Chunk:
    """A unit of decode work: packets, their input size, and any problems met while reading them."""

    index: int
    packets: list[Packet] = field(default_factory=list)
    nbytes: int = 0
    problems: list[tuple[str, str | None, str, bytes]] = field(default_factory=list)  # (source, member, reason, raw)
    slices: list[parquet_alerts.Slice] = field(default_factory=list)  # row groups of Parquet dumps

    def __reduce_ex__(self, protocol):
        """Tarball members pickled out of band (protocol 5, as Dask ships a chunk to a worker): in band,
        pickling copied every member's bytes into a growing stream, 0.6 s of the driver per 10,000 ZTF
        alerts (436 MB), against ~0.03 s as one buffer per member."""
        if protocol < 5 or not any(p.data is not None for p in self.packets):
            return super().__reduce_ex__(protocol)
        heads = [(p.source, p.member, None if p.data is None else pickle.PickleBuffer(p.data)) for p in self.packets]
        return _unpickle_chunk, (self.index, heads, self.nbytes, self.problems, self.slices)


@dataclass
class Inputs:
    files: list[Path]
    tarballs: list[Path]
    skipped: list[Path]
    problems: list[tuple[str, str | None, str, bytes]] = field(default_factory=list)  # e.g. unreadable folders
    refused: dict[str, str] = field(default_factory=dict)  # path -> why it is not read (not a regular file, a link out)
    dumps: list[parquet_alerts.Dump] = field(default_factory=list)
    skip_reasons: dict[Path, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(_size(p) for p in self.files + self.tarballs) + sum(b for d in self.dumps for _, b in d.row_groups)

    def skipped_files(self) -> list[str]:
        return [f"{p} ({self.skip_reasons[p]})" if p in self.skip_reasons else str(p) for p in self.skipped]


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:  # gone since it was listed: its reader reports it
        return 0


def _is_tar(p: Path) -> bool:
    return p.name.endswith(TAR_SUFFIXES)


def _is_packet(p: Path) -> bool:
    return p.name.endswith(PACKET_SUFFIXES)


def _is_parquet(p: Path) -> bool:
    return p.name.endswith(parquet_alerts.SUFFIXES)


def _inside(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def expand(sources: list[str], follow_links: bool = False) -> Inputs:
    """Resolve SOURCE arguments; a directory (named, or matched by a glob) is searched recursively for
    packets, tarballs and Parquet dumps. A directory that cannot be read is a problem of the ingest, never
    skipped silently; a Parquet file that is not an alert dump is skipped with its reason, or refused when
    named on its own. A path named as an argument is read where it points; inside folders and glob matches,
    only regular files are read, and symlinks only where they point inside the sources (the folders
    given or searched, and the folders of files given), unless ``follow_links``."""
    files: list[Path] = []
    tarballs: list[Path] = []
    skipped: list[Path] = []
    problems: list[tuple[str, str | None, str, bytes]] = []
    refused: dict[str, str] = {}
    parquet: list[tuple[Path, bool]] = []
    seen: set[str] = set()
    walked: set[str] = set()

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

    def linked(path: str) -> str | None:
        """A symlink's target if it may be followed, else None (with the reason recorded)."""
        target = os.path.realpath(path)
        if not follow_links and not _inside(target, roots):
            refused[path] = f"symlink to {target}, outside the sources (not followed; --follow-links reads it)"
            return None
        return target

    def entry(p: Path, real: str) -> None:
        """A file met in a folder or by a glob: read only if it is (or links inside to) a regular file."""
        path = str(p)
        try:
            mode = os.lstat(path).st_mode
        except OSError as exc:
            refused[path] = f"cannot be examined: {exc.strerror}"
            return
        link = ""
        if stat.S_ISLNK(mode):
            target = linked(path)
            if target is None:
                return
            try:
                mode = os.stat(path).st_mode
            except OSError:
                refused[path] = f"symlink to {target}, which does not exist"
                return
            real, link = target, f"symlink to {target}: "
        if stat.S_ISDIR(mode):
            walk(p)
        elif stat.S_ISREG(mode):
            add(p, real, explicit=False)
        else:
            refused[path] = f"{link}{file_kind(mode)}, not a regular file"

    def walk(top: Path) -> None:
        real_top = os.path.realpath(top)
        if real_top in walked:  # a folder reached twice (links): once is enough, and ends link cycles
            return
        walked.add(real_top)
        for root, dirs, names in os.walk(top, onerror=unreadable):
            real_root = os.path.realpath(root)  # once per folder, not per file: archives hold millions
            walked.add(real_root)
            kept = []
            for d in sorted(d for d in dirs if not d.startswith(".")):
                path = os.path.join(root, d)
                if not os.path.islink(path):
                    kept.append(d)
                elif (target := linked(path)) is not None and not _inside(target, roots):
                    walk(Path(path))  # a link out of the sources, followed as asked
                # a link to a folder inside the sources: that folder is searched anyway
            dirs[:] = kept
            for name in sorted(names):
                if not name.startswith("."):
                    entry(Path(root) / name, os.path.join(real_root, name))

    # what counts as inside the sources: every folder given or matched, and the folder of every file
    resolved: list[tuple[str, Path, list[Path] | None]] = []  # (argument, path, glob matches)
    roots: set[str] = set()
    for src in sources:
        p = Path(src)
        if os.path.exists(p):
            resolved.append((src, p, None))
            roots.add(os.path.realpath(p if p.is_dir() else p.parent))
        elif glob.has_magic(src):
            matches = [Path(m) for m in sorted(glob.glob(src, recursive=True))]
            if not matches:
                raise SourceError(f"no files match {src!r}")
            resolved.append((src, p, matches))
            roots.update(os.path.realpath(m if m.is_dir() else m.parent) for m in matches)
        else:
            raise SourceError(f"no such file or directory: {src}")

    for src, p, matches in resolved:
        if matches is None:  # named: read where it points
            mode = os.stat(p).st_mode
            if stat.S_ISDIR(mode):
                walk(p)
            elif stat.S_ISREG(mode):
                add(p, os.path.realpath(p), explicit=True)
            else:
                refused[src] = f"{file_kind(mode)}, not a regular file"
            continue
        for m in matches:  # as if met in a folder: a link must point inside the sources
            entry(m, os.path.realpath(m))
    inputs = Inputs(files, tarballs, skipped, problems, refused)
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


def chunks(inputs: Inputs, max_bytes: int, max_packets: int, limits: Limits = DEFAULT_LIMITS) -> Iterator[Chunk]:
    """Deterministic chunks: plain files first (in order), then each tarball's members as streamed."""
    index = 0
    cur = Chunk(index, problems=list(inputs.problems))

    def full() -> bool:
        return cur.nbytes >= max_bytes or len(cur.packets) >= max_packets

    for path in inputs.files:
        cur.packets.append(Packet(str(path)))
        cur.nbytes += _size(path)
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
        for item in _members(tar_path, limits):
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


def _unpickle_chunk(index: int, heads: list, nbytes: int, problems: list, slices: list) -> Chunk:
    packets = [Packet(source, member, None if data is None else bytes(data)) for source, member, data in heads]
    return Chunk(index, packets, nbytes, problems, slices)


def _members(path: Path, limits: Limits = DEFAULT_LIMITS) -> Iterator[Packet | tuple[str, str | None, str, bytes]]:
    """Stream a tarball without unpacking it to disk. Every member is yielded, or named by a problem
    record: one larger than ``limits.file_bytes`` is skipped unread; damage to the stream ends it with a
    problem that names the member it fell in (or the last member, when only the gzip check at the end
    fails: every member has been read by then, and each is archived where it decodes)."""
    name = None
    inside = False  # reading a member's data (else between members)
    members = 0
    gz: GzipStream | None = None
    try:
        with open_regular(path) as fh:
            gz = GzipStream(fh) if _starts_gzip(fh) else None  # known here even if the tar cannot open
            with _open_tar(fh, gz) as tar:
                for member in tar:
                    tar.members.clear()  # a stream needs no index of past members (a night has a million)
                    name, inside = member.name, True
                    if not member.isfile():
                        inside = False
                        continue
                    members += 1
                    if member.size > limits.file_bytes:  # skipped unread: the stream reads past it in pieces
                        yield (str(path), name, f"tar member {larger(limits.file_bytes)} ({member.size} bytes)", b"")
                        continue  # still inside it: damage met while skipping its data is in this member
                    mh = tar.extractfile(member)
                    data = mh.read() if mh is not None else b""
                    inside = False
                    if not data:
                        yield (str(path), name, "empty tar member (0 bytes)", b"")
                        continue
                    yield Packet(str(path), name, data)
            while gz is not None and gz.read(1 << 20):  # to the gzip trailer, whose CRC is checked there
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        cause = gz.problem if gz is not None and gz.problem else f"{type(exc).__name__}: {exc}"
        if inside:
            yield (str(path), name, f"tarball unreadable inside member {name!r}: {cause}", b"")
        else:
            where = f"after member {name!r}" if name else "at its start"
            yield (str(path), None, f"tarball unreadable {where}: {cause}", b"")
        return
    if gz is not None and gz.problem:  # the stream ended between members, or its check at the end failed
        after = f"after member {name!r}" if name else "before its first member"
        if gz.check_failed:
            yield (str(path), None, f"tarball corrupt: its gzip check failed at the end, {after} ({gz.problem}); "
                                    f"its {members} member(s) were read and are archived where they decode: any may hold damaged bytes", b"")  # fmt: skip
        else:
            yield (str(path), None, f"tarball unreadable {after}: {gz.problem}", b"")


def _starts_gzip(fh) -> bool:
    magic = fh.read(2)
    fh.seek(0)
    return magic == b"\x1f\x8b"


def _open_tar(fh, gz: GzipStream | None) -> tarfile.TarFile:
    """A tarball read as a stream; a gzip one through :class:`GzipStream` (zlib-ng: 1.9x zlib's speed),
    which ends where damage begins instead of raising from a read-ahead."""
    if gz is None:
        return tarfile.open(fileobj=fh, mode="r|*", bufsize=_TAR_READ)
    return tarfile.open(fileobj=io.BufferedReader(gz, _INFLATE_READ), mode="r|", bufsize=_TAR_READ)
