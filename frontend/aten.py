"""The ATen -> IR table: one small translator per ATen op.

Each translator receives the translation context `cx` and the node's arguments with every fx node
already replaced by what it translated to (an IR `Value`, a tuple of them, or a sympy expression
for symbolic sizes). It returns a `Value` or a tuple of `Value`s. The context adds the provenance of
the node being translated to every op it emits, and checks the result types against torch's own
shape propagation, so a wrong translation fails at capture time, not at run time.

Supported ops are exactly the keys of `TABLE`; `frontend.capture` names the unsupported ones.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

import ir
from ir import DType, Value

aten = torch.ops.aten
Translator = Callable[..., Any]
TABLE: dict[Any, Translator] = {}

# Near misses we can name when an op is unsupported: op name -> how to spell it instead.
ALTERNATIVES: dict[str, str] = {
    "nonzero": "data-dependent shapes cannot be compiled; keep the full shape and mask with "
    "torch.where, or pick a static number of entries with torch.topk",
    "masked_select": "use torch.where(mask, x, fill) to keep the shape static",
    "bincount": "count with torch.zeros(n).scatter_add(0, idx, torch.ones_like(idx))",
    "_local_scalar_dense": "`.item()`/`.tolist()` move data to the host; keep the value a 0-d tensor",
    "unique": "data-dependent shapes cannot be compiled; use sort + a mask of first occurrences",
    "repeat_interleave": "use unsqueeze + expand + reshape",
    "auto_functionalized": "dsv4c keeps only pure custom ops whole: declare the op with "
    "mutates_args=() and return new tensors, or register a translator with frontend.translates",
    "auto_functionalized_v2": "dsv4c keeps only pure custom ops whole: declare the op with "
    "mutates_args=() and return new tensors, or register a translator with frontend.translates",
}


def translates(*ops: Any) -> Callable[[Translator], Translator]:
    """Register one translator for one or more ATen overloads."""

    def deco(fn: Translator) -> Translator:
        for op in ops:
            TABLE[op] = fn
        return fn

    return deco


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --- elementwise ---------------------------------------------------------------------------

_UNARY = {
    aten.neg.default: "neg", aten.abs.default: "abs", aten.exp.default: "exp",
    aten.log.default: "log", aten.log1p.default: "log1p", aten.sqrt.default: "sqrt",
    aten.rsqrt.default: "rsqrt", aten.sigmoid.default: "sigmoid", aten.silu.default: "silu",
    aten.relu.default: "relu", aten.tanh.default: "tanh", aten.sin.default: "sin",
    aten.cos.default: "cos", aten.reciprocal.default: "reciprocal", aten.floor.default: "floor",
    aten.ceil.default: "ceil", aten.sign.default: "sign", aten.erf.default: "erf",
    aten.logical_not.default: "logical_not",
}  # fmt: skip

for _op, _mnemonic in _UNARY.items():
    TABLE[_op] = lambda cx, x, _m=_mnemonic: cx.op(_m, x)


@translates(aten.softplus.default)
def _softplus(cx, x, beta=1.0, threshold=20.0):
    return cx.op("softplus", x, beta=float(beta), threshold=float(threshold))


_BINARY = {
    "add": "add", "sub": "sub", "mul": "mul", "maximum": "maximum", "minimum": "minimum",
    "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
    "logical_and": "logical_and", "logical_or": "logical_or", "bitwise_and": "bitwise_and",
    "remainder": "remainder", "floor_divide": "floordiv", "pow": "pow",
}  # fmt: skip


def _binary(mnemonic: str) -> Translator:
    def translate(cx, a, b, *, alpha=1):
        a, b = cx.operands(a, b)
        if alpha != 1:  # add/sub(a, b, alpha) = a ± alpha * b
            b = cx.op("mul", b, cx.const(alpha))
        return cx.op(mnemonic, a, b)

    return translate


for _name, _mnemonic in _BINARY.items():
    for _overload in (
        "Tensor",
        "Scalar",
        "default",
        "Tensor_Scalar",
        "Tensor_Tensor",
        "Scalar_Tensor",
    ):
        _packet = getattr(aten, _name)
        if _overload in _packet.overloads():
            TABLE[getattr(_packet, _overload)] = _binary(_mnemonic)


@translates(aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div(cx, a, b, *, rounding_mode=None):
    a, b = cx.operands(a, b)
    if rounding_mode is None:
        return cx.op("div", a, b)
    if rounding_mode == "floor":
        return cx.op("floordiv", a, b)
    quotient = cx.op("div", a, b)  # "trunc": round toward zero
    truncated = cx.op(
        "where",
        cx.op("lt", quotient, cx.const(0)),
        cx.op("ceil", quotient),
        cx.op("floor", quotient),
    )
    return cx.op("cast", truncated, dtype=cx.expected_dtype())


@translates(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(cx, cond, a, b):
    a, b = cx.operands(a, b)
    return cx.op("where", cond, a, b)


@translates(aten.clamp.default, aten.clamp.Tensor)
def _clamp(cx, x, min=None, max=None):
    if isinstance(min, Value) or isinstance(max, Value):
        if min is not None:
            x = cx.op("maximum", x, min)
        if max is not None:
            x = cx.op("minimum", x, max)
        return x
    return cx.op("clamp", x, min=min, max=max)


@translates(aten.clamp_min.default)
def _clamp_min(cx, x, min):
    return cx.op("clamp", x, min=min, max=None)


@translates(aten.clamp_max.default)
def _clamp_max(cx, x, max):
    return cx.op("clamp", x, min=None, max=max)


@translates(aten._to_copy.default, aten.to.dtype)
def _to_copy(cx, x, dtype=None, **_ignored):
    if dtype is None or DType.from_torch(dtype) == cx.type_of(x).dtype:
        return x  # SSA values are immutable: a same-dtype copy is the value itself
    return cx.op("cast", x, dtype=DType.from_torch(dtype))


@translates(
    aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default
)
def _copy(cx, x, **_ignored):
    return x


# --- reductions ----------------------------------------------------------------------------


def _reduce(mnemonic: str) -> Translator:
    def translate(cx, x, dims=None, keepdim=False, *, dtype=None):
        rank = cx.type_of(x).rank
        if dims is None or (isinstance(dims, Sequence) and len(dims) == 0) or rank == 0:
            dims = list(range(rank))  # (a 0-d tensor's dim 0 or -1 is the tensor itself)
        elif isinstance(dims, int):
            dims = [dims]
        if dtype is not None:
            x = cx.op("cast", x, dtype=DType.from_torch(dtype))
        dims = tuple(sorted(_dim(d, rank) for d in dims))
        return cx.op(mnemonic, x, dims=dims, keepdim=bool(keepdim))

    return translate


for _name in ("sum", "mean", "amax", "amin", "prod", "any", "all"):
    for _op in getattr(aten, _name).overloads():
        if _op in ("dim_IntList", "dim", "default", "dims", "dim_int", "int"):
            TABLE[getattr(getattr(aten, _name), _op)] = _reduce(_name)


@translates(aten.argmax.default, aten.argmin.default)
def _argmax(cx, x, dim=None, keepdim=False):
    mnemonic = "argmax" if cx.node.target is aten.argmax.default else "argmin"
    if dim is None:
        x, dim = cx.op("reshape", x, shape=(-1,)), 0
    return cx.op(mnemonic, x, dim=_dim(dim, cx.type_of(x).rank), keepdim=bool(keepdim))


@translates(
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default
)
def _softmax(cx, x, dim, dtype_or_half=None):
    mnemonic = "log_softmax" if "log" in cx.node.target.__name__ else "softmax"
    if isinstance(dtype_or_half, torch.dtype):
        x = cx.op("cast", x, dtype=DType.from_torch(dtype_or_half))
    return cx.op(mnemonic, x, dim=_dim(dim, cx.type_of(x).rank))


@translates(aten.cumsum.default)
def _cumsum(cx, x, dim, *, dtype=None):
    if dtype is not None:
        x = cx.op("cast", x, dtype=DType.from_torch(dtype))
    y = cx.op("cumsum", x, dim=_dim(dim, cx.type_of(x).rank))
    if cx.type_of(y).dtype != cx.expected_dtype():  # cumsum(dtype=int32): the IR scans in i64
        y = cx.op("cast", y, dtype=cx.expected_dtype())
    return y


# --- linear algebra ------------------------------------------------------------------------


@translates(aten.linear.default)
def _linear(cx, x, weight, bias=None):
    # F.linear(x, w, b) = x @ wᵀ + b
    wt = cx.op("permute", weight, dims=(1, 0))
    y = cx.op("matmul", x, wt)
    return y if bias is None else cx.op("add", y, bias)


@translates(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(cx, a, b):
    return cx.op("matmul", a, b)


@translates(aten.addmm.default)
def _addmm(cx, bias, a, b, *, beta=1, alpha=1):
    y = cx.op("matmul", a, b)
    if alpha != 1:
        y = cx.op("mul", y, cx.const(alpha))
    if beta != 1:
        bias = cx.op("mul", bias, cx.const(beta))
    return cx.op("add", y, bias)


# Custom ops are keyed by their qualified name: the frontend never imports the model package.
@translates("dsv4c_models::grouped_mm")
def _grouped_mm(cx, x, w, offsets):
    return cx.op("grouped_mm", x, w, offsets)


# --- indexing ------------------------------------------------------------------------------


@translates(aten.embedding.default)
def _embedding(cx, weight, ids, padding_idx=-1, *_flags):
    return cx.op("embedding", weight, ids)


@translates(aten.gather.default)
def _gather(cx, x, dim, index, *, sparse_grad=False):
    if cx.type_of(index).dtype != DType.i64:  # torch takes i32 indices too; the IR wants i64
        index = cx.op("cast", index, dtype=DType.i64)
    return cx.op("gather", x, index, dim=_dim(dim, cx.type_of(x).rank))


@translates(aten.index_select.default)
def _index_select(cx, x, dim, index):
    if cx.type_of(x).rank == 0:  # torch picks from a 0-d tensor as from its 1-element view
        picked = cx.op("index_select", cx.op("reshape", x, shape=(1,)), index, dim=0)
        return cx.op("reshape", picked, shape=())
    return cx.op("index_select", x, index, dim=_dim(dim, cx.type_of(x).rank))


@translates(aten.index.Tensor)
def _index(cx, x, indices):
    used = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(used) == 1:
        dim, idx = used[0]
        return cx.op("index", x, idx, dim=dim)
    return cx.op("index_multi", x, *[i for _, i in used], dims=tuple(d for d, _ in used))


@translates(aten.scatter.src, aten.scatter.value)
def _scatter(cx, x, dim, index, src):
    if not isinstance(src, Value):  # scatter.value: the scalar fills index's shape, in x's dtype
        shape = tuple(cx.type_of(index).shape)
        src = cx.op("full", shape=shape, value=_scalar(src), dtype=cx.type_of(x).dtype)
    return cx.op("scatter", x, index, src, dim=_dim(dim, cx.type_of(x).rank))


@translates(aten.scatter_add.default)
def _scatter_add(cx, x, dim, index, src):
    return cx.op("scatter_add", x, index, src, dim=_dim(dim, cx.type_of(x).rank))


@translates(aten.index_put.default)
def _index_put(cx, x, indices, values, accumulate=False):
    used = [(d, i) for d, i in enumerate(indices) if i is not None]
    (values,) = cx.operands(values, like=x)
    if len(used) == 1 and used[0][0] == 0 and cx.type_of(used[0][1]).dtype == DType.bool:
        return _masked_put(cx, x, used[0][1], values, accumulate)
    if len(used) == 1:
        dim, idx = used[0]
        return cx.op("index_put", x, idx, values, dim=dim, accumulate=bool(accumulate))
    return cx.op(
        "index_put_multi", x, *[i for _, i in used], values,
        dims=tuple(d for d, _ in used), accumulate=bool(accumulate),
    )  # fmt: skip


def _masked_put(cx, x, mask, values, accumulate):
    """x[mask] = values with values broadcastable to one selected row (x.shape[mask.rank:]):
    where(mask, values, x); values listing one row per True entry are data-dependent."""
    t, k = cx.type_of(x), cx.type_of(mask).rank
    rest = tuple(t.shape[k:])
    v = cx.type_of(values)
    if v.rank > len(rest) or any(a not in (1, b) for a, b in zip(v.shape[::-1], rest[::-1])):
        raise TypeError(
            f"x[mask] = values with values {list(v.shape)} (one row per True entry) has a "
            "data-dependent shape; write torch.where(mask[..., None], values, x) instead"
        )
    if v.dtype != t.dtype:
        values = cx.op("cast", values, dtype=t.dtype)
    values = cx.op("expand", values, shape=tuple(t.shape))
    if accumulate:
        values = cx.op("add", x, values)
    mask = cx.op("reshape", mask, shape=tuple(cx.type_of(mask).shape) + (1,) * len(rest))
    return cx.op("where", cx.op("expand", mask, shape=tuple(t.shape)), values, x)


@translates(aten.topk.default)
def _topk(cx, x, k, dim=-1, largest=True, sorted=True):
    return cx.op(
        "topk",
        x,
        k=k,
        dim=_dim(dim, cx.type_of(x).rank),
        largest=bool(largest),
        sorted=bool(sorted),
    )


@translates(aten.sort.default, aten.sort.stable)
def _sort(cx, x, *args, stable=False, dim=-1, descending=False):
    if cx.node.target is aten.sort.default and args:  # sort(x, dim=-1, descending=False)
        dim, descending = (list(args) + [descending])[:2]
    return cx.op(
        "sort",
        x,
        dim=_dim(dim, cx.type_of(x).rank),
        descending=bool(descending),
        stable=bool(stable),
    )


@translates(aten.argsort.default, aten.argsort.stable)
def _argsort(cx, x, *args, stable=False, dim=-1, descending=False):
    if cx.node.target is aten.argsort.default and args:
        dim, descending = (list(args) + [descending])[:2]
    return cx.op(
        "argsort",
        x,
        dim=_dim(dim, cx.type_of(x).rank),
        descending=bool(descending),
        stable=bool(stable),
    )


# --- shapes --------------------------------------------------------------------------------


@translates(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(cx, x, shape):
    return cx.op("reshape", x, shape=_resolve_holes(cx, shape))


def _resolve_holes(cx, shape) -> tuple:
    """A -1 in a view shape becomes torch's own size for it: with a zero-sized dim elsewhere the
    IR cannot infer it from the element count (0 / 0), but torch's shape propagation knows it."""
    shape = tuple(shape)
    if -1 not in shape or "val" not in cx.node.meta:
        return shape  # no torch shapes (the MLIR import): the IR infers the -1 from the count
    return tuple(cx.expected_shape())


