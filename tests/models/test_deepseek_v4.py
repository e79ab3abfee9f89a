"""Tests of the DeepSeek-V4 reference model (models/deepseek_v4.py and its parts).

Every numerical test is differential: the model's sparse / batched / functional code against a
plain, separately written formulation (dense masks, per-token loops, one prefill vs token-by-token
decode, eager vs torch.export). Models used here are re-initialised with unit-gain random weights
(`_sensitive_model`) so that every branch (sinks, ape, gate bias, mHC mixing) moves the logits.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim, export

from models.attention import Compressor, Indexer, sparse_attention, topk_visible
from models.deepseek_v4 import Config, Transformer, count_params
from models.hc import hc_head, hc_post, hc_pre, sinkhorn
from models.layers import Rotary, apply_rope
from models.moe import MoE, grouped_mm

CONFIGS = Path("/work/shared/configs")
if not CONFIGS.exists():  # a checkout next to shared/
    CONFIGS = Path(__file__).resolve().parents[3] / "shared" / "configs"

ATOL = 1e-4


def _sensitive_model(cfg: Config, seed: int = 0) -> Transformer:
    """A model whose every parameter matters: matrices N(0, 1/fan_in), non-zero ape / sinks /
    gate biases, mHC gating factors of order 1."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf != "ape":
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif leaf == "ape":
                p.normal_(0.0, 1.0)
            elif leaf in ("attn_sink", "bias"):
                p.normal_(0.0, 0.5)
            elif leaf.endswith("_scale"):
                p.uniform_(0.5, 1.0)
            elif leaf.endswith("_base"):
                p.add_(torch.randn_like(p) * 0.3)
            else:  # norm weights
                p.uniform_(0.8, 1.2)
    return model


