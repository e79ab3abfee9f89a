"""`to_mlir(graph)`: the graph as MLIR text in torch-mlir's `torch` dialect.

Primitive ops become `torch.aten.*` ops (with `torch.constant.*` and `torch.prim.ListConstruct`
for their arguments), so a graph of primitives lowers through torch-mlir's pipelines (e.g. to
linalg-on-tensors). Everything else — semantic ops (`attn.*`, `moe.*`, `hc.*`), `fused.kernel`,
and primitives with no direct torch spelling — becomes `torch.operator "dsv4c.<mnemonic>"`
carrying its attributes (`fused.kernel` carries its body as IR text in `body`).

Symbolic dims print as `?`; where an attribute needs a symbolic size (`reshape` to `[T, 64]`) it is
computed from an input's `torch.aten.size.int`. Provenance becomes MLIR locations:
`loc("layers.3.attn"("attention.py":120:0))`.

Pure text: importing this module imports nothing of MLIR; the tests parse the output with
torch-mlir's bindings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import sympy

from ir.core import Graph, Loc, Node, Value
from ir.types import DType, TensorType

__all__ = ["to_mlir"]

_ELEMENT = {
    DType.f32: "f32", DType.bf16: "bf16", DType.f16: "f16", DType.i64: "si64",
    DType.i32: "si32", DType.i8: "si8", DType.bool: "i1", DType.f8e4m3: "f8E4M3FN",
    DType.f8e5m2: "f8E5M2",
}  # fmt: skip

# c10::ScalarType codes, as torch.aten.to.dtype takes them
_SCALAR_TYPE = {
    DType.i8: 1, DType.i32: 3, DType.i64: 4, DType.f16: 5, DType.f32: 6, DType.bool: 11,
    DType.bf16: 15, DType.f8e5m2: 23, DType.f8e4m3: 24,
}  # fmt: skip

_BINARY = {
    "add": "add.Tensor", "sub": "sub.Tensor", "mul": "mul.Tensor", "div": "div.Tensor",
    "maximum": "maximum", "minimum": "minimum", "pow": "pow.Tensor_Tensor",
    "eq": "eq.Tensor", "ne": "ne.Tensor", "lt": "lt.Tensor", "le": "le.Tensor",
    "gt": "gt.Tensor", "ge": "ge.Tensor", "logical_and": "logical_and",
    "logical_or": "logical_or", "bitwise_and": "bitwise_and.Tensor",
    "remainder": "remainder.Tensor", "floordiv": "floor_divide",
}  # fmt: skip
_ALPHA = {"add", "sub"}  # take a trailing alpha = 1

_UNARY = {
    m: m
    for m in (
        "neg", "exp", "log", "sqrt", "rsqrt", "sigmoid", "silu", "tanh", "abs", "cos", "sin",
        "relu", "erf", "floor", "ceil", "reciprocal", "sign", "log1p", "logical_not",
    )
}  # fmt: skip


def to_mlir(graph: Graph) -> str:
    """MLIR text of `graph`: one `func.func` in the `torch` dialect."""
    return _Emitter(graph).run()


class _Emitter:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.lines: list[str] = []
        self.counter = 0
        self.sizes: dict[sympy.Symbol, tuple[Value, int]] = {}  # symbol -> (input, axis)
        self.loc: Loc | None = None

    def run(self) -> str:
        g = self.graph
        for v in g.inputs:
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, sympy.Symbol):
                    self.sizes.setdefault(d, (v, axis))
        args = ", ".join(f"{_ref(v)}: {_type(v.type)}" for v in g.inputs)
        results = ", ".join(_type(v.type) for v in g.outputs)
        name = _symbol_name(g.name or "main")
        header = f"  func.func @{name}({args}) -> ({results}) {{"
        for node in g.ops:
            self.loc = node.loc
            emit = _EMITTERS.get(node.name, _generic)
            if emit(self, node) is False:
                _generic(self, node)
        outs = ", ".join(_ref(v) for v in g.outputs)
        types = ", ".join(_type(v.type) for v in g.outputs)
        body = "\n".join(self.lines)
        return f"module {{\n{header}\n{body}\n    return {outs} : {types}\n  }}\n}}\n"

    # emission helpers

    def line(self, text: str) -> None:
        self.lines.append(f"    {text}{_loc(self.loc)}")

    def fresh(self) -> str:
        self.counter += 1
        return f"%$c{self.counter}"

    def int_(self, value: Any) -> str | None:
        """A `!torch.int` for an int or a symbolic size; None if not expressible."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            name = self.fresh()
            self.line(f"{name} = torch.constant.int {value}")
            return name
        return self._symbolic(sympy.sympify(value))

    def _symbolic(self, expr: sympy.Expr) -> str | None:
        if expr.is_Integer:
            return self.int_(int(expr))
        if expr.is_Symbol:
            if expr not in self.sizes:
                return None
            value, axis = self.sizes[expr]
            axis_name = self.int_(axis)
            name = self.fresh()
            self.line(f"{name} = torch.aten.size.int {_ref(value)}, {axis_name} : "
                      f"{_type(value.type)}, !torch.int -> !torch.int")  # fmt: skip
            return name
        ops = {sympy.Add: "add.int", sympy.Mul: "mul.int"}
        if type(expr) in ops:
            parts = [self._symbolic(a) for a in expr.args]
            if None in parts:
                return None
            acc = parts[0]
            for p in parts[1:]:
                name = self.fresh()
                self.line(f"{name} = torch.aten.{ops[type(expr)]} {acc}, {p} : "
                          "!torch.int, !torch.int -> !torch.int")  # fmt: skip
                acc = name
            return acc
        if isinstance(expr, sympy.floor) and isinstance(expr.args[0], sympy.Mul):
            num, den = expr.args[0].as_numer_denom()
            a, b = self._symbolic(num), self._symbolic(den)
            if a is None or b is None:
                return None
            name = self.fresh()
            self.line(f"{name} = torch.aten.floordiv.int {a}, {b} : "
                      "!torch.int, !torch.int -> !torch.int")  # fmt: skip
            return name
        return None

    def scalar(self, value: Any) -> str:
        name = self.fresh()
        if value is None:
            self.line(f"{name} = torch.constant.none")
        elif isinstance(value, bool):
            self.line(f"{name} = torch.constant.bool {'true' if value else 'false'}")
        elif isinstance(value, int):
            self.line(f"{name} = torch.constant.int {value}")
        else:
            self.line(f"{name} = torch.constant.float {_float(float(value))}")
        return name

    def int_list(self, values) -> str | None:
        items = [self.int_(v) for v in values]
        if None in items:
            return None
        name = self.fresh()
        types = ", ".join("!torch.int" for _ in items)
        self.line(f"{name} = torch.prim.ListConstruct {', '.join(items)} : "
                  f"({types}) -> !torch.list<int>")  # fmt: skip
        return name

    def aten(self, node: Node, op: str, args: list[tuple[str, str]]) -> None:
        """`%r = torch.aten.<op> a, b : ta, tb -> tr` for a single-result node."""
        (result,) = node.results
        names = ", ".join(a for a, _ in args)
        types = ", ".join(t for _, t in args)
        self.line(f"{_ref(result)} = torch.aten.{op} {names} : {types} -> {_type(result.type)}")


