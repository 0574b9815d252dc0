"""Read a YAML file that is user input (a workflow) within limits, noting the line of every field.

A 1 KB file of nested aliases stands for billions of nodes (an "alias bomb"), a few KB of brackets nest
deeper than recursive code survives, and a huge file takes minutes. So one streaming pass over the
parser's events checks the limits before anything is built: file size, nesting depth and the number of
nodes, where an alias counts as the nodes it repeats (and its depth as theirs). The same pass notes the
line of each mapping key and sequence item by its path of keys and indexes, without expanding aliases,
and refuses a key repeated in one mapping (YAML would keep the last one silently). Only a document within
limits is constructed, by PyYAML's safe constructor (no tags that run code; aliases stay shared objects).

Every problem is a :class:`YamlFileError` whose message starts ``FILE:LINE:`` where a line is known.
Limits come from :class:`YamlLimits` (defaults; ``AMPEL_DASK_WORKFLOW_MAX_BYTES``, ``..._NODES``,
``..._DEPTH`` override them).
"""

from __future__ import annotations

import gc
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.error import MarkedYAMLError
from yaml.events import AliasEvent, CollectionEndEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from yaml.reader import ReaderError

from ..tiers.base import shown

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it (~10x faster)
ENV_PREFIX = "AMPEL_DASK_WORKFLOW_MAX_"


class YamlFileError(ValueError):
    """A YAML file that is unreadable, malformed or over a limit; the message names the file and line."""


@dataclass(frozen=True)
class YamlLimits:
    """What a workflow file may cost. A real workflow is a few KB, 40 nodes deep at most; a generated one
    with 70,000 channels is ~8 MB and ~1.2 million nodes, and loads in linear time."""

    max_bytes: int = 10 * 2**20  # AMPEL_DASK_WORKFLOW_MAX_BYTES
    max_nodes: int = 2_000_000  # AMPEL_DASK_WORKFLOW_MAX_NODES: scalars and collections, aliases expanded
    max_depth: int = 64  # AMPEL_DASK_WORKFLOW_MAX_DEPTH: collections inside collections, aliases expanded

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> YamlLimits:
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            var = ENV_PREFIX + f.name.removeprefix("max_").upper()
            if env.get(var):
                try:
                    values[f.name] = int(env[var])
                except ValueError:
                    values[f.name] = 0
                if values[f.name] < 1:
                    raise YamlFileError(f"{var}={shown(env[var])}: a positive whole number is expected")
        return cls(**values)

    def setting(self, name: str) -> str:
        """``64 (AMPEL_DASK_WORKFLOW_MAX_DEPTH)``: the limit and where to change it, for a refusal."""
        return f"{getattr(self, 'max_' + name):,} ({ENV_PREFIX}{name.upper()})"


def read_yaml(path: str | Path, limits: YamlLimits | None = None) -> tuple[Any, dict[tuple, int]]:
    """The document in ``path`` and the line (1-based) of each field by its path of keys and indexes."""
    limits = limits or YamlLimits.from_env()
    text = _read_text(Path(path), limits)
    with gc_paused():  # millions of new objects and none of them garbage: the collector only costs time
        lines = _scan(text, str(path), limits)
        data = _construct(text, str(path))
    return data, lines


def _read_text(path: Path, limits: YamlLimits) -> str:
    """The file's text: a regular file (a FIFO or device is not read: it may never end), within the size
    limit (checked before reading), UTF-8."""
    try:  # O_NONBLOCK: opening a FIFO does not wait for a writer; it is then refused as not a regular file
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise YamlFileError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise YamlFileError(f"{path}: not a regular file")
        if st.st_size > limits.max_bytes:
            raise YamlFileError(f"{path}: {st.st_size:,} bytes, more than the {limits.setting('bytes')} a workflow file may have")
        raw = fh.read(limits.max_bytes + 1)
    if len(raw) > limits.max_bytes:  # grew since fstat
        raise YamlFileError(f"{path}: more than the {limits.setting('bytes')} bytes a workflow file may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise YamlFileError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): a workflow is a YAML text file") from None


class _Open:
    """A collection being read: its path (None inside a complex key), its depth, where its count started."""

    __slots__ = ("path", "is_map", "expect_key", "key", "index", "level", "deepest", "start", "anchor")

    def __init__(self, path: tuple | None, is_map: bool, level: int, start: int, anchor: str | None):
        self.path, self.is_map, self.level, self.deepest, self.start, self.anchor = path, is_map, level, level, start, anchor
        self.expect_key, self.key, self.index = True, None, 0