def _tokens(cfg: Config, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    return _sensitive_model(Config.preset("tiny"))


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_preset_equals_hf_config(name: str) -> None:
    hf = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = Config.preset(name)
    assert Config.from_hf(hf) == cfg
    flash = name == "v4-flash"
    assert len(cfg.compress_ratios) == cfg.n_layers + 1 == (44 if flash else 62)
    assert cfg.compress_ratios[-1] == 0
    assert cfg.route_scale == (1.5 if flash else 2.5)
    assert cfg.index_topk == (512 if flash else 1024)
    assert (cfg.n_hash_layers, cfg.rope_theta, cfg.compress_rope_theta) == (3, 1e4, 1.6e5)
    assert (cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow) == (
        16.0,
        65536,
        32,
        1,
    )
    counts = {r: cfg.compress_ratios[: cfg.n_layers].count(r) for r in (0, 4, 128)}
    assert counts == ({0: 2, 4: 21, 128: 20} if flash else {0: 0, 4: 30, 128: 31})


def test_from_hf_rejects_unsupported() -> None:
    hf = json.loads((CONFIGS / "v4-flash.json").read_text())
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Config.from_hf({**hf, "num_key_value_heads": 8})
    with pytest.raises(ValueError, match="compress_ratios"):
        Config.preset("tiny").replace(compress_ratios=(0, 4))


@pytest.mark.parametrize(
    "name, total, activated",
    [("v4-flash", 284.33e9, 13.27e9), ("v4-pro", 1573.0e9, 48.85e9)],
)
def test_count_params_matches_spec(name: str, total: float, activated: float) -> None:
    counts = count_params(Config.preset(name))  # builds the model on the meta device
    assert abs(counts["total"] / total - 1) < 1e-3, counts
    assert abs(counts["activated"] / activated - 1) < 1e-3, counts


def test_flash_parameter_names_and_shapes() -> None:
    with torch.device("meta"):
        model = Transformer(Config.preset("v4-flash"))
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    expected = {
        "embed.weight": (129280, 4096),
        "head.weight": (129280, 4096),
        "norm.weight": (4096,),
        "hc_head_fn": (4, 16384),
        "hc_head_base": (4,),
        "hc_head_scale": (1,),
        "layers.0.hc_attn_fn": (24, 16384),
        "layers.0.hc_ffn_base": (24,),
        "layers.0.hc_ffn_scale": (3,),
        "layers.0.attn.wq_a.weight": (1024, 4096),
        "layers.0.attn.q_norm.weight": (1024,),
        "layers.0.attn.wq_b.weight": (32768, 1024),
        "layers.0.attn.wkv.weight": (512, 4096),
        "layers.0.attn.kv_norm.weight": (512,),
        "layers.0.attn.wo_a.weight": (8192, 4096),
        "layers.0.attn.wo_b.weight": (4096, 8192),
        "layers.0.attn.attn_sink": (64,),
        "layers.0.ffn.gate.tid2eid": (129280, 6),
        "layers.2.attn.compressor.wkv.weight": (1024, 4096),
        "layers.2.attn.compressor.wgate.weight": (1024, 4096),
        "layers.2.attn.compressor.ape": (4, 1024),
        "layers.2.attn.compressor.norm.weight": (512,),
        "layers.2.attn.indexer.wq_b.weight": (8192, 1024),
        "layers.2.attn.indexer.weights_proj.weight": (64, 4096),
        "layers.2.attn.indexer.compressor.wkv.weight": (256, 4096),
        "layers.2.attn.indexer.compressor.ape": (4, 256),
        "layers.2.attn.indexer.compressor.norm.weight": (128,),
        "layers.3.attn.compressor.wkv.weight": (512, 4096),
        "layers.3.attn.compressor.ape": (128, 512),
        "layers.3.ffn.gate.weight": (256, 4096),
        "layers.3.ffn.gate.bias": (256,),
        "layers.3.ffn.experts.w1": (256, 2048, 4096),
        "layers.3.ffn.experts.w3": (256, 2048, 4096),
        "layers.3.ffn.experts.w2": (256, 4096, 2048),
        "layers.3.ffn.shared_experts.w1.weight": (2048, 4096),
        "layers.3.ffn.shared_experts.w2.weight": (4096, 2048),
        "mtp.0.e_proj.weight": (4096, 4096),
        "mtp.0.h_proj.weight": (4096, 4096),
        "mtp.0.enorm.weight": (4096,),
        "mtp.0.hnorm.weight": (4096,),
        "mtp.0.norm.weight": (4096,),
        "mtp.0.hc_head_fn": (4, 16384),
        "mtp.0.hc_attn_fn": (24, 16384),
        "mtp.0.attn.wkv.weight": (512, 4096),
        "mtp.0.ffn.gate.bias": (256,),
    }
    assert {n: shapes.get(n) for n in expected} == expected
    assert not any(n.startswith("layers.1.attn.compressor") for n in shapes)  # ratio 0
    assert not any(n.startswith("layers.3.attn.indexer") for n in shapes)  # HCA: no indexer
    assert not any(n.startswith("mtp.0.attn.compressor") for n in shapes)
    assert "layers.2.ffn.gate.bias" not in shapes and "layers.3.ffn.gate.tid2eid" not in shapes
    assert "mtp.0.ffn.gate.tid2eid" not in shapes
    assert model.layers[0].ffn.gate.tid2eid.dtype == torch.int64


def test_init_is_deterministic_and_sane() -> None:
    cfg = Config.preset("tiny")
    torch.manual_seed(3)
    a = Transformer(cfg)
    torch.manual_seed(3)
    b = Transformer(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    table = a.layers[0].ffn.gate.tid2eid
    assert table.shape == (cfg.vocab_size, cfg.n_activated_experts)
    assert all(len(set(row.tolist())) == cfg.n_activated_experts for row in table)
    assert not torch.equal(table, a.layers[1].ffn.gate.tid2eid)
    # mHC starts near identity mixing: comb ≈ diagonal, post ≈ 1, the block input ≈ the stream.
    x = torch.randn(1, 3, 1, cfg.dim).expand(1, 3, cfg.hc_mult, cfg.dim)
    layer = a.layers[1]
    h, post, comb = hc_pre(
        x, layer.hc_attn_fn, layer.hc_attn_scale, layer.hc_attn_base, 20, cfg.hc_eps, 1e-6
    )
    assert comb.diagonal(dim1=-2, dim2=-1).min() > 0.8
    assert (post - 1).abs().max() < 0.2
    torch.testing.assert_close(h, x[:, :, 0], rtol=0.1, atol=0.1)
    logits = a.prefill(_tokens(cfg, 2, 20))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert logits.std() < 5


# ---------------------------------------------------------------------------------------------
# Parts against plain formulations


def test_rope_inverse_and_yarn() -> None:
    plain = Rotary(64, 10000.0)
    yarn = Rotary(64, 160000.0, 16.0, 65536, 32, 1)
    x = torch.randn(5, 3, 512)
    cos, sin = yarn.cos_sin(torch.arange(5) * 1000)
    y = apply_rope(x, cos[:, None], sin[:, None])
    assert torch.equal(y[..., :448], x[..., :448])  # only the last 64 dims rotate
    torch.testing.assert_close(apply_rope(y, cos[:, None], sin[:, None], inverse=True), x)
    # Interleaved pairs: (x0, x1) rotated as a complex number.
    c, s = cos[1, 0], sin[1, 0]
    x0, x1 = x[1, 0, 448], x[1, 0, 449]
    torch.testing.assert_close(y[1, 0, 448:450], torch.stack((x0 * c - x1 * s, x0 * s + x1 * c)))
    base = 1.0 / 160000.0 ** (torch.arange(0, 64, 2) / 64)
    ratio = yarn.inv_freq(torch.device("cpu")) / base
    assert torch.allclose(ratio[:4], torch.ones(4))  # fast dims untouched
    assert torch.allclose(ratio[-4:], torch.full((4,), 1 / 16))  # slow dims interpolated
    torch.testing.assert_close(
        plain.inv_freq(torch.device("cpu")), 1 / 1e4 ** (torch.arange(0, 64, 2) / 64)
    )


def test_hc_matches_loops() -> None:
    torch.manual_seed(0)
    n, d = 4, 8
    x = torch.randn(2, 3, n, d)
    fn, base, scale = torch.randn(24, n * d) * 0.3, torch.randn(24), torch.rand(3) + 0.5
    h, post, comb = hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for b in range(2):
        for t in range(3):
            flat = x[b, t].flatten()
            mix = fn @ flat / flat.square().mean().add(1e-6).sqrt()
            pre = torch.sigmoid(mix[:4] * scale[0] + base[:4]) + 1e-6
            torch.testing.assert_close(h[b, t], sum(pre[j] * x[b, t, j] for j in range(n)))
            torch.testing.assert_close(
                post[b, t], 2 * torch.sigmoid(mix[4:8] * scale[1] + base[4:8])
            )
            m = torch.softmax((mix[8:] * scale[2] + base[8:]).view(4, 4), -1) + 1e-6
            m = m / (m.sum(0) + 1e-6)
            for _ in range(19):
                m = m / (m.sum(1, keepdim=True) + 1e-6)
                m = m / (m.sum(0) + 1e-6)
            torch.testing.assert_close(comb[b, t], m)
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 3, n), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(2, 3, n), atol=1e-3, rtol=0)
    f = torch.randn(2, 3, d)
    out = hc_post(f, x, post, comb)
    for k in range(n):  # output stream k reads column k of comb (combᵀ·X)
        want = post[..., k, None] * f + sum(comb[..., j, k, None] * x[..., j, :] for j in range(n))
        torch.testing.assert_close(out[..., k, :], want)
    fh, bh, sh = torch.randn(n, n * d) * 0.3, torch.randn(n), torch.rand(1)
    flat = x.flatten(2)
    mix = flat @ fh.T / flat.square().mean(-1, keepdim=True).add(1e-6).sqrt()
    pre = torch.sigmoid(mix * sh + bh) + 1e-6
    torch.testing.assert_close(hc_head(x, fh, sh, bh, 1e-6, 1e-6), (pre[..., None] * x).sum(2))
    assert torch.allclose(sinkhorn(torch.zeros(4, 4), 20, 0.0), torch.full((4, 4), 0.25))


