"""`linalg.matmul_fp8`: the op's reference against x @ dequant(w)ᵀ, its verifier errors and cost,
and the TVM CPU kernel (weight kept float8_e4m3fn in memory) against the reference.

Shapes include N, K not multiples of the 128 block, an M of 1 (decode GEMV), and every finite
e4m3 code in one weight (the in-kernel decode must be exact, subnormals included).
"""

from __future__ import annotations

import pytest
import torch

import ir
from ir.errors import IRTypeError
from models.weights import dequantize_fp8
from quant_fp8_helpers import all_codes_weight, expected, fp8_weight, graph

F8, F32 = ir.DType.f8e4m3, ir.DType.f32


# --- the op ---------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_reference_is_matmul_on_dequantised_weight(act: torch.dtype) -> None:
    q, scale = fp8_weight(200, 300, seed=1)
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(2)).to(act)
    (y,) = ir.OPS["linalg.matmul_fp8"]().reference(x, q, scale)
    want = x.float() @ dequantize_fp8(q, scale).T
    assert y.dtype == act and y.shape == (5, 200)
    torch.testing.assert_close(y, want.to(act), rtol=0, atol=0)
    # and it is not a bf16 GEMM: a different scale changes the answer
    (other,) = ir.OPS["linalg.matmul_fp8"]().reference(x, q, scale * 2)
    assert not torch.equal(other, y)


@pytest.mark.parametrize(
    "types, message",
    [
        (((4, 256), F32, (3, 256), F8, (1, 2), ir.DType.bf16), "scale must be f32"),
        (((4, 256), F32, (3, 256), ir.DType.bf16, (1, 2), F32), "w must be f8e4m3"),
        (((4, 256), ir.DType.i64, (3, 256), F8, (1, 2), F32), "x must be f32, bf16 or f16"),
        (((4, 200), F32, (3, 256), F8, (1, 2), F32), "contracted dims differ"),
        (((4, 256), F32, (3, 256), F8, (2, 2), F32), r"scale must be \[1, 2\] \(one per 128x128"),
        (((4, 256), F32, (3, 256), F8, (1, 2, 1), F32), "ranks 2, 2, 2"),
    ],
)
def test_verifier_errors(types, message: str) -> None:
    xs, xd, ws, wd, ss, sd = types
    op = ir.OPS["linalg.matmul_fp8"]()
    with pytest.raises(IRTypeError, match=message):
        op.infer_type(ir.TensorType(xs, xd), ir.TensorType(ws, wd), ir.TensorType(ss, sd))


def test_cost_counts_weight_bytes_at_one_per_element() -> None:
    n, k = 4096, 4096
    g = graph(1, n, k, ir.DType.bf16)
    node = g.ops[0]
    cost = node.op.cost([v.type for v in node.operands], [node.result.type])
    weight, scales, io = n * k, 32 * 32 * 4, 2 * k + 2 * n
    assert cost.bytes == weight + scales + io
    assert cost.flops == 2 * n * k
    bf16_weight = 2 * n * k  # what a bf16 `matmul` of the same shape reads for its weight
    assert cost.bytes < 0.51 * (bf16_weight + scales + io)


# --- TVM CPU ---------------------------------------------------------------------------------

tvm = pytest.importorskip("tvm")


