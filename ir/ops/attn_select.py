"""`attn.block_select`: block-level top-n selection of sparse attention (NSA, Yuan et al. 2025,
"Native Sparse Attention"): importance of each selection block from the attention over
compressed blocks, shared by the query heads of one KV group, plus forced blocks.

Layout (`attn.sdpa`'s): q [B,Hq,T,D] (rotated queries), k [B,Hkv,N,D] (compressed keys, one per
compressed block) -> picks [B,Hkv,T,n] i64, Hq % Hkv == 0, query head h in group h // (Hq/Hkv).

Positions: query t sits at p_t = t (prefill) or pos + t (`decode`, operand pos 0-d int, last).
Compressed block i pools tokens i·d .. i·d+l−1 (l = cmp_block, d = cmp_stride) and is
visible iff i·d + l − 1 <= p_t; selection block j holds tokens j·l' .. j·l'+l'−1
(l' = slc_block) and is visible iff j·l' <= p_t. In fp32:

    p[t,h,i]      = softmax_i(scale · q_h·k_i) over visible i (0 everywhere if none is)
    imp[t,g,j]    = Σ_{h in g} Σ_{i overlaps j} p[t,h,i]        (i overlaps j: a shared token)
    forced[t,j]   = j < initial, or own − local < j <= own       (own = p_t // l')
    picks[g,t]    = the n visible blocks of largest imp + forced·(Hq/Hkv + 1), descending;
                    −1 past the visible count (n may exceed `blocks`)

Every imp is at most Hq/Hkv (the group's probabilities sum to at most that), so forced blocks
come first, by importance, then the others by importance. `blocks` (S') is the number of
selection blocks the keys span (static).
"""

from __future__ import annotations

from dataclasses import dataclass

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import INT_INDEX, io_cost, numel, require
from ir.ops.attn import topk_or_pad
from ir.symbolic import same_dim
from ir.types import DType, TensorType

__all__ = ["BlockSelect", "block_overlap", "forced_blocks"]


def block_overlap(n_cmp: int, n_slc: int, l: int, d: int, ls: int, device=None):
    """[n_cmp, n_slc] fp32: 1 where compressed block i shares a token with selection block j."""
    start = torch.arange(n_cmp, device=device).unsqueeze(1) * d
    sel = torch.arange(n_slc, device=device).unsqueeze(0) * ls
    return ((start < sel + ls) & (start + l > sel)).float()


def forced_blocks(positions, n_slc: int, ls: int, initial: int, local: int):
    """[T, n_slc] bool: the blocks every query at `positions` [T] keeps (before visibility)."""
    j = torch.arange(n_slc, device=positions.device).unsqueeze(0)
    own = (positions // ls).unsqueeze(1)
    return (j < initial) | ((j <= own) & (j > own - local))


@register
@dataclass(frozen=True)
class BlockSelect(Op):
    """NSA block selection (module docstring): q [B,Hq,T,D], k [B,Hkv,N,D] (, pos 0-d int when
    decode) -> picks [B,Hkv,T,topn] i64, -1 pads."""

    mnemonic = "attn.block_select"
    kind = Kind.OPAQUE
    num_operands = None
    scale: float = 1.0
    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    blocks: int = 1
    topn: int = 16
    initial: int = 1
    local: int = 2
    decode: bool = False

    def infer_type(self, *types: TensorType):
        want = 3 if self.decode else 2
        require(self, len(types) == want, f"takes {want} operands (q, k{', pos' * self.decode})"
                f", got {len(types)}", *types)  # fmt: skip
        l, d, ls = self.cmp_block, self.cmp_stride, self.slc_block
        require(self, 0 < d <= l and ls >= 1, f"need 0 < cmp_stride ({d}) <= cmp_block ({l}) "
                f"and slc_block ({ls}) >= 1", *types)  # fmt: skip
        require(self, self.blocks >= 1 and self.topn >= 1, "blocks and topn must be >= 1", *types)
        require(self, self.initial >= 0 and self.local >= 0, "initial, local must be >= 0", *types)
        q, k = types[:2]
        require(self, q.rank == 4 and k.rank == 4, "q, k must be [B,Hq,T,D], [B,Hkv,N,D]", *types)
        require(self, q.dtype.is_float and k.dtype.is_float, "q, k must be float", *types)
        require(self, same_dim(q.shape[0], k.shape[0]), "batch of q and k differs", *types)
        require(self, same_dim(q.shape[3], k.shape[3]), "head dim of q and k differs", *types)
        hq, hkv = q.shape[1], k.shape[1]
        ok = isinstance(hq, int) and isinstance(hkv, int) and hkv >= 1 and hq % hkv == 0
        require(self, ok, f"query heads {hq} must be a static multiple of KV heads {hkv}", *types)
        if self.decode:
            pos = types[2]
            ok = pos.rank == 0 and pos.dtype in INT_INDEX
            require(self, ok, "pos must be a 0-d i64/i32", *types)
        return (TensorType((q.shape[0], hkv, q.shape[2], self.topn), DType.i64),)

    def reference(self, q, k, *pos):
        b, hq, t, _ = q.shape
        hkv, n = k.shape[1], k.shape[2]
        group = hq // hkv
        l, d, ls = self.cmp_block, self.cmp_stride, self.slc_block
        p = torch.arange(t, device=q.device) + (pos[0].long() if pos else 0)
        z = q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2) * self.scale
        seen = (torch.arange(n, device=q.device) * d + l - 1).unsqueeze(0) <= p.unsqueeze(1)
        probs = torch.softmax(z.masked_fill(~seen, float("-inf")), dim=-1)
        probs = torch.where(seen, probs, 0.0)  # a row that sees nothing: 0, not NaN
        by_group = probs.unflatten(1, (hkv, group)).sum(2)  # [B,Hkv,T,N]
        importance = by_group @ block_overlap(n, self.blocks, l, d, ls, q.device)
        forced = forced_blocks(p, self.blocks, ls, self.initial, self.local)
        rank = importance + forced.float() * (group + 1)
        visible = (torch.arange(self.blocks, device=q.device) * ls).unsqueeze(0) <= p.unsqueeze(1)
        return (topk_or_pad(rank, visible, self.topn),)

    def cost(self, operand_types, result_types):
        q, k = operand_types[0], operand_types[1]
        pairs = numel(q.shape[:3]) * k.shape[2]
        flops = pairs * (2 * q.shape[3] + 5) + numel(result_types[0].shape[:3]) * k.shape[2] * 2
        return io_cost(flops, operand_types, result_types)
