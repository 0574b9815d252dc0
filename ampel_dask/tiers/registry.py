"""Units are found by entry points (group ``ampel_dask.units``): built-ins register the same way a
science package does, e.g. in its pyproject.toml::

    [project.entry-points."ampel_dask.units"]
    MyFilter = "my_science.filters:MyFilter"
"""

from __future__ import annotations

import typing
from importlib.metadata import EntryPoint, entry_points

from .base import Unit, UnitConfig, shown

GROUP = "ampel_dask.units"


class UnknownUnit(KeyError):
    def __str__(self) -> str:
        name, known = self.args
        return f"unknown unit {shown(name)}; installed units: {', '.join(sorted(known)) or '(none)'}"


_INSTALLED: dict[str, EntryPoint] = {}


def installed(refresh: bool = False) -> dict[str, EntryPoint]:
    """Registered units by name. The scan of every installed distribution (~15 ms) is kept per process;
    a name it lacks triggers a fresh scan (a package installed since, e.g. in a notebook)."""
    if refresh or not _INSTALLED:
        _INSTALLED.clear()
        _INSTALLED.update({ep.name: ep for ep in entry_points(group=GROUP)})
    return dict(_INSTALLED)


def load(name: str) -> type[Unit]:
    eps = installed()
    if name not in eps:
        eps = installed(refresh=True)
    if name not in eps:
        raise UnknownUnit(name, list(eps))
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Unit)):
        raise TypeError(f"entry point {name!r} ({eps[name].value}) is not an ampel_dask unit class")
    return cls


def make(name: str, config: dict | None = None) -> Unit:
    """Instantiate a unit by registry name with a config dict (validated by the unit's model)."""
    return load(name)(config or {})


def _type_name(annotation: object) -> str:
    """Readable type of a config field: 'float', 'str | None', 'list[str]', "Literal['a', 'b']"."""
    import types

    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "None"
    if origin is None:
        return getattr(annotation, "__name__", str(annotation))
    args = typing.get_args(annotation)
    if origin is typing.Annotated:  # e.g. WorkflowVariable: the type, without its validator
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"


def describe(name: str, cls: type[Unit]) -> dict:
    config: type[UnitConfig] = cls.Config
    fields = {k: _type_name(f.annotation) for k, f in config.model_fields.items()}
    return {"name": name, "tier": cls.tier, "version": str(cls.version), "config": fields, "doc": (cls.__doc__ or "").strip().split("\n")[0]}


def catalogue() -> list[dict]:
    """Every installed unit, described (units that fail to import are listed with the error)."""
    out = []
    for name, ep in sorted(installed().items()):
        try:
            out.append(describe(name, load(name)))
        except Exception as exc:  # a broken third-party unit must not hide the others
            out.append({"name": name, "tier": "?", "version": "?", "config": {}, "error": f"{type(exc).__name__}: {exc}", "entry_point": ep.value})
    return out