@pytest.mark.parametrize("ratio", [4, 8])
def test_compressor_matches_per_block_loop(ratio: int) -> None:
    cfg = Config.preset("tiny")
    torch.manual_seed(ratio)
    rot = Rotary(cfg.rope_head_dim, 160000.0, 16.0)
    comp = Compressor(cfg, ratio, 32, rot)
    with torch.no_grad():
        for p in comp.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 5 * ratio + ratio - 1, cfg.dim)
    got = comp(x)
    assert got.shape == (2, 5, 32)
    kv = x @ comp.wkv.weight.T
    score = x @ comp.wgate.weight.T
    for i in range(5):
        if ratio == 4:  # paper: rows of block i (a half) and block i−1 (b half), one softmax
            rows = [(t, 32, 64) for t in range(i * 4, i * 4 + 4)]
            rows += [(t, 0, 32) for t in range(i * 4 - 4, i * 4) if t >= 0]
        else:
            rows = [(t, 0, 32) for t in range(i * ratio, (i + 1) * ratio)]
        z = torch.stack([score[:, t, lo:hi] + comp.ape[t % ratio, lo:hi] for t, lo, hi in rows], 1)
        v = torch.stack([kv[:, t, lo:hi] for t, lo, hi in rows], 1)
        pooled = (z.softmax(1) * v).sum(1)
        pooled = pooled * torch.rsqrt(pooled.square().mean(-1, keepdim=True) + 1e-6)
        cos, sin = rot.cos_sin(torch.tensor(i * ratio))
        want = apply_rope(pooled * comp.norm.weight, cos, sin)
        torch.testing.assert_close(got[:, i], want, atol=1e-5, rtol=1e-5)


