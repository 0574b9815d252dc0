"""What a run does when a unit raises: nothing silent.

A T0 filter, T1 unit or T3 unit that raises fails its task with :class:`UnitFailed` (unit, channels, how
many alerts or objects, the error), which Dask carries to the driver: the run goes on with the work
that does not depend on it (a work unit's packet channels share one T2 stage, so a filter that raises
holds back the other channels there too: their alerts count as ``not_processed``), writes its manifest
with ``status: failed`` and raises :class:`RunFailed` with one line naming the first failure (the CLI
exits 1).

A T2 unit that raises fails the states it was given, not its task: with ``on_error: fail`` (the
default) they are counted, nothing of them is stored, the channel's T3 does not run and the run fails;
with ``on_error: record`` the failing states are isolated by bisection (:func:`attempt`) and stored with
their error apart from the results (``write_t2_failures``), so they are counted, shown by ``explain``,
seen by T3 as ``<Unit>__code = -1`` (with a ``<Unit>__failure`` text), and retried by the next run; the run
succeeds. A unit that reads another's results does not run on the states where that one failed: they
fail for it too, under the policy of the unit that failed. A ``T2PointUnit`` fails (or records) the
datapoints it was given the same way (``write_t2_point_failures``; counted in ``datapoints``).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NOUN = {"T0": "alerts", "T1": "alerts", "T2": "states", "T3": "objects"}
KIND = {"T0": "T0 filter", "T1": "T1 unit", "T2": "T2 unit", "T3": "T3 unit"}
MAX_ERROR = 500  # characters of an error message kept in summaries and stored failures
BISECT_CALLS = 16  # calls per halving of the batch that isolating failed states may spend (see attempt)


def noun(f: dict) -> str:
    """What a failure counts: alerts, states, objects, or (a T2PointUnit's) datapoints."""
    return "datapoints" if "datapoints" in f else NOUN[f["tier"]]


def error_text(exc: BaseException) -> str:
    """``Type: message`` on one line (a multi-line message is joined), cut at :data:`MAX_ERROR`."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


def debug_trace() -> str | None:
    """The traceback being handled, when ``AMPEL_DASK_DEBUG`` asks for tracebacks (else None)."""
    return traceback.format_exc() if os.environ.get("AMPEL_DASK_DEBUG") else None


class UnitFailed(Exception):
    """A unit raised inside a task. ``where``: the task's key (one failure seen through several
    dependent tasks is counted once); ``trace``: the unit's traceback under ``AMPEL_DASK_DEBUG``."""

    def __init__(self, tier: str, unit: str, channels: list[str], count: int, error: str, where: str = "", trace: str | None = None):
        self.tier, self.unit, self.channels, self.count, self.error, self.where = tier, unit, list(channels), int(count), error, where
        self.trace = trace
        super().__init__(reason(self.as_dict()))

    @classmethod
    def of(cls, exc: Exception, tier: str, unit: str, channels: list[str], count: int, where: str = "") -> UnitFailed:
        """From the exception being handled (call inside ``except``)."""
        return cls(tier, unit, channels, count, error_text(exc), where, debug_trace())

    def __reduce__(self):  # pickled by its fields: Dask carries it from the worker to the driver
        return (UnitFailed, (self.tier, self.unit, self.channels, self.count, self.error, self.where, self.trace))

    def as_dict(self) -> dict:
        out = {"tier": self.tier, "unit": self.unit, "channels": self.channels, NOUN[self.tier]: self.count, "policy": "fail",
               "recorded": 0, "error": self.error}  # fmt: skip
        return out | ({"traceback": self.trace} if self.trace else {})


