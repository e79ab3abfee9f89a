"""Other spellings of the computations the semantic fusions recognise (captured from small torch
modules, canonicalised), and look-alikes that must stay unfused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from passes_helpers import RouteBiasSubtracted, route_args
from torch import Tensor, nn

import ir
import models.attention as attention_module
import passes
from frontend import capture
from models.attention import Attention, Compressor, Indexer, sparse_attention, topk_visible
from models.config import Config
from models.hc import hc_head, hc_post, hc_pre
from models.layers import apply_rope
from models.moe import Experts, MoE, grouped_mm
from passes.fuse_attention import fuse_attention
from passes.fuse_hc import fuse_hc
from passes.fuse_moe import fuse_moe


def fused(module: nn.Module, args: tuple, fuse, dynamic=None) -> tuple[int, list]:
    """Capture, canonicalise, fuse; -> (fusions fired, max |before - after| per output)."""
    g = passes.canonicalize(capture(module, args, dynamic=dynamic))
    ctx = passes.PassContext()
    out = fuse(g, ctx)
    ir.verify(out)
    before, after = ir.interpret(g, *args), ir.interpret(out, *args)
    diffs = []
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        diffs.append((a.double() - b.double()).abs().max().item() if a.numel() else 0.0)
    return sum(v for k, v in ctx.counters.items() if k.startswith("fuse_")), diffs


# --- hc.post ---------------------------------------------------------------------------------


class PostEinsum(nn.Module):
    def forward(self, f: Tensor, r: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        return hc_post(f, r, post, comb)


class PostMatmul(nn.Module):
    def forward(self, f: Tensor, r: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        return post.unsqueeze(-1) * f.unsqueeze(-2) + comb.transpose(-1, -2) @ r


class PostBmm(nn.Module):
    def forward(self, f: Tensor, r: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        n, d = r.shape[-2:]
        carried = torch.bmm(comb.mT.reshape(-1, n, n), r.reshape(-1, n, d)).view(r.shape)
        return carried + post[..., None] * f[..., None, :]


class PostNoTranspose(nn.Module):  # comb·R instead of combᵀ·R: not mHC post
    def forward(self, f: Tensor, r: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        return post.unsqueeze(-1) * f.unsqueeze(-2) + comb @ r


def post_args() -> tuple:
    gen = torch.Generator().manual_seed(0)
    shapes = ((2, 5, 8), (2, 5, 4, 8), (2, 5, 4), (2, 5, 4, 4))
    return tuple(torch.randn(s, generator=gen) for s in shapes)


def test_hc_post_spellings() -> None:
    for module in (PostEinsum(), PostMatmul(), PostBmm()):
        count, diffs = fused(module, post_args(), fuse_hc)
        assert count == 1, type(module).__name__
        assert max(diffs) <= 1e-5
    assert fused(PostNoTranspose(), post_args(), fuse_hc)[0] == 0


# --- hc.pre: any Sinkhorn length, F.linear or @ ----------------------------------------------


class Pre(nn.Module):
    def __init__(self, iters: int) -> None:
        super().__init__()
        self.iters = iters

    def forward(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor) -> tuple:
        return hc_pre(x, fn, scale, base, self.iters, 1e-6, 1e-6)


class PreMatmul(nn.Module):
    """hc_pre with `xf @ fn.t()`, `x.pow(2)`-free RMS and an explicit Sinkhorn loop."""

    def forward(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor) -> tuple:
        n, eps = x.shape[-2], 1e-6
        xf = x.flatten(2)
        mix = (xf @ fn.t()) * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)
        pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
        post = torch.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n]) * 2.0
        m = torch.softmax(
            (mix[..., 2 * n :] * scale[2] + base[2 * n :]).view(*x.shape[:2], n, n), -1
        )
        m = m + eps
        m = m / (m.sum(-2, keepdim=True) + eps)
        for _ in range(4):
            m = m / (m.sum(-1, keepdim=True) + eps)
            m = m / (m.sum(-2, keepdim=True) + eps)
        return (pre.unsqueeze(-1) * x).sum(2), post, m


def pre_args() -> tuple:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 16, generator=gen)
    fn = torch.randn(24, 64, generator=gen) * 0.1
    return x, fn, torch.rand(3, generator=gen), torch.randn(24, generator=gen)


def test_hc_pre_spellings_and_sinkhorn_lengths() -> None:
    for module, iters in ((Pre(20), 20), (Pre(1), 1), (Pre(3), 3), (PreMatmul(), 5)):
        g = passes.canonicalize(capture(module, pre_args()))
        out = fuse_hc(g, passes.PassContext())
        ops = [n for n in out.ops if n.name == "hc.pre"]
        assert len(ops) == 1 and ops[0].attrs["iters"] == iters, (type(module).__name__, iters)
        assert not any(n.name in ("div", "softmax") for n in out.ops)
        count, diffs = fused(module, pre_args(), fuse_hc)
        assert count == 1 and max(diffs) <= 1e-5


# --- hc.head: the final contraction of the streams ------------------------------------------


class Head(nn.Module):
    def forward(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor) -> Tensor:
        return hc_head(x, fn, scale, base, 1e-6, 1e-6)


class HeadMatmul(nn.Module):
    """`@ fn.T`, x·x for the square, the stream sum over dim -2 of x·pre."""

    def forward(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor) -> Tensor:
        xf = x.flatten(2)
        mix = (xf @ fn.T) * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + 1e-6)
        pre = F.sigmoid(mix * scale + base) + 1e-6
        return torch.sum(x * pre[..., None], dim=-2)


class HeadPow(nn.Module):
    """`pow(2)` for the square, F.linear with the norm applied before the projection."""

    def forward(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor) -> Tensor:
        xf = x.flatten(2)
        mix = F.linear(xf, fn) * xf.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        pre = torch.sigmoid(mix * scale + base).add(1e-6)
        return (pre.unsqueeze(-1) * x).sum(2)


def head_args() -> tuple:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 16, generator=gen)
    fn = torch.randn(4, 64, generator=gen) * 0.1
    return x, fn, torch.rand(1, generator=gen), torch.randn(4, generator=gen)


def test_hc_head_spellings() -> None:
    for module in (Head(), HeadMatmul(), HeadPow()):
        g = passes.canonicalize(capture(module, head_args()))
        out = fuse_hc(g, passes.PassContext())
        assert [n.name for n in out.ops if n.name.startswith("hc.")] == ["hc.head"], module
        count, diffs = fused(module, head_args(), fuse_hc)
        assert count == 1 and max(diffs) <= 1e-5


# --- moe.route: scores, top-k or sort + slice, with or without renormalisation --------------


class RouteSigmoid(nn.Module):
    def forward(self, x: Tensor, w: Tensor, bias: Tensor) -> tuple:
        s = (x @ w.t()).sigmoid()
        picks = (s + bias).topk(2, dim=-1).indices
        return s.gather(1, picks) * 2.5, picks


class RouteSoftmaxSort(nn.Module):
    def forward(self, x: Tensor, w: Tensor, bias: Tensor) -> tuple:
        s = F.linear(x, w).softmax(dim=-1)
        picks = s.sort(dim=-1, descending=True).indices[:, :3]
        weights = s.gather(1, picks)
        return weights / weights.sum(-1, keepdim=True), picks


class RouteSqrtSoftplus(nn.Module):
    def forward(self, x: Tensor, w: Tensor, bias: Tensor) -> tuple:
        s = F.softplus(torch.matmul(x, w.T)).sqrt()
        picks = torch.topk(s + bias, 2).indices
        weights = s.gather(1, picks)
        return weights / weights.sum(-1, keepdim=True) * 1.5, picks


def test_moe_route_spellings() -> None:
    want = {RouteSigmoid: "sigmoid", RouteSoftmaxSort: "softmax", RouteSqrtSoftplus: "sqrtsoftplus"}
    for cls, score in want.items():
        g = passes.canonicalize(capture(cls(), route_args()))
        out = fuse_moe(g, passes.PassContext())
        (route,) = [n for n in out.ops if n.name == "moe.route"]
        assert route.attrs["score"] == score, cls.__name__
        count, diffs = fused(cls(), route_args(), fuse_moe)
        assert count == 1 and max(diffs) <= 1e-5, cls.__name__
    assert fused(RouteBiasSubtracted(), route_args(), fuse_moe)[0] == 0


# --- bf16: the same fusions on a model computing in bf16 ------------------------------------


def test_bf16_moe_and_hc_fuse_exactly() -> None:
    cfg = Config.preset("tiny")
    torch.manual_seed(3)
    moe = MoE(cfg, hash_routing=False).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(2, 7, cfg.dim, dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    g = passes.canonicalize(capture(moe, (x, ids)))
    ctx = passes.PassContext()
    out = fuse_moe(g, ctx)
    assert ctx.counters["fuse_moe.moe.route"] == 1 and ctx.counters["fuse_moe.moe.experts"] == 1
    p = moe.state_dict()
    assert torch.equal(ir.interpret(g, x, ids, params=p)[0], ir.interpret(out, x, ids, params=p)[0])

    args = tuple(t.to(torch.bfloat16) if i == 0 else t for i, t in enumerate(pre_args()))
    assert fused(Pre(20), args, fuse_hc) == (1, [0.0, 0.0, 0.0])
    post = tuple(t.to(torch.bfloat16) if i < 2 else t for i, t in enumerate(post_args()))
    assert fused(PostEinsum(), post, fuse_hc) == (1, [0.0])


# --- attention: the CSA layer of tiny-512 with its helpers spelled differently ----------------


def matmul_sparse_attention(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float):
    """`@` instead of einsum, `where(valid, ..)` instead of masked_fill, softmax spelled out."""
    b, t, h, _ = q.shape
    entries = kv[torch.arange(b).view(b, 1, 1), idx.clamp(min=0)]
    scores = (q @ entries.transpose(-1, -2)).float() * scale
    scores = torch.where((idx >= 0).unsqueeze(2), scores, float("-inf"))
    logits = torch.cat((scores, sink.float().view(1, 1, h, 1).expand(b, t, h, 1)), dim=-1)
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    return (e / e.sum(-1, keepdim=True))[..., :-1].to(q.dtype) @ entries


def bmm_sparse_attention(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float):
    """One bmm over the flattened (batch, query) rows; F.softmax over dim -1 of a negated mask."""
    b, t, h, c = q.shape
    entries = kv[torch.arange(b).view(b, 1, 1), idx.clamp(min=0)].flatten(0, 1)  # [BT, n, c]
    scores = torch.bmm(q.flatten(0, 1), entries.transpose(1, 2)).view(b, t, h, -1)
    scores = (scores.float() * scale).masked_fill(~(idx >= 0)[:, :, None, :], float("-inf"))
    logits = torch.cat((scores, sink.float()[None, None, :, None].expand(b, t, h, 1)), dim=3)
    probs = F.softmax(logits, dim=-1)[..., :-1].to(q.dtype)
    return torch.bmm(probs.flatten(0, 1), entries).view(b, t, h, c)


def sorted_topk_visible(scores: Tensor, visible: Tensor, k: int) -> Tensor:
    """`sort` + slice instead of `topk`, `where(visible, ..)` instead of masked_fill."""
    n = scores.shape[-1]
    masked = torch.where(visible, scores.float(), float("-inf"))
    values, picks = F.pad(masked, (0, k), value=float("-inf")).sort(dim=-1, descending=True)
    values, picks = values[..., :k], picks[..., :k]
    return torch.where(torch.isinf(values) | (picks >= n), -1, picks)


def bmm_indexer_scores(self, x: Tensor, cq: Tensor, cos: Tensor, sin: Tensor, keys: Tensor):
    """q·kᵀ as one batched matmul over (query, head) rows; the head sum over dim -2."""
    b, t = x.shape[:2]
    q = self.wq_b(cq).unflatten(-1, (self.n_heads, self.head_dim))
    q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2)).float()
    w = self.weights_proj(x).float() * (self.head_dim * self.n_heads) ** -0.5
    logits = F.relu(q.flatten(1, 2) @ keys.float().transpose(1, 2)).view(b, t, self.n_heads, -1)
    return (logits * w[..., None]).sum(-2)


def spelled_pool(kv: Tensor, score: Tensor, keepdim: bool) -> Tensor:
    """Gated pooling over the block's rows as max-shifted exp / sum."""
    e = torch.exp(score - score.amax(dim=-2, keepdim=True))
    return torch.sum(kv * (e / e.sum(dim=-2, keepdim=True)), dim=-2, keepdim=keepdim)


