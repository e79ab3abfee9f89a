"""te lowerings of the primitive ops: elementwise, broadcasting binary, where, clamp, creation
ops, reductions and the row-wise normalisers (softmax, log_softmax). Registered in `TE_OPS`."""

from __future__ import annotations

from typing import Any

import ir
from backends.tvm.lower import (
    Lowering,
    Unsupported,
    broadcast_index,
    convert,
    dtype_of,
    lowers,
    tvm_dtype,
)
from ir.types import result_dtype

# --- unary --------------------------------------------------------------------------------------


def _unary_expr(node: ir.Node, x: Any) -> Any:
    """One element of a unary op; `x` is already in the result dtype."""
    from tvm import te, tirx

    op, dt = node.op, dtype_of(x)
    zero, one = tirx.const(0, dt), tirx.const(1, dt)
    name = node.name
    if name in ("neg",):
        return zero - x
    if name == "abs":
        return tirx.abs(x) if dt != "bool" else x
    if name in ("exp", "log", "log1p", "sqrt", "rsqrt", "tanh", "sin", "cos", "erf"):
        return getattr(te, name)(x) if hasattr(te, name) else getattr(tirx, name)(x)
    if name == "sigmoid":
        return one / (one + te.exp(zero - x))
    if name == "silu":
        return x / (one + te.exp(zero - x))
    if name == "relu":
        return tirx.max(x, zero)
    if name == "reciprocal":
        return one / x
    if name == "softplus":
        beta, thr = tirx.const(op.beta, dt), tirx.const(op.threshold, dt)
        soft = tirx.log1p(te.exp(beta * x)) / beta
        return tirx.Select(beta * x > thr, x, soft)
    if name == "logical_not":
        return tirx.Not(x)
    if name in ("floor", "ceil"):
        return getattr(te, name)(x) if dt.startswith(("float", "bfloat")) else x
    if name == "sign":
        return tirx.Select(x > zero, one, tirx.Select(x < zero, zero - one, zero))
    if name in ("cast", "copy"):
        return x
    raise Unsupported(f"no TVM lowering for {name}")


UNARY = [
    "neg",
    "abs",
    "exp",
    "log",
    "log1p",
    "sqrt",
    "rsqrt",
    "sigmoid",
    "silu",
    "relu",
    "tanh",
    "sin",
    "cos",
    "reciprocal",
    "erf",
    "softplus",
    "logical_not",
    "floor",
    "ceil",
    "sign",
    "cast",
    "copy",
]


