"""The TVM runtime's in-place cache updates (`backends.inplace`): which node a writer emits and
how it writes.

`attn.compress_step` with an aliased result is emitted as its *row form*: the same op on the one
cache row it may write (cache operand and result `[B,1,c]`, so the kernel's `min(pos // m, L-1)`
is row 0). Per call the writer reads the position on the host (TVM runs on the CPU), hands the
kernel that row of the caller's cache, copies the new row back only when the block completes,
and copies the new states (`[B,R,W]` fp32: a few hundred KB at most) into the state buffers.
The kernel never reads or writes the rest of the cache, which the functional lowering copies
whole on every step. `index_put` (a reference op in this backend) writes its rows with torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ir
from backends.inplace import Writer, index_put_writer

__all__ = ["emitted_node", "writer"]

_CACHE = 10  # attn.compress_step's cache operand (and result 0)


def emitted_node(node: ir.Node, aliased: tuple[int, ...]) -> ir.Node:
    """The node a writer step emits: the row form of an aliased `attn.compress_step`, else
    `node` itself."""
    if node.name != "attn.compress_step" or not aliased:
        return node
    cache = node.operands[_CACHE]
    row = ir.TensorType((cache.shape[0], 1, cache.shape[2]), cache.dtype)
    operands = list(node.operands)
    operands[_CACHE] = ir.Value(cache.name, row)
    results = (ir.Value(node.results[0].name, row), *node.results[1:])
    return ir.Node(node.op, tuple(operands), results, node.loc)


def writer(node: ir.Node, call: Callable[[Sequence[Any]], tuple[Any, ...]]) -> Writer | None:
    """The in-place writer of `node` (the emitted node) given its bound `call`, or None (the
    result is computed as usual and copied into the caller's buffer)."""
    if node.name == "attn.compress_step" and node.operands[_CACHE].shape[1] == 1:
        return _compress_rows(node.op.ratio, call)
    return index_put_writer(node)


def _compress_rows(ratio: int, call: Callable[[Sequence[Any]], tuple[Any, ...]]) -> Writer:
    def write(ins: list[Any]) -> tuple[Any, ...]:
        cache, kv_state, score_state = ins[_CACHE], ins[2], ins[3]
        if cache.shape[1] == 0:
            raise ValueError("attn.compress_step: the cache has no rows; init_cache(max_len >= 1)")
        pos = int(ins[1])
        row = min(pos // ratio, cache.shape[1] - 1)
        narrowed = list(ins)
        narrowed[_CACHE] = cache[:, row : row + 1]
        new_row, kv, score = call(narrowed)
        if (pos + 1) % ratio == 0:  # the block completes: its entry goes to the cache
            cache[:, row : row + 1].copy_(new_row)
        kv_state.copy_(kv)
        score_state.copy_(score)
        return (cache, kv_state, score_state)

    return write
