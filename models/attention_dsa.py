"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): MLA in MQA form over the top-k tokens that a
lightning indexer picks from every previous token. Selected by `Config(attention="dsa")`.

Per token t (H heads, query/key dims = `head_dim` = NoPE n + RoPE r, latent `kv_lora_rank` c,
values `v_head_dim`):

    cq      = q_norm(wq_a(x))                          low-rank query, shared with the indexer
    q       = wq_b(cq) -> [H, n + r], RoPE (interleaved pairs) on the last r dims
    entry   = [kv_norm(latent), rope(pe)]  with  [latent, pe] = wkv_a(x)     one [c + r] row/token
    q_abs   = [q_nope · W_uk[h], q_pe]     W_uk[h] = the key rows of wkv_b for head h ([n, c])
    picks   = top-k over s <= t of  I[t, s] = Σ_j w[t, j] · relu(qᴵ[t, j] · kᴵ[s]) · dᴵ^−½
    o_lat   = softmax_s∈picks(scale · q_abs · entry_s) · latent_s       (MQA: one K = V row)
    out     = wo([o_lat · W_uv[h]ᵀ]_h)                   W_uv[h] = the value rows of wkv_b

This is the "absorbed" form of V3.2's MLA (FlashMLA's sparse decode kernel computes it): equal to
expanding every selected latent into per-head keys k = [W_uk·latent, pe] and values W_uv·latent.
Indexer (V3.2 / Hugging Face DeepseekV32Indexer): qᴵ = wq_b(cq) [nᴵ, dᴵ], kᴵ = LayerNorm(wk(x))
[dᴵ], RoPE on their FIRST r dims in the half-split (non-interleaved) layout, w = weights_proj(x) ·
nᴵ^−½; the Hadamard rotation and FP8 quantisation of the official kernels are omitted (orthogonal
on both sides of the dot product; precision only). RoPE: `rope_theta`, YaRN when rope_factor > 1,
with mscale² = (0.1·ln(factor) + 1)² folded into the softmax scale (V3.2: mscale_all_dim = 1).

Prefill and decode are branch-free in T and the position (module docstring of models/attention.py).
Cache entries (names relative to `layers.{i}.attn.`):
    kv              [B, max_len, c + r]    every token's entry, row = position
    indexer.keys    [B, max_len, dᴵ]       every token's indexer key
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.attention import topk_visible
from models.config import Config
from models.layers import RMSNorm, Rotary, apply_rope


