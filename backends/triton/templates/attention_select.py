"""Triton template of `attn.block_select` (ir/ops/attn_select.py: NSA's block selection), and its
host side (check, tiles, launch, AOT variants).

One program per (sequence, KV group, query row). It streams the compressed keys BLOCK_N at a
time, twice, scoring them as dots of the group's heads (padded to 16 rows) BLOCK_D channels at
a time: the first pass keeps each head's running max and sum of exp (online softmax), the
second turns the scores into probabilities, sums them over the heads and adds them to the
importance of every selection block they overlap (an index test on the block bounds, no
overlap matrix). Blocks past the query's last complete compressed block are never loaded. The
importances of all S' selection blocks (S_PAD >= S', a power of two) stay in registers; forced
blocks get the bonus Hq/Hkv + 1, invisible ones drop out, and one sort of int64 keys (the
score's order-preserving bits high, the complement of the block index low, as the indexer's
selection) gives the top-n, -1 past the visible blocks.

AOT (bf16, v4-flash-nsa: 64 heads in 4 groups, head dim 192, top-16): a 4K context (64
blocks) compiles without spills on sm_80/90/100/120 (56-64 registers) and gfx942/950; at 64K
(1024 blocks) NVIDIA still does not spill (80-112), gfx942/950 spill 26-30 registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ir
from backends.targets import Target, get_target
from backends.triton.emitters import TRITON_EMITTERS, AotVariant, OneKernel
from backends.triton.kernel import KernelSource, Param, load_jit, next_pow2
from ir.symbolic import subs_dim

__all__ = ["BlockSelectLaunch", "select_config"]

_FLOATS = (ir.DType.f32, ir.DType.bf16, ir.DType.f16)
MAX_BLOCKS = 4096  # S_PAD importances and their sort keys stay in one program's registers
THREADS = 256  # per program on GPUs (the sort of S_PAD int64 keys)

SELECT_SOURCE = '''\
# Hand-written template from dsv4c backends/triton/templates/attention_select.py.
# kernel:   block_select (one program per sequence, KV group and query row)
# computes: picks = top-n over visible selection blocks of sum_{h in group} sum_{i overlaps j}
#           softmax_i(scale q_h.k_i) + forced bonus, -1 pads
import triton
import triton.language as tl

EMPTY = tl.constexpr(-9223372036854775808)  # the key of "no entry": below every real key
LOW_BITS = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _order_key(score, index):
    """int64 keys whose signed order is (score, -index)."""
    bits = score.to(tl.int32, bitcast=True)
    monotone = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (monotone.to(tl.int64) << 32) | (LOW_BITS - index.to(tl.int64))


@triton.jit
def _scores(q_ptr, k_ptr, q_rows, bg, i, n_seen, N, D, SCALE: tl.constexpr,
            GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, DOT_IN_F32: tl.constexpr):
    """[BLOCK_G, BLOCK_N] scale * q_h . k_i of the group's heads against keys i, channels
    BLOCK_D at a time; -inf at keys past n_seen."""
    heads = tl.arange(0, BLOCK_G)
    chans = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        q_mask = (heads < GROUP)[:, None] & ((c0 + chans) < D)[None, :]
        q = tl.load(q_ptr + q_rows[:, None] * D + c0 + chans[None, :], mask=q_mask, other=0.0)
        k_mask = ((c0 + chans) < D)[:, None] & (i < n_seen)[None, :]
        k_ptrs = k_ptr + (bg * N + i[None, :]) * D + c0 + chans[:, None]
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        if DOT_IN_F32:  # fp32 operands (and the interpreter): IEEE products
            acc = tl.dot(q.to(tl.float32), k.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(q, k, acc)
    return tl.where((i < n_seen)[None, :], acc * SCALE, float("-inf"))


@triton.jit
def block_select(
    q_ptr, k_ptr, pos_ptr, picks_ptr,
    T, N, D,
    SCALE: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    SLC_BLOCK: tl.constexpr, BLOCKS: tl.constexpr, TOPN: tl.constexpr, INITIAL: tl.constexpr,
    LOCAL: tl.constexpr, GROUP: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, S_PAD: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):
    # program: (b, g) pair (b * G + g), query row t
    tl.static_assert(BLOCK_G >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot tiles")
    bg = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    if DECODE:
        p = tl.load(pos_ptr).to(tl.int64) + t
    else:
        p = t
    heads = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_N)
    q_rows = (bg * GROUP + heads) * T + t  # q[b, g*GROUP + j, t, :]
    # compressed blocks i with i*d + l - 1 <= p: the first n_seen
    n_seen = tl.minimum(tl.maximum((p - (CMP_BLOCK - 1)) // CMP_STRIDE + 1, 0), N)
    n_seen = tl.where(p >= CMP_BLOCK - 1, n_seen, 0)
    # pass 1: running max m_i and sum of exp l_i per head
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    for i0 in range(0, n_seen, BLOCK_N):
        scores = _scores(q_ptr, k_ptr, q_rows, bg, i0 + cols, n_seen, N, D, SCALE, GROUP,
                         BLOCK_G, BLOCK_N, BLOCK_D, DOT_IN_F32)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(scores - m_new[:, None]), axis=1)
        m_i = m_new
    # pass 2: probabilities, summed over the group's heads, into the overlapping blocks
    blocks = tl.arange(0, S_PAD)
    importance = tl.zeros((S_PAD,), tl.float32)
    for i0 in range(0, n_seen, BLOCK_N):
        i = i0 + cols
        scores = _scores(q_ptr, k_ptr, q_rows, bg, i, n_seen, N, D, SCALE, GROUP,
                         BLOCK_G, BLOCK_N, BLOCK_D, DOT_IN_F32)
        probs = tl.exp(scores - m_i[:, None]) / l_i[:, None]
        keep = (heads < GROUP)[:, None] & (i < n_seen)[None, :]
        p_group = tl.sum(tl.where(keep, probs, 0.0), axis=0)  # [BLOCK_N]
        start = i * CMP_STRIDE
        sel = blocks * SLC_BLOCK
        meets = (start[:, None] < sel[None, :] + SLC_BLOCK) & (
            start[:, None] + CMP_BLOCK > sel[None, :]
        )
        importance += tl.sum(tl.where(meets, p_group[:, None], 0.0), axis=0)
    # forced blocks first, then by importance; invisible and padding blocks are no entry
    own = p // SLC_BLOCK
    forced = (blocks < INITIAL) | ((blocks <= own) & (blocks > own - LOCAL))
    rank = importance + tl.where(forced, GROUP + 1.0, 0.0)
    visible = (blocks < BLOCKS) & (blocks * SLC_BLOCK <= p)
    best = tl.sort(tl.where(visible, _order_key(rank, blocks), EMPTY), descending=True)
    picks = tl.where(best == EMPTY, -1, LOW_BITS - (best & LOW_BITS))
    tl.store(picks_ptr + (bg * T + t) * TOPN + blocks, picks, mask=blocks < TOPN)
'''


def select_config(
    target: Target, group: int, head_dim: int, blocks: int, dtype: ir.DType
) -> dict[str, int]:
    """BLOCK_G heads (the group, padded to a dot's 16 rows), BLOCK_N compressed keys a step,
    BLOCK_D channels a step, S_PAD >= S' selection blocks (and >= topn: the stored slots).
    fp32 on GPUs (IEEE dots, operands in registers): 32 channels a step."""
    cfg = {"BLOCK_G": max(16, next_pow2(group)), "BLOCK_N": 16,
           "BLOCK_D": min(64, max(16, next_pow2(head_dim))),
           "S_PAD": max(16, next_pow2(blocks))}  # fmt: skip
    if not target.is_gpu:
        return cfg
    if dtype == ir.DType.f32:
        cfg["BLOCK_D"] = min(cfg["BLOCK_D"], 32)
    return {**cfg, "num_warps": THREADS // target.warp_size}


def _source(q: ir.DType, k: ir.DType, pos: ir.DType) -> KernelSource:
    params = [
        Param("q_ptr", "ptr", q),
        Param("k_ptr", "ptr", k),
        Param("pos_ptr", "ptr", pos),
        Param("picks_ptr", "ptr", ir.DType.i64),
        *(Param(n, "int") for n in ("T", "N", "D")),
        *(Param(n, "constexpr") for n in ("SCALE", "CMP_BLOCK", "CMP_STRIDE", "SLC_BLOCK",
                                          "BLOCKS", "TOPN", "INITIAL", "LOCAL", "GROUP", "DECODE",
                                          "BLOCK_G", "BLOCK_N", "BLOCK_D", "S_PAD",
                                          "DOT_IN_F32")),
    ]  # fmt: skip
    return KernelSource("block_select", SELECT_SOURCE, tuple(params), ("attn.block_select",))


@dataclass
class BlockSelectLaunch(OneKernel):
    source: KernelSource
    attrs: dict[str, Any]
    dtype: ir.DType  # of q and k (the dot operands)
    target: Target
    operands: tuple[ir.Value, ...]

    def _constexprs(self, group: int, head_dim: int, target: Target) -> tuple[dict, dict]:
        blocks = max(self.attrs["blocks"], self.attrs["topn"])
        cfg = select_config(target, group, head_dim, blocks, self.dtype)
        opts = {k: v for k, v in cfg.items() if k.startswith("num_")}
        names = ("scale", "cmp_block", "cmp_stride", "slc_block", "blocks", "topn", "initial",
                 "local", "decode")  # fmt: skip
        consts = {n.upper(): self.attrs[n] for n in names}
        consts["SCALE"] = float(consts["SCALE"])
        consts.update(GROUP=group, **{k: v for k, v in cfg.items() if k not in opts})
        # fp32 operands use IEEE products; the CPU interpreter upcasts bf16/f16 tiles too
        consts["DOT_IN_F32"] = self.dtype == ir.DType.f32 or not target.is_gpu
        return consts, opts

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        device = next((t.device for t in inputs if t.device.type != "cpu"), inputs[0].device)
        q, k, *pos = (t.to(device).contiguous() for t in inputs)
        batch, heads, tokens, head_dim = q.shape
        kv_heads, n_cmp = k.shape[1], k.shape[2]
        picks = torch.empty(batch, kv_heads, tokens, self.attrs["topn"], dtype=torch.int64,
                            device=device)  # fmt: skip
        if picks.numel() == 0:
            return (picks,)
        consts, opts = self._constexprs(heads // kv_heads, head_dim, self.target)
        kernel = load_jit(self.source)
        kernel[(batch * kv_heads, tokens)](
            q_ptr=q, k_ptr=k, pos_ptr=pos[0] if pos else picks, picks_ptr=picks,
            T=tokens, N=n_cmp, D=head_dim, **consts, **opts,
        )  # fmt: skip
        return (picks,)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        _, heads, _, head_dim = (int(subs_dim(d, env)) for d in self.operands[0].shape)
        kv_heads = int(subs_dim(self.operands[1].shape[1], env))
        consts, opts = self._constexprs(heads // kv_heads, head_dim, target)
        hints = {"D": 16} if head_dim % 16 == 0 else {}
        return [AotVariant(consts, opts, hints)]


def _check(node: ir.Node) -> bool | str:
    q, k = node.operands[0], node.operands[1]
    if q.dtype not in _FLOATS or k.dtype != q.dtype:
        return (f"attn.block_select of q {q.dtype} and k {k.dtype}: the template takes f32, "
                "bf16 or f16, the same for both")  # fmt: skip
    if max(node.attrs["blocks"], node.attrs["topn"]) > MAX_BLOCKS:
        return f"more than {MAX_BLOCKS} selection blocks: the template keeps them in registers"
    if not all(isinstance(d, int) for d in (q.shape[1], k.shape[1], q.shape[3])):
        return "attn.block_select with symbolic heads or head dim"
    return True


@TRITON_EMITTERS.register("attn.block_select", check=_check)
def emit_block_select(node: ir.Node, target: Target | None) -> BlockSelectLaunch:
    q, k = node.operands[:2]
    pos = node.operands[2].dtype if node.attrs["decode"] else ir.DType.i64
    tgt = target or get_target("cpu")
    source = _source(q.dtype, k.dtype, pos)
    return BlockSelectLaunch(source, dict(node.attrs), q.dtype, tgt, node.operands)
