"""``--keep`` expressions over score columns, evaluated on whole columns at once.

The language is a safe subset of Python expressions: column names, numbers, strings, ``True``
/ ``False``, comparisons (chained too), ``and`` / ``or`` / ``not``, ``+ - * /`` and the
functions

- ``top(col, f)``: in the best fraction ``f`` of the rows by ``col`` (``top(clip, 0.3)``: the
  top 30%, as DFN/DataComp's percentile filtering), ``bottom(col, f)`` the lowest;
- ``missing(col)``: the sample has no value in ``col`` (not scored by that table).

A missing value compares False; a boolean column that is missing counts as False in ``and``,
``or`` and ``not`` (so ``not duplicate`` keeps a sample that the dedup table never saw only
when it says so). Anything else (attributes, subscripts, calls of other names, lambdas) is
refused before evaluation.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

_COMPARE = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_ARITH = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
FUNCTIONS = ("top", "bottom", "missing")


@dataclass(frozen=True)
class KeepExpression:
    """A parsed ``--keep`` expression.

    Attributes:
        text: The expression as written.
        tree: Its syntax tree (checked: only the allowed nodes).
        columns: Column names it reads.
    """

    text: str
    tree: ast.Expression
    columns: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, known: list[str] | None = None) -> KeepExpression:
        """Parse and check ``text``.

        Raises:
            ValueError: A syntax error, a construct outside the language, or (given ``known``)
                a column no score table has; the message names it.
        """
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as e:
            raise ValueError(f"--keep {text!r}: not an expression ({e.msg})") from e
        columns: list[str] = []
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            _check_node(node, text)
            named = isinstance(node, ast.Name) and id(node) not in called
            if named and node.id not in ("True", "False", *columns):
                columns.append(node.id)
        if known is not None:
            unknown = [c for c in columns if c not in known]
            if unknown:
                raise ValueError(
                    f"--keep {text!r}: no score column {', '.join(map(repr, unknown))}; the score "
                    f"tables have {', '.join(known) or 'none'}"
                )
        return cls(text, tree, tuple(columns))

    def conjuncts(self) -> list[KeepExpression]:
        """The top-level ``and`` terms (each a reason a sample is dropped), or itself."""
        body = self.tree.body
        if isinstance(body, ast.BoolOp) and isinstance(body.op, ast.And):
            return [KeepExpression.parse(ast.unparse(v)) for v in body.values]
        return [self]

    def evaluate(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Boolean mask (N,) of the rows to keep, from equal-length column arrays."""
        n = len(next(iter(columns.values()))) if columns else 0
        out = _Evaluator(columns, n).eval(self.tree.body)
        out = np.asarray(out)
        if out.shape == ():
            out = np.full(n, bool(out))
        return _truth(out)


def _check_node(node: ast.AST, text: str) -> None:
    allowed = (
        ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
        ast.Compare, ast.Name, ast.Constant, ast.Load, ast.BinOp, ast.Call, *_COMPARE, *_ARITH,
    )  # fmt: skip
    if not isinstance(node, allowed):
        raise ValueError(f"--keep {text!r}: {type(node).__name__} is not allowed")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise ValueError(f"--keep {text!r}: only {', '.join(FUNCTIONS)} can be called")
        if not node.args or not isinstance(node.args[0], ast.Name):
            raise ValueError(f"--keep {text!r}: {node.func.id}() takes a column name first")


def _truth(x: np.ndarray) -> np.ndarray:
    """Boolean truth of a column: a missing value (NaN / None) is False."""
    if x.dtype == bool:
        return x
    if x.dtype.kind == "f":
        return np.nan_to_num(x, nan=0.0) != 0
    return np.array([bool(v) if v is not None else False for v in x], dtype=bool)


class _Evaluator:
    def __init__(self, columns: Mapping[str, np.ndarray], n: int) -> None:
        self.columns = columns
        self.n = n

    def eval(self, node: ast.AST) -> np.ndarray:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in ("True", "False"):
                return node.id == "True"
            return self.columns[node.id]
        if isinstance(node, ast.BoolOp):
            parts = [_truth(np.asarray(self._vector(v))) for v in node.values]
            join = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = parts[0]
            for p in parts[1:]:
                out = join(out, p)
            return out
        if isinstance(node, ast.UnaryOp):
            value = self._vector(node.operand)
            if isinstance(node.op, ast.Not):
                return ~_truth(np.asarray(value))
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            return _ARITH[type(node.op)](
                _float(self.eval(node.left)), _float(self.eval(node.right))
            )
        if isinstance(node, ast.Compare):
            return self._compare(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise AssertionError(f"unchecked node {type(node).__name__}")  # _check_node refused it

    def _vector(self, node: ast.AST) -> np.ndarray:
        value = self.eval(node)
        return np.full(self.n, value) if np.ndim(value) == 0 else value

    def _compare(self, node: ast.Compare) -> np.ndarray:
        left = self.eval(node.left)
        out = np.ones(self.n, dtype=bool)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.eval(right_node)
            a, b = _comparable(left, right)
            with np.errstate(invalid="ignore"):
                result = np.asarray(_COMPARE[type(op)](a, b))
            known = ~(_missing(a) | _missing(b))
            out &= np.broadcast_to(result, (self.n,)) & known
            left = right
        return out

    def _call(self, node: ast.Call) -> np.ndarray:
        name = node.func.id
        column = _float(self.columns[node.args[0].id])
        if name == "missing":
            return _missing(self.columns[node.args[0].id])
        if len(node.args) != 2 or not isinstance(node.args[1], ast.Constant):
            raise ValueError(f"{name}(column, fraction) takes a fraction in (0, 1]")
        fraction = float(node.args[1].value)
        if not 0 < fraction <= 1:
            raise ValueError(f"{name}(..., {fraction}): the fraction must be in (0, 1]")
        scored = column[~np.isnan(column)]
        if scored.size == 0:
            return np.zeros(self.n, dtype=bool)
        if name == "top":
            threshold = np.quantile(scored, 1 - fraction, method="higher")
            return np.nan_to_num(column, nan=-np.inf) >= threshold
        threshold = np.quantile(scored, fraction, method="lower")
        return np.nan_to_num(column, nan=np.inf) <= threshold


def _float(x: object) -> np.ndarray | float:
    if np.ndim(x) == 0:
        return float(x)  # type: ignore[arg-type]
    arr = np.asarray(x)
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64)
    return np.array([np.nan if v is None else float(v) for v in arr], dtype=np.float64)


def _comparable(a: object, b: object) -> tuple[np.ndarray, np.ndarray]:
    """Numbers as float64 (missing = NaN), anything else as object arrays."""
    if isinstance(a, str) or isinstance(b, str) or _is_text(a) or _is_text(b):
        return np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    return np.asarray(_float(a)), np.asarray(_float(b))


def _is_text(x: object) -> bool:
    return np.ndim(x) > 0 and np.asarray(x).dtype.kind in "OUS"


def _missing(x: object) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind == "f":
        return np.isnan(arr)
    if arr.dtype.kind == "O":
        return np.array([v is None for v in arr.ravel()], dtype=bool).reshape(arr.shape)
    return np.zeros(arr.shape, dtype=bool)
