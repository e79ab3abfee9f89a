"""Contractions: matmul (torch.matmul semantics) and grouped_mm (MoE expert GEMM)."""

from __future__ import annotations

from dataclasses import dataclass

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import INT_INDEX, broadcast_shapes, f8_safe, io_cost, numel, require
from ir.types import DType, TensorType


@register
@dataclass(frozen=True)
class Matmul(Op):
    """torch.matmul: 1-D operands are promoted to matrices and the added dim removed afterwards;
    batch dims (all but the last two) broadcast. Both operands must have the same dtype."""

    mnemonic = "matmul"
    kind = Kind.GEMM
    num_operands = 2

    def infer_type(self, a: TensorType, b: TensorType):
        require(self, a.rank >= 1 and b.rank >= 1, "operands must be at least 1-D", a, b)
        require(self, a.dtype == b.dtype, "operand dtypes differ; insert a cast", a, b)
        k_a = a.shape[-1]
        k_b = b.shape[0] if b.rank == 1 else b.shape[-2]
        require(self, k_a == k_b, f"contracted dims differ: {k_a} vs {k_b}", a, b)
        batch_a = TensorType(a.shape[:-2], a.dtype)
        batch_b = TensorType(b.shape[:-2], b.dtype)
        batch = broadcast_shapes(self, batch_a, batch_b)
        m = (a.shape[-2],) if a.rank >= 2 else ()
        n = (b.shape[-1],) if b.rank >= 2 else ()
        return (TensorType(batch + m + n, a.dtype),)

    def reference(self, a, b):
        return (f8_safe(torch.matmul, a, b, out_dtype=DType.from_torch(a.dtype)),)

    def cost(self, operand_types, result_types):
        a = operand_types[0]
        return io_cost(2 * numel(result_types[0].shape) * a.shape[-1], operand_types, result_types)


@register
@dataclass(frozen=True)
class GroupedMM(Op):
    """Grouped GEMM: x [M,K], w [G,K,N], offsets int[G] (cumulative row ends) -> [M,N].
    Rows offsets[g-1]:offsets[g] (offsets[-1] = 0) are multiplied by w[g]; rows past
    offsets[G-1] are zero."""

    mnemonic = "grouped_mm"
    kind = Kind.GEMM
    num_operands = 3

    def infer_type(self, x: TensorType, w: TensorType, offsets: TensorType):
        types = (x, w, offsets)
        require(
            self,
            x.rank == 2 and w.rank == 3 and offsets.rank == 1,
            "expected ranks 2, 3, 1",
            *types,
        )
        require(self, x.dtype == w.dtype, "x and w dtypes differ; insert a cast", *types)
        require(self, offsets.dtype in INT_INDEX, "offsets must be i64 or i32", *types)
        require(self, x.shape[1] == w.shape[1], f"K differs: {x.shape[1]} vs {w.shape[1]}", *types)
        require(self, offsets.shape[0] == w.shape[0], "offsets length must equal G", *types)
        return (TensorType((x.shape[0], w.shape[2]), x.dtype),)

    def reference(self, x, w, offsets):
        out = torch.zeros((x.shape[0], w.shape[2]), dtype=x.dtype, device=x.device)
        start = 0
        for g, end in enumerate(offsets.tolist()):
            if end > start:
                out[start:end] = f8_safe(
                    torch.matmul, x[start:end], w[g], out_dtype=DType.from_torch(x.dtype)
                )
            start = max(start, end)
        return (out,)

    def cost(self, operand_types, result_types):
        x, w = operand_types[0], operand_types[1]
        return io_cost(2 * x.shape[0] * x.shape[1] * w.shape[2], operand_types, result_types)