@translates(aten.permute.default)
def _permute(cx, x, dims):
    rank = cx.type_of(x).rank
    return cx.op("permute", x, dims=tuple(_dim(d, rank) for d in dims))


@translates(aten.t.default)
def _t(cx, x):
    return x if cx.type_of(x).rank < 2 else cx.op("permute", x, dims=(1, 0))


@translates(aten.transpose.int)
def _transpose(cx, x, d0, d1):
    rank = cx.type_of(x).rank
    dims = list(range(rank))
    a, b = _dim(d0, rank), _dim(d1, rank)
    dims[a], dims[b] = dims[b], dims[a]
    return cx.op("permute", x, dims=tuple(dims))


@translates(aten.expand.default)
def _expand(cx, x, shape, *, implicit=False):
    return cx.op("expand", x, shape=tuple(shape))


@translates(aten.slice.Tensor)
def _slice(cx, x, dim=0, start=None, end=None, step=1):
    t = cx.type_of(x)
    dim = _dim(dim, t.rank)
    size = t.shape[dim]
    start = 0 if start is None else start
    end = size if end is None or (isinstance(end, int) and end >= 2**62) else end
    return cx.op("slice", x, dim=dim, start=start, end=end, step=step)


@translates(aten.select.int)
def _select(cx, x, dim, index):
    return cx.op("select", x, dim=_dim(dim, cx.type_of(x).rank), index=index)