def _scan(text: str, where: str, limits: YamlLimits) -> dict[tuple, int]:
    """One pass over the parser's events: limits checked as it goes (a bomb is refused at its first
    node over the limit, nothing built), lines noted."""
    lines: dict[tuple, int] = {}
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (nodes it stands for, its collection depth)
    stack: list[_Open] = []
    nodes = 0

    def refuse(line: int, reason: str) -> YamlFileError:
        return YamlFileError(f"{where}:{line}: {reason}")

    try:
        for ev in yaml.parse(text, Loader=_LOADER):
            if isinstance(ev, CollectionEndEvent):
                done = stack.pop()
                if done.anchor is not None:
                    anchors[done.anchor] = (nodes - done.start, done.deepest - done.level + 1)
                if stack:
                    stack[-1].deepest = max(stack[-1].deepest, done.deepest)
                continue
            if not isinstance(ev, (ScalarEvent, AliasEvent, SequenceStartEvent, MappingStartEvent)):
                continue  # stream and document start/end
            line = ev.start_mark.line + 1
            path = _place(stack, ev, line, lines, where)
            if isinstance(ev, AliasEvent):
                if ev.anchor not in anchors:
                    inside = any(o.anchor == ev.anchor for o in stack)
                    raise refuse(line, f"alias *{ev.anchor} " + ("is inside the node it repeats (a cycle)" if inside else "repeats no anchor defined before it"))
                size, depth = anchors[ev.anchor]
                nodes += size
                if stack:
                    stack[-1].deepest = max(stack[-1].deepest, len(stack) + depth)
                    if stack[-1].deepest > limits.max_depth:
                        raise refuse(line, f"alias *{ev.anchor} nests more than {limits.setting('depth')} levels deep")
            elif isinstance(ev, ScalarEvent):
                nodes += 1
                if ev.anchor is not None:
                    anchors[ev.anchor] = (1, 0)
            else:
                if len(stack) >= limits.max_depth:
                    raise refuse(line, f"nested more than {limits.setting('depth')} levels deep")
                stack.append(_Open(path, isinstance(ev, MappingStartEvent), len(stack) + 1, nodes, ev.anchor))
                nodes += 1
            if nodes > limits.max_nodes:
                raise refuse(line, f"more than {limits.setting('nodes')} YAML nodes, counting the nodes each alias repeats (an alias bomb?)")
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, where) from None
    return lines


def _place(stack: list[_Open], ev: Any, line: int, lines: dict[tuple, int], where: str) -> tuple | None:
    """The path of the node ``ev`` starts (None for a mapping key, or inside one), noting lines: a
    mapping value's line is its key's, a sequence item's its own."""
    if not stack:
        lines[()] = line
        return ()
    top = stack[-1]
    if top.path is None:
        return None
    if top.is_map:
        if top.expect_key:
            top.expect_key = False
            top.key = ev.value if isinstance(ev, ScalarEvent) else None
            if top.key is not None:
                path = top.path + (top.key,)
                if path in lines:
                    raise YamlFileError(f"{where}:{line}: key {shown(top.key)} appears twice in one mapping (first on line {lines[path]})")
                lines[path] = line
            return None
        top.expect_key = True
        return None if top.key is None else top.path + (top.key,)
    path = top.path + (top.index,)
    top.index += 1
    lines[path] = line
    return path


class _Loader(_LOADER):  # type: ignore[misc,valid-type]
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A scalar that does not convert (a 5,000-digit integer, a date 2001-13-45) is a YAML error at
        its line, not a bare ValueError."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise ConstructorError(None, None, f"{shown(node.value) if isinstance(node, yaml.ScalarNode) else 'value'}: {exc}", node.start_mark) from None


def _construct(text: str, where: str) -> Any:
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, where) from None
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.YAMLError, text: str, where: str) -> YamlFileError:
    """``FILE:LINE: not valid YAML: <context>: <problem>`` on one line."""
    if isinstance(exc, ReaderError):  # a character YAML does not allow (control characters, NUL)
        char = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
        at = text.find(char)
        line = text.count("\n", 0, at) + 1 if at >= 0 else None
        reason = f"character {shown(char)} is not allowed in YAML"
    elif isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = ": ".join(str(p) for p in (exc.context, exc.problem) if p)
    else:
        line, reason = None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return YamlFileError(f"{where}:{line}: not valid YAML: {reason}" if line else f"{where}: not valid YAML: {reason}")


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building a million objects that all stay alive (a large
    document, its validated model) otherwise spends most of its time in collections (10x measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


__all__ = ["YamlFileError", "YamlLimits", "gc_paused", "read_yaml"]
