"""DeepSeek-V4 (Flash / Pro) reference model in plain PyTorch — v4-architecture.md §3.

Public API (stable):

    Config, Config.preset(name), Config.from_hf(config_json_dict)      (models/config.py)
    Transformer(cfg)
        .prefill(tokens [B,T] int64) -> logits [B,T,V] fp32            (also .forward)
        .prefill(tokens, cache) -> (logits, cache)                     fills a cache from position 0
        .init_cache(batch, max_len) -> cache                           dict[str, Tensor]
        .decode(token [B,1] int64, position 0-d int64, cache) -> (logits [B,1,V], cache)
        .mtp_logits(tokens [B,T]) -> (logits [B,T,V], mtp_logits [B,T-1,V])
    count_params(cfg) -> {"total": int, "activated": int}

Numerics: the model computes in its parameters' dtype (`embed.weight.dtype`); the router, the
compressors' pooling, the mHC mixing, softmaxes and the LM head run in fp32. FP8/FP4 QAT
fake-quantisation and the indexer's Hadamard rotation are omitted (the rotation is orthogonal on
both sides of a dot product, so it cancels exactly without quantisation); there is no flag.

Cache: one dict, keys `layers.{i}.attn.<entry>` with the entries listed in models/attention.py
(`window_kv`, `compressor.kv_state`, `compressor.score_state`, `compressed_kv`, `indexer.keys`,
`indexer.compressor.kv_state`, `indexer.compressor.score_state`); the attention variants
(Config.attention "dsa" / "nsa") list theirs in models/attention_dsa.py / attention_nsa.py.
`decode` is functional: it returns a new tensor for every entry and never mutates its inputs, so
torch.export captures it as a pure function of (token, position, cache); all batch rows share one position. Positions must
stay below the `max_len` given to init_cache (not checked: no host syncs in decode). The MTP
module is not part of decode.

torch.export: `prefill(tokens)` exports as one graph with symbolic B and T (non-strict export)
for T >= 2 * max(compress_ratios): torch specialises compressed-entry counts of 0 and 1, so
shorter prompts need their own graph (or right-padding: the model is causal, so logits of the
real positions do not change). `decode` exports as one graph for every position; the MoE uses the
custom op `dsv4c_models::grouped_mm` (models/moe.py), which has a fake kernel and autograd.

MTP (depth 1): `mtp_logits` runs the main model, then the module `mtp.0` on the main residual
streams of positions 0..T-2 combined with the embeddings of tokens 1..T-1; mtp_logits[:, t]
predicts tokens[:, t + 2]. It shares `embed` and `head` with the main model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import Attention
from models.attention_dsa import DSAttention
from models.attention_nsa import NSAttention
from models.config import Config
from models.hc import hc_head, hc_post, hc_pre
from models.layers import RMSNorm
from models.moe import MoE

__all__ = ["Config", "Transformer", "count_params"]

Cache = dict[str, Tensor]

# Initial mHC gating factors α: small, so that the token-dependent part of pre/post/comb starts as
# a perturbation of the static biases (spec §8: comb ≈ identity, pre ≈ 1/n each, post ≈ 1).
HC_SCALE_INIT = 0.1
HC_COMB_DIAG_INIT = 4.0  # row-softmax of [4, 0, 0, 0] puts 0.95 on the diagonal


def _sub(cache: Cache, prefix: str) -> Cache:
    return {k[len(prefix) :]: v for k, v in cache.items() if k.startswith(prefix)}


def _add_prefix(entries: Cache, prefix: str) -> Cache:
    return {prefix + k: v for k, v in entries.items()}


def _attention(cfg: Config, layer_id: int) -> nn.Module:
    """The layer's attention by cfg.attention: V4's CSA/HCA/SWA by ratio, or a DSA / NSA layer."""
    if cfg.attention == "dsa":
        return DSAttention(cfg)
    if cfg.attention == "nsa":
        return NSAttention(cfg)
    return Attention(cfg, cfg.compress_ratios[layer_id])


class Block(nn.Module):
    """One transformer block: mHC around attention, then mHC around the MoE."""

    def __init__(self, cfg: Config, layer_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        d, n = cfg.dim, cfg.hc_mult
        mix = (2 + n) * n
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = _attention(cfg, layer_id)
        self.ffn = MoE(cfg, hash_routing=layer_id < cfg.n_hash_layers)
        self.hc_attn_fn = nn.Parameter(torch.empty(mix, n * d, dtype=torch.float32))
        self.hc_attn_base = nn.Parameter(torch.empty(mix, dtype=torch.float32))
        self.hc_attn_scale = nn.Parameter(torch.empty(3, dtype=torch.float32))
        self.hc_ffn_fn = nn.Parameter(torch.empty(mix, n * d, dtype=torch.float32))
        self.hc_ffn_base = nn.Parameter(torch.empty(mix, dtype=torch.float32))
        self.hc_ffn_scale = nn.Parameter(torch.empty(3, dtype=torch.float32))

    def _pre(
        self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        return hc_pre(x, fn, scale, base, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps)

    def _ffn(self, x: Tensor, ids: Tensor) -> Tensor:
        h, post, comb = self._pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        return hc_post(self.ffn(self.ffn_norm(h), ids), x, post, comb)

    def forward(self, x: Tensor, ids: Tensor, cache: Cache | None = None) -> tuple[Tensor, Cache]:
        """Prefill. x [B,T,n,d] streams, ids [B,T] -> (streams, this layer's new cache entries;
        empty without a cache)."""
        h, post, comb = self._pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        h = self.attn_norm(h)
        if cache is None:
            out, new = self.attn(h), {}
        else:
            out, new = self.attn(h, cache)
        x = hc_post(out, x, post, comb)
        return self._ffn(x, ids), new

    def decode(self, x: Tensor, ids: Tensor, pos: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        """One position: x [B,1,n,d], ids [B,1], pos 0-d -> (streams, new cache entries)."""
        h, post, comb = self._pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        out, new = self.attn.decode(self.attn_norm(h), pos, cache)
        x = hc_post(out, x, post, comb)
        return self._ffn(x, ids), new


class MTPBlock(Block):
    """Multi-token-prediction module: a ratio-0, score-routed Block plus its input projections and
    its own hc_head / final norm. Its parameters sit directly under `mtp.{k}.`."""

    def __init__(self, cfg: Config, layer_id: int) -> None:
        super().__init__(cfg, layer_id)
        d, n = cfg.dim, cfg.hc_mult
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, cfg.norm_eps)
        self.hnorm = RMSNorm(d, cfg.norm_eps)
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def combine(self, streams: Tensor, emb: Tensor) -> Tensor:
        """streams [B,T,n,d] (main model, before its head), emb [B,T,d] (next tokens) ->
        e_proj(enorm(emb)) added to every stream of h_proj(hnorm(streams))."""
        return self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(streams))


class Transformer(nn.Module):
    """DeepSeek-V4: embedding -> n_hc streams -> blocks -> hc_head -> norm -> fp32 LM head.
    See the module docstring for the methods' contracts."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        d, n = cfg.dim, cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp_layers))
        self.reset_parameters()

    # --- initialisation (spec §8; the official init is unpublished) ----------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deterministic given torch.manual_seed (and cfg.seed for the hash tables): projections
        N(0, init_std); norms 1; ape, sinks, gate biases 0; mHC near the identity mixing."""
        n = self.cfg.hc_mult
        pre_base = math.log(1.0 / (n - 1))  # sigmoid(pre_base) = 1/n: x = mean of the streams
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf in ("ape", "attn_sink", "bias"):
                p.zero_()
            elif leaf.endswith("_scale"):
                p.fill_(HC_SCALE_INIT)
            elif leaf.endswith("_base"):
                p.zero_()  # post: 2·sigmoid(0) = 1; comb off-diagonal 0
                p[:n] = pre_base
                if p.numel() > n:
                    p[2 * n :].view(n, n).diagonal().fill_(HC_COMB_DIAG_INIT)
            else:
                p.normal_(0.0, self.cfg.init_std)
        for i, layer in enumerate(self.layers):
            table = getattr(layer.ffn.gate, "tid2eid", None)
            if table is None or table.is_meta:
                continue
            gen = torch.Generator().manual_seed(self.cfg.seed * 100003 + i)
            noise = torch.rand(table.shape[0], self.cfg.n_routed_experts, generator=gen)
            table.copy_(noise.topk(table.shape[1], dim=-1).indices)  # distinct experts per id

    # --- forward paths ---------------------------------------------------------------------------

    def _streams(self, tokens: Tensor) -> Tensor:
        return self.embed(tokens).unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)

    def _logits(self, x: Tensor, head_owner: nn.Module) -> Tensor:
        """hc_head (with head_owner's hc_head_* and norm) then the shared fp32 LM head."""
        c = self.cfg
        y = hc_head(
            x,
            head_owner.hc_head_fn,
            head_owner.hc_head_scale,
            head_owner.hc_head_base,
            c.hc_eps,
            c.norm_eps,
        )
        y = head_owner.norm(y)
        return F.linear(y.float(), self.head.weight.float())

    def forward(self, tokens: Tensor) -> Tensor:
        return self.prefill(tokens)

    def prefill(self, tokens: Tensor, cache: Cache | None = None) -> Tensor | tuple[Tensor, Cache]:
        """tokens [B,T] from position 0 -> logits [B,T,V] fp32; with a cache (from init_cache,
        max_len >= T) -> (logits, filled cache) ready for decode at position T."""
        x = self._streams(tokens)
        new: Cache = {}
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}.attn."
            x, entries = layer(x, tokens, None if cache is None else _sub(cache, prefix))
            new.update(_add_prefix(entries, prefix))
        logits = self._logits(x, self)
        return logits if cache is None else (logits, new)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        """Zeroed decode state for `batch` sequences of up to `max_len` tokens."""
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        cache: Cache = {}
        for i, layer in enumerate(self.layers):
            entries = layer.attn.init_cache(batch, max_len, dtype, device)
            cache.update(_add_prefix(entries, f"layers.{i}.attn."))
        return cache

    def decode(self, token: Tensor, position: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        """token [B,1] int64 at 0-d int64 `position` -> (logits [B,1,V] fp32, new cache)."""
        x = self._streams(token)
        new: Cache = {}
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}.attn."
            x, entries = layer.decode(x, token, position, _sub(cache, prefix))
            new.update(_add_prefix(entries, prefix))
        # Same key order as the input, so the flattened cache of one step feeds the next.
        return self._logits(x, self), {name: new[name] for name in cache}

    def mtp_logits(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B,T] -> (main logits [B,T,V], MTP logits [B,T-1,V]); mtp_logits[:, t] predicts
        tokens[:, t+2] from the main streams at t and the embedding of tokens[:, t+1]."""
        if not self.mtp:
            raise ValueError("mtp_logits: this Config has n_mtp_layers = 0")
        x = self._streams(tokens)
        for layer in self.layers:
            x, _ = layer(x, tokens)
        logits = self._logits(x, self)
        mtp, nxt = self.mtp[0], tokens[:, 1:]
        y, _ = mtp(mtp.combine(x[:, :-1], self.embed(nxt)), nxt)
        return logits, self._logits(y, mtp)


def count_params(cfg: Config) -> dict[str, int]:
    """Parameter counts of the main model (no MTP), built on the meta device. "activated" counts
    everything except routed experts, plus n_activated_experts experts per layer, and excludes
    the input embedding (the convention of the DeepSeek-V4 paper, spec §4)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = activated = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        total += p.numel()
        if name == "embed.weight":
            continue
        if ".ffn.experts." in name:
            activated += p.numel() // cfg.n_routed_experts * cfg.n_activated_experts
        else:
            activated += p.numel()
    return {"total": total, "activated": activated}
