"""te lowering of `attn.sdpa` (ir/ops/attn_dense.py), one kernel per node, dense or indexed.

Stages, all fp32: z = scale·q·kᵀ (capped: softcap·tanh(z/softcap)) (+ float mask; -inf where a
key is not visible by position or by a bool mask), the row max m (with the sink), the
denominator Σ exp(z - m) (+ exp(sink - m)), p = exp(z - m) / den materialised once per (query,
key) so the output loop reads it instead of recomputing it per output channel, then
o = Σ p·v cast to q's dtype. Query head h reads KV head h // G. A row with no visible key and
no sink has a zero denominator: its p is 0, so o is 0.

Indexed (`indexed=true`): the key axis is the query's n index slots instead of the S keys;
slot j reads key row s = indices[b, h // G or 0, t, j] (a data-dependent load in the index
expression), clamped to row 0 and masked to -inf when s is outside [0, S) or not visible; the
mask (bool or additive) is read at [b, h, t, s]. Values are v's rows, or with value_dim the
first value_dim channels of the same key rows.

kv_layout="bshd": k and v are read where they lie, [B,S,Hkv,D] (`_BshdView` swaps the index of
the head and the row), so a permuted KV cache reaches the kernel as stored, not as a copy.
"""

from __future__ import annotations

from typing import Any, Callable

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


class _BshdView:
    """A [B,S,Hkv,D] te tensor read as [B,Hkv,S,D]: shape and element access with dims 1 and 2
    swapped (the loads index the stored tensor; nothing is materialised)."""

    def __init__(self, x: Any) -> None:
        self.x = x
        s = x.shape
        self.shape = (s[0], s[2], s[1], s[3])

    def __call__(self, b: Any, h: Any, s: Any, c: Any) -> Any:
        return self.x(b, s, h, c)


