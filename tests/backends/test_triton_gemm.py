"""matmul (with a fused epilogue) and grouped_mm templates on the Triton CPU interpreter, against
`ir.interpret`; sizes are not multiples of the 32x32x32 interpreter tiles."""

from __future__ import annotations

import pytest
import torch

import ir
from backends.triton import TritonBackend
from backends.triton import samples as bodies
from ir import DType, TensorType

T = bodies.T
TOL = {DType.f32: dict(rtol=1e-4, atol=1e-4), DType.bf16: dict(rtol=2e-2, atol=5e-2)}


def run_both(g: ir.Graph, args, params=None, dtype=DType.f32):
    exe = TritonBackend().compile(g, "cpu")
    assert exe.fallbacks() == []
    got = exe(*args, params=params)
    want = ir.interpret(g, *args, params=params)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
    return exe


def rand(*shape, dtype=DType.f32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(dtype.to_torch())


@pytest.mark.parametrize("dtype", [DType.f32, DType.bf16], ids=str)
@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((37, 50), (50, 45)),
        ((2, T, 40), (40, 33)),
        ((2, 17, 20), (2, 20, 9)),
        ((3, 5, 16), (1, 16, 40)),
    ],
    ids=["2d", "lead-dims", "batched", "batch-bcast"],
)
def test_matmul(a_shape, b_shape, dtype):
    b = ir.Builder(name="mm")
    x = b.input("x", TensorType(a_shape, dtype))
    w = b.input("w", TensorType(b_shape, dtype), role="parameter")
    b.output(b.op("matmul", [x, w], name="y"))
    g = b.build()
    env = {T: 7}
    xs = rand(*[int(ir.symbolic.subs_dim(d, env)) for d in a_shape], dtype=dtype)
    exe = run_both(g, [xs], {"w": rand(*b_shape, dtype=dtype, seed=1)}, dtype)
    assert exe.report()["kernels"][0]["name"] == f"matmul_{dtype.value}"


@pytest.mark.parametrize("dtype", [DType.f32, DType.bf16], ids=str)
def test_matmul_epilogue(dtype):
    body = bodies.linear_epilogue(dtype=dtype)
    g = bodies.wrap(body)
    params = {"w": rand(40, 36, dtype=dtype, seed=2), "bias": rand(36, dtype=dtype, seed=3)}
    exe = run_both(g, [rand(21, 40, dtype=dtype), rand(21, 36, dtype=dtype, seed=4)], params, dtype)
    (kernel,) = exe.kernels()
    assert kernel.fused_ops == ("matmul", "add", "silu", "mul", "cast")
    assert "# epilogue on the fp32 accumulator" in kernel.source


@pytest.mark.parametrize("offsets_dtype", [DType.i64, DType.i32], ids=str)
@pytest.mark.parametrize("dtype", [DType.f32, DType.bf16], ids=str)
def test_grouped_mm(dtype, offsets_dtype):
    """Four experts: one with zero tokens, one with more rows than a tile, rows past the end."""
    g_, k, n = 4, 40, 36
    b = ir.Builder(name="experts")
    x = b.input("x", TensorType((T, k), dtype))
    w = b.input("w", TensorType((g_, k, n), dtype), role="parameter")
    off = b.input("offsets", TensorType((g_,), offsets_dtype))
    b.output(b.op("grouped_mm", [x, w, off], name="y"))
    graph = b.build()
    offsets = torch.tensor([5, 5, 41, 44], dtype=offsets_dtype.to_torch())  # 46 rows: 2 unused
    xs = rand(46, k, dtype=dtype)
    exe = run_both(graph, [xs, offsets], {"w": rand(g_, k, n, dtype=dtype, seed=5)}, dtype)
    (out,) = exe(xs, offsets, params={"w": rand(g_, k, n, dtype=dtype, seed=5)})
    assert out[44:].abs().max() == 0
    assert exe.report()["kernels"][0]["name"] == f"grouped_mm_{dtype.value}"


def test_gemm_fallbacks_have_reasons():
    b = ir.Builder(name="int_mm")
    x = b.input("x", TensorType((4, 8), DType.i64))
    w = b.input("w", TensorType((8, 2), DType.i64))
    v = b.input("v", TensorType((8,), DType.f32))
    m = b.input("m", TensorType((4, 8), DType.f32))
    b.output(b.op("matmul", [x, w]), b.op("matmul", [m, v]))
    exe = TritonBackend().compile(b.build(), "cpu")
    reasons = [r for _, r in exe.fallbacks()]
    assert "only f32, bf16 and f16" in reasons[0]
    assert "rank 2 or 3" in reasons[1]


def test_matmul_epilogue_with_leading_dims_and_broadcast_input():
    """x [2,T,24] @ w [24,20] + pos [T,20] (broadcast over the leading 2): A's rows flattened."""
    b = ir.Builder(name="proj_pos")
    x = b.input("x", TensorType((2, T, 24), DType.f32))
    w = b.input("w", TensorType((24, 20), DType.f32), role="parameter")
    pos = b.input("pos", TensorType((T, 20), DType.f32))
    y = b.op("matmul", [x, w], name="y")
    b.output(b.op("add", [y, pos], name="out"))
    g = bodies.wrap(b.build())
    exe = run_both(g, [rand(2, 5, 24), rand(5, 20, seed=7)], {"w": rand(24, 20, seed=8)})
    assert exe.kernels()[0].fused_ops == ("matmul", "add")
