"""Triton template of `linalg.matmul_fp8` (ir/ops/quant.py), one kernel (`quant_fp8_kernel.py`).

The weight pointer is `*fp8e4nv` (float8_e4m3fn): on NVIDIA sm_89/sm_90 the e4m3 -> f32 decode
is the hardware conversion; under the CPU interpreter (Triton 3.9) every finite code decodes
exactly, but the NaN codes 0x7f/0xff read as ±480 (checkpoints hold no NaN weights). AMD
gfx942 (MI300) has only the fnuz variant (fp8e4b8, another bias and NaN code): e4m3fn weights
are not supported there (they would need re-encoding at load), so no gfx942 variant is offered.

Tiles: GPUs take BLOCK_N = 64 channels, BLOCK_M = 1 × BLOCK_K = 128 for decode (M < 16: a
GEMV, weight-bandwidth bound) and 64 × 64 with `tl.dot` otherwise; the interpreter takes
wide tiles (it pays per program and per op).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ir
from backends.targets import Target, get_target
from backends.triton.emitters import TRITON_EMITTERS, AotVariant, OneKernel, cdiv
from backends.triton.kernel import KernelSource, Param, load_jit, next_pow2

__all__ = ["MatmulFP8Launch", "fp8_config"]

_POINTERS = ("x_ptr", "w_ptr", "scale_ptr", "y_ptr")
_CONSTEXPRS = ("BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K")


@functools.cache
def _text() -> str:
    return Path(__file__).with_name("quant_fp8_kernel.py").read_text()


def fp8_config(target: Target, m: int, block: int) -> dict[str, int]:
    """Tiles for M rows (BLOCK_K = min(block, 128) divides the scale block)."""
    block_k = min(block, 128)
    if target.is_gpu:
        if m < 16:
            return {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 4}
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": min(block_k, 64), "num_warps": 4}
    return {"BLOCK_M": min(next_pow2(max(m, 1)), 16), "BLOCK_N": 128, "BLOCK_K": block_k,
            "num_warps": 4}


@dataclass
class MatmulFP8Launch(OneKernel):
    source: KernelSource
    target: Target
    block: int

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        x, w, scale = (t.contiguous() for t in inputs)
        (m, k), n = x.shape, w.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if m == 0 or n == 0:
            return (y,)
        cfg = fp8_config(self.target, m, self.block)
        grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]))
        load_jit(self.source)[grid](
            x_ptr=x, w_ptr=w, scale_ptr=scale, y_ptr=y, M=m, N=n, K=k,
            SCALE_COLS=scale.shape[1], BLOCK=self.block, **cfg,
        )  # fmt: skip
        return (y,)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        """The decode GEMV (BLOCK_M 1) and the prefill GEMM (BLOCK_M 64, tl.dot) tiles."""
        out = []
        for m in (1, 64):
            cfg = fp8_config(target, m, self.block)
            opts = {"num_warps": cfg.pop("num_warps")}
            out.append(AotVariant({**cfg, "BLOCK": self.block}, opts, {"K": 16}))
        return out


def _check(node: ir.Node) -> bool | str:
    block = node.attrs["block"]
    if block < 16 or block & (block - 1):
        return f"linalg.matmul_fp8: block {block}; the template takes a power of two >= 16"
    return True


@TRITON_EMITTERS.register("linalg.matmul_fp8", check=_check)
def emit_matmul_fp8(node: ir.Node, target: Target | None) -> MatmulFP8Launch:
    values = (*node.operands, *node.results)
    params = [Param(p, "ptr", v.dtype) for p, v in zip(_POINTERS, values, strict=True)]
    params += [Param(p, "int") for p in ("M", "N", "K", "SCALE_COLS")]
    params += [Param(c, "constexpr") for c in _CONSTEXPRS]
    pointers = ", ".join(f"{p.name}: {p.dtype.value}" for p in params if p.dtype is not None)
    text = _text() + f"# pointers: {pointers}\n"
    source = KernelSource("matmul_fp8", text, tuple(params), (node.name,))
    return MatmulFP8Launch(source, target or get_target("cpu"), node.attrs["block"])
