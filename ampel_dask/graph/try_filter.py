"""Try a T0 filter over an archive (``ampel-dask filter``): per-alert decisions and counts, nothing stored."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from ..io.archive import Archive, Partition
from ..tiers.base import T0Filter


class FilterFailure(RuntimeError):
    """The filter raised on one archive part (``part``: its path; ``error``: what it raised)."""

    def __init__(self, part: str, error: Exception):
        super().__init__(f"{part}: {type(error).__name__}: {error}")
        self.part, self.error = part, error


@dataclass
class FilterResult:
    alerts: int = 0
    accepted: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # outcome ('accepted' or a reason) -> alerts


def try_filter(archive: str | Path, unit: T0Filter, surveys: list[str] | None = None, nights: list[int] | None = None,
               out_csv: str | Path | None = None) -> FilterResult:  # fmt: skip
    """The filter over every selected part, a part at a time; ``out_csv``: one row per alert (alert_id,
    stock, accepted, reason)."""
    arch = Archive(archive)
    if not arch.exists():
        raise FileNotFoundError(f"{archive} is not an ampel-dask archive (no _index.parquet)")
    result = FilterResult()
    fh = open(out_csv, "w", newline="") if out_csv else None
    writer = csv.writer(fh) if fh else None
    if writer:
        writer.writerow(["alert_id", "stock", "accepted", "reason"])
    try:
        for part in arch.partitions(surveys, nights):
            cols = None if unit.columns is None else sorted({"alert_id", "stock", *unit.columns})
            table = arch.read(part, columns=[c for c in cols if c in _part_columns(arch, part)] if cols else None)
            try:
                verdict = unit.verdict(table)
            except Exception as exc:
                raise FilterFailure(part.path, exc) from exc
            result.alerts += table.num_rows
            result.accepted += int(verdict.accepted.sum())
            for reason, n in verdict.counts().items():
                result.counts[reason] = result.counts.get(reason, 0) + n
            if writer:
                ids, stocks = table.column("alert_id").to_pylist(), table.column("stock").to_pylist()
                for a, s, ok, r in zip(ids, stocks, verdict.accepted.tolist(), verdict.reason_of()):
                    writer.writerow([a, s, int(ok), r or ""])
    finally:
        if fh:
            fh.close()
    return result


def _part_columns(arch: Archive, part: Partition) -> set[str]:
    return set(pq.read_schema(arch.root / part.path).names) | {"dps"}  # dps: in the part's history file