@translates(aten.cat.default)
def _cat(cx, tensors, dim=0):
    # torch.cat skips 1-D empty tensors (a legacy rule caches built from torch.tensor([]) rely on)
    full = [t for t in tensors if tuple(cx.type_of(t).shape) != (0,)] or list(tensors[:1])
    if len(full) == 1:
        return full[0]
    return cx.op("concat", *full, dim=_dim(dim, cx.type_of(full[0]).rank))


@translates(aten.constant_pad_nd.default)
def _pad(cx, x, pad, value=0):
    return cx.op("pad", x, pads=tuple(pad), value=float(value))


@translates(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(cx, x, dims):
    rank = cx.type_of(x).rank
    dims = [dims] if isinstance(dims, int) else list(dims)
    shape = [
        s
        for i, s in enumerate(cx.type_of(x).shape)
        if not (i in {_dim(d, rank) for d in dims} and s == 1)
    ]
    return cx.op("reshape", x, shape=tuple(shape))


@translates(aten.unsqueeze.default)
def _unsqueeze(cx, x, dim):
    return cx.op("unsqueeze", x, dim=_dim(dim, cx.type_of(x).rank + 1))


@translates(aten.flip.default)
def _flip(cx, x, dims):
    rank = cx.type_of(x).rank
    return cx.op("flip", x, dims=tuple(_dim(d, rank) for d in dims))


@translates(aten.repeat.default)
def _repeat(cx, x, repeats):
    return cx.op("repeat", x, repeats=tuple(repeats))


# --- creation ------------------------------------------------------------------------------


@translates(aten.full.default)
def _full(cx, size, value, **_kw):
    return cx.op("full", shape=tuple(size), value=_scalar(value), dtype=cx.expected_dtype())


@translates(aten.full_like.default, aten.zeros_like.default, aten.ones_like.default)
def _full_like(cx, x, value=None, **_kw):
    if value is None:
        value = 1 if cx.node.target is aten.ones_like.default else 0
    return cx.op(
        "full", shape=tuple(cx.type_of(x).shape), value=_scalar(value), dtype=cx.expected_dtype()
    )


@translates(aten.zeros.default, aten.ones.default)
def _zeros(cx, size, **_kw):
    value = 1 if cx.node.target is aten.ones.default else 0
    return cx.op("full", shape=tuple(size), value=value, dtype=cx.expected_dtype())


@translates(aten.scalar_tensor.default)
def _scalar_tensor(cx, value, **_kw):
    return cx.op("constant", value=_scalar(value), dtype=cx.expected_dtype())


@translates(aten.arange.start_step, aten.arange.start, aten.arange.default)
def _arange(cx, *args, **_kw):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (list(args) + [1])[:3]
    descending = isinstance(step, int) and step < 0
    if descending or any(isinstance(v, float) for v in (start, end, step)):
        # arange(a, b, s) over floats = a + s * iota(0, n), n = torch's own length
        (count,) = cx.expected_shape()
        ramp = cx.op("iota", start=0, end=count, step=1, dtype=cx.expected_dtype())
        scaled = cx.op("mul", ramp, cx.const(float(step), cx.expected_dtype()))
        return cx.op("add", scaled, cx.const(float(start), cx.expected_dtype()))
    return cx.op("iota", start=start, end=end, step=step, dtype=cx.expected_dtype())


def _scalar(v):
    if hasattr(v, "free_symbols") and v.free_symbols:
        return v  # a symbolic size used as a fill value (full_like(x, T // 4)): a Dim
    return v if isinstance(v, bool) else (float(v) if isinstance(v, float) else int(v))


# --- nodes that carry no tensor computation ------------------------------------------------

# Python-level size arithmetic (`T // 4`) and runtime assertions: the context reads sizes from
# torch's own symbolic values, so these translate to nothing.
SIZE_OPS = {
    aten.sym_size.int, operator.floordiv, operator.mul, operator.add, operator.sub,
    operator.mod, operator.neg, torch.sym_max, torch.sym_min, torch.sym_float,
}  # fmt: skip
IGNORED_OPS = {
    aten._assert_tensor_metadata.default, aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default, aten._assert_async.msg,
}  # fmt: skip


def lookup(target: Any) -> Translator | None:
    """The translator for an fx node target: by overload, or by qualified name for custom ops."""
    if target in TABLE:
        return TABLE[target]
    name = target.name() if isinstance(target, torch._ops.OpOverload) else None
    return TABLE.get(name) if name else None


@translates(aten.bitwise_not.default)
def _bitwise_not(cx, x):
    if cx.type_of(x).dtype != DType.bool:
        raise TypeError("bitwise_not is only supported on bool tensors (as logical_not)")
    return cx.op("logical_not", x)


@translates(aten.isinf.default)
def _isinf(cx, x):
    # isinf(x) = |x| == inf
    return cx.op("eq", cx.op("abs", x), cx.const(float("inf")))


@translates(aten.bitwise_or.Tensor, aten.bitwise_or.Scalar)
def _bitwise_or(cx, a, b):
    a, b = cx.operands(a, b)
    if cx.type_of(a).dtype != DType.bool or cx.type_of(b).dtype != DType.bool:
        raise TypeError("bitwise_or is only supported on bool tensors (as logical_or)")
    return cx.op("logical_or", a, b)


# --- composite ops that torch.export keeps whole (no core-ATen decomposition run needed) -----


@translates(aten.flatten.using_ints)
def _flatten(cx, x, start_dim=0, end_dim=-1):
    shape = cx.type_of(x).shape
    if not shape:
        return cx.op("reshape", x, shape=(1,))
    lo, hi = _dim(start_dim, len(shape)), _dim(end_dim, len(shape))
    merged = 1
    for s in shape[lo : hi + 1]:
        merged = merged * s
    return cx.op("reshape", x, shape=tuple(shape[:lo]) + (merged,) + tuple(shape[hi + 1 :]))


@translates(aten.unflatten.int)
def _unflatten(cx, x, dim, sizes):
    shape = cx.type_of(x).shape
    d = _dim(dim, len(shape))
    new = tuple(shape[:d]) + tuple(sizes) + tuple(shape[d + 1 :])
    return cx.op("reshape", x, shape=_resolve_holes(cx, new))


@translates(aten.square.default)
def _square(cx, x):
    return cx.op("mul", x, x)


@translates(aten.stack.default)
def _stack(cx, tensors, dim=0):
    d = _dim(dim, cx.type_of(tensors[0]).rank + 1)
    return cx.op("concat", *[cx.op("unsqueeze", t, dim=d) for t in tensors], dim=d)


@translates(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(cx, x, other, alpha=1):
    # rsub(x, other, alpha) = other - alpha * x
    x, other = cx.operands(x, other)
    if alpha != 1:
        x = cx.op("mul", x, cx.const(alpha))
    return cx.op("sub", other, x)


@translates(aten.pad.default)
def _pad_mode(cx, x, pad, mode="constant", value=None):
    if mode != "constant":
        raise TypeError(f"F.pad mode {mode!r} is not supported; only mode='constant'")
    return cx.op("pad", x, pads=tuple(pad), value=float(value or 0.0))


@translates(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(cx, x, mask, value):
    if not isinstance(value, ir.Value):
        value = cx.const(value, cx.type_of(x).dtype)
    return cx.op("where", mask, value, x)


@translates(aten.index_add.default)
def _index_add(cx, x, dim, index, source, *, alpha=1):
    if alpha != 1:
        source = cx.op("mul", source, cx.const(alpha))
    return cx.op("index_put", x, index, source, dim=_dim(dim, cx.type_of(x).rank), accumulate=True)


@translates(aten.__or__.Tensor, aten.__and__.Tensor)
def _bool_ops(cx, a, b):
    mnemonic = "logical_or" if cx.node.target is aten.__or__.Tensor else "logical_and"
    if cx.type_of(a).dtype != DType.bool or cx.type_of(b).dtype != DType.bool:
        raise TypeError("| and & are only supported on bool tensors")
    return cx.op(mnemonic, a, b)


@translates(aten.einsum.default)
def _einsum(cx, equation, operands):
    """Two-operand einsum as one batched matmul: permute each side to [batch, free, contracted],
    flatten the groups, multiply, unflatten and permute to the output order."""
    inputs, output = equation.replace(" ", "").split("->")
    specs = inputs.split(",")
    if len(specs) == 1:
        (spec,), (x,) = specs, operands
        summed = tuple(i for i, c in enumerate(spec) if c not in output)
        if summed:
            x = cx.op("sum", x, dims=summed, keepdim=False)
        kept = [c for c in spec if c in output]
        return cx.op("permute", x, dims=tuple(kept.index(c) for c in output))
    if len(specs) != 2 or any("." in s for s in specs):
        raise TypeError(
            f"einsum {equation!r}: only one or two operands without '...' are supported"
        )
    (sa, sb), (a, b) = specs, operands
    a, sa = _sum_private(cx, a, sa, sb + output)
    b, sb = _sum_private(cx, b, sb, sa + output)
    size = {c: s for spec, v in ((sa, a), (sb, b)) for c, s in zip(spec, cx.type_of(v).shape)}
    batch = [c for c in sa if c in sb and c in output]
    contract = [c for c in sa if c in sb and c not in output]
    left = [c for c in sa if c not in sb]
    right = [c for c in sb if c not in sa]
    a = _group(cx, a, sa, [batch, left, contract], size)
    b = _group(cx, b, sb, [batch, contract, right], size)
    y = cx.op("matmul", a, b)
    order = batch + left + right
    y = cx.op("reshape", y, shape=tuple(size[c] for c in order))
    return cx.op("permute", y, dims=tuple(order.index(c) for c in output))


def _sum_private(cx, x, spec: str, others: str):
    """Sum away labels that appear only in this operand."""
    private = tuple(i for i, c in enumerate(spec) if c not in others)
    if not private:
        return x, spec
    return cx.op("sum", x, dims=private, keepdim=False), "".join(c for c in spec if c not in others)


def _group(cx, x, spec: str, groups: list[list[str]], size: dict):
    order = [c for g in groups for c in g]
    x = cx.op("permute", x, dims=tuple(spec.index(c) for c in order))
    shape = []
    for g in groups:
        n = 1
        for c in g:
            n = n * size[c]
        shape.append(n)
    return cx.op("reshape", x, shape=tuple(shape))


@translates(aten.index_copy.default)
def _index_copy(cx, x, dim, index, source):
    return cx.op("index_put", x, index, source, dim=_dim(dim, cx.type_of(x).rank), accumulate=False)


@translates(aten.native_layer_norm.default, aten.layer_norm.default)
def _layer_norm(cx, x, normalized_shape, weight=None, bias=None, eps=1e-5, *_cudnn):
    """(x - mean) * rsqrt(var + eps) * weight + bias over the trailing `normalized_shape` dims;
    native_layer_norm also returns mean and rstd (keepdim), layer_norm only the output."""
    rank = cx.type_of(x).rank
    dims = tuple(range(rank - len(normalized_shape), rank))
    mean = cx.op("mean", x, dims=dims, keepdim=True)
    centred = cx.op("sub", x, mean)
    var = cx.op("mean", cx.op("mul", centred, centred), dims=dims, keepdim=True)
    rstd = cx.op("rsqrt", cx.op("add", var, *cx.operands(float(eps))))
    out = cx.op("mul", centred, rstd)
    if weight is not None:
        out = cx.op("mul", out, weight)
    if bias is not None:
        out = cx.op("add", out, bias)
    if cx.node.target is aten.layer_norm.default:
        return out
    return out, mean, rstd


# Core ATen ops left by torch's decompositions (split_with_sizes, slice_scatter, histc, ...).
from frontend import aten_core as _aten_core  # noqa: E402,F401  (registers into TABLE)
