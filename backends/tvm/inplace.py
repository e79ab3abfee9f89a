"""The TVM runtime's in-place cache updates (`backends.inplace`): which node a writer emits and
how it writes.

`attn.compress_step` with an aliased result is emitted as its *row form*: the same op whose cache
operand and result are the one cache row it may write (`[B,1,c]`, so the kernel's
`min(pos // m, L-1)` is row 0) and whose state results are the one new state row (`[B,1,W]`).
Per call the writer reads the position on the host (TVM runs on the CPU), hands the kernel that
row of the caller's cache, copies the new row back only when the block completes, stores the new
state row at its slot (`pos % m`, `+ m` with overlap) and, when an overlapping block completes,
rolls the states (rows m..2m-1 to 0..m-1), as the op's functional form does. A step inside a
block moves the projection weights, one state row per state and nothing of the cache; the kernel
never reads or writes the rest of the cache or of the states (the functional lowering copies
them whole on every step). `index_put` (a reference op in this backend) writes its rows with
torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ir
from backends.inplace import Writer, index_put_writer

__all__ = ["emitted_node", "writer", "writes_rows"]

_CACHE = 10  # attn.compress_step's cache operand (and result 0)


def emitted_node(node: ir.Node, aliased: tuple[int, ...]) -> ir.Node:
    """The node a writer step emits: the row form of an aliased `attn.compress_step`, else
    `node` itself."""
    if node.name != "attn.compress_step" or not aliased:
        return node
    operands = list(node.operands)
    cache = operands[_CACHE]
    operands[_CACHE] = ir.Value(cache.name, _one_row(cache.type))
    results = tuple(ir.Value(r.name, _one_row(r.type)) for r in node.results)
    return ir.Node(node.op, tuple(operands), results, node.loc)


def _one_row(t: ir.TensorType) -> ir.TensorType:
    return ir.TensorType((t.shape[0], 1, t.shape[2]), t.dtype)


def writer(
    node: ir.Node, call: Callable[[Sequence[Any]], tuple[Any, ...]], keep: bool = False
) -> Writer | None:
    """The in-place writer of `node` (the emitted node) given its bound `call`, or None (the
    result is computed as usual and copied into the caller's buffer). `keep`: the row writer
    keeps the cache row it last handed the kernel (the same view while the row and the cache
    tensor stay the same: `Plan.reusing`)."""
    if writes_rows(node):
        return _compress_rows(node.op.ratio, node.op.overlap, call, keep)
    return index_put_writer(node)


def writes_rows(node: ir.Node) -> bool:
    """Whether `node` is the row form of `attn.compress_step`, whose writer stores the kernel's
    results (never returns them): the kernel may write them into buffers of its own."""
    return node.name == "attn.compress_step" and node.operands[_CACHE].shape[1] == 1


def _compress_rows(
    ratio: int, overlap: bool, call: Callable[[Sequence[Any]], tuple[Any, ...]], keep: bool
) -> Writer:
    last: list[Any] = [None, -1, None]  # with `keep`: cache, row, the view cache[:, row:row+1]

    def write(ins: list[Any]) -> tuple[Any, ...]:
        cache, kv_state, score_state = ins[_CACHE], ins[2], ins[3]
        if cache.shape[1] == 0:
            raise ValueError("attn.compress_step: the cache has no rows; init_cache(max_len >= 1)")
        pos = int(ins[1])
        row = min(pos // ratio, cache.shape[1] - 1)
        if cache is last[0] and row == last[1]:
            view = last[2]
        else:
            view = cache[:, row : row + 1]
            if keep:
                last[:] = cache, row, view
        narrowed = list(ins)
        narrowed[_CACHE] = view
        new_row, kv, score = call(narrowed)
        slot = pos % ratio + (ratio if overlap else 0)
        kv_state[:, slot : slot + 1].copy_(kv)
        score_state[:, slot : slot + 1].copy_(score)
        if (pos + 1) % ratio:
            return (cache, kv_state, score_state)
        cache[:, row : row + 1].copy_(new_row)  # the block completes: its entry goes to the cache
        if overlap:  # its second half is the next block's first half
            kv_state[:, :ratio].copy_(kv_state[:, ratio:])
            score_state[:, :ratio].copy_(score_state[:, ratio:])
        return (cache, kv_state, score_state)

    return write
