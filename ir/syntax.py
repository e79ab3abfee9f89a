"""Lexer, token stream and the symbolic-expression grammar shared by the parser.

Tokens: NAME (`matmul`, `moe.route`, `T`), VALUE (`%x`, `%7`, `%layers.0.w`), INT, FLOAT
(`1.5`, `1e-05`), STRING (JSON-quoted), COMMENT (`# ...` to end of line), punctuation
(`( ) [ ] { } , : =`) and operators (`+ - * / // % **`). Whitespace and newlines separate tokens.

Expression grammar (Python precedence):
    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '//' | '/' | '%') unary)*
    unary := '-' unary | power
    power := atom ['**' unary]
    atom  := INT | NAME | FUNC '(' expr (',' expr)* ')' | '(' expr ')'
with FUNC one of Max, Min, floor, ceiling, Mod, Add, Mul, Pow, Rational.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

import sympy

from ir.errors import ParseError

__all__ = ["Token", "tokenize", "TokenStream", "parse_expr", "NAME_RE", "MAX_DEPTH"]

NAME_RE = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"
MAX_DEPTH = 64  # nesting limit for parentheses/brackets; deeper text is rejected, not recursed

# one token after any spaces (one match per token, not two); END: only spaces are left
_TOKEN_RE = re.compile(
    r"""
    [ \t\r]*
    (?:
    (?P<END>\Z)
  | (?P<NL>\n)
  | (?P<COMMENT>\#[^\n]*)
  | (?P<VALUE>%"""
    + NAME_RE
    + r""")
  | (?P<FLOAT>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)
  | (?P<INT>\d+(?![A-Za-z_.]))
  | (?P<NAME>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
  | (?P<STRING>"(?:[^"\\\n]|\\.)*")
  | (?P<OP>//|\*\*|[()\[\]{},:=+\-*/%])
    )
    """,
    re.VERBOSE,
)


class Token(NamedTuple):
    """One token (immutable; a named tuple because a graph's text has tens of thousands)."""

    kind: str  # NAME VALUE INT FLOAT STRING COMMENT OP EOF
    text: str
    line: int
    col: int
    pos: int


def tokenize(text: str) -> list[Token]:
    """Split `text` into tokens (whitespace dropped, comments kept); raises ParseError."""
    tokens: list[Token] = []
    append, match = tokens.append, _TOKEN_RE.match
    pos, line, line_start, n = 0, 1, 0, len(text)
    while pos < n:
        m = match(text, pos)
        if m is None:
            pos += len(text[pos:]) - len(text[pos:].lstrip(" \t\r"))  # at the character
            col = pos - line_start + 1
            raise ParseError(
                f"unexpected character {text[pos]!r}", line, col, _line_of(text, line_start)
            )
        kind = m.lastgroup
        if kind == "END":
            pos = n
            break
        start, pos = m.start(kind), m.end()
        if kind == "NL":
            line, line_start = line + 1, pos
        else:
            append(Token(kind, m.group(kind), line, start - line_start + 1, start))
    tokens.append(Token("EOF", "", line, pos - line_start + 1, pos))
    return tokens


def _line_of(text: str, line_start: int) -> str:
    end = text.find("\n", line_start)
    return text[line_start : end if end >= 0 else len(text)]


class TokenStream:
    """Cursor over tokens with error helpers that point at the current token."""

    def __init__(self, tokens: list[Token], text: str) -> None:
        self.tokens = tokens
        self.text = text
        self.i = 0  # never past `last` (the EOF token), so tokens[i] needs no clamp
        self.last = len(tokens) - 1
        self.depth = 0

    def peek(self, ahead: int = 0) -> Token:
        i = self.i + ahead
        return self.tokens[i if i < self.last else self.last]

    def next(self) -> Token:
        tok = self.tokens[self.i]
        if self.i < self.last:
            self.i += 1
        return tok

    def at(self, kind: str, text: str | None = None) -> bool:
        tok = self.tokens[self.i]
        return tok.kind == kind and (text is None or tok.text == text)

    def accept(self, kind: str, text: str | None = None) -> Token | None:
        return self.next() if self.at(kind, text) else None

    def expect(self, kind: str, text: str | None = None, what: str | None = None) -> Token:
        if self.at(kind, text):
            return self.next()
        want = what or (repr(text) if text is not None else kind.lower())
        raise self.error(f"expected {want}, got {describe(self.peek())}")

    def error(self, msg: str, tok: Token | None = None) -> ParseError:
        tok = tok or self.peek()
        start = self.text.rfind("\n", 0, tok.pos) + 1
        return ParseError(msg, tok.line, tok.col, _line_of(self.text, start))

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nesting deeper than {MAX_DEPTH} levels")

    def leave(self) -> None:
        self.depth -= 1


def describe(tok: Token) -> str:
    if tok.kind == "EOF":
        return "end of input"
    return f"{tok.kind.lower()} {tok.text!r}"


def string_value(ts: TokenStream, tok: Token) -> str:
    try:
        return json.loads(tok.text)
    except ValueError as e:
        raise ts.error(f"bad string literal: {e}", tok) from None


# --- symbolic expressions ---------------------------------------------------------------------

_FUNCS = {
    "Max": (2, None, lambda *a: sympy.Max(*a)),
    "Min": (2, None, lambda *a: sympy.Min(*a)),
    "floor": (1, 1, lambda a: sympy.floor(a)),
    "ceiling": (1, 1, lambda a: sympy.ceiling(a)),
    "Mod": (2, 2, lambda a, b: sympy.Mod(a, b)),
    "Add": (1, None, lambda *a: sympy.Add(*a)),
    "Mul": (1, None, lambda *a: sympy.Mul(*a)),
    "Pow": (2, 2, lambda a, b: _pow(a, b)),
    "Rational": (2, 2, lambda a, b: _div(a, b)),
}
_MAX_EXP = 64
_MAX_INT_DIGITS = 40


def parse_expr(ts: TokenStream):
    """Parse one symbolic expression; returns an int or a canonical sympy expression."""
    from ir.symbolic import canon_dim

    tok = ts.peek()
    e = _expr(ts)
    try:
        return canon_dim(e)
    except Exception as err:  # noqa: BLE001 - report any sympy/IR failure at the expression
        raise ts.error(f"bad dim expression: {err}", tok) from None


def _expr(ts: TokenStream) -> sympy.Expr:
    e = _term(ts)
    while ts.at("OP", "+") or ts.at("OP", "-"):
        op = ts.next().text
        rhs = _term(ts)
        e = e + rhs if op == "+" else e - rhs
    return e


def _term(ts: TokenStream) -> sympy.Expr:
    e = _unary(ts)
    while ts.peek().kind == "OP" and ts.peek().text in ("*", "/", "//", "%"):
        op_tok = ts.next()
        rhs = _unary(ts)
        if op_tok.text == "*":
            e = e * rhs
            continue
        if rhs == 0:
            raise ts.error("division by zero in dim expression", op_tok)
        if op_tok.text == "/":
            e = _div(e, rhs)
        elif op_tok.text == "//":
            e = sympy.floor(_div(e, rhs))
        else:
            e = sympy.Mod(e, rhs)
    return e


def _unary(ts: TokenStream) -> sympy.Expr:
    if ts.accept("OP", "-"):
        ts.enter()
        e = -_unary(ts)
        ts.leave()
        return e
    return _power(ts)


def _power(ts: TokenStream) -> sympy.Expr:
    base = _atom(ts)
    tok = ts.accept("OP", "**")
    if tok is None:
        return base
    ts.enter()
    exp = _unary(ts)
    ts.leave()
    if not (exp.is_Integer and abs(int(exp)) <= _MAX_EXP):
        raise ts.error(f"exponent must be an integer in [-{_MAX_EXP}, {_MAX_EXP}]", tok)
    if base == 0 and exp < 0:
        raise ts.error("division by zero in dim expression", tok)
    return _pow(base, exp)


def _pow(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    if not (sympy.sympify(b).is_Integer and abs(int(b)) <= _MAX_EXP) or (a == 0 and b < 0):
        raise ValueError(f"unsupported power {a}**{b}")
    return sympy.Pow(a, b)


def _div(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    if b == 0:
        raise ValueError("division by zero")
    return a / b


def _atom(ts: TokenStream) -> sympy.Expr:
    tok = ts.next()
    if tok.kind == "INT":
        if len(tok.text) > _MAX_INT_DIGITS:
            raise ts.error(f"integer literal longer than {_MAX_INT_DIGITS} digits", tok)
        return sympy.Integer(int(tok.text))
    if tok.kind == "OP" and tok.text == "(":
        ts.enter()
        e = _expr(ts)
        ts.expect("OP", ")")
        ts.leave()
        return e
    if tok.kind == "NAME" and tok.text in _FUNCS and ts.at("OP", "("):
        return _call(ts, tok)
    if tok.kind == "NAME":
        from ir.symbolic import sym

        try:
            return sym(tok.text)
        except Exception as err:  # noqa: BLE001
            raise ts.error(str(err), tok) from None
    raise ts.error(f"expected a dim (integer, symbol or expression), got {describe(tok)}", tok)


def _call(ts: TokenStream, name: Token) -> sympy.Expr:
    lo, hi, fn = _FUNCS[name.text]
    ts.expect("OP", "(")
    ts.enter()
    args = [_expr(ts)]
    while ts.accept("OP", ","):
        args.append(_expr(ts))
    ts.expect("OP", ")")
    ts.leave()
    if len(args) < lo or (hi is not None and len(args) > hi):
        want = f"{lo}" if lo == hi else f"at least {lo}"
        raise ts.error(f"{name.text} takes {want} arguments, got {len(args)}", name)
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001
        raise ts.error(f"bad {name.text}(...): {err}", name) from None