# --- emitters: return False to fall back to the generic custom op -------------------------

Emit = Callable[[_Emitter, Node], Any]


def _tensor(v: Value) -> tuple[str, str]:
    return _ref(v), _type(v.type)


def _binary(e: _Emitter, node: Node) -> Any:
    a, b = node.operands
    args = [_tensor(a), _tensor(b)]
    if node.name in _ALPHA:
        args.append((e.int_(1), "!torch.int"))
    e.aten(node, _BINARY[node.name], args)


def _unary(e: _Emitter, node: Node) -> Any:
    e.aten(node, _UNARY[node.name], [_tensor(node.operands[0])])


def _where(e: _Emitter, node: Node) -> Any:
    e.aten(node, "where.self", [_tensor(v) for v in node.operands])


def _matmul(e: _Emitter, node: Node) -> Any:
    e.aten(node, "matmul", [_tensor(v) for v in node.operands])


def _cast(e: _Emitter, node: Node) -> Any:
    dtype = e.int_(_SCALAR_TYPE[node.attrs["dtype"]])
    false, none = e.scalar(False), e.scalar(None)
    args = [_tensor(node.operands[0]), (dtype, "!torch.int"), (false, "!torch.bool"),
            (false, "!torch.bool"), (none, "!torch.none")]  # fmt: skip
    e.aten(node, "to.dtype", args)


