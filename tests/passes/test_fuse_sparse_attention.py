"""Attention over index-selected keys fuses into an indexed `attn.sdpa`
(passes/fuse_sparse_attention.py): our DSA layer's gathered MLA (prefill and decode), Hugging
Face DeepSeek-V3.2's dense attention under the top-k scatter mask; counters per rule, and the
fused graph computes what eager does. A near miss (the -1 test off by one) stays unfused, stays
right and is explained. Indexer inputs have no exact ties: the DSA preset and hf_tiny's V3.2 use
16 index heads.

Slow tier (DSV4C_SLOW=1): the whole tiny-dsa model (prefill and decode) and HF V3.2 counted and
compiled with TVM and Triton (interpreter) against eager.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads: its kernels run on CPU

import pytest
import torch

import ir
import passes
from frontend import capture
from passes.fuse_attention import fuse_attention
from passes.fuse_sdpa import fuse_sdpa
from passes.fuse_sparse_attention import RULES, fuse_sparse_attention
from passes_helpers import DSADecode, dsa_layer

sys.path.insert(0, str(Path(__file__).parents[1] / "frontend"))
import hf_tiny  # noqa: E402

slow = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="minutes on 2 cores")
GATHERED, TOPK_MASK = (r.name for r in RULES)


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(m.named_buffers()), **m.state_dict()}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _fused(g: ir.Graph) -> tuple[ir.Graph, passes.PassContext]:
    """The semantic attention fusions up to this pass, with its counters."""
    ctx = passes.PassContext()
    return fuse_sparse_attention(fuse_sdpa(fuse_attention(passes.canonicalize(g))), ctx), ctx


def _indexed(g: ir.Graph) -> list[ir.Node]:
    return [n for n in g.ops if n.name == "attn.sdpa" and n.attrs["indexed"]]


# --- our DSA layer: the gathered form ------------------------------------------------------------


def test_dsa_prefill_forms_one_indexed_sdpa() -> None:
    layer = dsa_layer()
    x = torch.randn(2, 12, layer.wq_a.in_features, generator=torch.Generator().manual_seed(5))
    fused, ctx = _fused(capture(layer, (x,)))
    assert ctx.counters[GATHERED] == 1 and ctx.counters[TOPK_MASK] == 0
    assert not ctx.near_misses.get(GATHERED)
    (node,) = _indexed(fused)
    a = node.attrs
    assert a["value_dim"] == layer.latent_dim and not a["causal"] and a["mask"] == "none"
    assert [tuple(v.type.shape) for v in node.operands] == [(2, 4, 12, 40), (2, 1, 12, 40),
                                                            (2, 1, 12, 6)]  # fmt: skip
    assert [n.name for n in fused.ops].count("attn.indexer_topk") == 1
    with torch.no_grad():
        want = layer(x)
    assert _relative(ir.interpret(fused, x, params=_params(layer))[0], want) <= 1e-5


@pytest.mark.parametrize("backend", [None, "triton", pytest.param("tvm", marks=slow)])
def test_dsa_prefill_at_symbolic_batch_and_length(backend: str | None) -> None:
    """One graph for every (B, T): the rule checks shapes symbolically; interpreted (None) and
    compiled, it equals eager at two sizes it was not captured at."""
    import dsv4c

    layer = dsa_layer()
    x = torch.randn(2, 12, layer.wq_a.in_features)
    dynamic = {"x": {0: "B", 1: "T"}}
    if backend is None:
        graph, ctx = _fused(capture(layer, (x,), dynamic=dynamic))
        assert ctx.counters[GATHERED] == 1
        run = functools.partial(ir.interpret, graph, params=_params(layer))
    else:
        run = dsv4c.compile(layer, (x,), backend=backend, target="cpu", dynamic=dynamic)
        graph = run.graph
    (node,) = _indexed(graph)
    assert [str(v.type) for v in node.operands] == ["f32[B,4,T,40]", "f32[B,1,T,40]",
                                                    "i64[B,1,T,6]"]  # fmt: skip
    gen = torch.Generator().manual_seed(8)
    for b, t in [(1, 9), (3, 17)]:
        x = torch.randn(b, t, layer.wq_a.in_features, generator=gen)
        with torch.no_grad():
            want = layer(x)
        assert _relative(run(x)[0], want) <= 1e-5


def test_dsa_prefill_in_bf16_forms_it_too() -> None:
    """bf16: the model rounds q·Gᵀ and the probabilities to bf16, the op computes in fp32 and
    rounds once: within two bf16 steps of eager."""
    layer = dsa_layer().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, layer.wq_a.in_features, generator=gen).to(torch.bfloat16)
    fused, ctx = _fused(capture(layer, (x,)))
    assert ctx.counters[GATHERED] == 1 and len(_indexed(fused)) == 1
    (got,) = ir.interpret(fused, x, params=_params(layer))
    with torch.no_grad():
        want = layer(x).float()
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 2 * 2.0**-7 * want.abs().max()


def test_dsa_decode_forms_one_indexed_sdpa() -> None:
    layer = dsa_layer()
    gen = torch.Generator().manual_seed(6)
    cache = layer.init_cache(2, 16, torch.float32, torch.device("cpu"))
    kv, keys = (torch.randn(v.shape, generator=gen) for v in cache.values())
    x = torch.randn(2, 1, layer.wq_a.in_features, generator=gen)
    module = DSADecode(layer)
    fused, ctx = _fused(capture(module, (x, torch.tensor(9), kv, keys)))
    assert ctx.counters[GATHERED] == 1
    (node,) = _indexed(fused)
    assert node.operands[1].type.shape[2] == 16  # the whole cache: picks index its rows
    for pos in (9, 3):  # at 3 fewer visible keys than k: -1 picks
        args = (x, torch.tensor(pos), kv, keys)
        with torch.no_grad():
            want = module(*args)
        for got, w in zip(ir.interpret(fused, *args, params=_params(module)), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


class _SparseMLA(torch.nn.Module):
    """`sparse_mla` on given picks; `first` is the smallest index the -1 test lets through (0 is
    right; 1 is a near miss: it drops key 0, which the op would keep)."""

    def __init__(self, first: int = 0) -> None:
        super().__init__()
        self.first = first

    def forward(self, q, kv, idx):
        batch = torch.arange(q.shape[0]).view(-1, 1, 1)
        entries = kv[batch, idx.clamp(min=0)]
        scores = torch.einsum("bthc,btnc->bthn", q, entries).float() * 0.25
        scores = scores.masked_fill(~(idx >= self.first).unsqueeze(2), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.einsum("bthn,btnc->bthc", probs, entries[..., :16])


def _picks(gen: torch.Generator) -> torch.Tensor:
    """[2, 5, 4] distinct rows of 9 per query, one -1 pad per query; key 0 is picked."""
    idx = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(10)]).view(2, 5, 4)
    idx[..., 3] = -1
    idx[0, 0, 0] = 0
    return idx


def test_given_picks_fuse_and_an_off_by_one_valid_test_is_a_near_miss() -> None:
    gen = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 5, 3, 24, generator=gen), torch.randn(2, 9, 24, generator=gen),
            _picks(gen))  # fmt: skip
    fused, ctx = _fused(capture(_SparseMLA(), args))
    assert ctx.counters[GATHERED] == 1 and _indexed(fused)[0].attrs["value_dim"] == 16
    torch.testing.assert_close(ir.interpret(fused, *args)[0], _SparseMLA()(*args),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    g = passes.canonicalize(capture(_SparseMLA(first=1), args))
    out, ctx = _fused(g)
    assert ctx.counters[GATHERED] == 0 and ctx.near_misses[GATHERED] == 1
    assert not _indexed(out)
    torch.testing.assert_close(ir.interpret(out, *args)[0], _SparseMLA(first=1)(*args))
    text = str(passes.explain(RULES[0], fuse_sdpa(fuse_attention(g))))
    assert "1 near miss" in text and "failed at mask" in text, text
    line = inspect.getsourcelines(_SparseMLA.forward)[1] + 4  # the masked_fill
    assert f"@ test_fuse_sparse_attention.py:{line}" in text, text


# --- HF DeepSeek-V3.2: dense attn.sdpa under the top-k scatter mask -----------------------------


def test_hf_deepseek_v32_forms_indexer_and_indexed_attention_per_layer() -> None:
    model = hf_tiny.deepseek_v32()  # 16 index heads: no exact ties among the picks
    ids = hf_tiny.tokens(1, 12)
    ctx = passes.PassContext()
    fused = passes.pipeline(capture(model, (ids,)), ctx=ctx)
    layers = model.config.num_hidden_layers
    assert ctx.counters[TOPK_MASK] == layers and not ctx.near_misses.get(TOPK_MASK)
    counts = collections.Counter(n.name for n in fused.ops if n.name.startswith("attn."))
    assert counts == {"attn.indexer_topk": layers, "attn.sdpa": layers}
    for node in _indexed(fused):  # the causal part became attributes, the mask is gone
        assert node.attrs["causal"] and node.attrs["mask"] == "none"
        assert tuple(node.operands[-1].type.shape) == (1, 1, 12, model.config.index_topk)
    assert len(_indexed(fused)) == layers
    (got,) = ir.interpret(fused, ids, params=_params(model))
    with torch.no_grad():
        want = model(ids).logits
    assert _relative(got, want) <= 1e-5


def test_hf_v32_mask_sending_pads_to_key_0_is_refused() -> None:
    """The top-k mask with -1 picks scattered to column 0 instead of the dropped extra column
    keeps key 0 for such queries — not the indexed op's set: the rule refuses, saying why."""
    import dataclasses

    model = hf_tiny.deepseek_v32()
    ids = hf_tiny.tokens(1, 12)
    g = fuse_sdpa(fuse_attention(passes.canonicalize(capture(model, (ids,)))))
    wheres = {n.operands[2].name for n in g.ops if n.name == "where" and n.operands[0].dtype
              == ir.DType.bool and any(u.name == "scatter" for u in _users(g, n.results[0]))}
    ops = []
    for n in g.ops:  # the pad column S (12) -> 0
        if n.results[0].name in wheres:
            n = ir.Node(dataclasses.replace(n.op, value=0), n.operands, n.results, n.loc)
        ops.append(n)
    assert len(wheres) == 2  # one per layer
    bad = ir.Graph(g.inputs, ops, g.outputs, name=g.name, roles=dict(g.roles))
    ir.verify(bad)
    ctx = passes.PassContext()
    out = fuse_sparse_attention(bad, ctx)
    assert ctx.counters[TOPK_MASK] == 0 and not _indexed(out)
    text = str(passes.explain(RULES[1], bad))
    assert "failed at picks.pad" in text and "extra column 12" in text, text
    params = _params(model)
    torch.testing.assert_close(ir.interpret(out, ids, params=params)[0],
                               ir.interpret(bad, ids, params=params)[0], rtol=0, atol=0)


