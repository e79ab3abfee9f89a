"""Translate torch's symbolic-shape expressions into plain sympy over the IR's named symbols.

`torch.export` names dynamic dims `s0, s1, …` and spells integer arithmetic with its own sympy
functions (`FloorDiv`, `PythonMod`, `CleanDiv`, …). The IR speaks plain sympy over user-facing
symbols (`B`, `T`), so every shape expression that reaches an attribute goes through `to_ir_expr`.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy
from torch.utils._sympy import functions as tf


class SymbolicShapeError(ValueError):
    """A shape expression uses a construct the IR cannot represent."""


def _floor_div(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    return sympy.floor(a / b)


_BINARY = {
    tf.FloorDiv: _floor_div,
    tf.CleanDiv: lambda a, b: a / b,
    tf.IntTrueDiv: lambda a, b: a / b,
    tf.CeilDiv: lambda a, b: sympy.ceiling(a / b),
    tf.Mod: sympy.Mod,
    tf.PythonMod: sympy.Mod,
    tf.PowByNatural: sympy.Pow,
}


def to_ir_expr(
    expr: sympy.Expr | int, names: Mapping[sympy.Symbol, sympy.Symbol]
) -> sympy.Expr | int:
    """Rewrite one torch shape expression over `names` (torch symbol -> IR symbol).

    Integers pass through unchanged; an unknown torch symbol or function raises
    `SymbolicShapeError` naming it.
    """
    if isinstance(expr, int):
        return expr
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        if expr not in names:
            raise SymbolicShapeError(
                f"shape symbol {expr} is not tied to any input dimension; "
                "mark the dimension it comes from as dynamic, or make it static"
            )
        return names[expr]
    args = [to_ir_expr(a, names) for a in expr.args]
    head = type(expr)
    if head in _BINARY:
        return _BINARY[head](*args)
    if head is tf.ModularIndexing:
        base, div, mod = args
        return sympy.Mod(sympy.floor(base / div), mod)
    if head in (tf.Max, sympy.Max):
        return sympy.Max(*args)
    if head in (tf.Min, sympy.Min):
        return sympy.Min(*args)
    if head in (sympy.Add, sympy.Mul, sympy.Pow, sympy.floor, sympy.ceiling, sympy.Mod):
        return head(*args)
    raise SymbolicShapeError(
        f"shape expression {expr} uses {head.__name__}, which the IR cannot represent"
    )