def _dense_attention(q, kv, idx, sink, scale):
    """Full q·kvᵀ over every row of kv with a [B,T,N] mask built from the index sets."""
    b, t, h, _ = q.shape
    mask = torch.zeros(b, t, kv.shape[1] + 1, dtype=torch.bool)
    mask.scatter_(2, torch.where(idx >= 0, idx, kv.shape[1]), True)
    mask = mask[..., :-1]
    scores = torch.einsum("bthc,bnc->bthn", q, kv) * scale
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    scores = torch.cat((scores, sink.view(1, 1, h, 1).expand(b, t, h, 1)), -1)
    return torch.einsum("bthn,bnc->bthc", scores.softmax(-1)[..., :-1], kv)


def test_sparse_attention_matches_dense_mask() -> None:
    torch.manual_seed(0)
    b, t, h, c, n_rows, n = 2, 7, 3, 16, 30, 9
    q, kv, sink = torch.randn(b, t, h, c), torch.randn(b, n_rows, c), torch.randn(h)
    idx = torch.stack([torch.randperm(n_rows)[:n] for _ in range(b * t)]).view(b, t, n)
    idx = idx.masked_fill(torch.rand(b, t, n) < 0.3, -1)
    idx[0, 0] = -1  # a query with nothing but the sink: output 0
    got = sparse_attention(q, kv, idx, sink, c**-0.5)
    torch.testing.assert_close(got, _dense_attention(q, kv, idx, sink, c**-0.5))
    assert got[0, 0].abs().max() == 0