class _EagerTopKMask(torch.nn.Module):
    """Our DSA indexer's picks applied as HF V3.2's eager path does: a float causal mask
    (0 / finfo.min) masked_fill'ed with finfo.min outside scatter(picks), added to the logits of
    a dense MHA softmax — the finite-drop spelling (where(I, -big, C))."""

    def __init__(self) -> None:
        super().__init__()
        from models.attention_dsa import LightningIndexer, variant_rotary
        from models.config import Config

        cfg = Config.preset("tiny-dsa")  # 16 index heads: no exact ties among the picks
        torch.manual_seed(0)
        self.rotary = variant_rotary(cfg)
        self.indexer = LightningIndexer(cfg)
        self.cq = torch.nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.qkv = torch.nn.Linear(cfg.dim, 3 * 4 * 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from models.attention import topk_visible

        b, t, _ = x.shape
        pos = torch.arange(t)
        causal = pos.view(1, -1) <= pos.view(-1, 1)
        cos, sin = self.rotary.cos_sin(pos)
        scores = self.indexer.scores(x, self.cq(x), cos, sin, self.indexer.key(x, cos, sin))
        picks = topk_visible(scores, causal, self.indexer.topk)
        index_mask = torch.ones(b, t, t + 1, dtype=torch.bool).scatter(
            -1, torch.where(picks >= 0, picks, t), False)[..., :t].unsqueeze(1)  # fmt: skip
        q, k, v = self.qkv(x).view(b, t, 3, 4, 16).permute(2, 0, 3, 1, 4)
        low = torch.finfo(x.dtype).min
        mask = torch.zeros(t, t).masked_fill(~causal, low).masked_fill(index_mask, low)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1) @ v