def _with_list(op: str, attr: str, extra: tuple = ()) -> Emit:
    def emit(e: _Emitter, node: Node) -> Any:
        values = node.attrs[attr]
        if node.name == "reshape":  # the result's dims; one symbolic dim is spelled -1
            values = node.results[0].type.shape
            if sum(not isinstance(d, int) for d in values) == 1:
                values = [d if isinstance(d, int) else -1 for d in values]
        items = e.int_list(values)
        if items is None:
            return False
        args = [_tensor(node.operands[0]), (items, "!torch.list<int>")]
        for kind in extra:
            args.append(_extra(e, node, kind))
        e.aten(node, op, args)

    return emit


def _extra(e: _Emitter, node: Node, kind: str) -> tuple[str, str]:
    if kind == "false":
        return e.scalar(False), "!torch.bool"
    if kind == "keepdim":
        return e.scalar(bool(node.attrs["keepdim"])), "!torch.bool"
    return e.scalar(None), "!torch.none"


def _softmax(e: _Emitter, node: Node) -> Any:
    dim, none = e.int_(node.attrs["dim"]), e.scalar(None)
    op = "softmax.int" if node.name == "softmax" else "log_softmax.int"
    e.aten(node, op, [_tensor(node.operands[0]), (dim, "!torch.int"), (none, "!torch.none")])


def _dim_op(op: str) -> Emit:
    def emit(e: _Emitter, node: Node) -> Any:
        dim = e.int_(node.attrs["dim"])
        e.aten(node, op, [_tensor(node.operands[0]), (dim, "!torch.int")])

    return emit


def _slice(e: _Emitter, node: Node) -> Any:
    a = node.attrs
    parts = [e.int_(a[k]) for k in ("dim", "start", "end", "step")]
    if None in parts:
        return False
    e.aten(node, "slice.Tensor", [_tensor(node.operands[0])] + [(p, "!torch.int") for p in parts])


def _concat(e: _Emitter, node: Node) -> Any:
    tensors = [_tensor(v) for v in node.operands]
    name = e.fresh()
    e.line(f"{name} = torch.prim.ListConstruct {', '.join(n for n, _ in tensors)} : "
           f"({', '.join(t for _, t in tensors)}) -> !torch.list<vtensor>")  # fmt: skip
    dim = e.int_(node.attrs["dim"])
    e.aten(node, "cat", [(name, "!torch.list<vtensor>"), (dim, "!torch.int")])


def _literal(e: _Emitter, node: Node) -> Any:
    """0-d `constant` and static `full`: a splat `torch.vtensor.literal`."""
    value = node.attrs["value"]
    (result,) = node.results
    shape = result.type.shape
    if isinstance(value, sympy.Basic) or not all(isinstance(d, int) for d in shape):
        return False
    element = _ELEMENT[result.type.dtype]
    if isinstance(value, float) and not math.isfinite(value):
        return False  # hexadecimal splats would need the element's own width
    if result.type.dtype == DType.bool:
        text = "true" if value else "false"
    elif result.type.dtype.is_float:
        text = _float(float(value))
    else:
        text = str(int(value))
    dims = "x".join(str(d) for d in shape)
    tensor = f"tensor<{dims + 'x' if dims else ''}{element}>"
    e.line(f"{_ref(result)} = torch.vtensor.literal(dense<{text}> : {tensor}) : "
           f"{_type(result.type)}")  # fmt: skip


