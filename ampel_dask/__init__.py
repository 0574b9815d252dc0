"""ampel-dask: columnar, content-addressed analysis of astronomical alert streams on Dask.

The Python API (``import ampel_dask as ad``): :func:`ingest`, :func:`run`, :func:`open_archive`,
:func:`open_store`, :func:`backtest` (see :mod:`ampel_dask.api`); units are used directly on frames, e.g.
``from ampel_dask.units import DecentFilter``. Loaded on first use, so ``import ampel_dask`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("ingest", "run", "backtest", "open_archive", "open_store", "Run", "ArchiveView", "Store")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ampel_dask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
