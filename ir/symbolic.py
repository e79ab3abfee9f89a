"""Symbolic dimensions.

A dim is an `int` or a sympy expression over integer, positive symbols made by `sym("T")`.
`canon_dim` is applied to every dim the IR stores: integers become `int`, symbols are re-made with
the IR's assumptions (so a foreign `sympy.Symbol("T")` equals `sym("T")`), so equal expressions
compare equal with `==`.

Text form is Python-like and read back by the parser to an equal expression:
`T`, `T + 8`, `4*T`, `T//4` (floor division), `T % 128`, `T/2`, `T**2`, `Max(T, 4)`, `Min(T, 4)`,
`ceiling(T/4)`. Should the readable form of some exotic expression not read back equal, the printer
falls back to a functional form (`Add(..)`, `Mul(..)`, `Rational(1, 4)`, ...) that does.
"""

from __future__ import annotations

import functools
import re
from typing import Union

import sympy

from ir.errors import IRTypeError

__all__ = [
    "Dim", "sym", "canon_dim", "dim_str", "parse_dim", "subs_dim", "same_dim", "same_shape",
    "RESERVED",
]  # fmt: skip

Dim = Union[int, sympy.Expr]

_SYM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Words the text syntax already uses; a symbol with one of these names could not be read back.
RESERVED = frozenset(
    ["true", "false", "none", "inf", "nan", "graph", "return"]
    + ["f32", "bf16", "f16", "f8e4m3", "f8e5m2", "i64", "i32", "i8", "bool"]
    + ["Max", "Min", "floor", "ceiling", "Mod", "Add", "Mul", "Pow", "Rational"]
)


@functools.lru_cache(maxsize=None)
def sym(name: str) -> sympy.Symbol:
    """The IR symbol `name`: a positive integer sympy symbol (same name -> same symbol)."""
    if not isinstance(name, str) or not _SYM_RE.match(name):
        raise IRTypeError(
            f"symbol name must match [A-Za-z_][A-Za-z0-9_]*, got {name!r}; pick a plain identifier"
        )
    if name in RESERVED:
        raise IRTypeError(f"symbol name {name!r} is reserved by the IR text syntax; rename it")
    return sympy.Symbol(name, integer=True, positive=True)


def canon_dim(d: object) -> Dim:
    """Canonical form of a dim: `int`, or a sympy expression over `sym` symbols."""
    if isinstance(d, bool):
        raise IRTypeError(f"a dim must be an int or a sympy expression, got bool {d!r}")
    if isinstance(d, int):
        return int(d)
    if hasattr(d, "__index__") and not isinstance(d, sympy.Basic):
        return int(d.__index__())  # numpy integers
    if not isinstance(d, sympy.Expr):
        raise IRTypeError(
            f"a dim must be an int or a sympy expression, got {type(d).__name__} {d!r}"
        )
    if d.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
        raise IRTypeError(f"a dim must be finite, got {d}")
    if d.free_symbols:
        repl = {s: sym(s.name) for s in d.free_symbols if s is not sym(s.name)}  # type: ignore
        if repl:
            d = d.xreplace(repl)
    if d.is_Integer:
        return int(d)
    if d.is_Number:
        raise IRTypeError(f"a dim must be integer valued, got {d}")
    return d


def subs_dim(d: Dim, env: dict) -> Dim:
    """Substitute symbol values (`{sym: int}`) into a dim."""
    if isinstance(d, int):
        return d
    if d.is_Symbol and isinstance(env.get(d), int):
        return env[d]
    return _subs(d, tuple(env.items()))


@functools.lru_cache(maxsize=4096)
def _subs(d: sympy.Expr, env: tuple[tuple[sympy.Symbol, int], ...]) -> Dim:
    """`subs_dim` memoised: an executable checks and binds the same dims on every call."""
    return canon_dim(d.xreplace({k: sympy.Integer(v) for k, v in env}))


def same_dim(a: Dim, b: Dim) -> bool:
    """Equal as integers for every value of the symbols (sympy decides; unknown -> False)."""
    a, b = canon_dim(a), canon_dim(b)
    if a == b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def same_shape(a, b) -> bool:
    """Shapes of equal rank whose dims are `same_dim`."""
    return len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b))


