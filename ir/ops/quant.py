"""Quantised-weight contractions: `linalg.matmul_fp8`, a GEMM whose weight stays block-scaled FP8.

The weight is kept as the checkpoint stores it (DeepSeek-V3/V4 FP8: float8_e4m3fn, one fp32
scale per 128×128 block) and is dequantised inside the kernel, so a decode GEMV reads 1 byte per
weight element (plus 4 bytes per 16,384 elements of scales) instead of 2 (bf16) or 4 (fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import io_cost, require
from ir.types import DType, TensorType

__all__ = ["MatmulFP8", "expand_block_scale"]

ACTIVATIONS = (DType.f32, DType.bf16, DType.f16)


def expand_block_scale(scale, n: int, k: int, block: int):
    """scale [ceil(n/block), ceil(k/block)] -> [n, k], element (i, j) = scale[i//block, j//block]."""
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]


@register
@dataclass(frozen=True)
class MatmulFP8(Op):
    """y = x @ dequant(w)ᵀ with a block-scaled FP8 weight.

    Operands: x [M,K] f32/bf16/f16 (activations), w [N,K] f8e4m3 (the weight as stored, row n is
    output channel n), scale [ceil(N/block), ceil(K/block)] f32. Result y [M,N] in x's dtype.

        dequant(w)[n,k] = f32(w[n,k]) · scale[n // block, k // block]      (exact when the
                                                                           scales are 2^e)
        y[m,n]          = round_to(x.dtype, Σ_k f32(x[m,k]) · dequant(w)[n,k])

    Products and the sum are fp32, up to reassociation (the sum's order is the kernel's; the
    Triton kernel applies each block's scale to its partial sum); the result is rounded once. M may be symbolic; N and K are static (weights). `block` is 128 in DeepSeek checkpoints.
    """

    mnemonic = "linalg.matmul_fp8"
    kind = Kind.OPAQUE  # a kernel of its own: the elementwise fuser must not absorb it
    num_operands = 3
    block: int = 128

    def infer_type(self, x: TensorType, w: TensorType, scale: TensorType):
        types = (x, w, scale)
        require(self, self.block >= 1, f"block must be >= 1, got {self.block}", *types)
        require(self, x.rank == 2 and w.rank == 2 and scale.rank == 2,
                "expected x [M,K], w [N,K], scale [N/block, K/block] (ranks 2, 2, 2)", *types)
        require(self, x.dtype in ACTIVATIONS, f"x must be f32, bf16 or f16, got {x.dtype}", *types)
        require(self, w.dtype == DType.f8e4m3,
                f"w must be f8e4m3 (float8_e4m3fn), got {w.dtype}; quantise it with "
                "models.weights.quantize_fp8", *types)
        require(self, scale.dtype == DType.f32,
                f"scale must be f32, got {scale.dtype}; cast e8m0 scales to f32", *types)
        n, k = w.shape
        require(self, isinstance(n, int) and isinstance(k, int),
                "w's shape must be static (a weight)", *types)
        require(self, x.shape[1] == k, f"contracted dims differ: x has K={x.shape[1]}, w {k}",
                *types)
        want = (math.ceil(n / self.block), math.ceil(k / self.block))
        require(self, tuple(scale.shape) == want,
                f"scale must be {list(want)} (one per {self.block}x{self.block} block of w "
                f"[{n},{k}]), got {list(scale.shape)}", *types)
        return (TensorType((x.shape[0], n), x.dtype),)

    def reference(self, x, w, scale):
        n, k = w.shape
        deq = w.float() * expand_block_scale(scale.float(), n, k, self.block)
        return ((x.float() @ deq.T).to(x.dtype),)

    def cost(self, operand_types, result_types):
        # Bytes at storage precision: w counts 1 byte per element, so the roofline sees the 2x
        # (vs bf16) / 4x (vs f32) cut in weight traffic.
        x, w = operand_types[0], operand_types[1]
        return io_cost(2 * x.shape[0] * w.shape[0] * w.shape[1], operand_types, result_types)
