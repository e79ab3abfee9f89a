"""The IR's exception types. Every message says what was expected, what was found, where, and
how to fix it."""

from __future__ import annotations

__all__ = ["IRTypeError", "ParseError", "VerifyError"]


class IRTypeError(TypeError):
    """An op was given operand types or attributes it does not accept."""


class VerifyError(ValueError):
    """A graph breaks an IR invariant; the message shows the surrounding ops with a marker."""


class ParseError(ValueError):
    """Malformed IR text. `.line`/`.col` are 1-based; the message quotes the line with a caret."""

    def __init__(self, msg: str, line: int, col: int, source_line: str) -> None:
        self.msg = msg
        self.line = line
        self.col = col
        self.source_line = source_line
        shown = source_line.expandtabs(1)
        super().__init__(f"line {line}, column {col}: {msg}\n  {shown}\n  {' ' * max(col - 1, 0)}^")
