"""te lowering of `attn.sdpa` (ir/ops/attn_dense.py), one kernel per node.

Stages, all fp32: z = scale·q·kᵀ (capped: softcap·tanh(z/softcap)) (+ float mask; -inf where a
key is not visible by position or by a bool mask), the row max m (with the sink), the
denominator Σ exp(z - m) (+ exp(sink - m)), p = exp(z - m) / den materialised once per (query,
key) so the output loop reads it instead of recomputing it per output channel, then
o = Σ_s p·v cast to q's dtype. Query head h reads KV head h // G. A row with no visible key and
no sink has a zero denominator: its p is 0, so o is 0.
"""

from __future__ import annotations

from typing import Any

import ir
from backends.tvm.emitters import TVM_EMITTERS, emit_single
from backends.tvm.lower import Lowering, convert, lowers, tvm_dtype
from backends.tvm.semantic import F32, NEG_INF, f32


def _mask_at(mask: Any, b: Any, h: Any, t: Any, s: Any) -> Any:
    """The mask element for (b, h, t, s), broadcasting its size-1 (or missing) dims."""
    idx = (b, h, t, s)[4 - len(mask.shape) :]
    return mask(*(0 if _is_one(n) else i for i, n in zip(idx, mask.shape)))


def _is_one(n: Any) -> bool:
    return isinstance(n, int) and n == 1 or getattr(n, "value", None) == 1


@lowers("attn.sdpa")
def lower_sdpa(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    q, k, v, *rest = args
    mask = rest[0] if op.mask != "none" else None
    sinks = rest[-1] if op.sinks else None
    out = tvm_dtype(node.result.dtype)
    batch, hq, t_len, d = q.shape
    s_len, dv = k.shape[2], v.shape[3]
    group = tirx.floordiv(hq, k.shape[1])
    neg = tirx.const(NEG_INF, F32)

    def visible(b: Any, h: Any, t: Any, s: Any) -> Any:
        ok = tirx.const(True, "bool")
        pos = t + op.offset
        if op.causal:
            ok = tirx.all(ok, s <= pos)
        if op.window > 0:
            ok = tirx.all(ok, pos - s < op.window)
        if op.mask == "bool":
            ok = tirx.all(ok, convert(_mask_at(mask, b, h, t, s), "bool"))
        return ok

    kd = te.reduce_axis((0, d), name="kd")
    dot = te.compute(
        (batch, hq, t_len, s_len),
        lambda b, h, t, s: te.sum(
            f32(q(b, h, t, kd)) * f32(k(b, tirx.floordiv(h, group), s, kd)), axis=kd
        ),
        name=lw.tag("dot"),
    )

    def logit(b: Any, h: Any, t: Any, s: Any) -> Any:
        z = dot(b, h, t, s) * tirx.const(op.scale, F32)
        if op.softcap > 0:
            cap = tirx.const(op.softcap, F32)
            z = te.tanh(z / cap) * cap
        if op.mask == "add":
            z = z + f32(_mask_at(mask, b, h, t, s))
        return tirx.Select(visible(b, h, t, s), z, neg)

    z = te.compute(dot.shape, logit, name=lw.tag("z"))
    rows = (batch, hq, t_len)
    ks = te.reduce_axis((0, s_len), name="ks")
    zmax = te.compute(rows, lambda b, h, t: te.max(z(b, h, t, ks), axis=ks), name=lw.tag("zmax"))
    if sinks is not None:
        m = te.compute(rows, lambda b, h, t: tirx.max(zmax(b, h, t), f32(sinks(h))), name="m")
    else:
        m = zmax
    # a row that sees nothing: every z is -inf (te.max starts at the lowest finite float, so m
    # stays finite), exp(z - m) = 0 and den = 0 without a sink; its weights are 0, not 0/0
    ks2 = te.reduce_axis((0, s_len), name="ks2")
    zsum = te.compute(
        rows,
        lambda b, h, t: te.sum(te.exp(z(b, h, t, ks2) - m(b, h, t)), axis=ks2),
        name=lw.tag("zsum"),
    )
    if sinks is not None:
        den = te.compute(
            rows, lambda b, h, t: zsum(b, h, t) + te.exp(f32(sinks(h)) - m(b, h, t)), name="den"
        )
    else:
        den = zsum
    zero = tirx.const(0.0, F32)
    p = te.compute(
        z.shape,
        lambda b, h, t, s: tirx.Select(
            den(b, h, t) > zero, te.exp(z(b, h, t, s) - m(b, h, t)) / den(b, h, t), zero
        ),
        name=lw.tag("keep_p"),
    )
    ks3 = te.reduce_axis((0, s_len), name="ks3")
    o = te.compute(
        (batch, hq, t_len, dv),
        lambda b, h, t, c: te.sum(
            p(b, h, t, ks3) * f32(v(b, tirx.floordiv(h, group), ks3, c)), axis=ks3
        ),
        name=lw.tag("rows_o"),
    )
    return [te.compute(o.shape, lambda *i: convert(o(*i), out), name=lw.tag("o_cast"))]


def _sdpa_check(node: ir.Node) -> bool | str:
    if node.attrs.get("indexed") or node.attrs.get("value_dim"):
        return "attn.sdpa with indices or value_dim: no TVM lowering yet"
    return True


TVM_EMITTERS.register("attn.sdpa", check=_sdpa_check)(emit_single)