def negative_dim_pool(kv: Tensor, score: Tensor, keepdim: bool) -> Tensor:
    """Gated pooling with F.softmax / sum over dim -2 (the block's rows)."""
    return (kv * F.softmax(score, dim=-2)).sum(-2, keepdim=keepdim)


class SpelledPooling(Compressor):
    """The compressor (prefill and decode step) with its pooling spelled by `pool`."""

    pool = staticmethod(spelled_pool)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        m, nb = self.ratio, t // self.ratio
        kv, score = self._project(x, torch.arange(t))
        kv = F.pad(kv, (0, 0, m, 0))
        score = F.pad(score, (0, 0, m, 0), value=float("-inf"))
        rows = torch.arange(nb * m).view(nb, m)
        kv, score = self._window(kv[:, rows + m], score[:, rows + m], kv[:, rows], score[:, rows])
        return self._finish(self.pool(kv, score, False), torch.arange(nb) * m, x.dtype)

    def decode(self, x, pos, kv_state, score_state):
        m = self.ratio
        kv, score = self._project(x, pos.view(1))
        slot = pos % m + (m if self.overlap else 0)
        kv_state = kv_state.index_copy(1, slot.view(1), kv)
        score_state = score_state.index_copy(1, slot.view(1), score)
        cur_kv, cur_score = kv_state[:, -m:], score_state[:, -m:]
        win_kv, win_score = self._window(cur_kv, cur_score, kv_state[:, :m], score_state[:, :m])
        pooled = self.pool(win_kv, win_score, True)
        entry = self._finish(pooled, (pos // m * m).view(1), x.dtype)
        emit = (pos + 1) % m == 0
        if self.overlap:
            kv_state = torch.where(emit, cur_kv.repeat(1, 2, 1), kv_state)
            score_state = torch.where(emit, cur_score.repeat(1, 2, 1), score_state)
        return entry, emit, kv_state, score_state


class NegativeDimPooling(SpelledPooling):
    pool = staticmethod(negative_dim_pool)


CSA = {"attn.compress": 2, "attn.indexer_topk": 1, "attn.sparse_mqa": 1}


@pytest.mark.parametrize(
    "attention, topk, scores, pooling",
    [
        (matmul_sparse_attention, sorted_topk_visible, bmm_indexer_scores, SpelledPooling),
        (bmm_sparse_attention, topk_visible, Indexer.scores, SpelledPooling),
        (sparse_attention, sorted_topk_visible, bmm_indexer_scores, NegativeDimPooling),
    ],
    ids=["matmul_sort_bmm_spelled", "bmm_masked_fill", "einsum_sort_bmm_negdim"],
)
def test_csa_layer_spellings(monkeypatch, attention, topk, scores, pooling) -> None:
    """The layer with its helpers spelled differently fuses to the same three ops, which compute
    what the model's own spelling does (the same top-k op breaks ties among equal scores, e.g.
    all-zero ReLU sums, the same way; `sort` may break them differently)."""
    torch.manual_seed(4)
    cfg = Config.preset("tiny-512")
    layer = Attention(cfg, 4).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
        x29 = torch.randn(2, 29, cfg.dim)
        want = layer(x29)
    monkeypatch.setattr(attention_module, "sparse_attention", attention)
    monkeypatch.setattr(attention_module, "topk_visible", topk)
    monkeypatch.setattr(Indexer, "scores", scores)
    layer.compressor.__class__ = layer.indexer.compressor.__class__ = pooling
    x = torch.randn(2, 24, cfg.dim)
    g = passes.canonicalize(capture(layer, (x,), dynamic={"x": {0: "B", 1: "T"}}))
    ctx = passes.PassContext()
    out = fuse_attention(g, ctx)
    ir.verify(out)
    fired = {k.split(".", 1)[1]: v for k, v in ctx.counters.items() if k.startswith("fuse_")}
    assert fired == CSA
    got = ir.interpret(out, x29, params=layer.state_dict())[0]
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "attention, topk, scores, step",
    [
        (matmul_sparse_attention, sorted_topk_visible, bmm_indexer_scores, SpelledPooling),
        (bmm_sparse_attention, topk_visible, Indexer.scores, NegativeDimPooling),
    ],
    ids=["matmul_sort_bmm_spelled", "bmm_masked_fill_negdim"],
)
def test_csa_decode_spellings(monkeypatch, attention, topk, scores, step) -> None:
    """Decode of the CSA layer (compressor steps, indexer, sparse attention at one position)."""
    torch.manual_seed(7)
    cfg = Config.preset("tiny-512")
    layer = Attention(cfg, 4).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
        cache = layer.init_cache(2, 64, torch.float32, torch.device("cpu"))
        _, cache = layer(torch.randn(2, 40, cfg.dim), cache)
        x = torch.randn(2, 1, cfg.dim)
        want = [layer.decode(x, torch.tensor(p), cache)[0] for p in (40, 43)]
    monkeypatch.setattr(attention_module, "sparse_attention", attention)
    monkeypatch.setattr(attention_module, "topk_visible", topk)
    monkeypatch.setattr(Indexer, "scores", scores)
    layer.compressor.__class__ = layer.indexer.compressor.__class__ = step
    dynamic = {"x": {0: "B"}, "cache": {0: "B"}}
    g = capture(layer, (x, torch.tensor(40), cache), dynamic=dynamic, method="decode")
    ctx = passes.PassContext()
    out = fuse_attention(passes.canonicalize(g), ctx)
    ir.verify(out)
    fired = {k.split(".", 1)[1]: v for k, v in ctx.counters.items() if k.startswith("fuse_")}
    assert fired == {"attn.compress_step": 2, "attn.indexer_topk": 1, "attn.sparse_mqa": 1}
    for pos, w in zip((40, 43), want):  # 43: a block completes, an entry is emitted
        got = ir.interpret(out, x, torch.tensor(pos), *cache.values(), params=layer.state_dict())
        assert (got[0] - w).abs().max().item() <= 1e-5


# --- moe.experts: dispatch, expert FFNs and combine spelled differently ----------------------


def spelled_swiglu(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    """silu spelled x·sigmoid(x)."""
    gate = gate.float().clamp(max=limit)
    return gate * torch.sigmoid(gate) * torch.clamp(up.float(), min=-limit, max=limit)


class WeightedAfterDown(Experts):
    """Routing weights scale the rows after w2; the combine is a scatter_add; silu spelled."""

    def forward(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        k = experts.shape[-1]
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = torch.zeros(self.w1.shape[0], dtype=torch.int64)
        offs = counts.scatter_add(0, flat, torch.ones_like(flat)).cumsum(0).to(torch.int32)
        rows = x[token]
        gate, up = (grouped_mm(rows, w.transpose(1, 2), offs) for w in (self.w1, self.w3))
        hidden = spelled_swiglu(gate, up, self.limit)
        down = grouped_mm(hidden, self.w2.transpose(1, 2), offs) * weights.flatten()[order, None]
        index = token[:, None].expand(-1, x.shape[1])
        return torch.zeros(x.shape).scatter_add(0, index, down)


class IndexSelectExperts(Experts):
    """Rows by index_select, weights by a [N·k, 1] gather, combine by in-place index_add_."""

    def forward(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        k = experts.shape[-1]
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        token = torch.div(order, k, rounding_mode="floor")
        counts = torch.zeros(self.w1.shape[0], dtype=torch.int64).scatter_add(
            0, flat, torch.ones_like(flat)
        )
        offs = torch.cumsum(counts, dim=0).int()
        rows = x.index_select(0, token)
        gate = grouped_mm(rows, self.w1.permute(0, 2, 1), offs).clamp(max=self.limit)
        up = grouped_mm(rows, self.w3.permute(0, 2, 1), offs).clamp(-self.limit, self.limit)
        hidden = torch.sigmoid(gate) * gate * up * weights.reshape(-1, 1)[order]
        out = torch.zeros_like(x)
        out.index_add_(0, token, grouped_mm(hidden, self.w2.permute(0, 2, 1), offs))
        return out


@pytest.mark.parametrize("experts", [WeightedAfterDown, IndexSelectExperts])
def test_moe_experts_spellings(experts) -> None:
    cfg = Config.preset("tiny")
    torch.manual_seed(5)
    moe = MoE(cfg, hash_routing=False).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        x, ids = torch.randn(2, 7, cfg.dim), torch.randint(0, cfg.vocab_size, (2, 7))
        want = moe(x, ids)
    moe.experts.__class__ = experts
    g = passes.canonicalize(capture(moe, (x, ids)))
    ctx = passes.PassContext()
    out = fuse_moe(g, ctx)
    ir.verify(out)
    assert ctx.counters["fuse_moe.moe.route"] == 1 and ctx.counters["fuse_moe.moe.experts"] == 1
    (fused_op,) = [n for n in out.ops if n.name == "moe.experts"]
    assert fused_op.attrs["shared"]
    got = ir.interpret(out, x, ids, params=moe.state_dict())[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # outputs up to ~20
