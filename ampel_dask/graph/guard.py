"""A channel's ``max_pass_ratio``: a run in which a channel passes a larger fraction of the alerts than its
workflow allows stops before that channel's T3 reactions (TNS reports, marshal posts, notifications).

A filter gone wrong (a cut inverted, a column missing in a new schema) would otherwise send thousands of
objects to TNS or a marshal. The ratio is over the alerts the channel may see (its data rights: alerts of
another survey or program in the same run do not dilute it). The guarded channels' T3 is compiled into a graph of its own
(``CompiledRun.held``); once the main graph is done the T0 counts of each guarded channel are known (the
markers of its work units, this run's and the ones it reused), and the held graph runs only if every
guarded channel is within its limit. Else nothing of it runs: the states and T2 results are stored, the
manifest says why (``stopped``), and the run ends with :class:`PassRatioExceeded` (the CLI: exit 1 and the
reason on one line). A re-run with a corrected limit runs only the held T3.
"""

from __future__ import annotations

from ..io.stores import ResultStore
from .compile import CompiledRun
from .workflow import Workflow


class PassRatioExceeded(RuntimeError):
    """A guarded channel passed more than its ``max_pass_ratio``: its T3 did not run (``summary``: the run's)."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


def limits(wf: Workflow) -> dict[str, float]:
    """Channel -> max_pass_ratio, for the channels that set one."""
    return {c.name: c.max_pass_ratio for c in wf.channels if c.max_pass_ratio is not None}


def pass_counts(store: ResultStore, run: CompiledRun, channel: str) -> tuple[int, int]:
    """(passed, alerts it may see) of a channel over the run's work units, from their T0 counts: alerts
    outside its data rights (another survey, a program it may not read) are not in its ratio."""
    passed = alerts = 0
    for name in run.count_names.get(channel, []):
        info = store.task_info(name) or {}
        passed += info.get("passed", 0)
        alerts += info.get("passed", 0) + info.get("rejected", 0) - info.get("reasons", {}).get("access", 0)
    return passed, alerts


def over_limit(store: ResultStore, run: CompiledRun, wf: Workflow) -> str | None:
    """Why the held T3 must not run (one line), or None when every guarded channel is within its limit."""
    units = {c.name: ", ".join(u.unit for u in c.t3) or "none" for c in wf.channels}
    reasons = []
    for channel, limit in limits(wf).items():
        passed, alerts = pass_counts(store, run, channel)
        if alerts and passed / alerts > limit:
            reasons.append(f"channel {channel} passed {passed} of the {alerts} alerts it sees ({passed / alerts:.2%}), more than its max_pass_ratio "
                           f"{limit:.2%}: its T3 reactions ({units[channel]}) were not run")  # fmt: skip
    return "; ".join(reasons) or None


__all__ = ["PassRatioExceeded", "limits", "over_limit", "pass_counts"]