def _generic(e: _Emitter, node: Node) -> Any:
    """`torch.operator "dsv4c.<mnemonic>"(operands) {attributes}`, for any op."""
    results = ", ".join(_ref(v) for v in node.results)
    operands = ", ".join(_ref(v) for v in node.operands)
    attrs = ", ".join(f"{k} = {_attr(v)}" for k, v in node.attrs.items())
    attrs = f" {{{attrs}}}" if attrs else ""
    in_types = ", ".join(_type(v.type) for v in node.operands)
    out_types = ", ".join(_type(v.type) for v in node.results)
    e.line(f'{results} = torch.operator "dsv4c.{node.name}"({operands}){attrs} : '
           f"({in_types}) -> ({out_types})")  # fmt: skip


_EMITTERS: dict[str, Emit] = {
    **{m: _binary for m in _BINARY},
    **{m: _unary for m in _UNARY},
    "where": _where,
    "matmul": _matmul,
    "cast": _cast,
    "reshape": _with_list("view", "shape"),
    "permute": _with_list("permute", "dims"),
    "expand": _with_list("expand", "shape", ("false",)),
    "sum": _with_list("sum.dim_IntList", "dims", ("keepdim", "none")),
    "mean": _with_list("mean.dim", "dims", ("keepdim", "none")),
    "amax": _with_list("amax", "dims", ("keepdim",)),
    "amin": _with_list("amin", "dims", ("keepdim",)),
    "softmax": _softmax,
    "log_softmax": _softmax,
    "unsqueeze": _dim_op("unsqueeze"),
    "squeeze": _dim_op("squeeze.dim"),
    "slice": _slice,
    "concat": _concat,
    "constant": _literal,
    "full": _literal,
}


# --- text pieces -------------------------------------------------------------------------


def _ref(v: Value) -> str:
    return f"%{v.name}"


def _type(t: TensorType) -> str:
    dims = ",".join(str(d) if isinstance(d, int) else "?" for d in t.shape)
    return f"!torch.vtensor<[{dims}],{_ELEMENT[t.dtype]}>"


def _float(x: float) -> str:
    """An f64 literal; non-finite values as MLIR's hexadecimal bit patterns."""
    if math.isnan(x):
        return "0x7FF8000000000000"
    if math.isinf(x):
        return "0x7FF0000000000000" if x > 0 else "0xFFF0000000000000"
    mantissa, e, exponent = repr(x).partition("e")
    if "." not in mantissa:  # MLIR float literals need a point: 1e-06 -> 1.0e-06
        mantissa += ".0"
    return mantissa + e + exponent


def _attr(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v} : i64"
    if isinstance(v, float):
        return f"{_float(v)} : f64"
    if isinstance(v, (tuple, list)) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v
    ):
        return "[" + ", ".join(f"{x} : i64" for x in v) + "]"
    if isinstance(v, Graph):
        from ir.printer import to_text

        return json.dumps(to_text(v))
    if isinstance(v, DType):
        return json.dumps(v.value)
    if isinstance(v, (tuple, list)):
        return json.dumps(", ".join(str(x) for x in v))
    return json.dumps(str(v))


def _loc(loc: Loc | None) -> str:
    if loc is None or not (loc.module or loc.source):
        return ""
    file, _, line = loc.source.rpartition(":")
    inner = f'"{file}":{line}:0' if file and line.isdigit() else json.dumps(loc.source or "?")
    if loc.module:
        return f" loc({json.dumps(loc.module)}({inner}))"
    return f" loc({inner})"


def _symbol_name(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "main"
