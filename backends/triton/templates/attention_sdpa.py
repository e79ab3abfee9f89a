"""Triton template for `attn.sdpa` (dense MHA/GQA/MQA attention), registered in
`TRITON_EMITTERS`: the host side of `attention_sdpa_kernel.py` — which nodes it takes, tiles
per target, the mask's broadcast strides, the grid, and the variants compiled ahead of time.

The node's attributes (scale, causal, offset, window, mask kind, sinks, softcap) are constexprs,
so one source serves every layer and a GPU compile specialises it. Tiles: BLOCK_M queries x BLOCK_N
keys, head dims padded to powers of two (at least 16, the `tl.dot` minimum). On NVIDIA 64 x 64
for 16-bit inputs (32 keys for heads wider than 128), on AMD 32 x 16; 256 threads per program
from head dim 128 on, else 128; fp32 (IEEE products on FMA units) 32 x 32, 16 x 32 for wide
heads; the CPU interpreter runs 16 x 16. At head dim 128 (triton 3.9, `aot_compile`) no
variant spills on sm_80, sm_90, sm_120, gfx942, gfx950 (bf16: 177/157/178/90/90 registers);
sm_100 bf16 spills 12 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ir
from backends.targets import Target, get_target
from backends.triton.emitters import TRITON_EMITTERS, AotVariant, OneKernel, cdiv
from backends.triton.kernel import KernelSource, Param, load_jit, next_pow2
from backends.triton.templates.attention_sdpa_indexed import IndexedSdpaLaunch, indexed_source
from backends.triton.templates.attention_sdpa_kernel import SDPA_SOURCE
from ir.ops.attn_dense import INDEXED_HEAD_DIM, INDEXED_VALUE_DIM, KERNEL_HEAD_DIM
from ir.symbolic import subs_dim

__all__ = ["SdpaLaunch", "sdpa_config"]

_FLOATS = (ir.DType.f32, ir.DType.bf16, ir.DType.f16)
_MASK = {"none": 0, "bool": 1, "add": 2}
MAX_HEAD_DIM = KERNEL_HEAD_DIM  # q and the fp32 accumulator of BLOCK_M rows stay in registers


def sdpa_config(target: Target, head_dim: int, value_dim: int, dtype: ir.DType) -> dict:
    """Tiles and launch options of one program (module docstring)."""
    block_d, block_dv = max(16, next_pow2(head_dim)), max(16, next_pow2(value_dim))
    dims = {"BLOCK_D": block_d, "BLOCK_DV": block_dv}
    if not target.is_gpu:
        return {"BLOCK_M": 16, "BLOCK_N": 16, **dims, "num_warps": 4, "num_stages": 1}
    wide = max(block_d, block_dv) >= 128
    # threads per program: 256 from head dim 128 on (128 spilled on sm_120, gfx942, gfx950)
    warps = (256 if wide else 128) // target.warp_size
    if dtype == ir.DType.f32:  # IEEE fp32 dots on FMA units: 32 x 32 spilled on sm_90 at 128
        block_m = 16 if wide else 32
        return {"BLOCK_M": block_m, "BLOCK_N": 32, **dims, "num_warps": warps, "num_stages": 1}
    if target.backend != "cuda":  # MFMA holds both dot operands in registers: 32x32 spilled
        return {"BLOCK_M": 32, "BLOCK_N": 16, **dims, "num_warps": warps, "num_stages": 1}
    block_n = 64 if max(block_d, block_dv) <= 128 else 32
    return {"BLOCK_M": 64, "BLOCK_N": block_n, **dims, "num_warps": warps, "num_stages": 2}


def _source(node: ir.Node) -> KernelSource:
    """The kernel's `KernelSource`, pointer dtypes from the node's operands (a missing mask or
    sinks operand is a never-read pointer of q's dtype; a bool mask goes in as int8)."""
    q, k, v = node.operands[:3]
    mask_kind, sinks = node.attrs["mask"], node.attrs["sinks"]
    mask = q.dtype if mask_kind == "none" else node.operands[3].dtype
    mask = ir.DType.i8 if mask == ir.DType.bool else mask
    sink = node.operands[-1].dtype if sinks else q.dtype
    params = [Param("q_ptr", "ptr", q.dtype), Param("k_ptr", "ptr", k.dtype),
              Param("v_ptr", "ptr", v.dtype), Param("mask_ptr", "ptr", mask),
              Param("sinks_ptr", "ptr", sink), Param("out_ptr", "ptr", q.dtype)]  # fmt: skip
    params += [Param(n, "int") for n in ("T", "S", "HQ", "GROUP", "D", "DV")]
    params += [Param(n, "int") for n in ("mask_sb", "mask_sh", "mask_st", "mask_ss")]
    consts = ("SCALE", "CAUSAL", "OFFSET", "WINDOW", "MASK", "SINKS", "SOFTCAP", "BLOCK_M",
              "BLOCK_N", "BLOCK_D", "BLOCK_DV", "DOT_IN_F32", "KV_BSHD")  # fmt: skip
    params += [Param(n, "constexpr") for n in consts]
    return KernelSource("sdpa_fwd", SDPA_SOURCE, tuple(params), ("attn.sdpa",))


@dataclass
class SdpaLaunch(OneKernel):
    source: KernelSource
    attrs: dict[str, Any]
    dtype: ir.DType  # of q and the output
    target: Target
    operands: tuple[ir.Value, ...]

    def _constexprs(self, head_dim: int, value_dim: int, target: Target) -> tuple[dict, dict]:
        """The node's attributes and the target's tiles as constexprs; the launch options."""
        a = self.attrs
        cfg = sdpa_config(target, head_dim, value_dim, self.dtype)
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        consts = {
            "SCALE": float(a["scale"]),
            "CAUSAL": bool(a["causal"]),
            "OFFSET": int(a["offset"]),
            "WINDOW": int(a["window"]),
            "MASK": _MASK[a["mask"]],
            "SINKS": bool(a["sinks"]),
            "SOFTCAP": float(a["softcap"]),
            **cfg,
            # fp32 operands use IEEE products; the CPU interpreter mis-multiplies bf16 tiles
            "DOT_IN_F32": self.dtype == ir.DType.f32 or not target.is_gpu,
            # k, v [B,S,Hkv,D] read as stored (kv_layout="bshd"), else [B,Hkv,S,D]
            "KV_BSHD": a.get("kv_layout", "bhsd") == "bshd",
        }
        return consts, opts

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        device = next((t.device for t in inputs if t.device.type != "cpu"), inputs[0].device)
        q, k, v = (t.to(device).contiguous() for t in inputs[:3])
        batch, heads, tokens, head_dim = q.shape
        bshd = self.attrs.get("kv_layout", "bhsd") == "bshd"
        keys, kv_heads = (k.shape[1], k.shape[2]) if bshd else (k.shape[2], k.shape[1])
        value_dim = v.shape[3]
        out = torch.empty(batch, heads, tokens, value_dim, dtype=q.dtype, device=device)
        if out.numel() == 0:
            return (out,)
        mask, strides = q, (0, 0, 0, 0)  # never read without a mask
        if self.attrs["mask"] != "none":
            mask = inputs[3].to(device)
            mask = mask.to(torch.int8) if mask.dtype == torch.bool else mask
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            mask = mask.expand(batch, heads, tokens, keys)  # a view: broadcast dims stride 0
            strides = mask.stride()
        sinks = inputs[-1].to(device).contiguous() if self.attrs["sinks"] else q
        consts, opts = self._constexprs(head_dim, value_dim, self.target)
        grid = (cdiv(tokens, consts["BLOCK_M"]), batch * heads)
        load_jit(self.source)[grid](
            q_ptr=q, k_ptr=k, v_ptr=v, mask_ptr=mask, sinks_ptr=sinks, out_ptr=out,
            T=tokens, S=keys, HQ=heads, GROUP=heads // kv_heads, D=head_dim, DV=value_dim,
            mask_sb=strides[0], mask_sh=strides[1], mask_st=strides[2], mask_ss=strides[3],
            **consts, **opts,
        )  # fmt: skip
        return (out,)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        head_dim = int(subs_dim(self.operands[0].shape[3], env))
        value_dim = int(subs_dim(self.operands[2].shape[3], env))
        consts, opts = self._constexprs(head_dim, value_dim, target)
        hints = {n: 16 for n, d in (("D", head_dim), ("DV", value_dim)) if d % 16 == 0}
        return [AotVariant(consts, opts, hints)]


def _sdpa_check(node: ir.Node) -> bool | str:
    r = node.op.roles(node.operands)
    q, k = r["q"], r["k"]
    v = k if r["v"] is None else r["v"]
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"attn.sdpa of {q.dtype}/{k.dtype}/{v.dtype}: the template takes f32/bf16/f16 alike"
    if node.attrs["value_dim"] and not node.attrs["indexed"]:
        return "dense attn.sdpa with value_dim: only the indexed template reads values from k"
    dims = (q.shape[3], node.attrs["value_dim"] or v.shape[3])
    if not all(isinstance(d, int) for d in dims):
        return f"attn.sdpa with a symbolic head dim {dims}: tiles need it static"
    indexed = node.attrs["indexed"]
    limits = (INDEXED_HEAD_DIM, INDEXED_VALUE_DIM) if indexed else (MAX_HEAD_DIM, MAX_HEAD_DIM)
    if dims[0] > limits[0] or dims[1] > limits[1]:
        return (f"attn.sdpa head dims {dims}: the template takes up to {limits[0]} (keys), "
                f"{limits[1]} (values)")
    if r["mask"] is not None and r["mask"].dtype not in (*_FLOATS, ir.DType.bool):
        return f"attn.sdpa mask of {r['mask'].dtype}: bool or float only"
    heads = (q.shape[1], k.shape[2 if node.attrs.get("kv_layout") == "bshd" else 1])
    if node.attrs["indexed"] and not all(isinstance(h, int) for h in heads):
        return f"indexed attn.sdpa with symbolic heads {heads}: the grid groups them statically"
    return True


@TRITON_EMITTERS.register("attn.sdpa", check=_sdpa_check)
def emit_sdpa(node: ir.Node, target: Target | None) -> SdpaLaunch | IndexedSdpaLaunch:
    q = node.operands[0]
    tgt = target or get_target("cpu")
    if node.attrs["indexed"]:
        return IndexedSdpaLaunch(indexed_source(node), node.op, q.dtype, tgt, node.operands)
    return SdpaLaunch(_source(node), dict(node.attrs), q.dtype, tgt, node.operands)
