"""Native Sparse Attention (NSA, Yuan et al. 2025, arXiv:2502.11089) with GQA. Selected by
`Config(attention="nsa")`.

H query heads in G = `n_kv_heads` groups; every branch c ∈ {cmp, slc, win} has its own keys and
values (the paper gives each branch independent K/V), [G, dk] and [G, dv] per token; RoPE
(interleaved pairs, last `rope_head_dim` dims, `rope_theta`) on the queries and on every key at its
token's position. Per query t and head h of group g (scale dk^−½):

    cmp   block i pools tokens i·d .. i·d+l−1 (l = nsa_cmp_block, d = nsa_cmp_stride):
          k̃_i = φ_k(flatten_j(k_cmp[i·d+j] + pe_k[j])), ṽ_i likewise (φ: a linear map, the paper's
          MLP with intra-block position encoding). Visible iff i·d + l − 1 <= t.
          p_cmp[t,h,i] = softmax_i(q·k̃_i) over visible i (all 0 while none is), o_cmp = Σ p·ṽ.
    slc   selection block j holds tokens j·l' .. j·l'+l'−1 (l' = nsa_slc_block), visible iff
          j·l' <= t. Importance p_slc[t,g,j] = Σ_{h∈g} Σ_i p_cmp[t,h,i]·[block i shares a token
          with block j] — the paper's Eq. 9 sums the compressed blocks covering selection block j;
          its printed index arithmetic does not match its own block layout, so the overlap
          indicator is used (it equals Eq. 9 whenever l = d = l'). The group keeps n =
          nsa_slc_topn blocks: block 0 and the 2 local blocks (t's own and the one before) always,
          the rest by importance. o_slc = softmax over the tokens s <= t of those blocks.
    win   o_win = softmax over the last `window_size` tokens (t itself included).
    out   wo(Σ_c sigmoid(wgate(x))[t,h,c] · o_c)            one gate per head and branch

Prefill and decode are branch-free in T and the position (see models/attention.py); prefill
exports with a symbolic T >= 2·max(l, l'). Cache entries (names relative to `layers.{i}.attn.`):
    slc.k, slc.v     [B, max_len, G, dk|dv]       every token (selection reads any block)
    win.k, win.v     [B, window, G, dk|dv]        ring, slot = position % window
    cmp.k_state, cmp.v_state  [B, l, G, dk|dv]    ring of the last l tokens' cmp keys / values
    cmp.k, cmp.v     [B, max_len // d, G, dk|dv]  compressed blocks, row = block index
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import _scatter_rows, topk_visible
from models.attention_dsa import variant_rotary
from models.config import Config
from models.layers import apply_rope

BRANCHES = ("cmp", "slc", "win")


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """GQA attention. q [B,T,G,hg,dk]; keys per query k [B,T,G,m,dk], v [B,T,G,m,dv], or shared
    by every query k [B,G,m,dk], v [B,G,m,dv]; valid bool broadcastable to [B,T,G,hg,m]. ->
    (o [B,T,G,hg,dv], probs [B,T,G,hg,m] fp32); a row with no valid key gives o = 0, probs = 0."""
    if k.ndim == 4:  # shared: broadcast over T by matmul (an einsum here makes export guard on T)
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.where(valid, torch.softmax(scores, dim=-1), 0.0)
    return torch.matmul(probs.to(v.dtype), v), probs


def block_overlap(n_cmp: int, n_slc: int, cfg: Config, device: torch.device) -> Tensor:
    """[n_cmp, n_slc] fp32: 1 where compressed block i shares a token with selection block j."""
    l, d, ls = cfg.nsa_cmp_block, cfg.nsa_cmp_stride, cfg.nsa_slc_block
    start = torch.arange(n_cmp, device=device).unsqueeze(1) * d
    sel = torch.arange(n_slc, device=device).unsqueeze(0) * ls
    return ((start < sel + ls) & (start + l > sel)).float()


class NSAttention(nn.Module):
    """One NSA layer (module docstring). Same call contract as models.attention.Attention."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        h, g, dk, dv = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
        self.n_heads, self.groups, self.dk, self.dv = h, g, dk, dv
        self.l, self.d = cfg.nsa_cmp_block, cfg.nsa_cmp_stride
        self.ls, self.topn, self.window = cfg.nsa_slc_block, cfg.nsa_slc_topn, cfg.window_size
        self.scale = dk**-0.5
        # Forced blocks outrank any importance: a group's p_slc is at most its head count.
        self.forced_bonus = float(h // g + 1)
        self.rotary = variant_rotary(cfg)
        self.wq = nn.Linear(cfg.dim, h * dk, bias=False)
        for c in BRANCHES:
            setattr(self, f"wk_{c}", nn.Linear(cfg.dim, g * dk, bias=False))
            setattr(self, f"wv_{c}", nn.Linear(cfg.dim, g * dv, bias=False))
        self.cmp_k_pe = nn.Parameter(torch.zeros(self.l, dk))
        self.cmp_v_pe = nn.Parameter(torch.zeros(self.l, dv))
        self.cmp_wk = nn.Linear(self.l * dk, dk, bias=False)
        self.cmp_wv = nn.Linear(self.l * dv, dv, bias=False)
        self.wgate = nn.Linear(cfg.dim, h * len(BRANCHES), bias=False)
        self.wo = nn.Linear(h * dv, cfg.dim, bias=False)

    # --- shared by prefill and decode ---------------------------------------------------------

    def _query(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """-> q [B,T,G,hg,dk] rotated."""
        q = self.wq(x).unflatten(-1, (self.n_heads, self.dk))
        q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        return q.unflatten(2, (self.groups, -1))

    def _kv(self, x: Tensor, branch: str, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """-> this branch's k [B,T,G,dk] (rotated) and v [B,T,G,dv]."""
        k = getattr(self, f"wk_{branch}")(x).unflatten(-1, (self.groups, self.dk))
        v = getattr(self, f"wv_{branch}")(x).unflatten(-1, (self.groups, self.dv))
        return apply_rope(k, cos.unsqueeze(-2), sin.unsqueeze(-2)), v

    def _compress(self, k_blocks: Tensor, v_blocks: Tensor) -> tuple[Tensor, Tensor]:
        """Blocks [B,N,l,G,dk|dv] -> compressed [B,N,G,dk|dv] (φ of the module docstring)."""
        k = (k_blocks + self.cmp_k_pe.unsqueeze(1)).transpose(2, 3).flatten(3)
        v = (v_blocks + self.cmp_v_pe.unsqueeze(1)).transpose(2, 3).flatten(3)
        return self.cmp_wk(k), self.cmp_wv(v)

    def _select(self, p_cmp: Tensor, pos: Tensor, n_slc: int | Tensor) -> Tensor:
        """p_cmp [B,T,G,hg,N] -> picked selection blocks [B,T,G,n] (−1 = none)."""
        overlap = block_overlap(p_cmp.shape[-1], n_slc, self.cfg, p_cmp.device)
        importance = torch.einsum("btgn,ns->btgs", p_cmp.sum(3), overlap)
        j = torch.arange(n_slc, device=p_cmp.device)
        own = (pos // self.ls).unsqueeze(1)  # [T,1]
        forced = (j == 0) | (j == own) | (j == own - 1)
        rank = importance + forced.unsqueeze(1).float() * self.forced_bonus
        visible = (j * self.ls <= pos.unsqueeze(1)).unsqueeze(1)  # [T,1,S]
        return topk_visible(rank, visible, self.topn)

    def _selected(self, q: Tensor, picks: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Attend to the tokens s <= t of the picked blocks; k [B,S,G,dk], v [B,S,G,dv]."""
        tok = (picks.unsqueeze(-1) * self.ls + torch.arange(self.ls, device=q.device)).flatten(3)
        valid = (tok >= 0) & (tok <= pos.view(1, -1, 1, 1))  # picks of −1 give tok < 0
        tok = torch.where(valid, tok, 0)
        b = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1, 1)
        g = torch.arange(self.groups, device=q.device).view(1, 1, -1, 1)
        o, _ = masked_attention(q, k[b, tok, g], v[b, tok, g], valid.unsqueeze(3), self.scale)
        return o

    def _combine(self, x: Tensor, outs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Gate the branch outputs [B,T,G,hg,dv] per head and project out."""
        gates = torch.sigmoid(self.wgate(x).float()).unflatten(-1, (self.n_heads, len(BRANCHES)))
        o_cmp, o_slc, o_win = (o.flatten(2, 3) for o in outs)
        g = gates.to(o_cmp.dtype)
        o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
        return self.wo(o.flatten(2))

    def _attend(
        self,
        x: Tensor,
        q: Tensor,
        cmp: tuple[Tensor, Tensor, Tensor],
        slc: tuple[Tensor, Tensor],
        win: tuple[Tensor, Tensor, Tensor],
        pos: Tensor,
        n_slc: int,
    ) -> Tensor:
        """cmp = (k̃, ṽ, visible [T,N]); slc = (k, v) over every token; win = (k, v, idx [T,w]
        token rows of win's k/v, −1 = none). Queries at positions pos [T]."""
        k_c, v_c, vis = cmp
        vis = vis[None, :, None, None, :]  # indexing, not view(-1): no divisibility guard on T
        o_cmp, p_cmp = masked_attention(
            q, k_c.transpose(1, 2), v_c.transpose(1, 2), vis, self.scale
        )
        o_slc = self._selected(q, self._select(p_cmp, pos, n_slc), *slc, pos)
        k_w, v_w, idx = win
        rows = idx.clamp(min=0)
        valid = (idx >= 0)[None, :, None, None, :]
        k_w, v_w = k_w[:, rows].transpose(2, 3), v_w[:, rows].transpose(2, 3)  # [B,T,G,w,..]
        o_win, _ = masked_attention(q, k_w, v_w, valid, self.scale)
        return self._combine(x, (o_cmp, o_slc, o_win))

    # --- prefill --------------------------------------------------------------------------------

    def forward(
        self, x: Tensor, cache: dict[str, Tensor] | None = None
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Prefill from position 0. x [B,T,d] -> out [B,T,d], or (out, new cache entries) when a
        cache (this layer's entries from init_cache, which fix max_len) is given; T <= max_len."""
        t = x.shape[1]
        pos = torch.arange(t, device=x.device)
        cos, sin = self.rotary.cos_sin(pos)
        q = self._query(x, cos, sin)
        kv = {c: self._kv(x, c, cos, sin) for c in BRANCHES}
        # T // d block starts; blocks running past T read padding and stay invisible. Rows are
        # gathered by an index (no slice of symbolic size), as in models/attention.py.
        n_cmp = t // self.d
        rows = torch.arange(n_cmp, device=x.device).unsqueeze(1) * self.d
        rows = rows + torch.arange(self.l, device=x.device)
        pad = (0, 0, 0, 0, 0, self.l - self.d)
        k_c, v_c = self._compress(
            F.pad(kv["cmp"][0], pad)[:, rows], F.pad(kv["cmp"][1], pad)[:, rows]
        )
        vis = rows[:, -1].unsqueeze(0) <= pos.unsqueeze(1)  # [T, N]
        win = pos.unsqueeze(1) - self.window + 1 + torch.arange(self.window, device=x.device)
        win = win.masked_fill(win < 0, -1)
        n_slc = (t + self.ls - 1) // self.ls
        out = self._attend(x, q, (k_c, v_c, vis), kv["slc"], (*kv["win"], win), pos, n_slc)
        if cache is None:
            return out
        return out, self._prefill_cache(kv, k_c, v_c, cache)

    def _prefill_cache(
        self,
        kv: dict[str, tuple[Tensor, Tensor]],
        k_c: Tensor,
        v_c: Tensor,
        cache: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        t, n = kv["slc"][0].shape[1], k_c.shape[1]
        new = {}
        for name, rows in (("k", 0), ("v", 1)):
            new[f"slc.{name}"] = _keep_tail(kv["slc"][rows], cache[f"slc.{name}"], t)
            new[f"cmp.{name}"] = _keep_tail((k_c, v_c)[rows], cache[f"cmp.{name}"], n)
            new[f"win.{name}"] = _ring(kv["win"][rows], cache[f"win.{name}"])
            new[f"cmp.{name}_state"] = _ring(kv["cmp"][rows], cache[f"cmp.{name}_state"])
        return new

    # --- decode ---------------------------------------------------------------------------------

    def init_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> dict[str, Tensor]:
        """Empty cache entries for this layer (names in the module docstring)."""
        lengths = {"slc": max_len, "win": self.window, "cmp": max_len // self.d}
        cache = {}
        for name, dim in (("k", self.dk), ("v", self.dv)):
            for c, n in lengths.items():
                cache[f"{c}.{name}"] = torch.zeros(
                    batch, n, self.groups, dim, dtype=dtype, device=device
                )
            cache[f"cmp.{name}_state"] = torch.zeros(
                batch, self.l, self.groups, dim, dtype=dtype, device=device
            )
        return cache

    def decode(
        self, x: Tensor, pos: Tensor, cache: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One token x [B,1,d] at 0-d int64 position `pos` (< max_len) -> (out [B,1,d], new cache
        entries); the inputs are not written."""
        at = pos.view(1)
        cos, sin = self.rotary.cos_sin(at)
        q = self._query(x, cos, sin)
        kv = {c: self._kv(x, c, cos, sin) for c in BRANCHES}
        new = {}
        for i, name in enumerate(("k", "v")):
            new[f"slc.{name}"] = cache[f"slc.{name}"].index_copy(1, at, kv["slc"][i])
            new[f"win.{name}"] = cache[f"win.{name}"].index_copy(1, at % self.window, kv["win"][i])
            state = cache[f"cmp.{name}_state"].index_copy(1, at % self.l, kv["cmp"][i])
            new[f"cmp.{name}_state"] = state
        # The block ending at pos (if one does) pools the ring in token order pos−l+1 .. pos.
        order = (pos + 1 + torch.arange(self.l, device=x.device)) % self.l
        k_e, v_e = self._compress(
            new["cmp.k_state"][:, order].unsqueeze(1), new["cmp.v_state"][:, order].unsqueeze(1)
        )
        first = pos + 1 - self.l  # start of that block
        emit = (first >= 0) & (first % self.d == 0)
        block = (first // self.d).clamp(min=0)
        new["cmp.k"] = _scatter_rows(cache["cmp.k"], block, k_e, emit)
        new["cmp.v"] = _scatter_rows(cache["cmp.v"], block, v_e, emit)
        n_cmp = new["cmp.k"].shape[1]
        ends = torch.arange(n_cmp, device=x.device) * self.d + self.l - 1
        vis = (ends <= pos).view(1, n_cmp)
        slots = torch.arange(self.window, device=x.device)
        win = torch.where(slots <= pos, slots, -1).view(1, -1)
        n_slc = (new["slc.k"].shape[1] + self.ls - 1) // self.ls
        out = self._attend(
            x,
            q,
            (new["cmp.k"], new["cmp.v"], vis),
            (new["slc.k"], new["slc.v"]),
            (new["win.k"], new["win.v"], win),
            at,
            n_slc,
        )
        return out, new


def _keep_tail(head: Tensor, cache: Tensor, n: int) -> Tensor:
    """cache with its first n rows replaced by head [B,n,..]."""
    return torch.cat((head.to(cache.dtype), cache[:, n:]), dim=1)


def _ring(rows: Tensor, ring: Tensor) -> Tensor:
    """ring [B,w,..] holding the last w of rows [B,T,..] at slot = position % w (rows before 0:
    zeros)."""
    t, w = rows.shape[1], ring.shape[1]
    positions = torch.arange(w, device=rows.device) + t - w  # t−w .. t−1
    last = F.pad(rows, (0,) * (2 * (rows.ndim - 2)) + (w, 0)).index_select(1, positions + w)
    return ring.index_copy(1, positions % w, last.to(ring.dtype))
