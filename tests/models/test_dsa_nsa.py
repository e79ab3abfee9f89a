"""Tests of the attention variants `Config(attention="dsa" | "nsa")` (models/attention_dsa.py,
models/attention_nsa.py).

Differential throughout: DSA against Hugging Face's DeepseekV32Attention on the same weights
(random, tiny, no download); NSA against a dense-mask formulation written here from the paper's
definitions (per-block loops, Python sets for the block selection); both models' token-by-token
decode against one prefill, and torch.export against eager. Inputs avoid top-k ties: every test
that depends on a selection first asserts a margin between the last pick and the first non-pick.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim, export

import models.attention_dsa as dsa_mod
import models.attention_nsa as nsa_mod
from models.attention_dsa import DSAttention
from models.attention_nsa import NSAttention
from models.deepseek_v4 import Config, Transformer, count_params
from models.layers import apply_rope

ATOL = 1e-4


def _sensitive(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-initialise so that every parameter moves the output: matrices N(0, 1/fan_in), biases
    and position embeddings of order 1, norm weights near 1, mHC gating factors of order 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("_pe"):
                p.normal_(0.0, 0.5)
            elif p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif leaf == "bias":
                p.normal_(0.0, 0.5)
            elif leaf.endswith("_scale"):
                p.uniform_(0.5, 1.0)
            elif leaf.endswith("_base"):
                p.add_(torch.randn_like(p) * 0.3)
            else:  # norm weights
                p.uniform_(0.8, 1.2)
    return model.eval()


def _model(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return _sensitive(Transformer(Config.preset(name)), seed)


def _tokens(cfg: Config, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)


class _TopkLog:
    """Records every (scores, visible, k) passed to topk_visible by one variant's module."""

    def __init__(self, module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        original = module.topk_visible

        def spy(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
            self.calls.append((scores.detach().clone(), visible.clone(), k))
            return original(scores, visible, k)

        monkeypatch.setattr(module, "topk_visible", spy)

    def margin(self) -> float:
        """Smallest gap between the k-th and (k+1)-th visible score over rows that must choose
        (more than k visible); inf when no row had to choose."""
        gap = math.inf
        for scores, visible, k in self.calls:
            masked = scores.float().masked_fill(~visible, float("-inf"))
            ranked = masked.sort(-1, descending=True).values
            crowded = visible.expand_as(masked).sum(-1) > k
            if crowded.any():
                gap = min(gap, (ranked[..., k - 1] - ranked[..., k])[crowded].min().item())
        return gap


# ---------------------------------------------------------------------------------------------
# Config and parameter counts


def test_config_validates_variants() -> None:
    tiny = Config.preset("tiny")
    assert tiny.attention == "csa"
    with pytest.raises(ValueError, match="attention='mla' is unknown"):
        tiny.replace(attention="mla")
    with pytest.raises(ValueError, match="needs every compress_ratios entry 0"):
        Config.preset("tiny-dsa").replace(compress_ratios=(4, 0, 0))
    with pytest.raises(ValueError, match="kv_lora_rank"):
        Config.preset("tiny-dsa").replace(kv_lora_rank=0)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Config.preset("tiny-nsa").replace(n_kv_heads=3)
    with pytest.raises(ValueError, match="nsa_cmp_stride"):
        Config.preset("tiny-nsa").replace(nsa_cmp_stride=3)
    with pytest.raises(ValueError, match="nsa_slc_topn"):
        Config.preset("tiny-nsa").replace(nsa_slc_topn=2)


def _dsa_layer_params(c: Config) -> int:
    h, n, r, lat, v = (
        c.n_heads,
        c.head_dim - c.rope_head_dim,
        c.rope_head_dim,
        c.kv_lora_rank,
        c.v_head_dim,
    )
    mla = c.dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * (n + r)
    mla += c.dim * (lat + r) + lat + lat * h * (n + v) + h * v * c.dim
    ni, di = c.index_n_heads, c.index_head_dim
    return mla + c.q_lora_rank * ni * di + c.dim * di + 2 * di + c.dim * ni


def _nsa_layer_params(c: Config) -> int:
    g, dk, dv, l = c.n_kv_heads, c.head_dim, c.v_head_dim, c.nsa_cmp_block
    branches = 3 * c.dim * g * (dk + dv)
    return (
        c.dim * c.n_heads * dk
        + branches
        + l * (dk + dv)
        + l * (dk * dk + dv * dv)
        + (c.dim * 3 * c.n_heads + c.n_heads * dv * c.dim)
    )


@pytest.mark.parametrize("backbone", ["v4-flash", "v4-pro"])
def test_count_params_full_size_variants(backbone: str) -> None:
    """A variant's total = the V4 backbone's total with every main-layer attention swapped for
    the per-layer count written out above; the routed experts are untouched."""
    base = Config.preset(backbone)
    with torch.device("meta"):
        base_model = Transformer(base)
    base_attn = sum(
        p.numel() for n, p in base_model.named_parameters() if ".attn." in n and "mtp." not in n
    )
    base_counts = count_params(base)
    for variant, layer_params in (("dsa", _dsa_layer_params), ("nsa", _nsa_layer_params)):
        cfg = Config.preset(f"{backbone}-{variant}")
        counts = count_params(cfg)
        expected = base_counts["total"] - base_attn + cfg.n_layers * layer_params(cfg)
        assert counts["total"] == expected, (variant, counts, expected)
        routed = counts["total"] - counts["activated"]
        assert routed == base_counts["total"] - base_counts["activated"], variant


# ---------------------------------------------------------------------------------------------
# DSA against Hugging Face DeepseekV32


def _hf_attention(cfg: Config, yarn: bool):
    from transformers.models.deepseek_v32.configuration_deepseek_v32 import DeepseekV32Config
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import (
        DeepseekV32Attention,
        DeepseekV32RotaryEmbedding,
    )

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if yarn:
        rope = {
            **rope,
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    hf_cfg = DeepseekV32Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=1,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_rope_head_dim=cfg.rope_head_dim,
        qk_nope_head_dim=cfg.head_dim - cfg.rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters=rope,
    )
    hf_cfg._attn_implementation = "eager"
    return DeepseekV32Attention(hf_cfg, 0).eval(), DeepseekV32RotaryEmbedding(hf_cfg)


# ours -> HF DeepseekV32Attention (the official V3.2 inference names on the left)
_HF_NAMES = {
    "wq_a.weight": "q_a_proj.weight",
    "q_norm.weight": "q_a_layernorm.weight",
    "wq_b.weight": "q_b_proj.weight",
    "wkv_a.weight": "kv_a_proj_with_mqa.weight",
    "kv_norm.weight": "kv_a_layernorm.weight",
    "wkv_b.weight": "kv_b_proj.weight",
    "wo.weight": "o_proj.weight",
    "indexer.wq_b.weight": "indexer.wq_b.weight",
    "indexer.wk.weight": "indexer.wk.weight",
    "indexer.k_norm.weight": "indexer.k_norm.weight",
    "indexer.k_norm.bias": "indexer.k_norm.bias",
    "indexer.weights_proj.weight": "indexer.weights_proj.weight",
}


@pytest.mark.parametrize("yarn", [False, True])
def test_dsa_matches_hf_deepseek_v32_attention(yarn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same weights, same input: our DSA layer == DeepseekV32Attention (eager, additive top-k
    mask). Positive inputs and index weights_proj make every index head's weight positive, so
    scores tie only when all 16 ReLUs are 0; the margin check rules that out for this seed."""
    cfg = Config.preset("tiny-dsa")
    if yarn:  # positions beyond original_seq_len, YaRN ramp and mscale² in the softmax scale
        cfg = cfg.replace(rope_factor=4.0, original_seq_len=16)
    ours = _sensitive(DSAttention(cfg), seed=3)
    with torch.no_grad():
        ours.indexer.weights_proj.weight.abs_()
    hf, rotary = _hf_attention(cfg, yarn)
    mapped = {_HF_NAMES[n]: p for n, p in ours.state_dict().items()}
    assert set(mapped) == set(hf.state_dict()), "weight map incomplete"
    hf.load_state_dict(mapped)

    b, t = 2, 40
    x = torch.rand(b, t, cfg.dim, generator=torch.Generator().manual_seed(4))
    log = _TopkLog(dsa_mod, monkeypatch)
    with torch.no_grad():
        out = ours(x)
        pos_ids = torch.arange(t).expand(b, t)
        cos_sin = rotary(x, pos_ids)
        causal = torch.full((t, t), float("-inf")).triu(1).expand(b, 1, t, t)
        ref, _ = hf(x, cos_sin, causal, position_ids=pos_ids)
    assert log.margin() > 1e-5, "top-k near-tie: pick another seed"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    # The selection matters: with top-k >= T the same layer is dense causal MLA and differs.
    ours.indexer.topk = t
    with torch.no_grad():
        full = ours(x)
    assert (full - out).abs().max() > 1e-2


def test_sparse_mla_equals_expanded_mla() -> None:
    """The absorbed form (MQA over [latent, pe] rows) equals MLA with per-head keys and values
    expanded from the latent, on a dense causal mask."""
    cfg = Config.preset("tiny-dsa").replace(index_topk=64)  # every token: a dense causal layer
    layer = _sensitive(DSAttention(cfg), seed=5)
    x = torch.randn(1, 12, cfg.dim, generator=torch.Generator().manual_seed(6))
    h, n, r = cfg.n_heads, cfg.head_dim - cfg.rope_head_dim, cfg.rope_head_dim
    with torch.no_grad():
        cos, sin = layer.rotary.cos_sin(torch.arange(12))
        q = layer.wq_b(layer.q_norm(layer.wq_a(x))).unflatten(-1, (h, n + r))
        q = apply_rope(q, cos[:, None], sin[:, None])
        latent, pe = layer.wkv_a(x).split((cfg.kv_lora_rank, r), dim=-1)
        kv = layer.wkv_b(layer.kv_norm(latent)).unflatten(-1, (h, -1))
        k = torch.cat((kv[..., :n], apply_rope(pe, cos, sin)[:, :, None].expand(-1, -1, h, -1)), -1)
        mask = torch.ones(12, 12, dtype=torch.bool).tril()
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            kv[..., n:].transpose(1, 2),
            mask,
            scale=layer.scale,
        )
        ref = layer.wo(o.transpose(1, 2).flatten(2))
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# NSA against a dense-mask formulation


def _nsa_dense(m: NSAttention, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NSA from the paper's definitions with [T, T] / [T, N] masks and per-row Python selection.
    -> (out, {branch: its gated contribution before wo, [B,T,H,dv]}, {"free_margin": gap})."""
    c = m.cfg
    b, t, _ = x.shape
    h, g, dk, dv = c.n_heads, c.n_kv_heads, c.head_dim, c.v_head_dim
    hg, l, d, ls, w = h // g, c.nsa_cmp_block, c.nsa_cmp_stride, c.nsa_slc_block, c.window_size
    cos, sin = m.rotary.cos_sin(torch.arange(t))
    q = apply_rope(m.wq(x).view(b, t, h, dk), cos[:, None], sin[:, None])

    def branch(name: str) -> tuple[torch.Tensor, torch.Tensor]:  # per head: [B,T,H,..]
        k = apply_rope(getattr(m, f"wk_{name}")(x).view(b, t, g, dk), cos[:, None], sin[:, None])
        v = getattr(m, f"wv_{name}")(x).view(b, t, g, dv)
        return k.repeat_interleave(hg, 2), v.repeat_interleave(hg, 2)

    def attend(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """k/v [B,N,H,..], mask [B,H,T,N] -> (o [B,T,H,dv], probs [B,H,T,N]; empty rows 0)."""
        scores = torch.einsum("bthc,bnhc->bhtn", q, k) * dk**-0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        return torch.einsum("bhtn,bnhc->bthc", probs, v), probs

    # Compressed branch: complete blocks only, φ applied block by block.
    k_raw, v_raw = branch("cmp")
    starts = list(range(0, t - l + 1, d))
    k_c = torch.stack(
        [
            m.cmp_wk((k_raw[:, s : s + l] + m.cmp_k_pe[:, None]).transpose(1, 2).flatten(2))
            for s in starts
        ],
        1,
    )
    v_c = torch.stack(
        [
            m.cmp_wv((v_raw[:, s : s + l] + m.cmp_v_pe[:, None]).transpose(1, 2).flatten(2))
            for s in starts
        ],
        1,
    )
    ends = torch.tensor([s + l - 1 for s in starts])
    cmp_mask = (ends[None, :] <= torch.arange(t)[:, None]).expand(b, h, t, len(starts))
    o_cmp, p_cmp = attend(k_c, v_c, cmp_mask)

    # Selection: overlap sums, group sums, forced initial + 2 local blocks, then by importance.
    n_slc = -(-t // ls)
    covers = [
        [i for i, s in enumerate(starts) if set(range(s, s + l)) & set(range(j * ls, j * ls + ls))]
        for j in range(n_slc)
    ]
    slc_mask = torch.zeros(b, h, t, t, dtype=torch.bool)
    margin = math.inf
    for bi in range(b):
        for gi in range(g):
            p_group = p_cmp[bi, gi * hg : (gi + 1) * hg].sum(0)  # [T, N]
            for ti in range(t):
                visible = [j for j in range(n_slc) if j * ls <= ti]
                forced = {0, ti // ls, ti // ls - 1} & set(visible)
                free = sorted(
                    ((p_group[ti, covers[j]].sum().item(), j) for j in visible if j not in forced),
                    reverse=True,
                )
                room = c.nsa_slc_topn - len(forced)
                if 0 < room < len(free):
                    margin = min(margin, free[room - 1][0] - free[room][0])
                chosen = forced | {j for _, j in free[:room]}
                for j in chosen:
                    slc_mask[bi, gi * hg : (gi + 1) * hg, ti, j * ls : min(j * ls + ls, ti + 1)] = (
                        True
                    )
    o_slc, _ = attend(*branch("slc"), slc_mask)

    s, tt = torch.arange(t)[None, :], torch.arange(t)[:, None]
    o_win, _ = attend(*branch("win"), ((s <= tt) & (s > tt - w)).expand(b, h, t, t))

    gates = torch.sigmoid(m.wgate(x)).view(b, t, h, 3)
    parts = {
        "cmp": gates[..., 0:1] * o_cmp,
        "slc": gates[..., 1:2] * o_slc,
        "win": gates[..., 2:3] * o_win,
    }
    out = m.wo((parts["cmp"] + parts["slc"] + parts["win"]).flatten(2))
    return out, parts, margin


def test_nsa_matches_dense_mask_formulation() -> None:
    cfg = Config.preset("tiny-nsa")
    layer = _sensitive(NSAttention(cfg), seed=7)
    x = torch.randn(2, 56, cfg.dim, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = layer(x)
        ref, parts, margin = _nsa_dense(layer, x)
    assert margin > 1e-5, "selection near-tie: pick another seed"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    # Every branch and every gate moves the output well above the tolerance: a bug in any of
    # them would fail the comparison above.
    for name, part in parts.items():
        assert layer.wo(part.flatten(2)).abs().max() > 50 * ATOL, name
    # Selection really chooses (56 tokens = 7 blocks > top-5) ...
    assert margin < math.inf
    # ... and its choice matters: picking every visible block changes the output.
    layer.topn = 7
    with torch.no_grad():
        assert (layer(x) - out).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Whole models: prefill / decode consistency, export


@pytest.mark.parametrize("name", ["tiny-dsa", "tiny-nsa"])
def test_prefill_then_decode_matches_one_prefill(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefix 37 then decode 37..47 (DSA: top-6 of up to 48 tokens; NSA: 5..6 selection blocks
    for top-5, compressed blocks completing every 4 tokens, the window wrapping)."""
    model = _model(name)
    cfg = model.cfg
    tokens = _tokens(cfg, 2, 48)
    module = dsa_mod if cfg.attention == "dsa" else nsa_mod
    log = _TopkLog(module, monkeypatch)
    with torch.no_grad():
        full = model.prefill(tokens)
        margin = log.margin()
        assert 1e-5 < margin < math.inf, "top-k near-tie (or nothing to choose): pick another seed"
        cache = model.init_cache(2, 64)
        logits, cache = model.prefill(tokens[:, :37], cache)
        torch.testing.assert_close(logits, full[:, :37], atol=ATOL, rtol=0)
        names = list(cache)
        for p in range(37, 48):
            step, cache = model.decode(tokens[:, p : p + 1], torch.tensor(p), cache)
            assert list(cache) == names
            torch.testing.assert_close(step[:, 0], full[:, p], atol=ATOL, rtol=0, msg=f"pos {p}")
    assert log.margin() > 1e-5


@pytest.mark.parametrize("name", ["tiny-dsa", "tiny-nsa"])
def test_decode_from_empty_cache(name: str) -> None:
    model = _model(name, seed=1)
    tokens = _tokens(model.cfg, 1, 12, seed=5)
    with torch.no_grad():
        full = model.prefill(tokens)
        cache = model.init_cache(1, 16)
        for p in range(12):
            step, cache = model.decode(tokens[:, p : p + 1], torch.tensor(p), cache)
            torch.testing.assert_close(step[:, 0], full[:, p], atol=ATOL, rtol=0, msg=f"pos {p}")


class _Prefill(torch.nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(tokens)


class _Decode(_Prefill):
    def forward(self, token, position, cache):  # type: ignore[override]
        return self.model.decode(token, position, cache)


@pytest.mark.skipif(
    not os.environ.get("DSV4C_SLOW"), reason="60-130 s each on 2 cores; DSV4C_SLOW=1"
)
@pytest.mark.parametrize("name", ["tiny-dsa", "tiny-nsa"])
def test_export_prefill_dynamic_and_decode(name: str) -> None:
    """One prefill graph for symbolic B and T, one decode graph for every position."""
    model = _model(name)
    cfg = model.cfg
    tokens = _tokens(cfg, 2, 40)
    t_min = 2 * max(cfg.nsa_cmp_block, cfg.nsa_slc_block) if cfg.attention == "nsa" else 2
    shapes = {"tokens": {0: Dim("B", min=1, max=16), 1: Dim("T", min=t_min, max=cfg.max_seq_len)}}
    ep = export(_Prefill(model), (tokens,), dynamic_shapes=shapes, strict=False)
    targets = {str(n.target) for n in ep.graph.nodes}
    assert not {"aten.nonzero.default", "aten._local_scalar_dense.default"} & targets
    with torch.no_grad():
        for b, t in [(1, 17), (3, 29)]:
            x = _tokens(cfg, b, t, seed=t)
            torch.testing.assert_close(ep.module()(x), model.prefill(x), atol=1e-5, rtol=0)
        cache = model.init_cache(2, 48)
        _, cache = model.prefill(tokens[:, :13], cache)
        run = export(_Decode(model), (tokens[:, 13:14], torch.tensor(13), cache), strict=False)
        exported, eager = dict(cache), dict(cache)
        for p in range(13, 18):
            a, exported = run.module()(tokens[:, p : p + 1], torch.tensor(p), exported)
            b_, eager = model.decode(tokens[:, p : p + 1], torch.tensor(p), eager)
            torch.testing.assert_close(a, b_, atol=1e-5, rtol=0, msg=f"pos {p}")