@pytest.mark.parametrize(
    "m, n, k, act, tol",
    [
        (1, 130, 200, torch.float32, 1e-6),  # GEMV, N and K not multiples of 128
        (3, 256, 384, torch.float32, 1e-6),  # K a multiple of the vector width: dot schedule
        (5, 129, 257, torch.bfloat16, 8e-3),  # bf16 activations and result (one bf16 rounding)
    ],
)
def test_tvm_matches_dequantised_eager(m: int, n: int, k: int, act: torch.dtype, tol) -> None:
    from backends.tvm import TVMBackend

    q, scale = fp8_weight(n, k, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(act)
    exe = TVMBackend().compile(graph(m, n, k, ir.DType.from_torch(act)), "cpu")
    assert exe.fallbacks() == [], exe.fallbacks()
    (y,) = exe(x, params={"w": q, "s": scale})
    want = expected(x, q, scale)
    assert y.dtype == act and y.shape == (m, n)
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


def test_tvm_decodes_every_e4m3_code_exactly() -> None:
    """x = e_j picks column j: y[j, n] = f32(w[n, j]) · scale, so every code is read back."""
    from backends.tvm import TVMBackend

    n, k = 136, 130
    q = all_codes_weight(n, k)
    scale = torch.tensor([[0.5, 2.0], [4.0, 0.25]])
    x = torch.eye(k)
    exe = TVMBackend().compile(graph(k, n, k, ir.DType.f32), "cpu")
    (y,) = exe(x, params={"w": q, "s": scale})
    torch.testing.assert_close(y, dequantize_fp8(q, scale).T, rtol=0, atol=0)


def test_tvm_cast_from_e4m3_is_exact() -> None:
    """Any kernel reading an f8e4m3 input (here a plain cast + scale, as when the dequant is not
    folded into `linalg.matmul_fp8`) decodes it exactly, subnormal codes included."""
    from backends.tvm import TVMBackend

    b = ir.Builder(name="dequant")
    w = b.input("w", ir.TensorType((16, 16), F8), role="parameter")
    b.output(b.op("mul", [b.op("cast", [w], dtype=F32), b.op("constant", value=0.5, dtype=F32)]))
    g = b.build()
    q = torch.arange(256, dtype=torch.uint8).view(16, 16).view(torch.float8_e4m3fn)  # NaNs too
    (y,) = TVMBackend().compile(g, "cpu")(params={"w": q})
    torch.testing.assert_close(y, q.float() * 0.5, rtol=0, atol=0, equal_nan=True)


def test_printer_parser_round_trip() -> None:
    from ir.parser import parse

    text = str(graph(ir.sym("M"), 130, 200, ir.DType.bf16))
    assert "linalg.matmul_fp8" in text and str(parse(text)) == text


# --- the decode GEMV kernel (K a multiple of the block: fp8_gemv_cpu) -----------------------


def _gemv_exe(n: int, k: int, act: ir.DType, blas: str = "auto"):
    from backends.tvm import TVMBackend

    exe = TVMBackend().compile(graph(ir.sym("M"), n, k, act), "cpu", blas=blas)
    assert exe.fallbacks() == [], exe.fallbacks()
    return exe


def test_gemv_kernel_is_the_hand_written_one() -> None:
    """K a multiple of 128: the kernel is `fp8_gemv_cpu` (decoded blocks, a NaN scan), not the
    te compute with the generic nt schedule."""
    from backends.tvm.kernel import KERNELS

    _gemv_exe(256, 512, ir.DType.f32)
    sources = [k.func.script() for k in KERNELS.values() if not isinstance(k, str)]
    fp8 = [s for s in sources if "float8_e4m3fn" in s and "seen" in s and "wblk" in s]
    assert fp8, "no fp8_gemv_cpu kernel was built"


@pytest.mark.parametrize("m", [1, 2, 8, 9, 17])  # whole and partial 8-row tiles, symbolic M
@pytest.mark.parametrize("act, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_gemv_matches_dequantised_eager(m: int, act: torch.dtype, tol: float) -> None:
    n, k = 200, 384  # N not a multiple of the block: the last block row is partial
    exe = _gemv_exe(n, k, ir.DType.from_torch(act))
    q, scale = fp8_weight(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(act)
    (y,) = exe(x, params={"w": q, "s": scale})
    want = expected(x, q, scale)
    assert y.dtype == act and y.shape == (m, n)
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


def test_gemv_f16_activations() -> None:
    exe = _gemv_exe(64, 256, ir.DType.f16)
    q, scale = fp8_weight(64, 256, seed=3)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)).half()
    (y,) = exe(x, params={"w": q, "s": scale})
    want = expected(x, q, scale)
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 2e-3


@pytest.mark.parametrize("scales", [(0.5, 2.0, 4.0, 0.25), (0.5, 300.0, 2.0**100, 1e-30)])
def test_gemv_decodes_every_e4m3_code_exactly(scales) -> None:
    """x = e_j picks column j: y[j, n] = f32(w[n, j])·scale, the reference's rounding exactly;
    the second set has scales >= 128 (s·2^120 would overflow: the kernel's other path)."""
    n, k = 136, 256
    q = all_codes_weight(n, k)
    scale = torch.tensor(scales).view(2, 2)
    exe = _gemv_exe(n, k, ir.DType.f32)
    (y,) = exe(torch.eye(k), params={"w": q, "s": scale})
    torch.testing.assert_close(y, dequantize_fp8(q, scale).T, rtol=0, atol=0)


def test_gemv_nan_code_gives_nan_row() -> None:
    """A NaN code (0x7f or 0xff) anywhere in weight row n makes y[:, n] NaN, as the
    reference's x @ dequant(w)ᵀ; the other outputs are unaffected."""
    n, k = 64, 384
    codes = torch.zeros(n, k, dtype=torch.uint8)
    codes[5, 77], codes[9, 383], codes[11, 3] = 0x7F, 0xFF, 0x7E  # 0x7e = 448: finite
    q = codes.view(torch.float8_e4m3fn)
    scale = torch.ones(1, 3)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    (y,) = _gemv_exe(n, k, ir.DType.f32)(x, params={"w": q, "s": scale})
    assert torch.isnan(y).any(0).nonzero().flatten().tolist() == [5, 9]
    torch.testing.assert_close(y[:, 11], x[:, 3] * 448.0)


def test_prefill_gemm_calls_blas_under_auto() -> None:
    """M >= FP8_BLAS_MIN_ROWS and >= BLAS_MIN_FLOPS: the reference (f32 dequant + torch.matmul)
    under blas="auto", the kernel under "never"; 8 rows: the kernel under "auto", the reference
    under "always"; all equal eager."""
    from backends.tvm.quant import FP8_BLAS_MIN_ROWS

    n, k, m = 256, 256, FP8_BLAS_MIN_ROWS
    q, scale = fp8_weight(n, k, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    want = expected(x, q, scale)
    for policy, rows, impl in (("auto", m, "blas"), ("never", m, "tvm"), ("auto", 8, "tvm"),
                               ("always", 8, "blas")):  # fmt: skip
        exe = _gemv_exe(n, k, ir.DType.f32, blas=policy)
        (y,) = exe(x[:rows], params={"w": q, "s": scale})
        err = ((y.double() - want[:rows]).abs().max() / want[:rows].abs().max()).item()
        assert err < 1e-6, (policy, rows, err)
        calls = [s.launch.calls for s in exe.steps if s.launch is not None]
        assert calls and set(calls[0]) == {impl}, (policy, rows, calls)


def test_gemv_block_32_with_a_nan_in_the_scan_tail() -> None:
    """block 32, K = 96: the NaN scan's last 32 bytes of a row are its scalar tail."""
    from backends.tvm import TVMBackend

    n, k, block = 70, 96, 32
    q, _ = fp8_weight(n, k, seed=5)
    scale = torch.rand(-(-n // block), k // block, generator=torch.Generator().manual_seed(5))
    codes = q.view(torch.uint8).clone()
    codes[3, 90] = 0xFF
    q = codes.view(torch.float8_e4m3fn)
    exe = TVMBackend().compile(graph(ir.sym("M"), n, k, F32, block=block), "cpu")
    assert exe.fallbacks() == [], exe.fallbacks()
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(5))
    (y,) = exe(x, params={"w": q, "s": scale})
    (want,) = ir.OPS["linalg.matmul_fp8"](block=block).reference(x, q, scale)
    assert torch.isnan(y).any(0).nonzero().flatten().tolist() == [3]
    assert torch.isnan(want).any(0).nonzero().flatten().tolist() == [3]
    ok = ~torch.isnan(want)
    assert ((y - want)[ok].abs().max() / want[ok].abs().max()).item() < 1e-6
