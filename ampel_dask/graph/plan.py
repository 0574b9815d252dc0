"""From a validated workflow to channel plans: units instantiated (their configs validated), T2
dependencies ordered, and the content-hash keys that identify each step's work."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import pyarrow as pa

from ..keys import key_of
from ..tiers.base import T0Filter, T1Unit, T2PointUnit, T2StateUnit, T3Unit, UnitConfigError
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
    t2: list[T2StateUnit | T2PointUnit]  # dependencies first
    t3: list[T3Unit]
    on_error: dict[str, str] = field(default_factory=dict)  # T2 unit key -> "fail" | "record"
    t0_key: str = ""
    t1_key: str = ""
    columns: set[str] | None = field(default=None)

    @property
    def history(self) -> bool:
        return self.t1.needs_history


def _make(ref: UnitRef, loc: tuple, kind: type | tuple[type, ...], wf: Workflow | None = None) -> object:
    """The unit ``ref`` names, made with its config; an error names the field at ``loc`` (and, for a
    workflow loaded from a file, the line of the field or of the config key at fault)."""
    name = _name(loc, wf)
    at = wf.where if wf is not None else (lambda _loc: "")
    try:
        cls = load(ref.unit)
    except UnknownUnit as exc:
        raise WorkflowError(f"{at(loc + ('unit',))}{name}: {exc}") from None
    if not issubclass(cls, kind):
        tier = (kind[0] if isinstance(kind, tuple) else kind).tier
        raise WorkflowError(f"{at(loc + ('unit',))}{name}: {ref.unit} is a {cls.tier} unit, expected {tier}")
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


def _with_dependencies(units: list[T2StateUnit | T2PointUnit]) -> list[T2StateUnit | T2PointUnit]:
    """Topological order: each unit after the units it reads; shared dependencies appear once."""
    out: dict[str, T2StateUnit | T2PointUnit] = {}

    def visit(u: T2StateUnit | T2PointUnit, stack: tuple[str, ...]) -> None:
        k = u.identity.key
        if k in stack:
            raise WorkflowError(f"T2 dependency cycle through {u.name()}")
        for d in u.dependencies() if isinstance(u, T2StateUnit) else []:
            if not isinstance(d, T2StateUnit):  # its results are per datapoint, not per state
                raise WorkflowError(f"{u.name()} depends on {d.name()}, which is not a T2 state unit")
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
    listed = [_make(r, (*loc, "t2", j), (T2StateUnit, T2PointUnit), wf) for j, r in enumerate(spec.t2)]
    t2 = _with_dependencies(listed)
    t3 = [_make(r, (*loc, "t3", j), T3Unit, wf) for j, r in enumerate(spec.t3)]
    own: dict[str, str] = {}
    for u, r in zip(listed, spec.t2):  # the same unit listed twice: "fail" wins
        own[u.identity.key] = "fail" if "fail" in (own.get(u.identity.key), r.on_error) else "record"  # type: ignore[attr-defined]
    on_error = _on_error(t2, own)
    plan = ChannelPlan(spec.name, list(spec.access), filters, t1, t2, t3, on_error)  # type: ignore[arg-type]
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


def _on_error(units: list[T2StateUnit | T2PointUnit], listed: dict[str, str]) -> dict[str, str]:
    """Each T2 unit's failure policy: its own where the channel lists it; a dependency the channel does
    not list takes the policy of the units that read it ("fail" if any of them fails)."""
    out = dict(listed)
    for u in reversed(units):  # dependents before their dependencies
        for d in u.dependencies() if isinstance(u, T2StateUnit) else []:
            k = d.identity.key
            if k not in listed:
                out[k] = "fail" if "fail" in (out.get(k), out[u.identity.key]) else "record"
    return out


def t2_units(plans: list[ChannelPlan]) -> list[T2StateUnit | T2PointUnit]:
    """The T2 units of these channels, each identity once, in order (dependencies first)."""
    seen: dict[str, T2StateUnit | T2PointUnit] = {}
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
            out[f"{u.name()}:{u.config_hash}"] = {"unit": u.name(), "version": str(u.version), "config_hash": u.config_hash, "tier": u.tier,
                                                  "libraries": dict(u.library_versions), "key": u.identity.key}  # fmt: skip
    return out
