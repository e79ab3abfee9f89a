"""te lowerings of the data-movement ops inside fused bodies: reshape, permute, expand, slice,
select, squeeze, unsqueeze, concat, pad. Each output element reads one input element (index
arithmetic on symbolic dims), so they inline into their consumers. Standalone, these ops stay
torch views (no kernel, no copy): they are only lowered as part of a `fused.kernel` body.

`repeat` (torch.Tensor.repeat) is lowered the same way but is not one of them: it copies, so
standalone it is a kernel of its own (the mHC's four streams made from the embedding)."""

from __future__ import annotations

from typing import Any

import ir
from ir.symbolic import same_dim
from backends.tvm.lower import Lowering, Unsupported, convert, guarded, lowers, tvm_dtype

SHAPE_OPS = ("reshape", "permute", "expand", "slice", "select", "squeeze", "unsqueeze")
SHAPE_OPS += ("concat", "pad")


def _compute(lw: Lowering, node: ir.Node, f: Any) -> list[Any]:
    from tvm import te

    shape = lw.shape(node.result.type)
    return [te.compute(shape, f, name=lw.tag(node.name), tag="injective")]


def _const_int(v: Any, what: str) -> int:
    if not isinstance(v, int):
        raise Unsupported(f"symbolic {what} {v} in a fused body")
    return v


@lowers("reshape")
def lower_reshape(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    """Dims the reshape keeps at either end index the input directly; only the ones between are
    flattened and split again (with symbolic sizes there, TVM's simplifier slows down sharply on
    the floordiv/floormod chains of a fused RoPE)."""
    from tvm import tirx

    (x,) = args
    src, dst = node.operands[0].shape, node.result.shape
    lead = 0
    while lead < min(len(src), len(dst)) and same_dim(src[lead], dst[lead]):
        lead += 1
    trail = 0
    while trail < min(len(src), len(dst)) - lead and same_dim(src[-1 - trail], dst[-1 - trail]):
        trail += 1
    out_mid = lw.shape(node.result.type)[lead : len(dst) - trail]
    in_mid = list(x.shape)[lead : len(src) - trail]

    def f(*i: Any) -> Any:
        flat = 0
        for idx, size in zip(i[lead : len(dst) - trail], out_mid):
            flat = flat * size + idx
        mid = []
        for size in reversed(in_mid):
            mid.append(tirx.floormod(flat, size))
            flat = tirx.floordiv(flat, size)
        return x(*i[:lead], *reversed(mid), *i[len(dst) - trail :])

    return _compute(lw, node, f)


@lowers("permute")
def lower_permute(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    (x,) = args
    dims = [d % len(x.shape) for d in node.op.dims]
    inverse = [dims.index(k) for k in range(len(dims))]
    return _compute(lw, node, lambda *i: x(*(i[inverse[k]] for k in range(len(dims)))))


@lowers("expand")
def lower_expand(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from backends.tvm.lower import broadcast_index

    (x,) = args
    rank = node.result.type.rank
    return _compute(lw, node, lambda *i: x(*broadcast_index(x, rank, i)))


@lowers("slice")
def lower_slice(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import tirx

    (x,) = args
    op = node.op
    d = op.dim % len(x.shape)
    n = node.operands[0].shape[d]
    if not isinstance(op.start, int) or op.start >= 0:
        begin = lw.dim(op.start)
    elif isinstance(n, int):  # Python's rule: a negative start counts from the end, at least 0
        begin = max(n + op.start, 0)
    else:
        begin = tirx.max(lw.dim(n) + op.start, 0)
    return _compute(lw, node, lambda *i: x(*i[:d], begin + i[d] * op.step, *i[d + 1 :]))


@lowers("select")
def lower_select(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    (x,) = args
    d = node.op.dim % len(x.shape)
    index = node.op.index
    if isinstance(index, int) and index < 0:
        index = lw.dim(node.operands[0].shape[d]) + index
    else:
        index = lw.dim(index)
    return _compute(lw, node, lambda *i: x(*i[:d], index, *i[d:]))


@lowers("squeeze", "unsqueeze")
def lower_squeeze(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    (x,) = args
    src, dst = node.operands[0].type, node.result.type
    if src.rank == dst.rank:
        return _compute(lw, node, lambda *i: x(*i))
    if node.name == "squeeze":
        d = node.op.dim % src.rank
        return _compute(lw, node, lambda *i: x(*i[:d], 0, *i[d:]))
    d = node.op.dim % dst.rank
    return _compute(lw, node, lambda *i: x(*i[:d], *i[d + 1 :]))


@lowers("repeat")
def lower_repeat(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    """Output index modulo the input's size along each repeated dim; leading repeats add dims
    the input lacks."""
    from tvm import tirx

    (x,) = args
    repeats = node.op.repeats
    lead = len(repeats) - len(x.shape)

    def f(*i: Any) -> Any:
        index = []
        for k, size in enumerate(x.shape):
            j = i[lead + k]
            index.append(j if repeats[lead + k] == 1 else tirx.floormod(j, size))
        return x(*index)

    return _compute(lw, node, f)


@lowers("concat")
def lower_concat(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import tirx

    out = tvm_dtype(node.result.dtype)
    d = node.op.dim % len(args[0].shape)
    starts, acc = [], 0
    for t in args:
        starts.append(acc)
        acc = acc + t.shape[d]

    def f(*i: Any) -> Any:
        value = None
        for t, s in zip(args, starts):  # later pieces win from their start on
            j = tirx.min(tirx.max(i[d] - s, 0), t.shape[d] - 1)
            read = convert(t(*i[:d], j, *i[d + 1 :]), out)
            value = read if value is None else guarded(i[d] >= s, read, value)
        return value

    return _compute(lw, node, f)


@lowers("pad")
def lower_pad(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import tirx

    (x,) = args
    rank = len(x.shape)
    pads = [_const_int(p, "pad") for p in node.op.pads]
    lo = [0] * rank
    for k in range(len(pads) // 2):
        lo[rank - 1 - k] = pads[2 * k]
    fill = tirx.const(node.op.value, tvm_dtype(node.result.dtype))

    def f(*i: Any) -> Any:
        src = [i[a] - lo[a] for a in range(rank)]
        inside = tirx.const(True, "bool")
        for a in range(rank):
            inside = tirx.And(inside, tirx.And(src[a] >= 0, src[a] < x.shape[a]))
        safe = [tirx.min(tirx.max(s, 0), x.shape[a] - 1) for a, s in enumerate(src)]
        return guarded(inside, x(*safe), fill)

    return _compute(lw, node, f)
