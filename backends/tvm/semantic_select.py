"""te lowering of `attn.block_select` (ir/ops/attn_select.py: NSA's block selection), one kernel.

Stages, all fp32, none leaving the kernel: scores q·kᵀ of every query head against the
compressed keys of its KV group (block-causal: i·d + l − 1 <= p), a guarded softmax per head
(a query that sees no block gets 0), the group sum over its heads, the importance of each
selection block (the at most ceil((l' + l − 1)/d) compressed blocks sharing a token with it:
a bounded window per block, linear in the context, no all-pairs test), the forced-block bonus
and visibility, then the shared top-n with -1 pads
(`semantic._topk_or_pad`: the CPU's sort extern, or the rank form on GPUs).
"""

from __future__ import annotations

from typing import Any

import ir
from backends.tvm.emitters import TVM_EMITTERS, emit_single
from backends.tvm.lower import Lowering, lowers
from backends.tvm.semantic import F32, NEG_INF, _topk_or_pad, f32, i32


def _positions(pos: list[Any]) -> Any:
    """p(t): the query row's position (t in prefill, pos + t in decode)."""
    p0 = i32(pos[0]()) if pos else 0
    return lambda t: p0 + t


@lowers("attn.block_select")
def lower_block_select(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    q, k, *pos = args
    at = _positions(pos)
    b_, hq, t_, width = q.shape
    hkv, n = k.shape[1], k.shape[2]
    group = int(hq) // int(hkv)
    l, d, ls, s_blocks = op.cmp_block, op.cmp_stride, op.slc_block, op.blocks
    ninf, zero = tirx.const(NEG_INF, F32), tirx.const(0.0, F32)

    def seen(t: Any, i: Any) -> Any:  # compressed block i is complete at the query's position
        return i * d + (l - 1) <= at(t)

    kc = te.reduce_axis((0, width), name="kc")
    z = te.compute(
        (b_, hq, t_, n),
        lambda b, h, t, i: te.sum(
            f32(q(b, h, t, kc)) * f32(k(b, tirx.floordiv(h, group), i, kc)), axis=kc
        ),
        name=lw.tag("rows_qk"),
    )
    zm = te.compute(
        z.shape,
        lambda b, h, t, i: tirx.Select(seen(t, i), z(b, h, t, i) * tirx.const(op.scale, F32), ninf),
        name=lw.tag("logits"),
    )
    km = te.reduce_axis((0, n), name="km")
    mx = te.compute((b_, hq, t_), lambda b, h, t: te.max(zm(b, h, t, km), axis=km), name="mx")
    e = te.compute(
        z.shape,
        lambda b, h, t, i: tirx.Select(seen(t, i), te.exp(zm(b, h, t, i) - mx(b, h, t)), zero),
        name=lw.tag("exp"),
    )
    ks = te.reduce_axis((0, n), name="ks")
    den = te.compute((b_, hq, t_), lambda b, h, t: te.sum(e(b, h, t, ks), axis=ks), name="den")
    kh = te.reduce_axis((0, group), name="kh")
    grouped = te.compute(  # Σ over the group's heads of p = e / den (0 where den is 0)
        (b_, hkv, t_, n),
        lambda b, g, t, i: te.sum(
            tirx.Select(
                den(b, g * group + kh, t) > zero,
                e(b, g * group + kh, t, i) / den(b, g * group + kh, t),
                zero,
            ),
            axis=kh,
        ),
        name=lw.tag("group_p"),
    )
    # Selection block j (tokens j·l' .. j·l'+l'−1) shares a token with compressed block i
    # (i·d .. i·d+l−1) iff j·l' − l < i·d < (j+1)·l': i runs over at most `span` blocks from
    # first(j) = floor((j·l' − l)/d) + 1, so the sum is O(n + blocks), not O(n · blocks); it adds
    # the same terms in the same (ascending i) order as the all-pairs sum, bit for bit.
    span = (ls + l - 2) // d + 1
    ki = te.reduce_axis((0, span), name="ki")

    def first(j: Any) -> Any:
        return tirx.max(tirx.floordiv(j * ls - l, d) + 1, 0)

    def overlaps(i: Any, j: Any) -> Any:  # tokens i·d .. i·d+l−1 meet j·l' .. j·l'+l'−1
        return tirx.And(i < n, tirx.And(i * d < j * ls + ls, i * d + l > j * ls))

    importance = te.compute(
        (b_, hkv, t_, s_blocks),
        lambda b, g, t, j: te.sum(
            tirx.if_then_else(  # no read past the last block (none at all when n is 0)
                overlaps(first(j) + ki, j),
                grouped(b, g, t, tirx.min(first(j) + ki, n - 1)),
                zero,
            ),
            axis=ki,
        ),
        name=lw.tag("importance"),
    )

    def rank(b: Any, g: Any, t: Any, j: Any) -> Any:
        own = tirx.floordiv(at(t), ls)
        forced = tirx.Or(j < op.initial, tirx.And(j <= own, j > own - op.local))
        bonus = tirx.Select(forced, tirx.const(float(group + 1), F32), zero)
        return tirx.Select(j * ls <= at(t), importance(b, g, t, j) + bonus, ninf)

    ranked = te.compute(importance.shape, rank, name=lw.tag("rank"))
    return [_topk_or_pad(lw, ranked, tirx.const(s_blocks, "int32"), op.topn)]



TVM_EMITTERS.register("attn.block_select")(emit_single)
