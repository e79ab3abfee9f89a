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

__all__ = [
    "E2M1_VALUES",
    "FP4_BLOCK",
    "FP8_BLOCK",
    "MatmulFP8",
    "decode_e2m1",
    "decode_ue8m0",
    "dequant_fp4",
    "dequant_fp8",
    "expand_block_scale",
]

ACTIVATIONS = (DType.f32, DType.bf16, DType.f16)
FP4_BLOCK = 32  # MXFP4: one ue8m0 scale per 1×32 block of a weight row
FP8_BLOCK = 128  # DeepSeek FP8: one fp32 (power-of-two) scale per 128×128 block
# e2m1 magnitudes of codes 0-7 (bit 3 of a code is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def decode_e2m1(packed):
    """int8 [.., n/2] of e2m1 code pairs -> f32 [.., n], exact. Byte j holds column 2j in its
    low nibble and column 2j+1 in its high nibble (models/weights.py's layout); a code is
    s·(e1 e0 m0): bit 3 the sign, bits 0-2 index `E2M1_VALUES`."""
    b = packed.to(torch.int32) & 0xFF
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    magnitude = torch.tensor(E2M1_VALUES, device=packed.device)[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def decode_ue8m0(bits):
    """int8 holding ue8m0 bytes u (read unsigned) -> f32 2^(u - 127), exact (2^-127 is an f32
    subnormal); u = 255 is NaN (OCP MX)."""
    u = bits.to(torch.int32) & 0xFF
    normal = (u << 23).view(torch.float32)  # exponent field u, mantissa 0: 2^(u-127) for u >= 1
    tiny = torch.full_like(normal, 2.0**-127)
    return torch.where(u == 0, tiny, torch.where(u == 255, torch.nan, normal))


def dequant_fp4(packed, scale):
    """MXFP4 -> f32: packed int8 [.., n, k/2] (`decode_e2m1`) and ue8m0 int8 scale
    [.., n, ceil(k/32)] -> [.., n, k], value = e2m1 · 2^(u - 127), exact."""
    values = decode_e2m1(packed)
    full = decode_ue8m0(scale).repeat_interleave(FP4_BLOCK, -1)
    return values * full[..., : values.shape[-1]]


def dequant_fp8(w, scale, block: int = FP8_BLOCK):
    """Block-scaled FP8 -> f32: w f8e4m3 [.., n, k], f32 scale [.., ceil(n/b), ceil(k/b)] ->
    [.., n, k], value = f32(w) · scale (exact for power-of-two scales)."""
    n, k = w.shape[-2:]
    full = scale.float().repeat_interleave(block, -2).repeat_interleave(block, -1)
    return w.float() * full[..., :n, :k]


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