def variant_rotary(cfg: Config) -> Rotary:
    """The rotary table of the DSA / NSA variants: rope_theta, YaRN only when rope_factor > 1."""
    if cfg.rope_factor <= 1.0:
        return Rotary(cfg.rope_head_dim, cfg.rope_theta)
    return Rotary(
        cfg.rope_head_dim,
        cfg.rope_theta,
        cfg.rope_factor,
        cfg.original_seq_len,
        cfg.beta_fast,
        cfg.beta_slow,
    )


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the FIRST 2·cos.shape[-1] channels of x in the half-split layout: channel i pairs
    with channel i + half (the indexer's convention, unlike apply_rope); the rest pass through."""
    half = cos.shape[-1]
    a, b, rest = x[..., :half].float(), x[..., half : 2 * half].float(), x[..., 2 * half :]
    rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


def sparse_mla(q: Tensor, kv: Tensor, idx: Tensor, scale: float, value_dim: int) -> Tensor:
    """Shared-KV MQA over gathered entries, values = the first `value_dim` channels of each entry.

    q [B,T,H,D]; kv [B,N,D]; idx [B,T,n] int64 rows of kv per query, −1 = no entry (each query
    needs at least one valid entry). Returns o[b,t,h] = Σ_j softmax_j(scale·q·kv_j)·kv_j[:value_dim]
    over the valid j, [B,T,H,value_dim]. Cost and memory ∝ T·n, never T·N.
    """
    b = q.shape[0]
    valid = idx >= 0
    batch = torch.arange(b, device=q.device).view(b, 1, 1)
    entries = kv[batch, idx.clamp(min=0)]  # [B,T,n,D]
    scores = torch.einsum("bthc,btnc->bthn", q, entries).float() * scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bthn,btnc->bthc", probs.to(q.dtype), entries[..., :value_dim])


class LightningIndexer(nn.Module):
    """V3.2's indexer: per-token keys, ReLU-weighted index heads, token-level top-k."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = (
            cfg.index_n_heads,
            cfg.index_head_dim,
            cfg.index_topk,
        )
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.dim, self.n_heads, bias=False)

    def key(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B,T,d] -> kᴵ [B,T,dᴵ] (rotated)."""
        return apply_rope_half(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: Tensor, cq: Tensor, cos: Tensor, sin: Tensor, keys: Tensor) -> Tensor:
        """x [B,T,d], cq [B,T,dc], cos/sin [T, r/2], keys [B,S,dᴵ] -> I [B,T,S] fp32."""
        q = self.wq_b(cq).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope_half(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        w = self.weights_proj(x).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)
        logits = torch.einsum("bthc,bsc->bths", q.float(), keys.float()).relu()
        return (logits * w.unsqueeze(-1)).sum(2)


class DSAttention(nn.Module):
    """One DSA layer (module docstring). Same call contract as models.attention.Attention."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        h, r = cfg.n_heads, cfg.rope_head_dim
        self.n_heads, self.qk_dim, self.rope_dim = h, cfg.head_dim, r
        self.nope_dim, self.latent_dim, self.v_dim = (
            cfg.head_dim - r,
            cfg.kv_lora_rank,
            cfg.v_head_dim,
        )
        self.rotary = variant_rotary(cfg)
        mscale = 0.1 * math.log(cfg.rope_factor) + 1.0 if cfg.rope_factor > 1.0 else 1.0
        self.scale = cfg.head_dim**-0.5 * mscale * mscale
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, h * cfg.head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.latent_dim + r, bias=False)
        self.kv_norm = RMSNorm(self.latent_dim, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.latent_dim, h * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, cfg.dim, bias=False)
        self.indexer = LightningIndexer(cfg)

    # --- shared by prefill and decode ---------------------------------------------------------

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> cq [B,T,dc], absorbed query [B,T,H,c+r], entry [B,T,c+r] (both rotated)."""
        cq = self.q_norm(self.wq_a(x))
        q = self.wq_b(cq).unflatten(-1, (self.n_heads, self.qk_dim))
        q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        q_nope, q_pe = q.split((self.nope_dim, self.rope_dim), dim=-1)
        w_uk = self.wkv_b.weight.unflatten(0, (self.n_heads, -1))[:, : self.nope_dim]  # [H,n,c]
        q_abs = torch.cat((torch.einsum("bthn,hnc->bthc", q_nope, w_uk), q_pe), dim=-1)
        latent, pe = self.wkv_a(x).split((self.latent_dim, self.rope_dim), dim=-1)
        entry = apply_rope(torch.cat((self.kv_norm(latent), pe), dim=-1), cos, sin)
        return cq, q_abs, entry

    def _output(self, o_lat: Tensor) -> Tensor:
        """o_lat [B,T,H,c] -> per-head values W_uv·o_lat -> wo."""
        w_uv = self.wkv_b.weight.unflatten(0, (self.n_heads, -1))[:, self.nope_dim :]  # [H,v,c]
        return self.wo(torch.einsum("bthc,hvc->bthv", o_lat, w_uv).flatten(2))

    def _attend(
        self,
        x: Tensor,
        cq: Tensor,
        q: Tensor,
        kv: Tensor,
        keys: Tensor,
        pos: Tensor,
        cos: Tensor,
        sin: Tensor,
    ) -> Tensor:
        """Index, pick and attend: queries at positions pos [T] over kv/keys rows 0..S−1."""
        scores = self.indexer.scores(x, cq, cos, sin, keys)  # [B,T,S]
        s = torch.arange(keys.shape[1], device=x.device)
        picks = topk_visible(scores, s.unsqueeze(0) <= pos.unsqueeze(1), self.indexer.topk)
        return self._output(sparse_mla(q, kv, picks, self.scale, self.latent_dim))

    # --- prefill --------------------------------------------------------------------------------

    def forward(
        self, x: Tensor, cache: dict[str, Tensor] | None = None
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Prefill from position 0. x [B,T,d] -> out [B,T,d], or (out, new cache entries) when a
        cache (this layer's entries from init_cache, which fix max_len) is given; T <= max_len."""
        t = x.shape[1]
        pos = torch.arange(t, device=x.device)
        cos, sin = self.rotary.cos_sin(pos)
        cq, q, entry = self._project(x, cos, sin)
        keys = self.indexer.key(x, cos, sin)
        out = self._attend(x, cq, q, entry, keys, pos, cos, sin)
        if cache is None:
            return out
        return out, {
            "kv": torch.cat((entry, cache["kv"][:, t:]), dim=1),
            "indexer.keys": torch.cat((keys, cache["indexer.keys"][:, t:]), dim=1),
        }

    # --- decode ---------------------------------------------------------------------------------

    def init_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> dict[str, Tensor]:
        """Empty cache entries for this layer (names in the module docstring)."""
        width = self.latent_dim + self.rope_dim
        return {
            "kv": torch.zeros(batch, max_len, width, dtype=dtype, device=device),
            "indexer.keys": torch.zeros(
                batch, max_len, self.indexer.head_dim, dtype=dtype, device=device
            ),
        }

    def decode(
        self, x: Tensor, pos: Tensor, cache: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One token x [B,1,d] at 0-d int64 position `pos` (< max_len) -> (out [B,1,d], new cache
        entries); the inputs are not written."""
        at = pos.view(1)
        cos, sin = self.rotary.cos_sin(at)
        cq, q, entry = self._project(x, cos, sin)
        kv = cache["kv"].index_copy(1, at, entry.to(cache["kv"].dtype))
        key = self.indexer.key(x, cos, sin)
        keys = cache["indexer.keys"].index_copy(1, at, key.to(cache["indexer.keys"].dtype))
        out = self._attend(x, cq, q, kv, keys, at, cos, sin)
        return out, {"kv": kv, "indexer.keys": keys}
