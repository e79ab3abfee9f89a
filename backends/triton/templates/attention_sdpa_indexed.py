"""Host side of `attn.sdpa` with index-selected keys (`attention_sdpa_indexed_kernel.py`):
the kernel's parameters, tiles per target, strides of the broadcast operands, the grid and the
variant compiled ahead of time. `attention_sdpa.emit_sdpa` hands indexed nodes here.

Tiles: BLOCK_H query heads of one KV group (at least 16, the `tl.dot` minimum: a group of 1-15
heads, MHA with shared indices, pads to 16 rows) x BLOCK_N index slots; the key head dim walked
in chunks of BLOCK_D <= 128, the value dim (up to INDEXED_VALUE_DIM) padded to a power of two.
The CPU interpreter runs 16 x 16; GPUs 16 heads x 32 slots (fp32, or any head dim above 128) or
64 x 32 heads x slots for 16-bit inputs at head dims up to 128 on NVIDIA, 16 x 16 on AMD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ir
from backends.targets import Target
from backends.triton.emitters import AotVariant, OneKernel, cdiv
from backends.triton.kernel import KernelSource, Param, load_jit, next_pow2
from backends.triton.templates.attention_sdpa_indexed_kernel import SDPA_INDEXED_SOURCE
from ir.ops.attn_dense import DenseAttention
from ir.symbolic import subs_dim

__all__ = ["IndexedSdpaLaunch", "indexed_config", "indexed_source"]

_MASK = {"none": 0, "bool": 1, "add": 2}


def indexed_config(target: Target, group: int, head_dim: int, value_dim: int,
                   dtype: ir.DType) -> dict:  # fmt: skip
    """Tiles and launch options of one program (module docstring)."""
    # the head dim is walked in chunks of at most 128 (q·kᵀ accumulates over them); the fp32
    # accumulator holds all of the value dim
    block_d, block_dv = max(16, min(128, next_pow2(head_dim))), max(16, next_pow2(value_dim))
    dims = {"BLOCK_D": block_d, "BLOCK_DV": block_dv}
    heads = max(16, min(64, next_pow2(group)))
    if not target.is_gpu:
        return {"BLOCK_H": 16, "BLOCK_N": 16, **dims, "num_warps": 4, "num_stages": 1}
    wide = head_dim > 128 or block_dv > 128
    warps = (256 if wide else 128) // target.warp_size
    if dtype == ir.DType.f32 or wide:
        return {"BLOCK_H": 16, "BLOCK_N": 32, **dims, "num_warps": warps, "num_stages": 1}
    if target.backend != "cuda":  # MFMA holds both dot operands in registers
        return {"BLOCK_H": 16, "BLOCK_N": 16, **dims, "num_warps": warps, "num_stages": 1}
    return {"BLOCK_H": heads, "BLOCK_N": 32, **dims, "num_warps": warps, "num_stages": 2}


def indexed_source(node: ir.Node) -> KernelSource:
    """The kernel's `KernelSource`, pointer dtypes from the node's operands (absent v, mask or
    sinks are never-read pointers of q's dtype; a bool mask goes in as int8)."""
    r = node.op.roles(node.operands)
    q, k = r["q"], r["k"]
    mask = q.dtype if r["mask"] is None else r["mask"].dtype
    mask = ir.DType.i8 if mask == ir.DType.bool else mask
    params = [Param("q_ptr", "ptr", q.dtype), Param("k_ptr", "ptr", k.dtype),
              Param("v_ptr", "ptr", (q if r["v"] is None else r["v"]).dtype),
              Param("mask_ptr", "ptr", mask),
              Param("idx_ptr", "ptr", r["indices"].dtype),
              Param("sinks_ptr", "ptr", (q if r["sinks"] is None else r["sinks"]).dtype),
              Param("out_ptr", "ptr", q.dtype)]  # fmt: skip
    ints = ("T", "S", "N", "HQ", "GROUP", "D", "DV", "idx_sb", "idx_sh", "idx_st", "mask_sb",
            "mask_sh", "mask_st", "mask_ss")  # fmt: skip
    params += [Param(n, "int") for n in ints]
    consts = ("SCALE", "CAUSAL", "OFFSET", "WINDOW", "MASK", "SINKS", "SOFTCAP", "VALUE_IN_K",
              "BLOCK_H", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "DOT_IN_F32", "KV_BSHD")  # fmt: skip
    params += [Param(n, "constexpr") for n in consts]
    return KernelSource("sdpa_indexed_fwd", SDPA_INDEXED_SOURCE, tuple(params), ("attn.sdpa",))


def _broadcast_strides(x: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """x viewed at `shape` (right-aligned, size-1 dims broadcast: stride 0) and its strides."""
    x = x.reshape((1,) * (len(shape) - x.dim()) + tuple(x.shape)).expand(*shape)
    return x, x.stride()


@dataclass
class IndexedSdpaLaunch(OneKernel):
    source: KernelSource
    op: DenseAttention
    dtype: ir.DType  # of q and the output
    target: Target
    operands: tuple[ir.Value, ...]

    def _constexprs(self, group: int, head_dim: int, value_dim: int,
                    target: Target) -> tuple[dict, dict]:  # fmt: skip
        """The node's attributes and the target's tiles as constexprs; the launch options."""
        op = self.op
        cfg = indexed_config(target, group, head_dim, value_dim, self.dtype)
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        consts = {
            "SCALE": float(op.scale), "CAUSAL": bool(op.causal), "OFFSET": int(op.offset),
            "WINDOW": int(op.window), "MASK": _MASK[op.mask], "SINKS": bool(op.sinks),
            "SOFTCAP": float(op.softcap), "VALUE_IN_K": op.value_dim > 0, **cfg,
            # fp32 operands use IEEE products; the CPU interpreter mis-multiplies bf16 tiles
            "DOT_IN_F32": self.dtype == ir.DType.f32 or not target.is_gpu,
            "KV_BSHD": op.kv_layout == "bshd",  # k, v [B,S,Hkv,D] read as stored
        }  # fmt: skip
        return consts, opts

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        device = next((t.device for t in inputs if t.device.type != "cpu"), inputs[0].device)
        r = self.op.roles([t.to(device) for t in inputs])
        q, k = r["q"].contiguous(), r["k"].contiguous()
        v = k if r["v"] is None else r["v"].contiguous()
        batch, heads, tokens, head_dim = q.shape
        keys, kv_heads = self.op.kv_bhsd(k).shape[1:3][::-1]
        value_dim = self.op.value_dim or v.shape[3]
        out = torch.empty(batch, heads, tokens, value_dim, dtype=q.dtype, device=device)
        if out.numel() == 0:
            return (out,)
        idx = r["indices"].contiguous()
        n = idx.shape[3]
        idx, idx_strides = _broadcast_strides(idx, (batch, kv_heads, tokens, n))
        mask, mask_strides = q, (0, 0, 0, 0)  # never read without a mask
        if r["mask"] is not None:
            mask = r["mask"].to(torch.int8) if r["mask"].dtype == torch.bool else r["mask"]
            mask, mask_strides = _broadcast_strides(mask, (batch, heads, tokens, keys))
        sinks = r["sinks"].contiguous() if r["sinks"] is not None else q
        group = heads // kv_heads
        consts, opts = self._constexprs(group, head_dim, value_dim, self.target)
        grid = (tokens, batch * kv_heads * cdiv(group, consts["BLOCK_H"]))
        if n == 0:
            return (out.zero_(),)
        load_jit(self.source)[grid](
            q_ptr=q, k_ptr=k, v_ptr=v, mask_ptr=mask, idx_ptr=idx, sinks_ptr=sinks, out_ptr=out,
            T=tokens, S=keys, N=n, HQ=heads, GROUP=group, D=head_dim, DV=value_dim,
            idx_sb=idx_strides[0], idx_sh=idx_strides[1], idx_st=idx_strides[2],
            mask_sb=mask_strides[0], mask_sh=mask_strides[1], mask_st=mask_strides[2],
            mask_ss=mask_strides[3], **consts, **opts,
        )  # fmt: skip
        return (out,)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        r = self.op.roles(self.operands)
        q, k = r["q"], r["k"]
        head_dim = int(subs_dim(q.shape[3], env))
        value_dim = self.op.value_dim or int(subs_dim(r["v"].shape[3], env))
        kv_heads = k.shape[2 if self.op.kv_layout == "bshd" else 1]
        group = int(subs_dim(q.shape[1], env)) // int(subs_dim(kv_heads, env))
        consts, opts = self._constexprs(group, head_dim, value_dim, target)
        hints = {n: 16 for n, d in (("D", head_dim), ("DV", value_dim)) if d % 16 == 0}
        return [AotVariant(consts, opts, hints)]
