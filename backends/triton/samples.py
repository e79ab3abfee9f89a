"""Sample kernels of a DeepSeek-V4 layer built by hand with `ir.Builder`: the fused bodies the
fusion pass produces (RMSNorm, clamped SwiGLU, scaled softmax), a linear with an epilogue and
the expert GEMM. Used by the tests, `benchmarks/aot_table.py` and as documentation."""

from __future__ import annotations

import ir
from ir import DType, TensorType

T = ir.sym("T")


def rmsnorm(dim: int = 64, dtype: DType = DType.f32, eps: float = 1e-6) -> ir.Graph:
    """x * rsqrt(mean(x*x, -1) + eps) * w, computed in f32 and cast back (as the model does)."""
    b = ir.Builder(name="rmsnorm")
    x = b.input("x", TensorType((T, dim), dtype))
    w = b.input("weight", TensorType((dim,), dtype), role="parameter")
    xf = b.op("cast", [x], dtype=DType.f32, name="xf")
    sq = b.op("mul", [xf, xf], name="sq")
    ms = b.op("mean", [sq], dims=(-1,), keepdim=True, name="mean_sq")
    e = b.constant(eps, DType.f32, name="eps")
    var = b.op("add", [ms, e], name="var")
    inv = b.op("rsqrt", [var], name="inv_rms")
    normed = b.op("mul", [xf, inv], name="normed")
    nc = b.op("cast", [normed], dtype=dtype, name="normed_cast")
    out = b.op("mul", [nc, w], name="out")
    b.output(out)
    return b.build()


def swiglu(dim: int = 48, dtype: DType = DType.f32, limit: float = 10.0) -> ir.Graph:
    """silu(clamp(gate, max=limit)) * clamp(up, -limit, limit) (DeepSeek-V4's clamped SwiGLU)."""
    b = ir.Builder(name="swiglu")
    gate = b.input("gate", TensorType((T, dim), dtype))
    up = b.input("up", TensorType((T, dim), dtype))
    g = b.op("clamp", [gate], max=limit, name="gate_c")
    u = b.op("clamp", [up], min=-limit, max=limit, name="up_c")
    act = b.op("silu", [g], name="act")
    out = b.op("mul", [act, u], name="h")
    b.output(out)
    return b.build()


def softmax(dim: int = 40, dtype: DType = DType.f32, scale: float = 0.125) -> ir.Graph:
    """softmax(scores * scale + mask_bias) over the last dim, plus the row max as a 2nd output."""
    b = ir.Builder(name="scaled_softmax")
    s = b.input("scores", TensorType((2, T, dim), dtype))
    bias = b.input("bias", TensorType((T, dim), dtype))
    c = b.constant(scale, DType.f32, name="scale")
    sc = b.op("mul", [s, c], name="scaled")
    biased = b.op("add", [sc, bias], name="biased")
    p = b.op("softmax", [biased], dim=-1, name="probs")
    m = b.op("amax", [biased], dims=(-1,), keepdim=False, name="row_max")
    b.output(p, m)
    return b.build()


def wrap(body: ir.Graph) -> ir.Graph:
    """A graph with one `fused.kernel` node running `body`."""
    b = ir.Builder(name=f"{body.name}_graph")
    ins = [b.input(v.name, v.type, role=body.roles[v.name]) for v in body.inputs]
    outs = b.op("fused.kernel", ins, body=body)
    b.output(*(outs if isinstance(outs, tuple) else (outs,)))
    return b.build()


def linear_epilogue(k: int = 40, n: int = 36, dtype: DType = DType.f32) -> ir.Graph:
    """silu(x @ w + bias) * residual, cast to f32: a `fused.kernel` body for one GEMM."""
    b = ir.Builder(name="linear_silu")
    x = b.input("x", TensorType((T, k), dtype))
    w = b.input("w", TensorType((k, n), dtype), role="parameter")
    bias = b.input("bias", TensorType((n,), dtype), role="parameter")
    res = b.input("residual", TensorType((T, n), dtype))
    y = b.op("matmul", [x, w], name="y")
    yb = b.op("add", [y, bias], name="y_bias")
    act = b.op("silu", [yb], name="act")
    out = b.op("mul", [act, res], name="gated")
    b.output(b.op("cast", [out], dtype=DType.f32, name="out"))
    return b.build()


def layer_kernels(dim: int, inter: int, experts: int, dtype: DType = DType.bf16) -> ir.Graph:
    """One graph holding a layer's worth of kernel kinds at model sizes: attention-norm RMSNorm,
    a q projection, router softmax over the experts, the expert up-projection (grouped_mm) and
    the clamped SwiGLU. No weights are needed to compile it."""
    b = ir.Builder(name="layer_kernels")
    x = b.input("x", TensorType((T, dim), dtype))
    gate = b.input("gate", TensorType((T, inter), dtype))
    up = b.input("up", TensorType((T, inter), dtype))
    scores = b.input("router_logits", TensorType((T, experts), DType.f32))
    offsets = b.input("expert_offsets", TensorType((experts,), DType.i32))
    norm_w = b.input("attn_norm.weight", TensorType((dim,), dtype), role="parameter")
    wq = b.input("wq_a.weight", TensorType((dim, 1024), dtype), role="parameter")
    w1 = b.input("experts.w1", TensorType((experts, dim, inter), dtype), role="parameter")
    norm = rmsnorm(dim, dtype)
    h = b.op("fused.kernel", [x, norm_w], body=norm, name="h")
    q = b.op("matmul", [h, wq], name="q")
    probs = b.op("softmax", [scores], dim=-1, name="probs")
    expert_h = b.op("grouped_mm", [h, w1, offsets], name="expert_h")
    act = b.op("fused.kernel", [gate, up], body=swiglu(inter, dtype), name="act")
    b.output(q, probs, expert_h, act)
    return b.build()