def test_eager_finfo_min_top_k_mask_forms_it_with_the_causal_part_folded() -> None:
    module = _EagerTopKMask().eval()
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(4))
    fused, ctx = _fused(capture(module, (x,)))
    assert ctx.counters[TOPK_MASK] == 1
    (node,) = _indexed(fused)
    assert node.attrs["causal"] and node.attrs["mask"] == "none"
    with torch.no_grad():
        want = module(x)
    assert _relative(ir.interpret(fused, x, params=_params(module))[0], want) <= 1e-5
    # picks not (yet) fused into attn.indexer_topk are not known to be distinct: refused
    text = str(passes.explain(RULES[1], fuse_sdpa(passes.canonicalize(capture(module, (x,))))))
    assert "failed at picks" in text and "not an attn.indexer_topk" in text, text


def _users(g: ir.Graph, v: ir.Value) -> list[ir.Node]:
    return [n for n in g.ops if v in n.operands]


# --- whole models, compiled (slow) ---------------------------------------------------------------


def _tiny_dsa():
    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    from test_dsa_nsa import _model, _tokens

    model = _model("tiny-dsa")
    return model, _tokens(model.cfg, 2, 16)


@slow
def test_tiny_dsa_model_forms_indexer_and_indexed_attention_per_layer() -> None:
    model, tokens = _tiny_dsa()
    layers = model.cfg.n_layers
    fused = passes.pipeline(capture(model, (tokens,), method="prefill"))
    counts = collections.Counter(n.name for n in fused.ops if n.name.startswith("attn."))
    assert counts == {"attn.indexer_topk": layers, "attn.sdpa": layers}
    assert len(_indexed(fused)) == layers
    (got,) = ir.interpret(fused, tokens, params=_params(model))
    with torch.no_grad():
        want = model.prefill(tokens)
    assert _relative(got, want) <= 1e-5
    cache = model.init_cache(2, 24)
    with torch.no_grad():
        _, cache = model.prefill(tokens, cache)
    step = (tokens[:, :1], torch.tensor(16), cache)
    decode = passes.pipeline(capture(model, step, method="decode"))
    counts = collections.Counter(n.name for n in decode.ops if n.name.startswith("attn."))
    assert counts == {"attn.indexer_topk": layers, "attn.sdpa": layers}


