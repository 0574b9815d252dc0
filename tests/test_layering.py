"""The package's floors stay apart: cli -> graph -> tiers -> io, keys at the ground.

Read from the source (every import statement, top-level or inside a function, resolved to its module),
not from what happens to be imported at run time, so an import added anywhere is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ampel_dask"

# floor -> what it must never import (package floors by prefix, third-party packages by top-level name)
FORBIDDEN = {
    "ampel_dask.keys": ["ampel_dask.io", "ampel_dask.tiers", "ampel_dask.graph", "ampel_dask.cli", "distributed", "tqdm"],
    "ampel_dask.io": ["ampel_dask.tiers", "ampel_dask.graph", "ampel_dask.cli", "distributed", "tqdm", "dask"],
    "ampel_dask.tiers": ["ampel_dask.graph", "ampel_dask.cli", "distributed"],  # (dask-based libraries, e.g. lsdb, are fine)
    "ampel_dask.graph": ["ampel_dask.cli"],
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from . import x`` / ``from .. import tiers``: the names may be modules themselves
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def violations(floor: str, forbidden: list[str]) -> list[str]:
    root = PKG.parent / Path(*floor.split("."))
    files = [root.with_suffix(".py")] if root.with_suffix(".py").exists() else sorted(root.rglob("*.py"))
    found = []
    for f in files:
        for line, target in imports_of(f):
            if any(target == bad or target.startswith(bad + ".") for bad in forbidden):
                found.append(f"{f.relative_to(PKG.parent)}:{line} imports {target}")
    return found


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_floor_imports_only_downward(floor):
    assert violations(floor, FORBIDDEN[floor]) == []


def test_the_rule_bites():
    """The walker sees relative, absolute and function-level imports (a planted file of each kind)."""
    planted = PKG / "io" / "_planted_for_layering_test.py"
    planted.write_text("from ..graph import runner\n\ndef f():\n    import distributed\n    from ampel_dask.tiers.base import Unit\n")
    try:
        found = violations("ampel_dask.io", FORBIDDEN["ampel_dask.io"])
    finally:
        planted.unlink()
    assert sorted(x.split(" imports ")[1] for x in found if "_planted" in x) == [
        "ampel_dask.graph", "ampel_dask.graph.runner", "ampel_dask.tiers.base", "ampel_dask.tiers.base.Unit", "distributed"]  # fmt: skip
