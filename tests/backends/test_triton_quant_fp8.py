"""`linalg.matmul_fp8` as a Triton template: the CPU interpreter against eager on the dequantised
weight (f32 and bf16 activations, N and K not multiples of 128, GEMV and tl.dot tiles), every
finite e4m3 code decoded exactly, and the AOT compile for sm_90 (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

import ir
from backends.triton import TritonBackend
from models.weights import dequantize_fp8
from quant_fp8_helpers import all_codes_weight, expected, fp8_weight, graph


@pytest.mark.parametrize(
    "m, n, k, act, tol",
    [
        (1, 130, 200, torch.float32, 1e-6),  # GEMV (sum form), ragged N and K
        (20, 129, 300, torch.float32, 1e-6),  # BLOCK_M 16: tl.dot, a ragged row tile
        (3, 256, 257, torch.bfloat16, 8e-3),  # bf16 in and out (one bf16 rounding)
    ],
)
def test_interpreter_matches_dequantised_eager(m, n, k, act, tol) -> None:
    q, scale = fp8_weight(n, k, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(act)
    exe = TritonBackend().compile(graph(m, n, k, ir.DType.from_torch(act)), "cpu")
    assert [s.launch is not None for s in exe.steps] == [True]
    (y,) = exe(x, params={"w": q, "s": scale})
    want = expected(x, q, scale)
    assert y.dtype == act and y.shape == (m, n)
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


def test_interpreter_decodes_every_finite_code() -> None:
    n, k = 136, 130
    q = all_codes_weight(n, k)
    scale = torch.tensor([[0.5, 2.0], [4.0, 0.25]])
    exe = TritonBackend().compile(graph(k, n, k, ir.DType.f32), "cpu")
    (y,) = exe(torch.eye(k), params={"w": q, "s": scale})
    torch.testing.assert_close(y, dequantize_fp8(q, scale).T, rtol=0, atol=0)


def test_aot_for_sm90() -> None:
    from backends.triton.aot import aot_compile

    exe = TritonBackend().compile(graph(ir.sym("M"), 4096, 4096, ir.DType.bf16), "cpu")
    try:
        results = aot_compile(exe, ["sm_90"])
    except RuntimeError as e:  # a triton wheel without the NVIDIA toolchain
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert [(r.kernel, r.target) for r in results] == [("matmul_fp8", "sm_90")] * 2
    for r in results:
        assert r.error is None, r.error
        assert 0 < r.registers <= 255 and r.spills == 0
    assert [r.constexprs["BLOCK_M"] for r in results] == [1, 64]