@pytest.mark.parametrize("layer", [0, 1, 2])  # window only, CSA, HCA
def test_attention_layer_matches_dense_rules(tiny: Transformer, layer: int) -> None:
    """The layer's gathered index sets reproduce the visibility rules written as dense masks:
    window t−w < s ≤ t; compressed s < (t+1)//m (all of them for HCA, the indexer's top-k for CSA)."""
    cfg, attn = tiny.cfg, tiny.layers[layer].attn
    torch.manual_seed(1)
    x = torch.randn(2, 45, cfg.dim)
    t, w, m = 45, cfg.window_size, attn.ratio
    with torch.no_grad():
        got = attn(x)
        pos = torch.arange(t)
        cos, sin = attn.rotary.cos_sin(pos)
        cq, q, kv = attn._project(x, cos, sin)
        s = torch.arange(t)
        mask = (s[None] <= pos[:, None]) & (s[None] > pos[:, None] - w)
        mask = mask.expand(2, t, t)
        rows = kv
        if m:
            comp = attn.compressor(x)
            nb = comp.shape[1]
            visible = torch.arange(nb)[None] < ((pos + 1) // m)[:, None]
            cmask = visible.expand(2, t, nb)
            if m == 4:  # the picks must be a top-k of the visible scores (tie-robust check)
                keys = attn.indexer.compressor(x)
                scores = attn.indexer.scores(x, cq, cos, sin, keys)
                picks = topk_visible(scores, visible, cfg.index_topk)
                chosen = torch.zeros(2, t, nb + 1, dtype=torch.bool)
                chosen.scatter_(2, torch.where(picks >= 0, picks, nb), True)
                chosen = chosen[..., :nb]
                assert torch.equal(chosen.sum(-1), visible.sum(-1).clamp(max=4).expand(2, t))
                assert not (chosen & ~visible).any()
                lowest = scores.masked_fill(~chosen, float("inf")).amin(-1)
                highest = scores.masked_fill(chosen | ~visible, float("-inf")).amax(-1)
                assert (lowest >= highest).all()
                cmask = chosen
            mask = torch.cat((mask, cmask), -1)
            rows = torch.cat((kv, comp), 1)
        idx = torch.where(mask, torch.arange(mask.shape[-1]), -1)
        dense = _dense_attention(q, rows, idx, attn.attn_sink, attn.scale)
        want = attn._output(dense, cos, sin)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_depends_on_relative_positions_only(tiny: Transformer) -> None:
    """RoPE on q and on the K = V entries, inverse RoPE on the output: shifting every position by
    the same amount leaves the layer output unchanged (it would not without the inverse)."""
    attn = tiny.layers[0].attn
    torch.manual_seed(2)
    x = torch.randn(1, 12, tiny.cfg.dim)
    pos = torch.arange(12)
    win = pos[:, None] - attn.window + 1 + torch.arange(attn.window)
    idx = win.masked_fill(win < 0, -1)[None]
    outs = []
    with torch.no_grad():
        for shift in (0, 37):
            cos, sin = attn.rotary.cos_sin(pos + shift)
            _, q, kv = attn._project(x, cos, sin)
            o = sparse_attention(q, kv, idx, attn.attn_sink, attn.scale)
            outs.append(attn._output(o, cos, sin))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_topk_visible_pads_with_minus_one() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 5.0], [1.0, 4.0, 2.0, 0.0]])
    visible = torch.tensor([[True, True, True, False], [True, False, False, False]])
    got = topk_visible(scores, visible, 3)
    assert sorted(got[0].tolist()) == [0, 1, 2] and sorted(got[1].tolist()) == [-1, -1, 0]
    assert topk_visible(scores[:, :0], visible[:, :0], 2).tolist() == [[-1, -1], [-1, -1]]


# ---------------------------------------------------------------------------------------------
# MoE


