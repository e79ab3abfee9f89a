"""TVM on the CPU fuses data movement (`backends.tvm.CPU_FUSION`): a RoPE spelled with slices,
selects, reshapes and concats, after an RMSNorm, is one `fused.kernel` that TVM lowers (no
fallback) and that equals the reference interpreter on the unfused graph, at symbolic B and T;
the default policy (Triton's) leaves that glue out of its kernels. Also: a negative slice start
and reshapes that keep their leading and trailing dims lower inside a body, and random movement
chains fuse without cycles and run."""

from __future__ import annotations

import random

import pytest
import torch

import ir
from backends.targets import get_target
from backends.tvm import TVMBackend
from backends.tvm.runtime import CPU_FUSION
from dsv4c.driver import fusion_policy
from ir import DType, TensorType
from passes.fuse_elementwise import fuse_elementwise

B, T = ir.sym("B"), ir.sym("T")
F32 = DType.f32
WIDTH, ROT = 24, 8  # channels, rotated channels (the last ROT, as interleaved pairs)


def rope_graph() -> ir.Graph:
    """rmsnorm(x)·w, then RoPE on its last ROT channels (DeepSeek's interleaved pairs)."""
    b = ir.Builder(name="norm_rope")
    x = b.input("x", TensorType((B, T, WIDTH), F32))
    w = b.input("w", TensorType((WIDTH,), F32))
    cos = b.input("cos", TensorType((T, ROT // 2), F32))
    sin = b.input("sin", TensorType((T, ROT // 2), F32))
    ms = b.op("mean", [b.op("mul", [x, x])], dims=[-1], keepdim=True)
    r = b.op("rsqrt", [b.op("add", [ms, b.constant(1e-6, F32)])])
    y = b.op("mul", [b.op("mul", [x, r]), w])
    keep = b.op("slice", [y], dim=2, start=0, end=-ROT)
    rot = b.op("slice", [y], dim=2, start=-ROT, end=WIDTH)
    pairs = b.op("reshape", [rot], shape=[B, T, ROT // 2, 2])
    a, c = (b.op("select", [pairs], dim=3, index=i) for i in (0, 1))
    re = b.op("sub", [b.op("mul", [a, cos]), b.op("mul", [c, sin])])
    im = b.op("add", [b.op("mul", [a, sin]), b.op("mul", [c, cos])])
    parts = [b.op("reshape", [v], shape=[B, T, ROT // 2, 1]) for v in (re, im)]
    rotated = b.op("reshape", [b.op("concat", parts, dim=3)], shape=[B, T, ROT])
    b.output(b.op("concat", [keep, rotated], dim=2))
    return b.build()


def inputs(g: ir.Graph, sizes: dict[str, int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    env = {ir.sym(k): v for k, v in sizes.items()}
    shapes = [[int(d.subs(env)) if not isinstance(d, int) else d for d in v.shape] for v in g.inputs]
    return [torch.randn(s, generator=gen) for s in shapes]


def kernels(g: ir.Graph) -> list[ir.Node]:
    return [n for n in g.ops if n.name == "fused.kernel"]


def test_the_policy_is_tvm_on_the_cpu_only() -> None:
    assert fusion_policy("tvm", get_target("cpu")) is CPU_FUSION
    assert fusion_policy("triton", get_target("cpu")) is None
    assert fusion_policy("tvm", get_target("sm_90")) is None
    assert CPU_FUSION.movement == {"slice", "select", "concat", "permute"}


def test_norm_and_rope_are_one_kernel_that_tvm_lowers() -> None:
    g = rope_graph()
    default = fuse_elementwise(g)
    assert "concat" in [n.name for n in default.ops]  # Triton's policy: glue stays outside
    fused = fuse_elementwise(g, policy=CPU_FUSION)
    ir.verify(fused)
    assert [n.name for n in fused.ops] == ["fused.kernel"]
    exe = TVMBackend().compile(fused, "cpu")
    assert exe.fallbacks() == []
    (record,) = exe.kernel_records()
    assert record.name == "rmsnorm_rope"
    for sizes in ({"B": 2, "T": 5}, {"B": 1, "T": 1}):
        args = inputs(g, sizes)
        (want,) = ir.interpret(g, *args)
        (got,) = exe(*args)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape, start, end",
    [((B, T, 12), -4, 12), ((B, T, 12), -20, 12), ((3, 12), -5, -1)],
)
def test_negative_slice_start_and_reshapes_inside_a_body(shape, start, end) -> None:
    """Python's slice rule (a negative start counts from the end, clamped at 0) in a fused body;
    the reshape keeps the leading dims and splits only the last."""
    b = ir.Builder(name="slices")
    x = b.input("x", TensorType(shape, F32))
    s = b.op("exp", [b.op("slice", [x], dim=-1, start=start, end=end)])
    n = s.shape[-1]
    split = b.op("reshape", [s], shape=[*shape[:-1], 1, n])
    b.output(b.op("neg", [b.op("concat", [split, split], dim=-2)]))
    g = b.build()
    fused = fuse_elementwise(g, policy=CPU_FUSION)
    assert len(kernels(fused)) == 1
    exe = TVMBackend().compile(fused, "cpu")
    assert exe.fallbacks() == []
    args = inputs(g, {"B": 2, "T": 3})
    torch.testing.assert_close(exe(*args)[0], ir.interpret(g, *args)[0], rtol=0, atol=0)


def movement_graph(seed: int, n_ops: int = 14) -> ir.Graph:
    """Random chains over [T, 8]: elementwise ops, slices (either end), concats back to 8
    columns, transposes, and values reused (detours) at random."""
    rng = random.Random(seed)
    b = ir.Builder(name=f"moves{seed}")
    tiles = [b.input("x", TensorType((T, 8), F32)), b.input("y", TensorType((T, 8), F32))]
    outs: list[ir.Value] = []
    for _ in range(n_ops):
        t, u = rng.choice(tiles), rng.choice(tiles)
        kind = rng.choice(["unary", "binary", "slices", "transpose"])
        if kind == "unary":
            v = b.op(rng.choice(["exp", "neg", "tanh"]), [t])
        elif kind == "binary":
            v = b.op(rng.choice(["add", "mul", "sub"]), [t, u])
        elif kind == "slices":
            k = rng.randrange(1, 8)
            lo = b.op("slice", [t], dim=1, start=0, end=k)
            hi = b.op("slice", [u], dim=1, start=k - 8, end=8)
            v = b.op("concat", [hi, lo] if rng.random() < 0.5 else [lo, hi], dim=1)
        else:
            twice = b.op("permute", [b.op("permute", [t], dims=[1, 0])], dims=[1, 0])
            v = b.op("add", [twice, u])
        tiles.append(v)
        if rng.random() < 0.2:
            outs.append(v)
    b.output(*outs, tiles[-1])
    return b.build()


@pytest.mark.parametrize("seed", range(4))
def test_random_movement_chains_fuse_and_run(seed: int) -> None:
    g = movement_graph(seed)
    fused = fuse_elementwise(g, policy=CPU_FUSION)
    ir.verify(fused)
    exe = TVMBackend().compile(fused, "cpu")
    assert "fused.kernel" not in {op for op, _ in exe.fallbacks()}, exe.fallbacks()
    args = inputs(g, {"T": 5}, seed)
    for want, got in zip(ir.interpret(g, *args), exe(*args)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
