"""Writer schemas that must never reach a decoder, and the least bytes a record of the others takes.

A container names its own writer schema, so a hostile or broken file chooses what the decoders run.
fastavro recurses in C: a record that contains itself overflows its stack on a few kilobytes of data
(exit 139, the whole process), whether or not a union with null lets the recursion end; an array of
items that take no bytes turns a forged count into a loop that reads nothing. Alert schemas have none
of these, so such schemas are refused with a reason before a record is decoded. The least encoded size
of a record bounds how many records a block of N bytes can hold (a forged count is checked with it).
"""

from __future__ import annotations

PRIMITIVE_BYTES = {"null": 0, "boolean": 1, "int": 1, "long": 1, "float": 4, "double": 8, "bytes": 1, "string": 1}
MAX_DEPTH = 64  # nested types on one path; alert schemas use about five


class Refused(ValueError):
    """A writer schema no decoder may run (the message says why)."""


def min_record_bytes(parsed) -> int:
    """The least bytes one record of this parsed (fastavro) writer schema takes; raises :class:`Refused`
    if the schema is not a record, is recursive, nests too deep, or lets a count loop without reading."""
    if not (isinstance(parsed, dict) and parsed.get("type") in ("record", "error")):
        top = parsed.get("type") if isinstance(parsed, dict) else parsed
        raise Refused(f"its top level is {_show(top)}, not a record")
    named = parsed.get("__named_schemas") or {}
    sizes: dict[str, int] = {}  # named types already sized

    def size(t, path: tuple[str, ...], depth: int = 0) -> int:
        """Least bytes of type ``t``; ``path``: the records being walked (a name met again is recursion)."""
        if depth > MAX_DEPTH:
            raise Refused(f"it nests more than {MAX_DEPTH} types deep (at {'.'.join(path[-3:])})")
        if isinstance(t, str):
            if t in PRIMITIVE_BYTES:
                return PRIMITIVE_BYTES[t]
            if t in path:
                raise Refused(_recursion(t, named, path))
            if t not in sizes:
                if t not in named:
                    raise Refused(f"it refers to an undefined type {_show(t)}")
                sizes[t] = size(named[t], path, depth)
            return sizes[t]
        if isinstance(t, list):  # a union: its branch index, then the smallest branch
            return 1 + min((size(b, path, depth + 1) for b in t), default=0)
        if not isinstance(t, dict):
            raise Refused(f"it holds a type that is neither a name, a union nor an object: {_show(t)}")
        kind = t.get("type")
        name = t.get("name")
        if kind in ("record", "error"):
            if name in path:
                raise Refused(_recursion(name, named, path))
            n = sum(size(f.get("type"), (*path, name), depth + 1) for f in t.get("fields", []))
            sizes[name] = n
            return n
        if kind == "enum":
            return 1
        if kind == "fixed":
            return int(t.get("size", 0))
        if kind in ("array", "map"):
            inner = t.get("items") if kind == "array" else t.get("values")
            if size(inner, path, depth + 1) == 0 and kind == "array":
                raise Refused(f"an array of items that take no bytes ({_show(inner)}): a forged count would loop without reading")
            return 1  # an empty array or map is one byte (the end of its blocks)
        return size(kind, path, depth)  # {"type": "long", "logicalType": ...} and the like

    try:
        n = size(parsed, ())
    except RecursionError as exc:
        raise Refused("it nests too deep to walk") from exc
    if n == 0:
        raise Refused("its records can take no bytes, so no block's record count can be checked against its size")
    return n


def _recursion(name: str, named: dict, path: tuple[str, ...]) -> str:
    """Why a recursive type is refused: never finite, or finite but as deep as the data says."""
    if not _finite(name, named):
        return f"record {_show(name)} requires itself: no value of it can end (a required field refers back to it)"
    return (f"recursive type {_show(name)} (via {' -> '.join(path[path.index(name):] + (name,))}): alert schemas are never "
            "recursive, and the decoder's recursion would go as deep as the data says (a few kilobytes crash it)")  # fmt: skip


def _finite(name: str, named: dict) -> bool:
    """Has this named type any finite value? (least fixed point: records need all fields, unions one branch)"""
    finite: set[str] = set()

    def ok(t) -> bool:
        if isinstance(t, str):
            return t in PRIMITIVE_BYTES or t in finite
        if isinstance(t, list):
            return any(ok(b) for b in t)
        if not isinstance(t, dict):
            return False
        kind = t.get("type")
        if kind in ("record", "error"):
            return t.get("name") in finite
        if kind in ("array", "map", "enum", "fixed"):
            return True  # an empty array or map ends
        return ok(kind)

    changed = True
    while changed:
        changed = False
        for n, t in named.items():
            if n not in finite and isinstance(t, dict) and (t.get("type") not in ("record", "error") or all(ok(f.get("type")) for f in t.get("fields", []))):
                finite.add(n)
                changed = True
    return name in finite


def _show(t) -> str:
    text = repr(t) if not isinstance(t, str) else f"'{t}'"
    return text if len(text) <= 60 else text[:57] + "..."
