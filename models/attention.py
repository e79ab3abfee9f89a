"""Hybrid attention (v4-architecture.md §3.3–3.5): sliding window ∪ compressed KV entries, one
shared 512-wide K = V head for all query heads (MQA), a learnable per-head sink, sparse by gather.

Layer kinds by compress ratio m:
    0        window only (last `window_size` tokens, the token itself included)
    4        CSA: overlapping compressor (each entry pools 2m tokens) + lightning indexer that
             picks `index_topk` compressed entries per query
    other    HCA: non-overlapping compressor, every completed entry attended

A compressed entry s is visible to query t iff s < (t + 1) // m (its block ends at or before t).
Every path is branch-free in the sequence length and the decode position so that torch.export
captures prefill with a symbolic T and one decode graph for every position.

Cache entries of one layer (names relative to `layers.{i}.attn.`):
    window_kv                     [B, window, head_dim]      ring, slot = position % window
    compressor.kv_state           [B, c·m, c·head_dim] fp32  projected rows of the open block(s)
    compressor.score_state        [B, c·m, c·head_dim] fp32  their gate logits (+ape); c = 2 if m == 4
    compressed_kv                 [B, max_len // m, head_dim]
    indexer.compressor.kv_state   [B, 8, 2·index_head_dim] fp32      (ratio 4 only)
    indexer.compressor.score_state
    indexer.keys                  [B, max_len // 4, index_head_dim]   (ratio 4 only)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import Config
from models.layers import RMSNorm, Rotary, apply_rope, rms_normalize


def sparse_attention(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
    """Shared-KV MQA over gathered entries.

    q [B,T,H,c]; kv [B,N,c] (each row is both key and value); idx [B,T,n] int64 rows of kv per
    query, −1 = no entry; sink [H] logits that join the softmax denominator only. Returns
    o[b,t,h] = Σ_j exp(z_j)·kv_j / (Σ_j exp(z_j) + exp(sink_h)), z_j = scale·q·kv_j over valid j.
    Cost and memory are ∝ T·n, never T·N.
    """
    b, t, h, _ = q.shape
    valid = idx >= 0
    batch = torch.arange(b, device=q.device).view(b, 1, 1)
    entries = kv[batch, idx.clamp(min=0)]  # [B,T,n,c]
    scores = torch.einsum("bthc,btnc->bthn", q, entries).float() * scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    sink_col = sink.float().view(1, 1, h, 1).expand(b, t, h, 1)
    probs = torch.softmax(torch.cat((scores, sink_col), dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bthn,btnc->bthc", probs.to(q.dtype), entries)


def topk_visible(scores: Tensor, visible: Tensor, k: int) -> Tensor:
    """Indices of the k best visible entries per row, −1 where fewer than k are visible.

    scores [.., S] (any float), visible: bool broadcastable to scores. k extra −inf columns keep
    topk(k) legal for any (symbolic) S; picks of masked or padding columns become −1.
    """
    n = scores.shape[-1]
    masked = scores.float().masked_fill(~visible, float("-inf"))
    padded = F.pad(masked, (0, k), value=float("-inf"))
    values, picks = padded.topk(k, dim=-1)
    return torch.where(torch.isinf(values) | (picks >= n), -1, picks)


def _scatter_rows(cache: Tensor, index: Tensor, rows: Tensor, write: Tensor) -> Tensor:
    """A copy of cache [B,L,..] with rows [B,1,..] at position `index` (0-d) when `write`. The
    index is clamped so that a step whose write is off never indexes past the end."""
    index = index.clamp(max=cache.shape[1] - 1).view(1)
    return torch.where(write, cache.index_copy(1, index, rows.to(cache.dtype)), cache)


class Compressor(nn.Module):
    """Softmax-gated pooling of every m tokens into one entry (+RMSNorm, RoPE at the block start).

    Per token: kv = x·wkvᵀ, score = x·wgateᵀ + ape[pos % m] (fp32). Entry i pools, per channel,
    softmax(score)·kv over its block's m rows; for m == 4 (overlap) it pools 2m rows: the first
    half of the channels ("b") of block i−1 and the second half ("a") of block i.
    """

    def __init__(self, cfg: Config, ratio: int, out_dim: int, rotary: Rotary) -> None:
        super().__init__()
        self.ratio, self.out_dim, self.rotary = ratio, out_dim, rotary
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * out_dim
        self.wkv = nn.Linear(cfg.dim, width, bias=False)
        self.wgate = nn.Linear(cfg.dim, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(out_dim, cfg.norm_eps)

    @property
    def state_rows(self) -> int:
        return (2 if self.overlap else 1) * self.ratio

    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        kv = F.linear(xf, self.wkv.weight.float())
        score = F.linear(xf, self.wgate.weight.float()) + self.ape[positions % self.ratio]
        return kv, score

    def _finish(self, pooled: Tensor, block_starts: Tensor, dtype: torch.dtype) -> Tensor:
        entry = self.norm(pooled.to(dtype))
        cos, sin = self.rotary.cos_sin(block_starts)
        return apply_rope(entry, cos, sin)

    def _window(
        self, kv: Tensor, score: Tensor, prev_kv: Tensor, prev_score: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Rows an entry pools: overlap -> previous block's b half ++ this block's a half."""
        if not self.overlap:
            return kv, score
        c = self.out_dim
        kv = torch.cat((prev_kv[..., :c], kv[..., c:]), dim=-2)
        score = torch.cat((prev_score[..., :c], score[..., c:]), dim=-2)
        return kv, score

    def forward(self, x: Tensor) -> Tensor:
        """All complete entries of a sequence starting at position 0: x [B,T,d] -> [B,T//m,out]."""
        t = x.shape[1]
        m, nb = self.ratio, t // self.ratio
        kv, score = self._project(x, torch.arange(t, device=x.device))
        # m padding rows in front stand for block −1 (zero kv, −inf score: no weight), so block
        # i's rows are padded rows (i+1)·m.. and its predecessor's i·m... Rows are gathered by
        # an [nb, m] index (no slice or view of symbolic size), which keeps torch.export free of
        # guards on T (e.g. that nb is neither 0 nor 1).
        kv = F.pad(kv, (0, 0, m, 0))
        score = F.pad(score, (0, 0, m, 0), value=float("-inf"))
        rows = torch.arange(nb * m, device=x.device).view(nb, m)

        def blocks(v: Tensor, offset: int) -> Tensor:  # -> [B, nb, m, width]
            return v[:, rows + offset]

        kv, score = self._window(blocks(kv, m), blocks(score, m), blocks(kv, 0), blocks(score, 0))
        pooled = (kv * score.softmax(dim=2)).sum(2)
        starts = torch.arange(nb, device=x.device) * m
        return self._finish(pooled, starts, x.dtype)

    def prefill_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Decode state after a prefill of x [B,T,d]: the rows of the open block (and, for
        overlap, of the last complete block in front of them) -> 2 × [B, state_rows, width]."""
        t = x.shape[1]
        m, nb = self.ratio, t // self.ratio
        kv, score = self._project(x, torch.arange(t, device=x.device))
        # Pad m rows at the end (the open block's unwritten rows; decode overwrites them before
        # they are pooled) and, for overlap, m rows in front (block −1: zero kv, −inf score).
        front = m if self.overlap else 0
        kv = F.pad(kv, (0, 0, front, m))
        score = F.pad(score, (0, 0, front, 0), value=float("-inf"))
        score = F.pad(score, (0, 0, 0, m))
        rows = nb * m + torch.arange(self.state_rows, device=x.device)
        return kv.index_select(1, rows), score.index_select(1, rows)

    def init_state(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        shape = (batch, self.state_rows, self.ape.shape[-1])
        kv = torch.zeros(shape, dtype=torch.float32, device=device)
        score = torch.zeros(shape, dtype=torch.float32, device=device)
        if self.overlap:  # no block before block 0
            score[:, : self.ratio] = float("-inf")
        return kv, score

    def decode(
        self, x: Tensor, pos: Tensor, kv_state: Tensor, score_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One token x [B,1,d] at 0-d position `pos` -> (entry [B,1,out], emit (0-d bool: entry is
        valid, i.e. (pos+1) % m == 0), new kv_state, new score_state)."""
        m = self.ratio
        kv, score = self._project(x, pos.view(1))
        slot = pos % m + (m if self.overlap else 0)
        kv_state = kv_state.index_copy(1, slot.view(1), kv)
        score_state = score_state.index_copy(1, slot.view(1), score)
        cur_kv, cur_score = kv_state[:, -m:], score_state[:, -m:]
        win_kv, win_score = self._window(cur_kv, cur_score, kv_state[:, :m], score_state[:, :m])
        pooled = (win_kv * win_score.softmax(dim=1)).sum(1, keepdim=True)
        entry = self._finish(pooled, (pos // m * m).view(1), x.dtype)
        emit = (pos + 1) % m == 0
        if self.overlap:  # the finished block becomes the predecessor of the next one
            kv_state = torch.where(emit, cur_kv.repeat(1, 2, 1), kv_state)
            score_state = torch.where(emit, cur_score.repeat(1, 2, 1), score_state)
        return entry, emit, kv_state, score_state


class Indexer(nn.Module):
    """Lightning indexer: score[t,s] = Σ_h w[t,h]·relu(qᴵ[t,h]·kᴵ[s]), top-k visible entries.

    qᴵ = wq_b(cq) (cq: the attention's normalised low-rank query), RoPE on its last rope dims;
    kᴵ from its own ratio-4 compressor; w = weights_proj(x)·(c_I·n_I)^−½. The Hadamard rotation of
    the official code is orthogonal on both sides and cancels in qᴵ·kᴵ; FP4 fake-quant is omitted.
    """

    def __init__(self, cfg: Config, rotary: Rotary) -> None:
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.topk = cfg.index_topk
        self.rotary = rotary
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.dim, self.n_heads, bias=False)
        self.compressor = Compressor(cfg, 4, self.head_dim, rotary)

    def scores(self, x: Tensor, cq: Tensor, cos: Tensor, sin: Tensor, keys: Tensor) -> Tensor:
        """x [B,T,d], cq [B,T,dc], cos/sin [T, r/2], keys [B,S,c_I] -> [B,T,S] fp32."""
        q = self.wq_b(cq).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        w = self.weights_proj(x).float() * (self.head_dim * self.n_heads) ** -0.5
        logits = torch.einsum("bthc,bsc->bths", q.float(), keys.float()).relu()
        return (logits * w.unsqueeze(-1)).sum(2)


class Attention(nn.Module):
    """One attention layer; `ratio` selects the kind (module docstring)."""

    def __init__(self, cfg: Config, ratio: int) -> None:
        super().__init__()
        self.ratio, self.window = ratio, cfg.window_size
        self.n_heads, self.head_dim, self.groups = cfg.n_heads, cfg.head_dim, cfg.o_groups
        self.scale = cfg.head_dim**-0.5
        self.norm_eps = cfg.norm_eps
        if ratio:
            self.rotary = Rotary(
                cfg.rope_head_dim,
                cfg.compress_rope_theta,
                cfg.rope_factor,
                cfg.original_seq_len,
                cfg.beta_fast,
                cfg.beta_slow,
            )
        else:
            self.rotary = Rotary(cfg.rope_head_dim, cfg.rope_theta)
        h, c, g = cfg.n_heads, cfg.head_dim, cfg.o_groups
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, h * c, bias=False)
        self.wkv = nn.Linear(cfg.dim, c, bias=False)
        self.kv_norm = RMSNorm(c, cfg.norm_eps)
        self.wo_a = nn.Linear(h * c // g, g * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(g * cfg.o_lora_rank, cfg.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(h, dtype=torch.float32))
        if ratio:
            self.compressor = Compressor(cfg, ratio, c, self.rotary)
        if ratio == 4:
            self.indexer = Indexer(cfg, self.rotary)

    # --- shared by prefill and decode ---------------------------------------------------------

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> cq [B,T,dc], q [B,T,H,c] (unit RMS per head, rotated), kv [B,T,c] (rotated)."""
        cq = self.q_norm(self.wq_a(x))
        q = self.wq_b(cq).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(rms_normalize(q, self.norm_eps), cos.unsqueeze(-2), sin.unsqueeze(-2))
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        return cq, q, kv

    def _output(self, o: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Undo the rotation carried by the values, then the grouped low-rank projection."""
        o = apply_rope(o, cos.unsqueeze(-2), sin.unsqueeze(-2), inverse=True)
        o = o.flatten(2).unflatten(-1, (self.groups, -1))  # [B,T,g,H·c/g]
        wo_a = self.wo_a.weight.unflatten(0, (self.groups, -1))  # [g, dg, H·c/g]
        return self.wo_b(torch.einsum("btgi,gri->btgr", o, wo_a).flatten(2))

    # --- prefill --------------------------------------------------------------------------------

    def forward(
        self, x: Tensor, cache: dict[str, Tensor] | None = None
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Prefill from position 0. x [B,T,d] -> out [B,T,d], or (out, new cache entries) when a
        cache (this layer's entries from init_cache, which fix max_len) is given; T <= max_len."""
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device)
        cos, sin = self.rotary.cos_sin(pos)
        cq, q, kv = self._project(x, cos, sin)

        # Window: query t sees t−window+1 .. t.
        win = pos.unsqueeze(1) - self.window + 1 + torch.arange(self.window, device=x.device)
        idx = win.masked_fill(win < 0, -1).expand(b, t, self.window)
        entries, comp, keys = kv, None, None
        if self.ratio:
            comp = self.compressor(x)  # [B, T//m, c]
            s = torch.arange(comp.shape[1], device=x.device)
            visible = s.unsqueeze(0) < ((pos + 1) // self.ratio).unsqueeze(1)  # [T, T//m]
            if self.ratio == 4:
                keys = self.indexer.compressor(x)
                scores = self.indexer.scores(x, cq, cos, sin, keys)
                picks = topk_visible(scores, visible, self.indexer.topk)
            else:  # HCA: every visible entry
                picks = torch.where(visible, s, -1).expand(b, t, -1)
            idx = torch.cat((idx, torch.where(picks >= 0, picks + t, -1)), dim=-1)
            entries = torch.cat((kv, comp), dim=1)
        o = sparse_attention(q, entries, idx, self.attn_sink, self.scale)
        out = self._output(o, cos, sin)
        if cache is None:
            return out
        return out, self._prefill_cache(x, kv, comp, keys, cache)

    def _prefill_cache(
        self,
        x: Tensor,
        kv: Tensor,
        comp: Tensor | None,
        keys: Tensor | None,
        cache: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        t, w = x.shape[1], self.window
        # Ring: slot p % w holds position p for the last w positions (negative ones are padding).
        positions = torch.arange(w, device=x.device) + t - w  # t−w .. t−1
        last = F.pad(kv, (0, 0, w, 0)).index_select(1, positions + w)
        slots = positions % w
        new = {"window_kv": cache["window_kv"].index_copy(1, slots, last.to(kv.dtype))}
        if not self.ratio:
            return new
        new["compressed_kv"] = torch.cat((comp, cache["compressed_kv"][:, comp.shape[1] :]), 1)
        new["compressor.kv_state"], new["compressor.score_state"] = self.compressor.prefill_state(x)
        if self.ratio == 4:
            new["indexer.keys"] = torch.cat((keys, cache["indexer.keys"][:, keys.shape[1] :]), 1)
            new["indexer.compressor.kv_state"], new["indexer.compressor.score_state"] = (
                self.indexer.compressor.prefill_state(x)
            )
        return new

    # --- decode ---------------------------------------------------------------------------------

    def init_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> dict[str, Tensor]:
        """Empty cache entries for this layer (names in the module docstring)."""
        c = self.head_dim
        cache = {"window_kv": torch.zeros(batch, self.window, c, dtype=dtype, device=device)}
        if not self.ratio:
            return cache
        cache["compressed_kv"] = torch.zeros(
            batch, max_len // self.ratio, c, dtype=dtype, device=device
        )
        cache["compressor.kv_state"], cache["compressor.score_state"] = self.compressor.init_state(
            batch, device
        )
        if self.ratio == 4:
            ci = self.indexer.head_dim
            cache["indexer.keys"] = torch.zeros(batch, max_len // 4, ci, dtype=dtype, device=device)
            cache["indexer.compressor.kv_state"], cache["indexer.compressor.score_state"] = (
                self.indexer.compressor.init_state(batch, device)
            )
        return cache

    def decode(
        self, x: Tensor, pos: Tensor, cache: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One token x [B,1,d] at 0-d int64 position `pos` -> (out [B,1,d], new cache entries).
        Every entry is returned as a new tensor; writes are selected with torch.where."""
        cos, sin = self.rotary.cos_sin(pos.view(1))
        cq, q, kv = self._project(x, cos, sin)
        w = self.window
        ring = cache["window_kv"].index_copy(1, (pos % w).view(1), kv)
        slots = torch.arange(w, device=x.device)
        idx = torch.where(slots <= pos, slots, -1).view(1, 1, w).expand(x.shape[0], 1, w)
        new = {"window_kv": ring}
        entries = ring
        if self.ratio:
            comp = self._decode_compressor(self.compressor, x, pos, cache, "", "compressed_kv")
            new.update(comp)
            s = torch.arange(new["compressed_kv"].shape[1], device=x.device)
            visible = s < (pos + 1) // self.ratio
            if self.ratio == 4:
                new.update(
                    self._decode_compressor(
                        self.indexer.compressor, x, pos, cache, "indexer.", "indexer.keys"
                    )
                )
                scores = self.indexer.scores(x, cq, cos, sin, new["indexer.keys"])
                picks = topk_visible(scores, visible, self.indexer.topk)
            else:
                picks = torch.where(visible, s, -1).view(1, 1, -1).expand(x.shape[0], 1, -1)
            idx = torch.cat((idx, torch.where(picks >= 0, picks + w, -1)), dim=-1)
            entries = torch.cat((ring, new["compressed_kv"]), dim=1)
        o = sparse_attention(q, entries, idx, self.attn_sink, self.scale)
        return self._output(o, cos, sin), new

    @staticmethod
    def _decode_compressor(
        comp: Compressor, x: Tensor, pos: Tensor, cache: dict[str, Tensor], prefix: str, out: str
    ) -> dict[str, Tensor]:
        kv_key, score_key = f"{prefix}compressor.kv_state", f"{prefix}compressor.score_state"
        entry, emit, kv_state, score_state = comp.decode(x, pos, cache[kv_key], cache[score_key])
        return {
            kv_key: kv_state,
            score_key: score_state,
            out: _scatter_rows(cache[out], pos // comp.ratio, entry, emit),
        }