# --- printing -------------------------------------------------------------------------------

_ADD, _MUL, _NEG, _POW, _ATOM = 10, 20, 25, 30, 40


def dim_str(d: Dim) -> str:
    """Readable text of a dim that `parse_dim` reads back equal."""
    if isinstance(d, int):
        return str(d)
    return _expr_str(d)


@functools.lru_cache(maxsize=4096)
def _expr_str(e: sympy.Expr) -> str:
    try:
        text = _pretty(e, 0)
        if parse_dim(text) == e:
            return text
    except Exception:  # noqa: BLE001 - any failure falls back to the functional form
        pass
    return _functional(e)


def _paren(text: str, prec: int, outer: int) -> str:
    return f"({text})" if prec < outer else text


def _pretty(e: sympy.Expr, outer: int) -> str:
    if e.is_Integer:
        return _paren(str(int(e)), _NEG if e < 0 else _ATOM, outer)
    if e.is_Symbol:
        return e.name
    if e.is_Rational:
        return _paren(f"{e.p}/{e.q}", _MUL, outer)
    if isinstance(e, sympy.Add):
        return _paren(_pretty_add(e), _ADD, outer)
    if isinstance(e, sympy.Mul):
        return _pretty_mul(e, outer)
    if isinstance(e, sympy.Pow):
        if e.exp.is_Integer and e.exp < 0:
            return _paren(f"1/{_pretty(1 / e, _POW)}", _MUL, outer)
        return _paren(f"{_pretty(e.base, _POW + 1)}**{_pretty(e.exp, _POW)}", _POW, outer)
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(e.args[0])
        if den != 1:
            return _paren(f"{_pretty(num, _MUL)}//{_pretty(den, _MUL + 1)}", _MUL, outer)
        return f"floor({_pretty(e.args[0], 0)})"
    if isinstance(e, sympy.Mod):
        a, b = e.args
        return _paren(f"{_pretty(a, _MUL)} % {_pretty(b, _MUL + 1)}", _MUL, outer)
    if isinstance(e, (sympy.Max, sympy.Min, sympy.ceiling)):
        return f"{type(e).__name__}({', '.join(_pretty(a, 0) for a in e.args)})"
    raise IRTypeError(f"cannot print symbolic dim {e} ({type(e).__name__})")


def _pretty_add(e: sympy.Add) -> str:
    terms = e.as_ordered_terms()
    out = _pretty(terms[0], _ADD)
    for t in terms[1:]:
        if t.could_extract_minus_sign():
            out += f" - {_pretty(-t, _ADD + 1)}"
        else:
            out += f" + {_pretty(t, _ADD + 1)}"
    return out


def _pretty_mul(e: sympy.Mul, outer: int) -> str:
    if e.could_extract_minus_sign():
        return _paren(f"-{_pretty(-e, _NEG)}", _NEG, outer)
    num, den = sympy.fraction(e)
    if den != 1:
        return _paren(f"{_pretty(num, _MUL)}/{_pretty(den, _MUL + 1)}", _MUL, outer)
    factors = [_pretty(f, _MUL) for f in e.as_ordered_factors()]
    return _paren("*".join(factors), _MUL, outer)


_FUNCTIONAL = {"Add", "Mul", "Pow", "Mod", "Max", "Min", "floor", "ceiling"}


def _functional(e: sympy.Expr) -> str:
    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        return e.name
    if e.is_Rational:
        return f"Rational({e.p}, {e.q})"
    name = type(e).__name__
    if name not in _FUNCTIONAL:
        raise IRTypeError(
            f"symbolic dim {e} uses {name}, which the IR cannot represent; "
            f"use +, -, *, //, %, Max, Min, floor, ceiling"
        )
    return f"{name}({', '.join(_functional(a) for a in e.args)})"


def parse_dim(text: str) -> Dim:
    """Read a dim written by `dim_str` (raises ParseError on malformed text)."""
    from ir.syntax import TokenStream, parse_expr, tokenize

    ts = TokenStream(tokenize(text), text)
    d = parse_expr(ts)
    ts.expect("EOF")
    return d
