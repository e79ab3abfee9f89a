"""Shared samples for the `linalg.matmul_fp8` tests (TVM and Triton)."""

from __future__ import annotations

import math

import torch

import ir
from models.weights import dequantize_fp8, quantize_fp8

F8 = ir.DType.f8e4m3


def fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantised random weight: (e4m3 [n, k], f32 scales [ceil(n/128), ceil(k/128)])."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n).unsqueeze(1)
    q, scale = quantize_fp8(w)
    return q, scale.float()


def all_codes_weight(n: int, k: int) -> torch.Tensor:
    """e4m3 [n, k] cycling through every byte except the two NaNs (0x7f, 0xff)."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    return codes.repeat(math.ceil(n * k / len(codes)))[: n * k].view(n, k).view(torch.float8_e4m3fn)


def graph(m, n: int, k: int, act: ir.DType, block: int = 128) -> ir.Graph:
    b = ir.Builder(name="fp8_gemm")
    x = b.input("x", ir.TensorType((m, k), act))
    w = b.input("w", ir.TensorType((n, k), F8), role="parameter")
    s = b.input("s", ir.TensorType((-(-n // block), -(-k // block)), ir.DType.f32), "parameter")
    b.output(b.op("linalg.matmul_fp8", [x, w, s], block=block))
    return b.build()


def expected(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eager on the dequantised weight, in f64 (the op sums in f32, in its own order)."""
    return x.double() @ dequantize_fp8(q, scale).double().T
