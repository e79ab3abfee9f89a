"""Graph fixtures shared by the IR tests (imported as a plain module from this folder)."""

from __future__ import annotations

import ir
from ir import Builder, DType, Loc, TensorType

B, T, D = ir.sym("B"), ir.sym("T"), ir.sym("D")
f32, bf16, i64, b = DType.f32, DType.bf16, DType.i64, DType.bool


def moe_gate() -> ir.Graph:
    """Embedding -> gate matmul -> softmax -> topk, symbolic B, T; params with dotted names."""
    bl = Builder(name="prefill")
    tok = bl.input("tokens", TensorType((B, T), i64))
    emb = bl.input("embed.weight", TensorType((100, 64), f32), role="parameter")
    wg = bl.input("layers.0.ffn.gate.weight", TensorType((64, 8), f32), role="parameter")
    kv = bl.input("cache.k", TensorType((B, 128, 64), bf16), role="cache")
    h = bl.op("embedding", [emb, tok], loc=Loc("embed", "model.py:88"))
    s = bl.op("matmul", [h, wg], loc=Loc("layers.0.ffn.gate"))
    p = bl.op("softmax", [s], dim=-1, name="scores")
    v, idx = bl.op(
        "topk", [p], k=2, loc=Loc("layers.0.ffn.gate", "model.py:120"), name=("vals", "idx")
    )
    half = bl.op("slice", [h], dim=1, start=0, end=T // 2, loc=Loc(source="model.py:7"))
    c = bl.constant(0.5, f32)
    m = bl.op("mul", [v, c])
    kb = bl.op("cast", [kv], dtype=f32)
    bl.output(m, idx, half, kb)
    return bl.build()


def attrs_zoo() -> ir.Graph:
    """Every attribute flavour: negative ints, floats (inf/nan/-0.0/1e-30), None, tuples, dtype,
    symbolic dims and expressions, bools, empty tuples."""
    bl = Builder(name="zoo")
    x = bl.input("x", TensorType((T, 4 * D), f32))
    a = bl.op("clamp", [x], min=None, max=float("inf"))
    a = bl.op("clamp", [a], min=-0.0, max=1e30)
    a = bl.op("softplus", [a], beta=float("nan"), threshold=-1e-30)
    r = bl.op("reshape", [a], shape=(T, D, 4))
    r = bl.op("reshape", [r], shape=(-1, 4))
    r = bl.op("slice", [r], dim=0, start=T - T // 4 - 1, end=None, step=2)
    p = bl.op("pad", [x], pads=(1, -1, 0, T % 128), value=-2)
    e = bl.op("expand", [bl.op("unsqueeze", [p], dim=0)], shape=(3, -1, -1))
    s = bl.op("sum", [e], dims=(), keepdim=False)
    am = bl.op("argmax", [x], dim=None, keepdim=True)
    fl = bl.op("full", [], shape=(ir.sym("T") + 8, 2), value=True, dtype=b)
    io = bl.op("iota", [], start=1, end=T * 2, step=3, dtype=DType.i32)
    bl.output(r, s, am, fl, io)
    return bl.build()


def fused() -> ir.Graph:
    """A fused.kernel with a nested body (and a doubly nested one)."""
    inner_b = Builder(name="inner")
    u = inner_b.input("u", TensorType((T, 8), f32))
    inner_b.output(inner_b.op("exp", [u], name="e"))
    inner = inner_b.build()

    body_b = Builder(name="fused_0")
    p = body_b.input("p", TensorType((T, 8), f32))
    q = body_b.input("q", TensorType((8,), f32))
    s = body_b.op("add", [p, q], loc=Loc("layers.1.mlp", "mlp.py:3"))
    k = body_b.op("fused.kernel", [s], body=inner)
    body_b.output(body_b.op("silu", [k]), s)
    body = body_b.build()

    bl = Builder(name="outer")
    x = bl.input("x", TensorType((T, 8), f32))
    bias = bl.input("layers.1.mlp.bias", TensorType((8,), f32), role="parameter")
    y, z = bl.op("fused.kernel", [x, bias], body=body, loc=Loc("layers.1.mlp"))
    bl.output(bl.op("mul", [y, z]))
    return bl.build()


def chain(n: int = 20) -> ir.Graph:
    bl = Builder(name="chain")
    v = bl.input("x", TensorType((4,), f32))
    for _ in range(n):
        v = bl.op("exp", [v])
    bl.output(v)
    return bl.build()


ALL = {"moe_gate": moe_gate, "attrs_zoo": attrs_zoo, "fused": fused, "chain": chain}
