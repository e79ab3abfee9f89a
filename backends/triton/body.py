"""Straight-line Triton for the elementwise, broadcast and last-dim reduction ops of a body.

Shared by the generated `fused.kernel` kernels (`fused.py`) and the matmul epilogue
(`matmul.py`). Every value of a body lives in registers as one of four layouts of a 2-D tile of
BLOCK_M rows by BLOCK_N columns of the kernel's domain (its iteration shape, last dim = columns):

    tile    [BLOCK_M, BLOCK_N]   varies along rows and columns (x, the output)
    row     [BLOCK_M, 1]         one value per row (a mean over the row, a per-token scale)
    col     [1, BLOCK_N]         one value per column (an RMSNorm weight, a bias)
    scalar  0-d                  a constant or a 0-d input

Floats are computed in fp32 whatever their storage type (loads upcast, stores downcast); an
explicit `cast` to bf16/f16 rounds through that type so the IR's rounding points are kept.
Anything outside the tables raises `Unsupported` with the reason, which becomes the fallback
reason in reports.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import ir
from ir.printer import node_text
from ir.symbolic import Dim
from ir.types import promote

__all__ = [
    "Unsupported",
    "Val",
    "BodyEmitter",
    "classify",
    "compute_type",
    "REDUCTIONS",
    "VIEWS",
    "ELEMENTWISE",
    "row_shapes",
    "reduced_dims",
]

LAYOUTS = ("scalar", "row", "col", "tile")


class Unsupported(Exception):
    """The op or body cannot be emitted; the message is the reason."""


@dataclass(frozen=True)
class Val:
    expr: str  # a Python name in the kernel, or a literal
    layout: str
    dtype: ir.DType  # the IR dtype (its compute type is `compute_type(dtype)`)
    literal: bool | int | float | None = None  # the value, for constants


def compute_type(dtype: ir.DType) -> str:
    """The Triton type a value of `dtype` is computed in."""
    if dtype.is_float:
        return "tl.float32"
    return {
        ir.DType.i64: "tl.int64",
        ir.DType.i32: "tl.int32",
        ir.DType.i8: "tl.int8",
        ir.DType.bool: "tl.int1",
    }[dtype]


def storage_type(dtype: ir.DType) -> str:
    return {ir.DType.bf16: "tl.bfloat16", ir.DType.f16: "tl.float16"}.get(
        dtype, compute_type(dtype)
    )


def classify(shape: Sequence[Dim], domain: Sequence[Dim], axis: int = -1) -> str | None:
    """Layout of a tensor of `shape` broadcast (right-aligned) against `domain`, whose columns
    run along `axis`; None if it broadcasts but only with some other dims repeated (the caller
    materialises it)."""
    if len(shape) > len(domain):
        raise Unsupported(f"shape {list(shape)} has more dims than the domain {list(domain)}")
    padded = [1] * (len(domain) - len(shape)) + list(shape)
    for s, d in zip(padded, domain):
        if s != 1 and s != d:
            raise Unsupported(f"shape {list(shape)} does not broadcast to {list(domain)}")
    axis = axis % len(domain)
    other = [s for i, s in enumerate(padded) if i != axis]
    other_domain = [d for i, d in enumerate(domain) if i != axis]
    if all(s == 1 for s in padded) and not all(d == 1 for d in domain):
        return "scalar"
    if other == other_domain:
        return "tile" if padded[axis] == domain[axis] else "row"
    if all(s == 1 for s in other):
        return "col"
    return None


def join(*layouts: str) -> str:
    out = set(layouts) - {"scalar"}
    if not out:
        return "scalar"
    if len(out) == 1:
        return out.pop()
    return "tile"


def literal_text(v: bool | int | float) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else '-float("inf")'
    return repr(float(v))


_RESERVED = {
    "tl",
    "triton",
    "pid",
    "pid_m",
    "pid_n",
    "rows",
    "cols",
    "row_mask",
    "col_mask",
    "mask",
    "offsets",
    "n_rows",
    "n_cols",
    "acc",
    "float",
    "max",
    "min",
    "sum",
    "abs",
    "range",
}


def py_name(value: ir.Value, mnemonic: str | None = None) -> str:
    """A readable Python name for an IR value: its own name, or `<op>_<n>` for numbered ones."""
    name = re.sub(r"\W", "_", value.name)
    if name[0].isdigit():
        stem = (mnemonic or "v").split(".")[-1]
        name = f"{stem}_{name}"
    if keyword.iskeyword(name) or name in _RESERVED or name.endswith("_ptr"):
        name += "_"
    return name


# --- the op tables ----------------------------------------------------------------------------

# unary: mnemonic -> Triton expression of `x` (already in its compute type)
ELEMENTWISE_UNARY = {
    "neg": "-{x}",
    "abs": "tl.abs({x})",
    "exp": "tl.exp({x})",
    "log": "tl.log({x})",
    "sqrt": "tl.sqrt({x})",
    "rsqrt": "tl.rsqrt({x})",
    "sigmoid": "tl.sigmoid({x})",
    "silu": "{x} * tl.sigmoid({x})",
    "tanh": "2.0 * tl.sigmoid(2.0 * {x}) - 1.0",
    "sin": "tl.sin({x})",
    "cos": "tl.cos({x})",
    "reciprocal": "1.0 / {x}",
    "erf": "tl.erf({x})",
    "floor": "tl.floor({x})",
    "ceil": "tl.ceil({x})",
    "copy": "{x}",
}
_FLOAT_RESULT_UNARY = {"exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "sin", "cos"}
_FLOAT_RESULT_UNARY |= {"reciprocal", "erf"}

ELEMENTWISE_BINARY = {
    "add": "{a} + {b}",
    "sub": "{a} - {b}",
    "mul": "{a} * {b}",
    "div": "{a} / {b}",
    "maximum": "tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)",  # NaN wins, as torch
    "minimum": "tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)",
    "eq": "{a} == {b}",
    "ne": "{a} != {b}",
    "lt": "{a} < {b}",
    "le": "{a} <= {b}",
    "gt": "{a} > {b}",
    "ge": "{a} >= {b}",
    # as selects, not `&`/`|`: Triton's interpreter cannot combine a tile's truth values with a
    # 0-d operand's (numpy refuses bitwise_and on the mixed types)
    "logical_and": "tl.where({a} != 0, {b} != 0, False)",
    "logical_or": "tl.where({a} != 0, True, {b} != 0)",
    "bitwise_and": "{a} & {b}",
}
_BOOL_BINARY = {"add": "{a} | {b}", "mul": "{a} & {b}"}

ELEMENTWISE = (
    set(ELEMENTWISE_UNARY)
    | set(ELEMENTWISE_BINARY)
    | {"relu", "softplus", "logical_not", "cast", "where", "clamp", "pow", "constant", "full"}
)
REDUCTIONS = {"sum", "mean", "amax", "amin", "softmax", "log_softmax"}
VIEWS = {"reshape", "unsqueeze", "squeeze", "expand"}


class BodyEmitter:
    """Emits one body's ops as Triton statements into `lines`.

    `domain` is the iteration shape (rows x last dim); `bind_input` registers a loaded input.
    `reduce_mask` masks padded columns before a reduction; `n_cols` is the row length.
    """

    def __init__(
        self, domain: Sequence[Dim], reduce_mask: str, n_cols: str, indent: str, axis: int = -1
    ):
        self.domain = tuple(domain)
        self.axis = axis % len(self.domain)  # the column axis: reductions run along it
        self.reduce_mask = reduce_mask
        self.n_cols = n_cols
        self.indent = indent
        self.lines: list[str] = []
        self.values: dict[str, Val] = {}
        self.used_names: set[str] = set()

    def fresh(self, name: str) -> str:
        while name in self.used_names:
            name += "_"
        self.used_names.add(name)
        return name

    def bind(self, value: ir.Value, expr: str, layout: str) -> None:
        self.values[value.name] = Val(expr, layout, value.dtype)

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)

    def emit_nodes(self, nodes: Sequence[ir.Node]) -> None:
        for node in nodes:
            where = f"  @ {node.loc.source}" if node.loc is not None and node.loc.source else ""
            self.emit("# " + node_text(node).split("  #")[0].strip() + where)
            self.emit_node(node)

    def emit_node(self, node: ir.Node) -> None:
        m = node.name
        if m in ("constant", "full"):
            return self._constant(node)
        if m in VIEWS:
            return self._view(node)
        if m in REDUCTIONS:
            return self._reduction(node)
        if m not in ELEMENTWISE:
            raise Unsupported(f"{m} has no Triton body emitter")
        args = [self.values[v.name] for v in node.operands]
        out = node.result
        expr = self._elementwise(node, args)
        self._assign(out, expr, join(*(a.layout for a in args)), m)

    def _assign(self, out: ir.Value, expr: str, layout: str, mnemonic: str) -> None:
        name = self.fresh(py_name(out, mnemonic))
        self.emit(f"{name} = {expr}")
        self.values[out.name] = Val(name, layout, out.dtype)

    # --- elementwise ------------------------------------------------------------------------

    def _as(self, v: Val, dtype: ir.DType) -> str:
        """`v` converted to the compute type of `dtype` (literals stay literals)."""
        if v.literal is not None:
            lit = float(v.literal) if dtype.is_float else v.literal
            return literal_text(lit)
        if compute_type(v.dtype) == compute_type(dtype):
            return v.expr
        if dtype == ir.DType.bool:
            return f"({v.expr} != 0)"
        return f"{v.expr}.to({compute_type(dtype)})"

    def _elementwise(self, node: ir.Node, args: list[Val]) -> str:
        m, out = node.name, node.result.dtype
        if m in ("floor", "ceil") and not out.is_float:
            return args[0].expr  # integers are already whole
        if m in ELEMENTWISE_UNARY:
            x = self._as(args[0], out) if m in _FLOAT_RESULT_UNARY else args[0].expr
            return ELEMENTWISE_UNARY[m].format(x=x)
        if m in ELEMENTWISE_BINARY:
            common = out if out != ir.DType.bool else _common(args)
            a, b = (self._as(v, common) for v in args)
            if common == ir.DType.bool and m in _BOOL_BINARY:
                return _BOOL_BINARY[m].format(a=a, b=b)
            return ELEMENTWISE_BINARY[m].format(a=a, b=b)
        return self._special(node, args)

    def _special(self, node: ir.Node, args: list[Val]) -> str:
        m, out, attrs = node.name, node.result.dtype, node.attrs
        x = args[0]
        if m == "relu":
            return f"tl.maximum({x.expr}, {'0.0' if out.is_float else '0'})"
        if m == "logical_not":
            return f"{x.expr} == 0"
        if m == "softplus":
            beta, threshold = attrs["beta"], attrs["threshold"]
            scaled = x.expr if beta == 1.0 else f"({literal_text(beta)} * {x.expr})"
            soft = f"tl.log(1.0 + tl.exp({scaled}))"
            soft = soft if beta == 1.0 else f"{soft} / {literal_text(beta)}"
            return f"tl.where({scaled} > {literal_text(threshold)}, {x.expr}, {soft})"
        if m == "cast":
            return self._cast(x, attrs["dtype"])
        if m == "where":
            a, b = self._as(args[1], out), self._as(args[2], out)
            return f"tl.where({self._as(x, ir.DType.bool)}, {a}, {b})"
        if m == "clamp":
            return self._clamp(x, attrs["min"], attrs["max"], out)
        if m == "pow":
            return self._pow(args, out)
        raise Unsupported(f"{m} has no Triton body emitter")

    def _cast(self, x: Val, dtype: ir.DType) -> str:
        expr = self._as(x, dtype)
        if dtype in (ir.DType.bf16, ir.DType.f16):  # keep the IR's rounding point
            return f"{expr}.to({storage_type(dtype)}).to(tl.float32)"
        if dtype.is_f8:
            raise Unsupported(f"cast to {dtype} (float8) is not emitted in bodies")
        return expr

    def _clamp(self, x: Val, lo, hi, out: ir.DType) -> str:
        expr = self._as(x, out)
        if lo is not None:
            expr = f"tl.maximum({expr}, {literal_text(float(lo) if out.is_float else lo)})"
        if hi is not None:
            expr = f"tl.minimum({expr}, {literal_text(float(hi) if out.is_float else hi)})"
        return expr

    def _pow(self, args: list[Val], out: ir.DType) -> str:
        exponent = args[1].literal
        base = self._as(args[0], out)
        if exponent == 2:
            return f"{base} * {base}"
        if exponent == 0.5:
            return f"tl.sqrt({base})"
        if exponent == -0.5:
            return f"tl.rsqrt({base})"
        raise Unsupported("pow is emitted only for the constant exponents 2, 0.5 and -0.5")

    # --- constants, views -------------------------------------------------------------------

    def _constant(self, node: ir.Node) -> None:
        value = node.attrs["value"]
        if not isinstance(value, (bool, int, float)):
            raise Unsupported(f"{node.name} with the symbolic value {value}")
        out = node.result
        if node.name == "full" and classify(out.shape, self.domain, self.axis) != "scalar":
            raise Unsupported("full of a non-scalar shape inside a body")
        if out.dtype.is_float:
            value = float(value)
        self.values[out.name] = Val(literal_text(value), "scalar", out.dtype, value)

    def _view(self, node: ir.Node) -> None:
        src = self.values[node.operands[0].name]
        out = node.result
        if src.layout == "row" and list(out.shape) in row_shapes(self.domain, self.axis):
            self.values[out.name] = src
            return
        layout = classify(out.shape, self.domain, self.axis)
        if layout == src.layout or (src.layout == "scalar" and layout == "scalar"):
            self.values[out.name] = src
            return
        if node.name == "expand" and layout == "tile":
            expr = f"tl.broadcast_to({src.expr}, (BLOCK_M, BLOCK_N))"
            return self._assign(out, expr, "tile", node.name)
        raise Unsupported(
            f"{node.name} to {list(out.shape)} changes the row/column layout ({src.layout} -> "
            f"{layout or 'mixed broadcast'}) of the domain {list(self.domain)}"
        )

    # --- reductions over the last dim -------------------------------------------------------

    def _reduction(self, node: ir.Node) -> None:
        x = self.values[node.operands[0].name]
        src = node.operands[0]
        if list(src.shape) != list(self.domain) or x.layout != "tile":
            raise Unsupported(
                f"{node.name} of a {list(src.shape)} value: only reductions of the "
                f"whole domain {list(self.domain)} over its last dim are emitted"
            )
        if reduced_dims(node) != [self.axis]:
            raise Unsupported(
                f"{node.name} over dims {reduced_dims(node)}: a body reduces one dim, the same "
                f"for all its reductions (here {self.axis})"
            )
        name = self.fresh(py_name(node.result, node.name))
        rm, fn = self.reduce_mask, node.name
        if fn in ("softmax", "log_softmax"):
            return self._softmax(node, x, name)
        if fn in ("amax", "amin") and not x.dtype.is_float:
            raise Unsupported(f"{fn} of integers is not emitted")
        if fn == "sum" and not x.dtype.is_float:
            expr = f"tl.sum(tl.where({rm}, {x.expr}, 0).to(tl.int64), axis=1)[:, None]"
        elif fn in ("sum", "mean"):
            expr = f"tl.sum(tl.where({rm}, {x.expr}, 0.0), axis=1)[:, None]"
            expr += f" / {self.n_cols}" if fn == "mean" else ""
        elif fn == "amax":
            expr = f'tl.max(tl.where({rm}, {x.expr}, -float("inf")), axis=1)[:, None]'
        else:
            expr = f'tl.min(tl.where({rm}, {x.expr}, float("inf")), axis=1)[:, None]'
        self.emit(f"{name} = {expr}")
        self.values[node.result.name] = Val(name, "row", node.result.dtype)

    def _softmax(self, node: ir.Node, x: Val, name: str) -> None:
        rm = self.reduce_mask
        row_max = self.fresh(f"{name}_max")
        shifted = self.fresh(f"{name}_shifted")
        denom = self.fresh(f"{name}_denom")
        self.emit(f'{row_max} = tl.max(tl.where({rm}, {x.expr}, -float("inf")), axis=1)[:, None]')
        self.emit(f"{shifted} = {x.expr} - {row_max}")
        exp = f"tl.where({rm}, tl.exp({shifted}), 0.0)"
        if node.name == "softmax":
            numer = self.fresh(f"{name}_numer")
            self.emit(f"{numer} = {exp}")
            self.emit(f"{denom} = tl.sum({numer}, axis=1)[:, None]")
            self.emit(f"{name} = {numer} / {denom}")
        else:
            self.emit(f"{denom} = tl.sum({exp}, axis=1)[:, None]")
            self.emit(f"{name} = {shifted} - tl.log({denom})")
        self.values[node.result.name] = Val(name, "tile", node.result.dtype)


def row_shapes(domain: Sequence[Dim], axis: int) -> list[list[Dim]]:
    """The shapes of a per-row value: the domain without its column axis, or with it as 1."""
    axis %= len(domain)
    return [
        [d for i, d in enumerate(domain) if i != axis],
        [1 if i == axis else d for i, d in enumerate(domain)],
    ]


def reduced_dims(node: ir.Node) -> list[int]:
    """The dims a reduction node reduces, non-negative."""
    rank = node.operands[0].type.rank
    dims = node.attrs.get("dims", (node.attrs.get("dim", -1),))
    return sorted(d % rank for d in dims) if dims else list(range(rank))


def _common(args: list[Val]) -> ir.DType:
    """The dtype comparison operands are computed in (torch promotion over tensor operands)."""
    tensors = [a.dtype for a in args if a.literal is None] or [a.dtype for a in args]
    out = tensors[0]
    for d in tensors[1:]:
        out = promote(out, d)
    if any(a.literal is not None and isinstance(a.literal, float) for a in args):
        out = out if out.is_float else ir.DType.f32
    return out