class RunFailed(Exception):
    """The run's one-line reason; ``summary`` is what the run did (written to its manifest too)."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def reason(f: dict) -> str:
    """``T2 unit T2BazinFit (channel DECENT) failed on 1,234 states: ValueError: ...``"""
    what = noun(f)
    chans = f["channels"]
    where = f" (channel{'s' if len(chans) > 1 else ''} {', '.join(chans)})" if chans else ""
    return f"{KIND[f['tier']]} {f['unit']}{where} failed on {f[what]:,} {what}: {f['error']}"


def run_reason(failures: list[dict]) -> str | None:
    """The line a failed run ends with: its first unrecorded failure (a unit's own before one caused by
    a dependency), or None when every failure was recorded."""
    open_ = [f for f in failures if f["policy"] == "fail"]
    if not open_:
        return None
    first = min(open_, key=lambda f: f.get("cause") is not None)
    more = sum(1 for f in open_ if f.get("cause") is None) - 1  # not the failures that follow from it
    return reason(first) + (f" (and {more} more failure{'s' if more > 1 else ''}: see the summary)" if more else "")


def merge(failures: list[dict]) -> list[dict]:
    """Failures of one unit (same tier, policy and cause) over many tasks as one: counts added,
    channels joined, the first error kept (tasks in graph order, so a run and its re-run say the same)."""
    out: dict[tuple, dict] = {}
    for f in failures:
        k = (f["tier"], f["unit"], f.get("policy"), f.get("cause"))
        if k not in out:
            out[k] = {**f, "channels": list(f["channels"])}
            continue
        m = out[k]
        m[noun(f)] += f[noun(f)]
        m["recorded"] += f["recorded"]
        m["channels"] += [c for c in f["channels"] if c not in m["channels"]]
    return list(out.values())


def t3_blocked(channel: str, upstream: tuple) -> str | None:
    """Why a channel's T3 must not run: an unrecorded T2 failure among its states (``upstream``: what
    the tasks T3 waits for returned; T2 stages return their counts with ``failures``)."""
    for res in upstream:
        if isinstance(res, dict):
            for f in res.get("failures", []):
                if channel in f["channels"] and f["policy"] == "fail":
                    return reason(f)
    return None


def unit_output(out: pa.Table | list[dict], n: int, unit: str, noun: str = "states") -> pa.Table:
    """A T2 unit's output as a table of ``n`` rows, refusing what would pass for a recorded failure: a
    ``failure`` column or codes below 0 (the framework's, see ``io.stores.UNIT_FAILED``)."""
    from ..io.stores import FAILURE, UNIT_FAILED

    table = out if isinstance(out, pa.Table) else pa.Table.from_pylist(out)
    if table.num_rows != n:
        raise ValueError(f"{unit} returned {table.num_rows} rows for {n} {noun}")
    if FAILURE in table.column_names:
        raise ValueError(f"{unit} returned a column {FAILURE!r}: that name is the framework's (a recorded failure's error)")
    low = pc.min(table.column("code")).as_py() if "code" in table.column_names and n else None
    if low is not None and low < 0:
        raise ValueError(f"{unit} returned negative codes: codes below 0 are the framework's ({UNIT_FAILED}: the unit raised)")
    return table


@dataclass
class Blocked:
    """A selection T3 must not react to, and why."""

    reason: str


def attempt(fn: Callable[[np.ndarray], pa.Table], n: int, isolate: bool, piece: int | None = None,
            ) -> tuple[list[tuple[np.ndarray, pa.Table]], list[tuple[np.ndarray, str, str | None]]]:  # fmt: skip
    """``fn`` on rows ``0..n-1``: (rows, result) pieces that worked and (rows, error, traceback under
    ``AMPEL_DASK_DEBUG``) pieces that raised. ``piece``: at most so many rows per call, in order (a
    unit's working memory grows with its batch; None = all at once).

    With ``isolate`` a failing piece is split in halves, depth first, until its failing states stand
    alone: one bad state among 10,000 costs ~28 more calls on ever smaller pieces (~2x the rows of one
    call in all). A budget of ``1 + 16 log2(n)`` calls bounds the cost when many or all states fail (a
    broken unit): pieces still failing when it is spent are reported whole, each state with the
    piece's error (they are retried by the next run like any other failure)."""
    ok: list[tuple[np.ndarray, pa.Table]] = []
    failed: list[tuple[np.ndarray, str, str | None]] = []
    stack = np.array_split(np.arange(n), max(1, -(-n // piece)) if piece else 1)[::-1]  # popped first to last
    budget = len(stack) + BISECT_CALLS * int(np.ceil(np.log2(max(n, 2))))
    calls = len(stack)
    while stack:
        rows = stack.pop()
        try:
            ok.append((rows, fn(rows)))
        except Exception as exc:  # the unit's own failure: reported, isolated, or recorded (never silent)
            if isolate and len(rows) > 1 and calls + 2 <= budget:
                calls += 2
                half = len(rows) // 2
                stack += [rows[half:], rows[:half]]
            else:
                failed.append((rows, error_text(exc), debug_trace()))
    return ok, failed