@slow
@pytest.mark.parametrize("backend", ["tvm", "triton"])
@pytest.mark.parametrize("which", ["tiny_dsa", "tiny_dsa_decode", "hf_v32"])
def test_compiled_equals_eager(which: str, backend: str, monkeypatch) -> None:
    import dsv4c

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if which == "hf_v32":
        model, args, method = hf_tiny.deepseek_v32(), (hf_tiny.tokens(1, 12),), "forward"
        with torch.no_grad():
            want = [model(*args).logits]
    elif which == "tiny_dsa":
        model, tokens = _tiny_dsa()
        args, method = (tokens,), "prefill"
        with torch.no_grad():
            want = [model.prefill(tokens)]
    else:  # one step at position 16 after a 16-token prefill into a 24-row cache
        model, tokens = _tiny_dsa()
        cache = model.init_cache(2, 24)
        with torch.no_grad():
            _, cache = model.prefill(tokens, cache)
            args, method = (tokens[:, :1], torch.tensor(16), cache), "decode"
            logits, new = model.decode(*args)
        want = [logits, *new.values()]
    compiled = dsv4c.compile(model, args, backend=backend, target="cpu", method=method)
    assert len(_indexed(compiled.graph)) == 2
    got = compiled(*args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert _relative(g, w) <= 1e-5