@lowers("attn.sdpa")
def lower_sdpa(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    r = op.roles(args)
    if op.kv_layout == "bshd":
        r = {**r, "k": _BshdView(r["k"]), "v": None if r["v"] is None else _BshdView(r["v"])}
    q, k = r["q"], r["k"]
    group = tirx.floordiv(q.shape[1], k.shape[1])

    def kv_head(h: Any) -> Any:
        return tirx.floordiv(h, group)

    if op.value_dim:  # values: the first value_dim channels of the key rows
        v, dv = k, op.value_dim
    else:
        v, dv = r["v"], r["v"].shape[3]
    if r["indices"] is not None:
        z, row = _indexed_logits(lw, op, r, kv_head)
    else:
        z, row = _dense_logits(lw, op, r, kv_head), None

    def value(b: Any, h: Any, t: Any, j: Any, c: Any) -> Any:
        s = j if row is None else row(b, h, t, j)
        return f32(v(b, kv_head(h), s, c))

    o = _softmax_times_values(lw, z, r["sinks"], value, dv)
    out = tvm_dtype(node.result.dtype)
    return [te.compute(o.shape, lambda *i: convert(o(*i), out), name=lw.tag("o_cast"))]


def _logit(op: Any, dot: Any, b: Any, h: Any, t: Any, s: Any) -> Any:
    """scale·q·k, soft-capped (before any mask) when softcap > 0."""
    from tvm import te, tirx

    z = dot * tirx.const(op.scale, F32)
    if op.softcap > 0:
        cap = tirx.const(op.softcap, F32)
        z = te.tanh(z / cap) * cap
    return z


def _seen_by_position(op: Any, t: Any, s: Any) -> Any:
    from tvm import tirx

    ok = tirx.const(True, "bool")
    pos = t + op.offset
    if op.causal:
        ok = tirx.all(ok, s <= pos)
    if op.window > 0:
        ok = tirx.all(ok, pos - s < op.window)
    return ok


def _dense_logits(lw: Lowering, op: Any, r: dict, kv_head: Callable) -> Any:
    """z [B,Hq,T,S]: masked logits over every key."""
    from tvm import te, tirx

    q, k, mask = r["q"], r["k"], r["mask"]
    batch, hq, t_len, d = q.shape
    kd = te.reduce_axis((0, d), name="kd")
    dot = te.compute(
        (batch, hq, t_len, k.shape[2]),
        lambda b, h, t, s: te.sum(f32(q(b, h, t, kd)) * f32(k(b, kv_head(h), s, kd)), axis=kd),
        name=lw.tag("dot"),
    )

    def logit(b: Any, h: Any, t: Any, s: Any) -> Any:
        z = _logit(op, dot(b, h, t, s), b, h, t, s)
        seen = _seen_by_position(op, t, s)
        if op.mask == "add":
            z = z + f32(_mask_at(mask, b, h, t, s))
        elif op.mask == "bool":
            seen = tirx.all(seen, convert(_mask_at(mask, b, h, t, s), "bool"))
        return tirx.Select(seen, z, tirx.const(NEG_INF, F32))

    return te.compute(dot.shape, logit, name=lw.tag("z"))


def _indexed_logits(lw: Lowering, op: Any, r: dict, kv_head: Callable) -> tuple[Any, Any]:
    """(z [B,Hq,T,n] over the index slots, row [B,Hq,T,n]: each slot's key row, 0 where the
    slot is no key)."""
    from tvm import te, tirx

    q, k, mask, idx = r["q"], r["k"], r["mask"], r["indices"]
    batch, hq, t_len, d = q.shape
    s_len, n = k.shape[2], idx.shape[3]
    shared = _is_one(idx.shape[1])

    def index(b: Any, h: Any, t: Any, j: Any) -> Any:
        return convert(idx(b, 0 if shared else kv_head(h), t, j), "int64")

    def in_range(s: Any) -> Any:
        return tirx.all(s >= 0, s < convert(s_len, "int64"))

    shape = (batch, hq, t_len, n)
    row = te.compute(
        shape,
        lambda b, h, t, j: tirx.Select(in_range(index(b, h, t, j)), index(b, h, t, j),
                                       tirx.const(0, "int64")),  # fmt: skip
        name=lw.tag("row"),
    )
    kd = te.reduce_axis((0, d), name="kd")
    dot = te.compute(
        shape,
        lambda b, h, t, j: te.sum(
            f32(q(b, h, t, kd)) * f32(k(b, kv_head(h), row(b, h, t, j), kd)), axis=kd
        ),
        name=lw.tag("dot"),
    )

    def logit(b: Any, h: Any, t: Any, j: Any) -> Any:
        s = row(b, h, t, j)
        z = _logit(op, dot(b, h, t, j), b, h, t, s)
        seen = tirx.all(in_range(index(b, h, t, j)), _seen_by_position(op, t, s))
        if op.mask == "add":
            z = z + f32(_mask_at(mask, b, h, t, s))
        elif op.mask == "bool":
            seen = tirx.all(seen, convert(_mask_at(mask, b, h, t, s), "bool"))
        return tirx.Select(seen, z, tirx.const(NEG_INF, F32))

    return te.compute(shape, logit, name=lw.tag("z")), row


def _softmax_times_values(lw: Lowering, z: Any, sinks: Any, value: Callable, dv: Any) -> Any:
    """o [B,Hq,T,Dv] fp32 = Σ_j softmax(z [, sink])_j · value(b, h, t, j, c)."""
    from tvm import te, tirx

    rows = tuple(z.shape[:3])
    keys = z.shape[3]
    ks = te.reduce_axis((0, keys), name="ks")
    zmax = te.compute(rows, lambda b, h, t: te.max(z(b, h, t, ks), axis=ks), name=lw.tag("zmax"))
    if sinks is not None:
        m = te.compute(rows, lambda b, h, t: tirx.max(zmax(b, h, t), f32(sinks(h))), name="m")
    else:
        m = zmax
    # a row that sees nothing: every z is -inf (te.max starts at the lowest finite float, so m
    # stays finite), exp(z - m) = 0 and den = 0 without a sink; its weights are 0, not 0/0
    ks2 = te.reduce_axis((0, keys), name="ks2")
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
    ks3 = te.reduce_axis((0, keys), name="ks3")
    return te.compute(
        (*rows, dv),
        lambda b, h, t, c: te.sum(p(b, h, t, ks3) * value(b, h, t, ks3, c), axis=ks3),
        name=lw.tag("rows_o"),
    )


TVM_EMITTERS.register("attn.sdpa")(emit_single)
