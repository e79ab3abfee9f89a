"""matmul: te lowering (batch dims broadcast like torch.matmul) and a tiled CPU schedule.

Weights reach a matmul as transposed views (`x @ w.T`: `permute(w)` runs as a torch view), so a
matmul kernel comes in two layouts chosen at run time from the operand's strides: "nn" reads
B[..., k, j]; "nt" reads a row-major Bᵀ[..., j, k] (the weight as stored), so no copy is made.
"""

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
    static,
)
from backends.tvm.schedule_cpu import VECTOR, _ok, _try, knobs_for, mark_tuned

__all__ = ["matmul_te", "schedule_matmul_cpu", "transposed_layout"]


def matmul_te(lw: Lowering, node: ir.Node, a: Any, b: Any, nt: bool) -> Any:
    """out[..., i, j] = Σ_k a[..., i, k]·b[..., k, j] (b given as bᵀ[..., j, k] when `nt`)."""
    from tvm import te

    ta, tb = node.operands[0].type, node.operands[1].type
    if ta.rank < 2 or tb.rank < 2:
        raise Unsupported("matmul with a 1-D operand runs the reference")
    if not ta.dtype.is_float:
        raise Unsupported(f"integer matmul ({ta.dtype}) runs the reference")
    shape = lw.shape(node.result.type)
    rank = len(shape)
    k_ext = a.shape[-1]
    k = te.reduce_axis((0, k_ext), name="k")
    acc = "float32"
    out = dtype_of(a)

    def f(*i: Any) -> Any:
        batch, row, col = i[:-2], i[-2], i[-1]
        ai = broadcast_index(_batch_view(a), rank - 2, batch) if ta.rank > 2 else ()
        bi = broadcast_index(_batch_view(b), rank - 2, batch) if tb.rank > 2 else ()
        x = a(*ai, row, k)
        y = b(*bi, col, k) if nt else b(*bi, k, col)
        return te.sum(convert(x, acc) * convert(y, acc), axis=k)

    c = te.compute(shape, f, name="matmul", tag="gemm")
    if out == acc:
        return c
    return te.compute(shape, lambda *i: convert(c(*i), out), name=lw.tag("cast"))


class _batch_view:
    def __init__(self, t: Any) -> None:
        self.shape = t.shape[:-2]


@lowers("matmul")
def lower_matmul(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    return [matmul_te(lw, node, args[0], args[1], nt=False)]


def lower_matmul_nt(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    return [matmul_te(lw, node, args[0], args[1], nt=True)]


def transposed_layout(t: Any) -> bool:
    """True when the last two dims of torch tensor `t` are a transposed row-major matrix."""
    if t.dim() < 2 or t.shape[-1] == 1 or t.shape[-2] == 1:
        return False
    return t.stride(-2) == 1 and t.stride(-1) == t.shape[-2]


def schedule_matmul_cpu(func: Any, nt: bool) -> Any:
    """nn: tile i×j (8×32), keep the k loop outside the register tile, vectorise j, parallelise
    the fused batch/row tiles. nt (weights as stored): vectorised dot products when K is a
    static multiple of the vector width (GEMV-like decode matmuls), else 4×8 tiles. Tuned
    knobs (`schedule_cpu.Knobs`: tile_i, tile_j, tile_k, vector, dots) replace these numbers."""
    from tvm import s_tir

    knobs = knobs_for(func)
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("matmul")
    loops = sch.get_loops(block)
    *batch, i, j, k = loops
    width = static(sch.get(k).extent)
    if nt and knobs.dots and width is not None and width % knobs.vector == 0:
        return mark_tuned(_schedule_dots(sch, func, knobs.vector), knobs)
    n = static(sch.get(j).extent)
    tile_j = knobs.tile_j if knobs.tile_j is not None else _tile_j(n, nt)
    i0, i1 = sch.split(i, [None, knobs.tile_i or (8 if not nt else 4)])
    j0, j1 = sch.split(j, [None, tile_j]) if tile_j else (j, None)
    k0, k1 = sch.split(k, [None, knobs.tile_k])
    order = [*batch, i0, j0, k0, i1, k1] + ([j1] if j1 is not None else [])
    sch.reorder(*order)
    outer = _try(sch.fuse, *batch, i0) if batch else i0
    _try(sch.parallel, outer if outer is not None else i0)
    init = _try(sch.decompose_reduction, block, k0)
    if j1 is not None and not nt and n is not None and n % tile_j == 0:
        _ok(sch.vectorize, j1)
        if init is not None:
            _ok(sch.vectorize, sch.get_loops(init)[-1])
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(b).name_hint != "matmul" and "init" not in sch.get(b).name_hint:
            _cast_loops(sch, b)
    out = sch.mod["main"].with_attr("global_symbol", func.attrs["global_symbol"])
    return mark_tuned(out, knobs)


DOT_ROWS = 4  # weight rows whose dot products share one pass over an activation row


def _schedule_dots(sch: Any, func: Any, vector: int = VECTOR) -> Any:
    """nt with a static K: each output is a dot product of two contiguous rows, computed as
    VECTOR partial sums (rfactor) in vector registers, then reduced. DOT_ROWS weight rows form a
    tile: per activation row, their DOT_ROWS accumulators run over K together (one load of the
    activation per DOT_ROWS FMAs), and the M rows of a decode batch reuse the tile while it is
    in L1 (parallel over the batch and the weight tiles, rows inside: reading the whole weight
    per row took 8x the M = 1 time at M = 8). LM head 512 -> 8192 f32, 2 threads, weight in L3:
    M = 8 0.63 ms with a tile of 4 rows against 0.93 one row at a time (M = 1: 0.32 both)."""
    block = sch.get_sblock("matmul")
    *batch, i, j, k = sch.get_loops(block)
    n = static(sch.get(j).extent)
    weight_rank = len(sch.get(block).reads[1].region)
    _, k_lanes = sch.split(k, [None, vector])
    rank = len(batch) + 2
    partial = sch.rfactor(k_lanes, rank)  # partial sums [..., i, j, lane]: lanes contiguous
    *batch, i, j, _ = sch.get_loops(block)
    rows = DOT_ROWS if n is not None and n % DOT_ROWS == 0 else 1
    j0, j1 = sch.split(j, [None, rows])
    per_batch = weight_rank > 2  # a weight per batch index: parallel over both
    # one weight: x's batch dims are rows too ([B, 1, K] in decode), inside the weight tile
    sch.reorder(*batch, j0, i, j1) if per_batch else sch.reorder(j0, *batch, i, j1)
    sch.compute_at(partial, i)
    lanes, *tile, ko = sch.get_loops(partial)[len(batch) + 2 :]
    sch.reorder(ko, *tile, lanes)
    for loop in tile:
        _ok(sch.unroll, loop)
    _ok(sch.vectorize, lanes)
    outer = _try(sch.fuse, *batch, j0) if per_batch and batch else j0
    sch.parallel(outer if outer is not None else j0)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(b).name_hint.startswith("cast"):
            _cast_loops(sch, b)
    return sch.mod["main"].with_attr("global_symbol", func.attrs["global_symbol"])


def _tile_j(n: int | None, nt: bool) -> int | None:
    if nt:
        return 8
    if n is None:
        return None
    for t in (2 * VECTOR, VECTOR, 8):
        if n % t == 0:
            return t
    return None


def _cast_loops(sch: Any, block: Any) -> None:
    loops = sch.get_loops(block)
    if len(loops) > 1:
        fused = _try(sch.fuse, *loops[:-1])
        _try(sch.parallel, fused if fused is not None else loops[0])