def _moe_reference(moe: MoE, x: torch.Tensor, ids: torch.Tensor, limit: float) -> torch.Tensor:
    """Per token, per picked expert, with the spec's formulas written out."""
    gate, ex, sh = moe.gate, moe.experts, moe.shared_experts
    out = []
    for xt, tid in zip(x.flatten(0, 1), ids.flatten()):
        s = F.softplus(gate.weight @ xt).sqrt()
        if gate.hash_routing:
            picks = gate.tid2eid[tid]
        else:
            picks = (s + gate.bias).topk(gate.topk).indices
        wts = s[picks] / s[picks].sum() * gate.route_scale
        y = torch.zeros_like(xt)
        for e, wt in zip(picks.tolist(), wts):
            g = (ex.w1[e] @ xt).clamp(max=limit)
            u = (ex.w3[e] @ xt).clamp(-limit, limit)
            y = y + ex.w2[e] @ (wt * F.silu(g) * u)
        g = (sh.w1.weight @ xt).clamp(max=limit)
        u = (sh.w3.weight @ xt).clamp(-limit, limit)
        out.append(y + sh.w2.weight @ (F.silu(g) * u))
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("hash_routing", [False, True])
def test_moe_matches_per_token_reference_with_grads(hash_routing: bool) -> None:
    cfg = Config.preset("tiny").replace(swiglu_limit=0.5, n_routed_experts=16)
    torch.manual_seed(0)
    moe = MoE(cfg, hash_routing)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.ndim > 1 else 1.0)
        if hash_routing:
            moe.gate.tid2eid.copy_(torch.rand(cfg.vocab_size, 16).topk(2).indices)
    x = torch.randn(1, 5, cfg.dim, requires_grad=True)  # 10 (token, slot) pairs, 16 experts
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    _, picks = moe.gate(x.detach().flatten(0, 1), ids.flatten())
    assert picks.unique().numel() < 16  # some experts get no token
    got = moe(x, ids)
    want = _moe_reference(moe, x, ids, 0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    params = [x, moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    for name, a, b in zip(["x", "w1", "w2", "w3", "gate"], g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [16, 6])  # 6: strides torch._grouped_mm rejects -> loop fallback
def test_grouped_mm_with_empty_groups_and_grads(dtype: torch.dtype, k: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 8, k, dtype=dtype, requires_grad=True)  # [G, N, K] stacked nn.Linear
    x = torch.randn(7, k, dtype=dtype, requires_grad=True)
    offs = torch.tensor([2, 2, 7, 7], dtype=torch.int32)  # groups 1 and 3 empty
    got = grouped_mm(x, w.transpose(1, 2), offs)
    want = torch.cat((x[:2] @ w[0].T, x[2:7] @ w[2].T))
    bf16 = dtype == torch.bfloat16
    tol = {"atol": 0.05, "rtol": 0.02} if bf16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got, want, **tol)
    dy = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (x, w), dy)
    g_want = torch.autograd.grad(want, (x, w), dy)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **tol)
    assert g_got[1][1].abs().max() == 0 and g_got[1][3].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# Whole model


