"""Every installed unit by name, for notebooks: ``from ampel_dask.units import DecentFilter``.

Units are found through their entry points (group ``ampel_dask.units``), so a science package's own units
are here too; each is imported on first use.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from .tiers.registry import UnknownUnit, load

    try:
        return load(name)
    except UnknownUnit as exc:
        raise AttributeError(str(exc)) from None


def __dir__() -> list[str]:
    from .tiers.registry import catalogue

    return sorted(u["name"] for u in catalogue())