@lowers(*UNARY)
def lower_unary(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te

    (x,) = args
    out = tvm_dtype(node.result.dtype)
    src = "bool" if node.name == "logical_not" else out

    def f(*i: Any) -> Any:
        return convert(_unary_expr(node, convert(x(*i), src)), out)

    return [te.compute(x.shape, f, name=lw.tag(node.name), tag="elemwise")]


# --- binary and ternary -------------------------------------------------------------------------


def _binary_expr(name: str, a: Any, b: Any, out: str) -> Any:
    """One element of a binary op on operands already in the promoted dtype."""
    from tvm import te, tirx

    dt = dtype_of(a)
    is_float = dt.startswith(("float", "bfloat"))
    if dt == "bool" and name in ("add", "mul", "bitwise_and", "maximum", "minimum"):
        return tirx.Or(a, b) if name in ("add", "maximum") else tirx.And(a, b)
    if dt == "bool" and name in ("eq", "ne", "lt", "le", "gt", "ge"):
        # LLVM's vectoriser emits a float compare for vectors of i1 ("fcmp one <4 x i1>" fails
        # verification): compare the bytes instead
        a, b = convert(a, "int8"), convert(b, "int8")
    table = {
        "add": lambda: a + b,
        "sub": lambda: a - b,
        "mul": lambda: a * b,
        "maximum": lambda: tirx.max(a, b),
        "minimum": lambda: tirx.min(a, b),
        "eq": lambda: tirx.EQ(a, b),
        "ne": lambda: tirx.NE(a, b),
        "lt": lambda: a < b,
        "le": lambda: a <= b,
        "gt": lambda: a > b,
        "ge": lambda: a >= b,
        "logical_and": lambda: tirx.And(convert(a, "bool"), convert(b, "bool")),
        "logical_or": lambda: tirx.Or(convert(a, "bool"), convert(b, "bool")),
        "bitwise_and": lambda: a & b,
    }
    if name in table:
        return table[name]()
    if name == "div":
        return convert(a, out) / convert(b, out)
    if name == "floordiv":
        return te.floor(a / b) if is_float else tirx.floordiv(a, b)
    if name == "remainder":
        return a - te.floor(a / b) * b if is_float else tirx.floormod(a, b)
    if name == "pow" and is_float:
        return te.power(a, b)
    raise Unsupported(f"no TVM lowering for {name} on {dt}")


BINARY = [
    "add",
    "sub",
    "mul",
    "div",
    "floordiv",
    "remainder",
    "pow",
    "maximum",
    "minimum",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "bitwise_and",
]


@lowers(*BINARY)
def lower_binary(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te

    a, b = args
    common = tvm_dtype(result_dtype(*(v.type for v in node.operands)))
    out = tvm_dtype(node.result.dtype)
    shape = lw.shape(node.result.type)
    rank = len(shape)

    def f(*i: Any) -> Any:
        x = convert(a(*broadcast_index(a, rank, i)), common)
        y = convert(b(*broadcast_index(b, rank, i)), common)
        return convert(_binary_expr(node.name, x, y, out), out)

    return [te.compute(shape, f, name=lw.tag(node.name), tag="broadcast")]


@lowers("where")
def lower_where(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    c, a, b = args
    out = tvm_dtype(node.result.dtype)
    shape = lw.shape(node.result.type)
    rank = len(shape)

    def f(*i: Any) -> Any:
        x = convert(a(*broadcast_index(a, rank, i)), out)
        y = convert(b(*broadcast_index(b, rank, i)), out)
        return tirx.Select(c(*broadcast_index(c, rank, i)), x, y)

    return [te.compute(shape, f, name=lw.tag("where"), tag="broadcast")]


@lowers("clamp")
def lower_clamp(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    (x,) = args
    out = tvm_dtype(node.result.dtype)
    lo, hi = node.op.min, node.op.max

    def f(*i: Any) -> Any:
        v = convert(x(*i), out)
        if lo is not None:
            v = tirx.max(v, tirx.const(lo, out))
        if hi is not None:
            v = tirx.min(v, tirx.const(hi, out))
        return v

    return [te.compute(x.shape, f, name=lw.tag("clamp"), tag="elemwise")]


# --- creation -----------------------------------------------------------------------------------


def _scalar(lw: Lowering, value: Any, dtype: str) -> Any:
    from tvm import tirx

    if isinstance(value, (bool, int, float)):
        return tirx.const(value, dtype)
    return convert(tirx.IntImm("int32", 0) + lw.dim(value), dtype)


@lowers("constant", "full")
def lower_full(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te

    out = tvm_dtype(node.result.dtype)
    value = _scalar(lw, node.op.value, out)
    shape = lw.shape(node.result.type)
    return [te.compute(shape, lambda *i: value, name=lw.tag(node.name), tag="elemwise")]


@lowers("iota")
def lower_iota(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te

    out = tvm_dtype(node.result.dtype)
    start, step = _scalar(lw, node.op.start, "int64"), node.op.step
    shape = lw.shape(node.result.type)
    f = lambda i: convert(start + i.astype("int64") * step, out)
    return [te.compute(shape, f, name=lw.tag("iota"), tag="elemwise")]


# --- reductions ---------------------------------------------------------------------------------

REDUCE = ("sum", "mean", "prod", "amax", "amin", "any", "all")


def _reducer(name: str, dtype: str) -> Any:
    from tvm import te, tirx

    if name in ("sum", "mean"):
        return te.sum
    if name in ("amax", "any"):
        return te.max
    if name in ("amin", "all"):
        return te.min
    return te.comm_reducer(lambda x, y: x * y, lambda t: tirx.const(1, t), name="prod")


@lowers(*REDUCE)
def lower_reduce(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    (x,) = args
    op, xt = node.op, node.operands[0].type
    red = op.reduced(xt)
    out = tvm_dtype(node.result.dtype)
    acc = "int8" if out == "bool" else out  # any/all: max/min over 0/1
    axes = [te.reduce_axis((0, x.shape[d]), name=f"k{d}") for d in red]
    shape = lw.shape(node.result.type)
    reducer = _reducer(node.name, acc)

    def f(*i: Any) -> Any:
        it = iter(i)
        idx = []
        for d in range(xt.rank):
            if d in red:
                idx.append(axes[red.index(d)])
                if op.keepdim:
                    next(it)
            else:
                idx.append(next(it))
        v = convert(x(*idx), "bool" if out == "bool" else acc)
        return reducer(convert(v, acc), axis=axes) if axes else convert(v, acc)

    acc_t = te.compute(shape, f, name=lw.tag(node.name), tag="reduce")
    if node.name == "mean":
        count = 1
        for d in red:
            count = count * x.shape[d]
        n = tirx.Cast(out, count)
        return [te.compute(shape, lambda *i: acc_t(*i) / n, name=lw.tag("mean"), tag="elemwise")]
    if out == "bool":
        return [lw.cast(acc_t, "bool")]
    return [acc_t]


@lowers("softmax", "log_softmax")
def lower_softmax(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te

    (x,) = args
    rank = len(x.shape)
    d = node.op.dim % rank
    out = tvm_dtype(node.result.dtype)
    rows = [s for i, s in enumerate(x.shape) if i != d]
    k = te.reduce_axis((0, x.shape[d]), name="k")
    xf = lambda i, j: convert(x(*i[:d], j, *i[d:]), "float32")
    mx = te.compute(rows, lambda *i: te.max(xf(i, k), axis=k), name=lw.tag("row_max"))
    k2 = te.reduce_axis((0, x.shape[d]), name="k2")
    den = te.compute(
        rows, lambda *i: te.sum(te.exp(xf(i, k2) - mx(*i)), axis=k2), name=lw.tag("row_sum")
    )

    def f(*i: Any) -> Any:
        r = (*i[:d], *i[d + 1 :])
        z = convert(x(*i), "float32") - mx(*r)
        v = z - te.log(den(*r)) if node.name == "log_softmax" else te.exp(z) / den(*r)
        return convert(v, out)

    return [te.compute(x.shape, f, name=lw.tag(node.name), tag="elemwise")]