def _topk_margin(
    model: Transformer, tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> float:
    """Smallest gap between the k-th and (k+1)-th best visible indexer score over every query of
    every CSA layer in one prefill. Prefill and decode compute the scores in different orders
    (rounding ~1e-7), so comparing them is only meaningful when no pick is a near-tie."""
    captured = []
    original = Indexer.scores

    def record(self: Indexer, *args: torch.Tensor) -> torch.Tensor:
        captured.append(original(self, *args))
        return captured[-1]

    monkeypatch.setattr(Indexer, "scores", record)
    with torch.no_grad():
        model.prefill(tokens)
    monkeypatch.undo()
    k, margin = model.cfg.index_topk, math.inf
    for scores in captured:
        t, s = scores.shape[1:]
        visible = torch.arange(s)[None] < ((torch.arange(t) + 1) // 4)[:, None]
        ranked = scores.masked_fill(~visible, float("-inf")).sort(-1, descending=True).values
        crowded = visible.sum(-1) > k  # rows where the indexer has to choose
        if crowded.any():
            margin = min(margin, (ranked[:, crowded, k - 1] - ranked[:, crowded, k]).min().item())
    assert captured and margin < math.inf
    return margin


def test_prefill_then_decode_matches_one_prefill(
    tiny: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefix 13 (no multiple of 4 or 8) then decode 13..47: crosses the window (8) many times,
    ratio-4 and ratio-8 block ends, and the indexer has up to 12 visible entries for 4 picks."""
    cfg = tiny.cfg
    tokens = _tokens(cfg, 2, 48)
    assert _topk_margin(tiny, tokens, monkeypatch) > 1e-4, "top-k near-tie: pick another seed"
    with torch.no_grad():
        full = tiny.prefill(tokens)
        cache = tiny.init_cache(2, 64)
        logits, cache = tiny.prefill(tokens[:, :13], cache)
        torch.testing.assert_close(logits, full[:, :13], atol=ATOL, rtol=0)
        inputs = {k: v.clone() for k, v in cache.items()}
        for p in range(13, 48):
            step, cache = tiny.decode(tokens[:, p : p + 1], torch.tensor(p), cache)
            torch.testing.assert_close(step[:, 0], full[:, p], atol=ATOL, rtol=0, msg=f"pos {p}")
    for k, v in inputs.items():  # decode did not write into its inputs
        assert k in cache and cache[k].shape == v.shape


@pytest.mark.parametrize("prefix", [0, 3])  # no prefill at all; prefill shorter than any block
def test_decode_after_short_or_no_prefill(
    tiny: Transformer, prefix: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny.cfg
    tokens = _tokens(cfg, 1, 20, seed=5)
    assert _topk_margin(tiny, tokens, monkeypatch) > 1e-4, "top-k near-tie: pick another seed"
    with torch.no_grad():
        full = tiny.prefill(tokens)
        cache = tiny.init_cache(1, 32)
        if prefix:
            _, cache = tiny.prefill(tokens[:, :prefix], cache)
        for p in range(prefix, 20):
            names = list(cache)
            step, cache = tiny.decode(tokens[:, p : p + 1], torch.tensor(p), cache)
            assert list(cache) == names  # a flattened cache of one step feeds the next
            torch.testing.assert_close(step[:, 0], full[:, p], atol=ATOL, rtol=0, msg=f"pos {p}")


def test_tiny_512_prefill_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config.preset("tiny-512")
    model = _sensitive_model(cfg, seed=2)
    tokens = _tokens(cfg, 1, 26, seed=3)
    assert _topk_margin(model, tokens, monkeypatch) > 1e-4, "top-k near-tie: pick another seed"
    with torch.no_grad():
        full = model.prefill(tokens)
        logits, cache = model.prefill(tokens[:, :9], model.init_cache(1, 32))
        torch.testing.assert_close(logits, full[:, :9], atol=ATOL, rtol=0)
        for p in range(9, 26):
            step, cache = model.decode(tokens[:, p : p + 1], torch.tensor(p), cache)
            torch.testing.assert_close(step[:, 0], full[:, p], atol=ATOL, rtol=0, msg=f"pos {p}")


def test_causal_and_mtp(tiny: Transformer) -> None:
    cfg = tiny.cfg
    tokens = _tokens(cfg, 2, 40, seed=7)
    changed = tokens.clone()
    changed[:, 30] = (changed[:, 30] + 1) % cfg.vocab_size
    with torch.no_grad():
        logits, mtp = tiny.mtp_logits(tokens)
        logits2, mtp2 = tiny.mtp_logits(changed)
        torch.testing.assert_close(logits, tiny.prefill(tokens))
    assert mtp.shape == (2, 39, cfg.vocab_size) and mtp.dtype == torch.float32
    torch.testing.assert_close(logits2[:, :30], logits[:, :30], atol=1e-5, rtol=0)
    assert (logits2[:, 30] - logits[:, 30]).abs().max() > 1e-3
    torch.testing.assert_close(mtp2[:, :29], mtp[:, :29], atol=1e-5, rtol=0)  # sees ids ≤ t+1
    assert (mtp2[:, 29] - mtp[:, 29]).abs().max() > 1e-3


def test_backward_reaches_every_parameter() -> None:
    cfg = Config.preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = _tokens(cfg, 2, 33)
    logits, mtp = model.mtp_logits(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss = loss + 0.3 * F.cross_entropy(mtp.flatten(0, 1), tokens[:, 2:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        # Selection only, no gradient by design: the router bias and the lightning indexer (the
        # official training fits the indexer with its own auxiliary loss, not modelled here).
        if name.endswith("gate.bias") or ".indexer." in name:
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# torch.export


class _Prefill(torch.nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(tokens)


class _Decode(_Prefill):
    def forward(
        self, token: torch.Tensor, position: torch.Tensor, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.decode(token, position, cache)


def test_export_prefill_dynamic_and_decode(tiny: Transformer) -> None:
    """One prefill graph for symbolic B and T (T >= 2·max ratio: torch specialises sizes 0 and 1
    of the compressed-entry counts), one decode graph for every position."""
    cfg = tiny.cfg
    tokens = _tokens(cfg, 2, 40)
    t_min = 2 * max(cfg.compress_ratios)
    shapes = {"tokens": {0: Dim("B", min=1, max=16), 1: Dim("T", min=t_min, max=cfg.max_seq_len)}}
    ep = export(_Prefill(tiny), (tokens,), dynamic_shapes=shapes, strict=False)
    targets = {str(n.target) for n in ep.graph.nodes}
    assert "dsv4c_models.grouped_mm.default" in targets
    assert not {"aten.nonzero.default", "aten._local_scalar_dense.default"} & targets
    with torch.no_grad():
        for b, t in [(1, 16), (3, 29), (2, 57)]:
            x = _tokens(cfg, b, t, seed=t)
            torch.testing.assert_close(ep.module()(x), tiny.prefill(x), atol=1e-5, rtol=0)

        cache = tiny.init_cache(2, 64)
        _, cache = tiny.prefill(tokens[:, :13], cache)
        dp = export(_Decode(tiny), (tokens[:, 13:14], torch.tensor(13), cache), strict=False)
        run = dp.module()
        exported, eager = dict(cache), dict(cache)
        for p in range(13, 30):
            a, exported = run(tokens[:, p : p + 1], torch.tensor(p), exported)
            b, eager = tiny.decode(tokens[:, p : p + 1], torch.tensor(p), eager)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"pos {p}")


@pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="~75 s on 2 cores; set DSV4C_SLOW=1")
def test_export_flash_prefill_on_meta() -> None:
    with torch.device("meta"):
        model = Transformer(Config.preset("v4-flash")).to(torch.bfloat16)
    tokens = torch.zeros(2, 512, dtype=torch.int64, device="meta")
    shapes = {"tokens": {0: Dim("B", max=64), 1: Dim("T", min=256, max=65536)}}
    ep = export(_Prefill(model), (tokens,), dynamic_shapes=shapes, strict=False)
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0][0].meta["val"]
    assert out.dtype == torch.float32 and out.shape[-1] == 129280


def test_from_hf_reads_the_transformers_5_config_spelling() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV4Config(
        num_hidden_layers=3,
        layer_types=[
            "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
        ],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        mlp_layer_types=["hash_moe", "hash_moe", "moe"],
    ).to_dict()
    cfg = Config.from_hf(hf)
    assert (cfg.compress_ratios, cfg.n_hash_layers) == ((0, 4, 128, 0), 2)  # + the MTP layer
    with pytest.raises(ValueError, match="mlp_layer_types"):
        Config.from_hf({**hf, "mlp_layer_types": ["moe", "hash_moe", "moe"]})
    with pytest.raises(ValueError, match=r"layer_types\[1\]"):
        kinds = ["sliding_attention", "full_attention", "sliding_attention"]
        Config.from_hf({**hf, "layer_types": kinds})
