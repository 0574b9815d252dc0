"""From a validated workflow to channel plans: units instantiated (their configs validated), T2
dependencies ordered, and the content-hash keys that identify each step's work."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import pyarrow as pa

from ..keys import key_of
from ..tiers.base import T0Filter, T1Unit, T2StateUnit, T3Unit, UnitConfigError
from ..tiers.registry import UnknownUnit, load
from ..tiers.rights import PROGRAMIDS, RIGHTS_RULE
from .workflow import ChannelSpec, UnitRef, Workflow, WorkflowError, field_path

# what a unit's constructor raises for a file its config names that is missing, unreadable or not what it
# should be (a text file as a model: unpickling errors; a non-Parquet catalog: Arrow errors): usage errors
FILE_ERRORS = (OSError, ValueError, LookupError, EOFError, pickle.UnpicklingError, pa.ArrowException)


@dataclass
class ChannelPlan:
    name: str
    access: list[str]
    filters: list[T0Filter]
    t1: T1Unit
    t2: list[T2StateUnit]  # dependencies first
    t3: list[T3Unit]
    t0_key: str = ""
    t1_key: str = ""
    columns: set[str] | None = field(default=None)

    @property
    def history(self) -> bool:
        return self.t1.needs_history


def _make(ref: UnitRef, loc: tuple, kind: type, wf: Workflow | None = None) -> object:
    """The unit ``ref`` names, made with its config; an error names the field at ``loc`` (and, for a
    workflow loaded from a file, the line of the field or of the config key at fault)."""
    name = _name(loc, wf)
    at = wf.where if wf is not None else (lambda _loc: "")
    try:
        cls = load(ref.unit)
    except UnknownUnit as exc:
        raise WorkflowError(f"{at(loc + ('unit',))}{name}: {exc}") from None
    if not issubclass(cls, kind):
        raise WorkflowError(f"{at(loc + ('unit',))}{name}: {ref.unit} is a {cls.tier} unit, expected {kind.tier}")
    try:
        return cls(ref.config)
    except UnitConfigError as exc:
        lines = [f"{at(loc + ('config', *e['loc']))}{name}.config.{field_path(e['loc']) if e['loc'] else '(config)'}: {e['msg']}" for e in exc.errors]
        raise WorkflowError(f"invalid config for unit {ref.unit}:\n" + "\n".join(lines)) from None
    except FILE_ERRORS as exc:  # a model or catalog file missing, unreadable, not what it should be, or not matching the config
        raise WorkflowError(f"{at(loc + ('config',))}{name} ({ref.unit}): {type(exc).__name__}: {exc}") from None


def _name(loc: tuple, wf: Workflow | None) -> str:
    """``channels[0] (DECENT).filters[1]`` for ``("channels", 0, "filters", 1)``."""
    out = ""
    for i, p in enumerate(loc):
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
        if i == 1 and loc[0] == "channels" and wf is not None and p < len(wf.channels):
            out += f" ({wf.channels[p].name})"
    return out.lstrip(".")


def _with_dependencies(units: list[T2StateUnit]) -> list[T2StateUnit]:
    """Topological order: each unit after the units it reads; shared dependencies appear once."""
    out: dict[str, T2StateUnit] = {}

    def visit(u: T2StateUnit, stack: tuple[str, ...]) -> None:
        k = u.identity.key
        if k in stack:
            raise WorkflowError(f"T2 dependency cycle through {u.name()}")
        for d in u.dependencies():
            visit(d, stack + (k,))
        out.setdefault(k, u)

    for u in units:
        visit(u, ())
    return list(out.values())


# alert columns every step needs, besides what the filters ask for
CORE_COLUMNS = {"alert_id", "stock", "object_id", "survey", "night", "mjd", "ra", "dec", "band", "mag", "flux", "flux_err", "isdiffpos", "programid",
                PROGRAMIDS}  # fmt: skip  (PROGRAMIDS: which datapoints a channel's view must leave out, tiers/rights.py)


def plan_channel(spec: ChannelSpec, i: int, wf: Workflow | None = None) -> ChannelPlan:
    loc = ("channels", i)
    filters = [_make(r, (*loc, "filters", j), T0Filter, wf) for j, r in enumerate(spec.filters)]
    t1 = _make(spec.t1, (*loc, "t1"), T1Unit, wf)
    t2 = _with_dependencies([_make(r, (*loc, "t2", j), T2StateUnit, wf) for j, r in enumerate(spec.t2)])
    t3 = [_make(r, (*loc, "t3", j), T3Unit, wf) for j, r in enumerate(spec.t3)]
    plan = ChannelPlan(spec.name, list(spec.access), filters, t1, t2, t3)  # type: ignore[arg-type]
    plan.t0_key = key_of("t0", RIGHTS_RULE, sorted(spec.access), [f.identity.key for f in filters])
    plan.t1_key = key_of("t1", plan.t0_key, t1.identity.key)
    cols: set[str] | None = set(CORE_COLUMNS)
    for f in filters:
        if f.columns is None:
            cols = None
            break
        cols |= set(f.columns)
    plan.columns = cols
    return plan


def t2_units(plans: list[ChannelPlan]) -> list[T2StateUnit]:
    """The T2 units of these channels, each identity once, in order (dependencies first)."""
    seen: dict[str, T2StateUnit] = {}
    for p in plans:
        for u in p.t2:
            seen.setdefault(u.identity.key, u)
    return list(seen.values())


def plan_workflow(wf: Workflow) -> list[ChannelPlan]:
    return [plan_channel(c, i, wf) for i, c in enumerate(wf.channels)]


def check_columns(wf: Workflow, plans: list[ChannelPlan], surveys: set[str]) -> None:
    """Filters that need a column the selected surveys' alerts do not have fail here, naming the field
    and its line, rather than on the first batch of a started run."""
    from ..io.lsst import SCHEMA as LSST
    from ..io.ztf import SCHEMA as ZTF
    from ..tiers.columns import SUMMARY

    have = {"ztf": set(ZTF.names) | set(SUMMARY), "lsst": set(LSST.names) | set(SUMMARY)}
    problems = []
    for i, plan in enumerate(plans):
        for j, f in enumerate(plan.filters):
            for survey in sorted(s for s in surveys if s in have):
                missing = [c for c in f.required_columns if c not in have[survey]]
                if missing:
                    loc = ("channels", i, "filters", j)
                    problems.append(f"{wf.where(loc + ('config',))}{_name(loc, wf)}: {f.name()} uses column(s) {', '.join(missing)}, "
                                    f"which {survey} alerts do not have")  # fmt: skip
    if problems:
        hint = "select the surveys it applies to (archive.surveys) or use columns every selected survey has"
        raise WorkflowError("\n".join(problems) + f"\n({hint}; selected: {', '.join(sorted(surveys))})")


def unit_versions(plans: list[ChannelPlan]) -> dict[str, dict]:
    out = {}
    for p in plans:
        for u in [*p.filters, p.t1, *p.t2, *p.t3]:
            out[f"{u.name()}:{u.config_hash}"] = {"unit": u.name(), "version": str(u.version), "config_hash": u.config_hash, "tier": u.tier}
    return out
