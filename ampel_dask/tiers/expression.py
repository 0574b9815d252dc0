"""Filter expressions written in a workflow (``"rb > 0.5 and ndethist >= 2"``), compiled to array code.

The text is parsed once with Python's ``ast`` into a tree of numpy operations over whole columns; it is
never ``eval``-ed per alert. Allowed: column names, numbers, strings, True/False/None, comparisons
(chained too), ``and``/``or``/``not``, + - * / ** %, ``in [...]``, ``is None``/``is not None`` and the
functions abs, log10, sqrt, isnull, notnull. A comparison with a missing value is False (as in SQL).
Besides alert columns: ``ndet`` (detections in the history) and ``tspan`` (days between first and
last detection).
"""

from __future__ import annotations

import ast
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from .columns import detections

Array = np.ndarray
FUNCS: dict[str, Callable[[Array], Array]] = {
    "abs": np.abs,
    "log10": lambda x: np.log10(np.where(x > 0, x, np.nan)),
    "sqrt": lambda x: np.sqrt(np.where(x >= 0, x, np.nan)),
    "isnull": lambda x: _isnull(x),
    "notnull": lambda x: ~_isnull(x),
}
DERIVED = {"ndet", "tspan"}
_CMP = {ast.Gt: np.greater, ast.GtE: np.greater_equal, ast.Lt: np.less, ast.LtE: np.less_equal, ast.Eq: np.equal, ast.NotEq: np.not_equal}
_BIN = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.true_divide, ast.Pow: np.power, ast.Mod: np.mod}


class ExpressionError(ValueError):
    pass


def _isnull(x: Array) -> Array:
    if x.dtype.kind == "f":
        return np.isnan(x)
    if x.dtype == object:
        return np.array([v is None for v in x], dtype=bool)
    return np.zeros(len(x), dtype=bool)


def _column(table: pa.Table, name: str) -> Array:
    if name in DERIVED:
        ndet, first, last = detections(table)
        return ndet.astype(np.float64) if name == "ndet" else last - first
    col = table.column(name)
    if pa.types.is_boolean(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(col.to_pylist(), dtype=object)


class Expression:
    """A compiled expression: ``Expression(text)(table) -> bool mask``."""

    def __init__(self, text: str):
        self.text = text
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            raise ExpressionError(f"cannot parse filter expression {text!r}: {exc.msg}") from None
        self.columns = sorted({n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name) and n.id not in FUNCS})
        self._check(self.tree)

    def _check(self, node: ast.AST) -> None:
        allowed = (ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Compare, ast.BinOp,
                   ast.Name, ast.Constant, ast.Call, ast.List, ast.Tuple, ast.Load, ast.In, ast.NotIn, ast.Is, ast.IsNot,
                   *_CMP, *_BIN)  # fmt: skip
        for n in ast.walk(node):
            if not isinstance(n, allowed):
                raise ExpressionError(f"{type(n).__name__} is not allowed in a filter expression: {self.text!r}")
            if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in FUNCS):
                raise ExpressionError(f"unknown function in {self.text!r}; allowed: {', '.join(FUNCS)}")

    def missing_columns(self, table: pa.Table) -> list[str]:
        return [c for c in self.columns if c not in table.column_names and c not in DERIVED]

    def __call__(self, table: pa.Table) -> Array:
        missing = self.missing_columns(table)
        if missing:
            raise ExpressionError(f"filter expression {self.text!r} uses unknown column(s): {', '.join(missing)}")
        cache: dict[str, Array] = {}
        out = self._eval(self.tree, table, cache)
        if np.ndim(out) == 0:
            out = np.full(table.num_rows, bool(out))
        return _truth(out)

    def _eval(self, node: ast.AST, table: pa.Table, cache: dict[str, Array]):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in cache:
                cache[node.id] = _column(table, node.id)
            return cache[node.id]
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self._eval(e, table, cache) for e in node.elts]
        if isinstance(node, ast.BoolOp):
            vals = [_truth(self._eval(v, table, cache)) for v in node.values]
            return np.logical_and.reduce(vals) if isinstance(node.op, ast.And) else np.logical_or.reduce(vals)
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, table, cache)
            if isinstance(node.op, ast.Not):
                return ~_truth(v)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            a, b = self._eval(node.left, table, cache), self._eval(node.right, table, cache)
            with np.errstate(all="ignore"):
                return _BIN[type(node.op)](a, b)
        if isinstance(node, ast.Call):
            return FUNCS[node.func.id](np.asarray(self._eval(node.args[0], table, cache)))
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, table, cache)
            result = None
            for op, comp in zip(node.ops, node.comparators):
                right = self._eval(comp, table, cache)
                part = _compare(op, left, right)
                result = part if result is None else result & part
                left = right
            return result
        raise ExpressionError(f"unsupported expression element {type(node).__name__}")


def _compare(op: ast.cmpop, a, b) -> Array:
    if isinstance(op, (ast.Is, ast.IsNot)):
        if b is not None:
            raise ExpressionError("only 'is None' / 'is not None' are supported")
        null = _isnull(np.asarray(a))
        return null if isinstance(op, ast.Is) else ~null
    if isinstance(op, (ast.In, ast.NotIn)):
        inside = np.isin(np.asarray(a), np.asarray(b, dtype=np.asarray(a).dtype if np.asarray(a).dtype != object else object))
        return inside if isinstance(op, ast.In) else ~inside & ~_isnull(np.asarray(a))
    with np.errstate(invalid="ignore"):
        res = _CMP[type(op)](a, b)
    res = np.asarray(res)
    if res.dtype == object:
        res = np.array([bool(x) if x is not None else False for x in res], dtype=bool)
    for side in (a, b):
        if isinstance(side, np.ndarray):
            res = res & ~_isnull(side)  # comparisons with a missing value are False
    return res


def _truth(v) -> Array:
    arr = np.asarray(v)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind == "f":
        return np.nan_to_num(arr, nan=0.0) != 0
    return arr.astype(bool)
