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
