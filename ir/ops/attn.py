"""Attention kernels of DeepSeek-V4 (v4-architecture.md §3.3-3.5, §5 K6, K8-K11) as named ops.

- `attn.compress`: the token-level compressor (wkv‖wgate GEMM, +APE, per-channel softmax pooling
  over m or 2m rows, RMSNorm, RoPE at the block start) -> one KV entry per complete block.
- `attn.compress_step`: the compressor's decode step — project one token into the state rows,
  pool the open block and, when the token completes the block, write the entry to the cache.
- `attn.indexer_topk`: lightning-indexer scores Σ_h w_h·relu(q_h·k_s), causal block mask, top-k
  -> entry indices with -1 pads.
- `attn.sparse_mqa`: shared-KV MQA over the sliding window ∪ compressed entries with the sink, the
  query's per-head RMS norm and RoPE folded in front and the inverse RoPE behind. Window-only,
  HCA (every visible compressed entry) and CSA (indexer-selected entries) are its three variants.

Prefill (default): query t sits at position t, raw KV row t belongs to position t, compressed
entry s pools the block of tokens [s·m, (s+1)·m) and is visible to query t iff s < (t+1) // m.
Decode (`decode=true`, indexer and attention): one more operand, the 0-d position `pos` of the
first query, last; query t sits at position pos + t, and the attention's raw KV is the ring of the
last `window` positions (slot p % window holds position p), read by a single query.

RoPE is the interleaved (GPT-J) rotation of the last 2·cos.shape[-1] channels; cos/sin tables
are operands, so the rotary base and YaRN schedule stay outside the ops. Computation is fp32
with rounding to the activation dtype where the reference model rounds (docstrings say where).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import INT_INDEX, io_cost, numel, require
from ir.symbolic import same_dim
from ir.types import DType, TensorType

__all__ = ["Compress", "CompressStep", "IndexerTopK", "SparseMQA", "rope_reference"]

VARIANTS = ("window", "hca", "csa")


def rope_reference(x, cos, sin, inverse: bool = False):
    """Rotate interleaved pairs of the last 2·cos.shape[-1] channels of x (fp32 math, x's dtype
    out); cos/sin broadcast against x[..., :half]. `inverse` rotates by the negative angle."""
    rope = 2 * cos.shape[-1]
    keep, rot = x[..., : x.shape[-1] - rope], x[..., x.shape[-1] - rope :]
    pairs = rot.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((keep, rotated.to(x.dtype)), dim=-1)


def _rms(x, eps: float, weight=None):
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _check_rope(op: Op, cos: TensorType, sin: TensorType, rows, width, *types: TensorType):
    require(op, cos.rank == 2 and cos.shape == sin.shape, "cos/sin must be equal 2-D", *types)
    require(op, cos.dtype.is_float and sin.dtype.is_float, "cos/sin must be float", *types)
    require(
        op,
        same_dim(cos.shape[0], rows),
        f"cos/sin need one row per position ({rows}), got {cos.shape[0]}",
        *types,
    )
    if isinstance(cos.shape[1], int) and isinstance(width, int):
        require(
            op,
            2 * cos.shape[1] <= width,
            f"rope width 2*{cos.shape[1]} exceeds the head dim {width}",
            *types,
        )


def _check_pos(op: Op, pos: TensorType, *types: TensorType) -> None:
    require(op, pos.rank == 0 and pos.dtype in INT_INDEX, "pos must be a 0-d i64/i32", *types)


# --- attn.compress --------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class Compress(Op):
    """Token-level KV compressor: x [B,T,d], wkv [W,d], wgate [W,d], ape [m,W], norm [c],
    cos/sin [T//m, r/2] -> entries [B, T//m, c] in x's dtype, W = 2c if `overlap` else c.

    In fp32: kv = x·wkvᵀ, z = x·wgateᵀ + ape[t % m]; only the T//m complete blocks are used.
    Without overlap entry i pools rows of block i: Σ_j softmax_j(z_ij) ⊙ kv_ij (softmax over the
    m rows, per channel). With overlap (m = 4 in V4) it pools 2m rows: channels [0, c) of block
    i-1 (zero kv, -inf score for block -1) followed by channels [c, 2c) of block i. Then
    RMSNorm(entry; norm, eps) in x's dtype and RoPE at position i·m (cos/sin row i).
    """

    mnemonic = "attn.compress"
    kind = Kind.OPAQUE
    num_operands = 7
    ratio: int = 4
    overlap: bool = True
    eps: float = 1e-6

    def infer_type(self, x, wkv, wgate, ape, norm, cos, sin):
        types = (x, wkv, wgate, ape, norm, cos, sin)
        require(self, self.ratio >= 1, f"ratio must be >= 1, got {self.ratio}", *types)
        require(self, x.rank == 3, "x must be [B,T,d]", *types)
        require(self, x.dtype.is_float, "x must be float", *types)
        require(self, wkv.rank == 2 and wkv.shape == wgate.shape, "wkv/wgate must be [W,d]", *types)
        require(self, same_dim(wkv.shape[1], x.shape[2]), "wkv's d differs from x's", *types)
        require(self, norm.rank == 1, "norm must be [c]", *types)
        c, width = norm.shape[0], wkv.shape[0]
        want = 2 * c if self.overlap else c
        require(self, same_dim(width, want), f"W must be {want} (overlap={self.overlap})", *types)
        require(
            self,
            ape.rank == 2 and ape.shape[0] == self.ratio and same_dim(ape.shape[1], width),
            f"ape must be [{self.ratio}, {width}]",
            *types,
        )
        blocks = x.shape[1] // self.ratio
        _check_rope(self, cos, sin, blocks, c, *types)
        return (TensorType((x.shape[0], blocks, c), x.dtype),)

    def reference(self, x, wkv, wgate, ape, norm, cos, sin):
        t = x.shape[1]
        m, nb = self.ratio, t // self.ratio
        xf = x[:, : nb * m].float()
        kv = (xf @ wkv.float().T).unflatten(1, (nb, m))
        score = (xf @ wgate.float().T).unflatten(1, (nb, m)) + ape.float()
        if self.overlap:
            c = norm.shape[0]
            prev_kv = torch.cat((torch.zeros_like(kv[:, :1]), kv[:, :-1]), dim=1)
            prev_score = torch.cat((torch.full_like(score[:, :1], -torch.inf), score[:, :-1]), 1)
            kv = torch.cat((prev_kv[..., :c], kv[..., c:]), dim=2)
            score = torch.cat((prev_score[..., :c], score[..., c:]), dim=2)
        pooled = (kv * score.softmax(dim=2)).sum(2)
        entry = _rms(pooled.to(x.dtype), self.eps, norm)
        return (rope_reference(entry, cos, sin),)

    def cost(self, operand_types, result_types):
        x, wkv = operand_types[0], operand_types[1]
        gemm = 2 * 2 * numel(x.shape[:2]) * wkv.shape[0] * x.shape[2]
        pool = 4 * numel(x.shape[:2]) * wkv.shape[0]
        return io_cost(gemm + pool, operand_types, result_types)


@register
@dataclass(frozen=True)
class CompressStep(Op):
    """Compressor decode step: x [B,1,d], pos (0-d int), kv_state [B,R,W], score_state [B,R,W],
    wkv [W,d], wgate [W,d], ape [m,W], norm [c], cos/sin [1,r/2] (at the block start
    pos//m·m), cache [B,L,c] -> (cache', kv_state', score_state'); R = 2m and W = 2c with
    `overlap`, else R = m and W = c.

    The token's rows kv = x·wkvᵀ, z = x·wgateᵀ + ape[pos % m] (fp32) go to state slot
    pos % m (+ m with overlap). The open block is pooled like `attn.compress` (softmax over its m
    rows, per channel; with overlap channels [0, c) come from state rows [0, m), the previous
    block, and [c, 2c) from rows [m, 2m)), normed, rotated and, when (pos+1) % m == 0, written to
    cache row min(pos // m, L-1). With overlap a completed block then moves to rows [0, m).
    """

    mnemonic = "attn.compress_step"
    kind = Kind.OPAQUE
    num_operands = 11
    ratio: int = 4
    overlap: bool = True
    eps: float = 1e-6

    def infer_type(self, x, pos, kv_state, score_state, wkv, wgate, ape, norm, cos, sin, cache):
        types = (x, pos, kv_state, score_state, wkv, wgate, ape, norm, cos, sin, cache)
        m = self.ratio
        require(self, m >= 1, f"ratio must be >= 1, got {m}", *types)
        require(self, x.rank == 3 and x.shape[1] == 1, "x must be [B,1,d]", *types)
        _check_pos(self, pos, *types)
        require(self, norm.rank == 1 and wkv.rank == 2, "norm must be [c], wkv [W,d]", *types)
        c, width = norm.shape[0], wkv.shape[0]
        rows = 2 * m if self.overlap else m
        require(self, same_dim(width, 2 * c if self.overlap else c), "W does not fit c", *types)
        require(self, wgate.shape == wkv.shape, "wgate must be [W,d] like wkv", *types)
        require(self, same_dim(wkv.shape[1], x.shape[2]), "wkv's d differs from x's", *types)
        require(self, ape.shape == (m, width), f"ape must be [{m}, W]", *types)
        want = (x.shape[0], rows, width)
        for st in (kv_state, score_state):
            require(self, st.shape == want, f"states must be [B,{rows},W]", *types)
            require(self, st.dtype.is_float, "states must be float", *types)
        require(self, cache.rank == 3 and same_dim(cache.shape[2], c), "cache: [B,L,c]", *types)
        require(self, same_dim(cache.shape[0], x.shape[0]), "batch of cache differs", *types)
        _check_rope(self, cos, sin, 1, c, *types)
        return (cache, kv_state, score_state)

    def reference(self, x, pos, kv_state, score_state, wkv, wgate, ape, norm, cos, sin, cache):
        m, c = self.ratio, norm.shape[0]
        xf = x.float()
        kv = xf @ wkv.float().T
        score = xf @ wgate.float().T + ape.float()[pos % m]
        slot = (pos % m + (m if self.overlap else 0)).view(1)
        kv_state = kv_state.index_copy(1, slot, kv.to(kv_state.dtype))
        score_state = score_state.index_copy(1, slot, score.to(score_state.dtype))
        win_kv, win_score = kv_state[:, -m:], score_state[:, -m:]
        if self.overlap:
            win_kv = torch.cat((kv_state[:, :m, :c], win_kv[..., c:]), dim=1)
            win_score = torch.cat((score_state[:, :m, :c], win_score[..., c:]), dim=1)
        pooled = (win_kv * win_score.softmax(dim=1)).sum(1, keepdim=True)
        entry = rope_reference(_rms(pooled.to(x.dtype), self.eps, norm), cos, sin)
        emit = (pos + 1) % m == 0
        row = (pos // m).clamp(max=cache.shape[1] - 1).view(1)
        cache = torch.where(emit, cache.index_copy(1, row, entry.to(cache.dtype)), cache)
        if self.overlap:
            kv_state = torch.where(emit, kv_state[:, -m:].repeat(1, 2, 1), kv_state)
            score_state = torch.where(emit, score_state[:, -m:].repeat(1, 2, 1), score_state)
        return (cache, kv_state, score_state)

    def cost(self, operand_types, result_types):
        """Bytes the step must touch: every operand but the cache (token, weights, tables), both
        states read and written, and the one cache row it may write — not the whole cache, which
        the in-place step (cache aliased to its result) never reads or copies."""
        x, wkv, cache = operand_types[0], operand_types[4], operand_types[10]
        flops = 4 * x.shape[0] * wkv.shape[0] * x.shape[2] + 8 * x.shape[0] * wkv.shape[0]
        row = TensorType((cache.shape[0], 1, cache.shape[2]), cache.dtype)
        return io_cost(flops, (*operand_types[:10], row), (row, *result_types[1:]))


# --- attn.indexer_topk ----------------------------------------------------------------------


@register
@dataclass(frozen=True)
class IndexerTopK(Op):
    """Lightning indexer + top-k: q [B,T,H,c] (rotated), keys [B,S,c], w [B,T,H] (+ pos, 0-d
    int, with `decode`) -> idx [B,T,k] i64.

    score[t,s] = Σ_h (w[t,h]·scale)·relu(q[t,h]·keys[s]) in fp32, masked to -inf unless
    s < (p_t+1) // ratio with p_t = t (prefill) or pos + t (decode). idx[t] = the k best visible
    s by descending score; slots past the visible count are -1 (so k may exceed S).
    """

    mnemonic = "attn.indexer_topk"
    kind = Kind.OPAQUE
    num_operands = None
    k: int = 512
    ratio: int = 4
    scale: float = 1.0
    decode: bool = False

    def infer_type(self, *types: TensorType):
        want = 4 if self.decode else 3
        require(self, len(types) == want, f"expected {want} operands, got {len(types)}", *types)
        if self.decode:
            _check_pos(self, types[3], *types)
        q, keys, w = types[:3]
        require(self, self.k >= 1 and self.ratio >= 1, "k and ratio must be >= 1", *types)
        require(
            self, q.rank == 4 and keys.rank == 3 and w.rank == 3, "ranks must be 4, 3, 3", *types
        )
        require(self, q.dtype.is_float and keys.dtype.is_float, "q/keys must be float", *types)
        require(self, w.dtype.is_float, "w must be float", *types)
        require(self, same_dim(q.shape[0], keys.shape[0]), "batch of q and keys differs", *types)
        require(self, same_dim(q.shape[3], keys.shape[2]), "head dim of q and keys differs", *types)
        require(self, w.shape == q.shape[:3], "w must be [B,T,H] like q", *types)
        return (TensorType((q.shape[0], q.shape[1], self.k), DType.i64),)

    def reference(self, q, keys, w, *pos):
        t, s = q.shape[1], keys.shape[1]
        logits = torch.einsum("bthc,bsc->bths", q.float(), keys.float()).relu()
        weights = (w.float() * self.scale).unsqueeze(-1)
        score = (logits * weights).sum(2)
        pos = torch.arange(t, device=q.device) + (pos[0] if pos else 0)
        visible = torch.arange(s, device=q.device) < ((pos + 1) // self.ratio).unsqueeze(1)
        return (topk_or_pad(score, visible, self.k),)

    def cost(self, operand_types, result_types):
        q, keys = operand_types[0], operand_types[1]
        flops = 3 * numel(q.shape) * keys.shape[1]
        return io_cost(flops, operand_types, result_types)


def topk_or_pad(score, visible, k: int):
    """Indices of the k best visible columns per row, -1 where fewer than k are visible."""
    n = score.shape[-1]
    masked = score.float().masked_fill(~visible, float("-inf"))
    padded = torch.nn.functional.pad(masked, (0, k), value=float("-inf"))
    values, picks = padded.topk(k, dim=-1)
    return torch.where(torch.isinf(values) | (picks >= n), -1, picks)


# --- attn.sparse_mqa ------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class SparseMQA(Op):
    """Shared-KV sparse MQA with sink (prefill from position 0, or one decode step).

    Operands by `variant`:
        window  q [B,T,H,c], kv [B,T,c], sink [H], cos [T,r/2], sin [T,r/2]
        hca     ... + comp [B,S,c]                 (every visible compressed entry)
        csa     ... + comp [B,S,c], picks [B,T,k]  (selected entries of comp, -1 = none)
    and with `decode` the position pos (0-d int) last; then T = 1 and kv [B,window,c] is the
    ring: slot j is an entry iff j <= pos. -> o [B,T,H,c] in q's dtype.

    Query: q' = rope(q · rsqrt(mean(q²) + q_norm_eps)) (per head; no norm when q_norm_eps is
    None). Entries of query t: raw rows max(0, t-window+1)..t of kv, plus comp rows s with
    s < (t+1) // ratio (hca) or s in picks[t] (csa; taken as given, the indexer guarantees
    visibility). With z_j = scale·q'·e_j over those entries e_j (each is key and value):
    o = Σ_j exp(z_j)·e_j / (Σ_j exp(z_j) + exp(sink_h)), then rotated back by -angle
    (inverse RoPE) on the rope channels. Decode: the raw entries are the ring slots j <= pos
    and comp rows s < (pos+1) // ratio (hca). Products q'·e and p·e are computed in q's dtype,
    the softmax in fp32; p is rounded to q's dtype before p·e.
    """

    mnemonic = "attn.sparse_mqa"
    kind = Kind.OPAQUE
    num_operands = None
    variant: str = "window"
    window: int = 128
    ratio: int = 0
    scale: float = 1.0
    q_norm_eps: float | None = None
    decode: bool = False

    def _arity(self) -> int:
        return {"window": 5, "hca": 6, "csa": 7}[self.variant] + int(self.decode)

    def infer_type(self, *types: TensorType):
        require(self, self.variant in VARIANTS, f"variant must be one of {VARIANTS}", *types)
        require(
            self,
            len(types) == self._arity(),
            f"variant {self.variant!r} takes {self._arity()} operands, got {len(types)}",
            *types,
        )
        require(self, self.window >= 1, f"window must be >= 1, got {self.window}", *types)
        want_ratio = self.ratio == 0 if self.variant == "window" else self.ratio >= 1
        require(
            self, want_ratio, f"ratio={self.ratio} does not fit variant {self.variant!r}", *types
        )
        q, kv, sink, cos, sin = types[:5]
        require(self, q.rank == 4 and kv.rank == 3, "q must be [B,T,H,c], kv [B,T,c]", *types)
        require(self, q.dtype.is_float and kv.dtype == q.dtype, "q/kv dtypes must match", *types)
        require(self, same_dim(q.shape[0], kv.shape[0]), "batch of q and kv differs", *types)
        if self.decode:
            _check_pos(self, types[-1], *types)
            require(self, q.shape[1] == 1, "decode takes one query per sequence", *types)
            ring = same_dim(kv.shape[1], self.window)
            require(self, ring, f"decode kv must be the ring [B,{self.window},c]", *types)
        else:
            ok = same_dim(q.shape[1], kv.shape[1])
            require(self, ok, "q and kv need one row per token", *types)
        require(self, same_dim(q.shape[3], kv.shape[2]), "head dim of q and kv differs", *types)
        require(self, sink.rank == 1 and same_dim(sink.shape[0], q.shape[2]), "sink: [H]", *types)
        _check_rope(self, cos, sin, q.shape[1], q.shape[3], *types)
        if self.variant != "window":
            comp = types[5]
            require(self, comp.rank == 3 and comp.dtype == q.dtype, "comp: [B,S,c]", *types)
            require(self, same_dim(comp.shape[0], q.shape[0]), "batch of comp differs", *types)
            require(self, same_dim(comp.shape[2], q.shape[3]), "head dim of comp differs", *types)
        if self.variant == "csa":
            picks = types[6]
            require(self, picks.dtype in INT_INDEX, "picks must be i64 or i32", *types)
            require(
                self,
                picks.rank == 3 and picks.shape[:2] == q.shape[:2],
                "picks must be [B,T,k]",
                *types,
            )
        return (q,)

    def entry_indices(self, t: int, kv_rows: int, rest, b: int, device):
        """[B,T,n] rows of cat(kv, comp) per query (-1 = none): the window, then compressed."""
        slots = torch.arange(self.window, device=device)
        if self.decode:
            pos = rest[-1].view(1)
            idx = torch.where(slots <= pos, slots, -1).expand(b, t, self.window)
            rest = rest[:-1]
        else:
            pos = torch.arange(t, device=device)
            win = pos.unsqueeze(1) - self.window + 1 + slots
            idx = win.masked_fill(win < 0, -1).expand(b, t, self.window)
        if self.variant == "window":
            return idx
        s = rest[0].shape[1]
        if self.variant == "csa":
            picks = rest[1].long()
        else:
            cols = torch.arange(s, device=device)
            visible = cols < ((pos + 1) // self.ratio).unsqueeze(1)
            picks = torch.where(visible, cols, -1).expand(b, t, s)
        return torch.cat((idx, torch.where(picks >= 0, picks + kv_rows, -1)), dim=-1)

    def reference(self, q, kv, sink, cos, sin, *rest):
        b, t, h, _ = q.shape
        if self.q_norm_eps is not None:
            q = _rms(q, self.q_norm_eps)
        q = rope_reference(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        idx = self.entry_indices(t, kv.shape[1], rest, b, q.device)
        comp = rest[: len(rest) - int(self.decode)]
        entries = torch.cat((kv, comp[0]), dim=1) if comp else kv
        valid = idx >= 0
        batch = torch.arange(b, device=q.device).view(b, 1, 1)
        rows = entries[batch, idx.clamp(min=0)]  # [B,T,n,c]
        z = torch.einsum("bthc,btnc->bthn", q, rows).float() * self.scale
        z = z.masked_fill(~valid.unsqueeze(2), float("-inf"))
        sink_col = sink.float().view(1, 1, h, 1).expand(b, t, h, 1)
        p = torch.softmax(torch.cat((z, sink_col), dim=-1), dim=-1)[..., :-1]
        o = torch.einsum("bthn,btnc->bthc", p.to(q.dtype), rows)
        return (rope_reference(o, cos.unsqueeze(-2), sin.unsqueeze(-2), inverse=True),)

    def cost(self, operand_types, result_types):
        """Bytes the op must touch: q, the output, the raw kv (every row is some query's window
        row), the small operands, and of the compressed entries the rows the queries can read —
        every one for hca (all visible to the last query), for csa only the picked ones:
        min(S, T·k) rows per sequence (a decode query reads k of the L/m cached entries)."""
        q = operand_types[0]
        n = self.window
        if self.variant == "hca":
            n = n + operand_types[5].shape[1]
        elif self.variant == "csa":
            n = n + operand_types[6].shape[2]
        flops = 4 * numel(q.shape) * n
        if self.variant != "csa":
            return io_cost(flops, operand_types, result_types)
        comp, picks = operand_types[5], operand_types[6]
        b, s, c = comp.shape
        read = TensorType((b, _min_dim(s, q.shape[1] * picks.shape[2]), c), comp.dtype)
        touched = (*operand_types[:5], read, *operand_types[6:])
        return io_cost(flops, touched, result_types)


def _min_dim(a, b):
    """min(a, b) for dims: an int when both are, else a sympy Min."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return sympy.Min(a, b)
