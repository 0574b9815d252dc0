"""Readable names and physical units of T2 result columns, for reports and exports.

A T2 unit declares them in its ``column_labels`` (:class:`~ampel_dask.tiers.base.T2StateUnit`):
``{"peak_mag": ("Peak magnitude", "mag")}``. A key may hold placeholders for parts of the name, so
one entry covers every band or catalog prefix: ``"n_{band}": ("Points in {band}", "")``; ``{band}``
stands for one word (no underscore), any other placeholder for any text, and the label may repeat
them. The first entry that matches wins (exact names before patterns); a column without one gets its
name made readable (:func:`prettify`) and no unit.

The selection a T3 unit receives carries each T2 column's label and unit as Arrow field metadata
(:func:`with_label`), so a report shows the label of the configuration that computed it (a feature in
flux has nJy where the same feature in magnitudes has mag).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

import pyarrow as pa

LABEL, UNIT = b"label", b"unit"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@lru_cache(maxsize=512)
def _pattern(key: str) -> re.Pattern | None:
    """The regular expression of a key with placeholders (None for a plain name)."""
    if not _PLACEHOLDER.search(key):
        return None
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(key):
        out.append(re.escape(key[pos : m.start()]))
        name = m.group(1)
        out.append(f"(?P<{name}>[^_]+)" if name == "band" else f"(?P<{name}>.+)")
        pos = m.end()
    out.append(re.escape(key[pos:]))
    return re.compile("".join(out) + r"\Z")


def prettify(column: str) -> str:
    """A column name as words: ``peak_mag`` -> ``Peak mag``, ``p_SN`` -> ``P SN`` (acronyms kept)."""
    words = [w for w in column.split("_") if w]
    if not words:
        return column
    return " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])


def column_label(labels: Mapping[str, tuple[str, str]], column: str) -> tuple[str, str]:
    """(label, unit) of ``column`` from a unit's ``column_labels``, else its prettified name and no unit."""
    if column in labels:
        return labels[column]
    if column == "code":
        return "Result code", ""
    for key, (label, unit) in labels.items():
        pat = _pattern(key)
        m = pat.match(column) if pat is not None else None
        if m:
            parts = {k: prettify(v) if k != "band" else v for k, v in m.groupdict().items()}
            return label.format(**parts), unit.format(**parts)
    return prettify(column), ""


def with_label(field: pa.Field, label: str, unit: str) -> pa.Field:
    """``field`` carrying its label and unit (Arrow field metadata; Parquet keeps it)."""
    return field.with_metadata({**(field.metadata or {}), LABEL: label.encode(), UNIT: unit.encode()})


def label_of(field: pa.Field) -> tuple[str, str] | None:
    """The (label, unit) a field carries, or None."""
    md = field.metadata or {}
    if LABEL not in md:
        return None
    return md[LABEL].decode(), md.get(UNIT, b"").decode()


def heading(label: str, unit: str) -> str:
    """``Peak magnitude [mag]``; the label alone without a unit."""
    return f"{label} [{unit}]" if unit else label


__all__ = ["column_label", "prettify", "with_label", "label_of", "heading", "LABEL", "UNIT"]
