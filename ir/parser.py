"""Parse the text form written by `ir.printer` (see its docstring for the syntax).

Every malformed input raises `ParseError` with line, column, the offending line and a caret —
including unknown mnemonics, unknown/duplicate/ill-typed attributes, undefined or redefined
values and wrong operand counts. Types are taken as written; run `ir.verify` to check them
against `infer_type`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ir.core import OPS, ROLES, Graph, Loc, Node, Value, _Bad, attr_schema, coerce_attr, schema_name
from ir.errors import IRTypeError, ParseError
from ir.syntax import Token, TokenStream, describe, parse_expr, string_value, tokenize
from ir.types import DType, TensorType

__all__ = ["parse"]

_DTYPES = {d.value: d for d in DType}


def parse(text: str) -> Graph:
    """Read one graph. Raises ParseError (and nothing else) on malformed text."""
    if not isinstance(text, str):
        raise TypeError(f"parse() expects str, got {type(text).__name__}")
    ts: TokenStream | None = None
    try:
        ts = TokenStream(tokenize(text), text)
        p = _Parser(ts)
        g = p.graph()
        p.skip_comments()
        ts.expect("EOF", what="end of input after the graph")
        return g
    except ParseError:
        raise
    except RecursionError:
        raise _fallback(ts, text, "input nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - the contract is: only ParseError escapes
        raise _fallback(ts, text, f"{type(e).__name__}: {e}") from None


def _fallback(ts: TokenStream | None, text: str, msg: str) -> ParseError:
    if ts is not None:
        return ts.error(msg)
    return ParseError(msg, 1, 1, text.split("\n", 1)[0])


class _Parser:
    def __init__(self, ts: TokenStream) -> None:
        self.ts = ts
        # the text of a type (its tokens) -> the TensorType read from it: a graph repeats a few
        # dozen types over thousands of values, and reading dims builds sympy expressions
        self.types: dict[tuple[tuple[str, str], ...], TensorType] = {}

    def skip_comments(self) -> None:
        while self.ts.at("COMMENT"):
            self.ts.next()

    # graph := 'graph' NAME? '(' inputs ')' '{' node* 'return' values '}'
    def graph(self) -> Graph:
        ts = self.ts
        self.skip_comments()
        ts.expect("NAME", "graph", what="'graph'")
        name = None
        if ts.at("NAME"):
            name = ts.next().text
        ts.expect("OP", "(", what="'(' starting the graph inputs")
        scope: dict[str, Value] = {}
        inputs, roles = [], {}
        self.skip_comments()
        while not ts.at("OP", ")"):
            tok = ts.peek()
            v = self.value_decl(scope)
            role_tok = ts.expect("NAME", what=f"an input role ({', '.join(ROLES)})")
            if role_tok.text not in ROLES:
                raise ts.error(
                    f"unknown role {role_tok.text!r}; expected one of {', '.join(ROLES)}", role_tok
                )
            self.define(scope, v, tok)
            inputs.append(v)
            roles[v.name] = role_tok.text
            self.skip_comments()
            if not ts.accept("OP", ","):
                break
            self.skip_comments()
        ts.expect("OP", ")", what="',' or ')' in the graph inputs")
        ts.expect("OP", "{", what="'{' starting the graph body")
        ops = []
        self.skip_comments()
        while not ts.at("NAME", "return"):
            ops.append(self.node(scope))
            self.skip_comments()
        ts.next()
        outputs: list[Value] = []
        aliases: dict[int, str] = {}
        if ts.at("VALUE"):
            self.output(scope, roles, outputs, aliases)
            while ts.accept("OP", ","):
                self.output(scope, roles, outputs, aliases)
        self.skip_comments()
        ts.expect("OP", "}", what="'}' closing the graph")
        try:
            return Graph(inputs, ops, outputs, name=name, roles=roles, aliases=aliases)
        except IRTypeError as e:
            raise ts.error(str(e)) from None

    def output(
        self, scope: dict[str, Value], roles: dict[str, str], outputs: list, aliases: dict
    ) -> None:
        """`%v` or `%v into %input` (the output may be written into that input's buffer)."""
        outputs.append(self.use(scope))
        if not self.ts.accept("NAME", "into"):
            return
        tok = self.ts.peek()
        target = self.use(scope)
        if target.name not in roles:
            raise self.ts.error(f"{tok.text} after 'into' is not an input of this graph", tok)
        aliases[len(outputs) - 1] = target.name

    def value_decl(self, scope: dict[str, Value]) -> Value:
        ts = self.ts
        tok = ts.expect("VALUE", what="a value name like %x")
        ts.expect("OP", ":", what="':' before the type")
        t = self.type()
        try:
            return Value(tok.text[1:], t)
        except IRTypeError as e:
            raise ts.error(str(e), tok) from None

    def define(self, scope: dict[str, Value], v: Value, tok: Token) -> None:
        if v.name in scope:
            raise self.ts.error(f"%{v.name} is defined twice; every value is assigned once", tok)
        scope[v.name] = v

    def use(self, scope: dict[str, Value]) -> Value:
        tok = self.ts.expect("VALUE", what="a value like %x")
        v = scope.get(tok.text[1:])
        if v is None:
            raise self.ts.error(f"undefined value {tok.text}; define it before this use", tok)
        return v

    # type := DTYPE '[' dims ']'
    def type(self) -> TensorType:
        ts = self.ts
        tok = ts.expect("NAME", what="a type like f32[B,T]")
        if tok.text not in _DTYPES:
            raise ts.error(f"unknown dtype {tok.text!r}; expected one of {', '.join(_DTYPES)}", tok)
        ts.expect("OP", "[", what="'[' after the dtype")
        key = self.type_key(tok.text)
        if key in self.types:  # the same tokens as a type read before: the same type
            ts.i += len(key) - 1
            return self.types[key]
        dims = []
        if not ts.at("OP", "]"):
            dims.append(parse_expr(ts))
            while ts.accept("OP", ","):
                dims.append(parse_expr(ts))
        ts.expect("OP", "]", what="',' or ']' in the shape")
        try:
            t = TensorType(tuple(dims), _DTYPES[tok.text])
        except IRTypeError as e:
            raise ts.error(str(e), tok) from None
        if key:
            self.types[key] = t
        return t

    def type_key(self, dtype: str) -> tuple[tuple[str, str], ...]:
        """The dtype and the (kind, text) of each token from the cursor to the first ']', which
        ends a well-formed shape (dims hold no brackets); () when there is none within 64."""
        key = [("NAME", dtype)]
        for tok in self.ts.tokens[self.ts.i : self.ts.i + 64]:
            key.append((tok.kind, tok.text))
            if tok.kind == "OP" and tok.text == "]":
                return tuple(key)
        return ()

    # node := results '=' MNEMONIC '(' operands attrs ')' COMMENT?
    def node(self, scope: dict[str, Value]) -> Node:
        ts = self.ts
        decls = [(ts.peek(), self.value_decl(scope))]
        while ts.accept("OP", ","):
            decls.append((ts.peek(), self.value_decl(scope)))
        ts.expect("OP", "=", what="',' or '=' after the results")
        m_tok = ts.expect("NAME", what="an op mnemonic")
        cls = OPS.get(m_tok.text)
        if cls is None:
            raise ts.error(f"unknown op {m_tok.text!r}; registered ops are listed in ir.OPS", m_tok)
        operands, attrs = self.args(scope, cls)
        loc = None
        if ts.at("COMMENT") and ts.peek().line == ts.tokens[ts.i - 1].line:
            loc = self.loc(ts.next())
        op = self.make_op(cls, attrs, m_tok)
        self.check_operand_count(cls, operands, m_tok)
        for tok, v in decls:
            self.define(scope, v, tok)
        return Node(op, tuple(operands), tuple(v for _, v in decls), loc)

    def args(
        self, scope: dict[str, Value], cls: type
    ) -> tuple[list[Value], dict[str, tuple[Token, Any]]]:
        ts = self.ts
        ts.expect("OP", "(", what="'(' after the mnemonic")
        operands: list[Value] = []
        attrs: dict[str, tuple[Token, Any]] = {}
        schema = attr_schema(cls)
        while not ts.at("OP", ")"):
            if ts.at("VALUE"):
                if attrs:
                    raise ts.error("operands must come before attributes")
                operands.append(self.use(scope))
            else:
                key = ts.expect("NAME", what="an operand %x or an attribute name=value")
                if key.text not in schema:
                    known = ", ".join(schema) or "none"
                    raise ts.error(
                        f"unknown attribute {key.text!r} for {cls.mnemonic}; known: {known}", key
                    )
                if key.text in attrs:
                    raise ts.error(f"attribute {key.text!r} given twice", key)
                ts.expect("OP", "=", what=f"'=' after attribute {key.text}")
                value_tok = ts.peek()
                attrs[key.text] = (value_tok, self.attr_value())
            if not ts.accept("OP", ","):
                break
        ts.expect("OP", ")", what="',' or ')' in the argument list")
        return operands, attrs

    def make_op(self, cls: type, attrs: dict[str, tuple[Token, Any]], m_tok: Token):
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in attrs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise self.ts.error(
                f"{cls.mnemonic} is missing attribute(s) {', '.join(missing)}", m_tok
            )
        try:  # the op checks every attribute against its schema itself (`Op.__post_init__`)
            return cls(**{k: v for k, (_, v) in attrs.items()})
        except Exception as e:
            self.check_attrs(cls, attrs)  # only on failure: name the attribute at fault
            if isinstance(e, (IRTypeError, TypeError, ValueError)):
                raise self.ts.error(f"bad attributes for {cls.mnemonic}: {e}", m_tok) from None
            raise

    def check_attrs(self, cls: type, attrs: dict[str, tuple[Token, Any]]) -> None:
        """Raise at the first attribute whose value its schema refuses."""
        schema = attr_schema(cls)
        for name, (tok, value) in attrs.items():
            if isinstance(coerce_attr(schema[name], value), _Bad):
                raise self.ts.error(
                    f"attribute {name} of {cls.mnemonic}: expected {schema_name(schema[name])}, "
                    f"got {_describe_value(value)}",
                    tok,
                )

    def check_operand_count(self, cls: type, operands: list[Value], tok: Token) -> None:
        n = cls.num_operands
        if n is not None and len(operands) != n:
            raise self.ts.error(f"{cls.mnemonic} takes {n} operand(s), got {len(operands)}", tok)

    def attr_value(self) -> Any:
        ts = self.ts
        tok = ts.peek()
        if tok.kind == "NAME":
            words = {
                "true": True,
                "false": False,
                "none": None,
                "inf": float("inf"),
                "nan": float("nan"),
            }
            if tok.text in words:
                ts.next()
                return words[tok.text]
            if tok.text in _DTYPES:
                ts.next()
                return _DTYPES[tok.text]
            if tok.text == "graph":
                ts.enter()
                g = self.graph()
                ts.leave()
                return g
        if tok.kind == "FLOAT":
            return float(ts.next().text)
        if tok.kind == "STRING":
            return string_value(ts, ts.next())
        if tok.kind == "OP" and tok.text == "-":
            nxt = ts.peek(1)
            if nxt.kind == "FLOAT" or (nxt.kind == "NAME" and nxt.text == "inf"):
                ts.next()
                ts.next()
                return -float(nxt.text)
        if tok.kind == "OP" and tok.text == "[":
            return self.list_value()
        if tok.kind in ("INT", "NAME") or (tok.kind == "OP" and tok.text in "(-"):
            return parse_expr(ts)
        raise ts.error(f"expected an attribute value, got {describe(tok)}")

    def list_value(self) -> tuple:
        ts = self.ts
        ts.expect("OP", "[")
        ts.enter()
        items = []
        while not ts.at("OP", "]"):
            items.append(self.attr_value())
            if not ts.accept("OP", ","):
                break
        ts.expect("OP", "]", what="',' or ']' in the list")
        ts.leave()
        return tuple(items)

    def loc(self, tok: Token) -> Loc:
        body = tok.text[1:].strip()
        try:
            module, rest = _loc_part(body)
            rest = rest.strip()
            source = ""
            if rest.startswith("@"):
                source, rest = _loc_part(rest[1:].strip())
            if rest.strip():
                raise ValueError(f"unexpected text {rest.strip()!r}")
            return Loc(module, source)
        except (ValueError, IRTypeError) as e:
            raise self.ts.error(
                f"bad location comment (expected '# module @ file:line'): {e}", tok
            ) from None


def _loc_part(text: str) -> tuple[str, str]:
    """Split one (possibly JSON-quoted) location part off `text`."""
    if text.startswith('"'):
        value, end = json.JSONDecoder().raw_decode(text)
        if not isinstance(value, str):
            raise ValueError("quoted part is not a string")
        return value, text[end:]
    at = text.find("@")
    return (text.strip(), "") if at < 0 else (text[:at].strip(), text[at:])


def _describe_value(v: Any) -> str:
    if isinstance(v, Graph):
        return "a graph"
    if isinstance(v, tuple):
        return f"list {list(v)}"
    if isinstance(v, DType):
        return f"dtype {v.value}"
    return f"{type(v).__name__} {v!r}"
