"""Hugging Face's spelling of DeepSeek-V4 attention forms the same semantic ops as ours.

HF `transformers` spells the compressor with viewed blocks and index_put overlap windows, RoPE
in rotate-half form, the indexer's causal mask with masked_fill and a threshold, and the
attention as dense softmax with an additive [window ++ block] mask. `fuse_attention`'s
canonical forms (passes/attention_forms.py) and its rules must still form `attn.compress`,
`attn.indexer_topk` and `attn.sparse_mqa`, and the fused graph must compute what HF eager does.

Fast tier: HF's indexer module alone (and a near miss), and a 2-layer HF model (CSA + HCA)
captured at 16 tokens. Slow tier (DSV4C_SLOW=1): a 3-layer model (window + CSA + HCA) against
`models.deepseek_v4` built with the same config, and TVM / Triton (interpreter) against eager.
"""

from __future__ import annotations

import collections
import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads: its kernels run on CPU

import pytest
import torch

import ir
import passes
from frontend import capture
from passes.fuse_attention import RULES, fuse_attention
from passes_helpers import DSADecode, dsa_layer

slow = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="minutes on 2 cores")
transformers = pytest.importorskip("transformers")

RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}
T = 16  # tokens: 4 CSA blocks, 2 HCA blocks, a window of 8


def _hf_config(layers: tuple[str, ...]):
    n = len(layers)
    return transformers.DeepseekV4Config(
        vocab_size=96, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
        num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, layer_types=list(layers),
        compress_rates=dict(RATES), mlp_layer_types=["hash_moe"] + ["moe"] * (n - 1),
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16,
        index_topk=4, qk_rope_head_dim=16, num_nextn_predict_layers=0,
        max_position_embeddings=256, use_cache=False,
    )  # fmt: skip


@functools.cache
def _hf_model(layers: tuple[str, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(_hf_config(layers)).eval()
    with torch.no_grad():  # HF leaves these uninitialised-random at small scale: make them tame
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "sinks")):
                p.normal_(0, 0.5)
    return model


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **model.state_dict()}


def _tokens(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(seed))


def _attn_counts(g: ir.Graph) -> dict[str, int]:
    c = collections.Counter(n.name for n in g.ops)
    return {k: c[k] for k in ("attn.compress", "attn.indexer_topk", "attn.sparse_mqa")}


@functools.cache
def _fused(layers: tuple[str, ...]) -> tuple[ir.Graph, ir.Graph]:
    g = capture(_hf_model(layers), (_tokens(T),))
    return g, fuse_attention(passes.canonicalize(g))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# --- the indexer module alone --------------------------------------------------------------


class _Indexer(torch.nn.Module):
    """HF's `DeepseekV4Indexer` prefill (no cache), optionally with a visibility threshold
    shifted by `shift` (a near miss: the op's causal rule is s < (t+1)//m)."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

        torch.manual_seed(0)
        self.inner = hf.DeepseekV4Indexer(_hf_config(("compressed_sparse_attention",)))
        with torch.no_grad():
            for p in self.inner.parameters():
                p.normal_(0, 0.3)
        self.shift = shift

    def forward(self, x: torch.Tensor, q_residual: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        if not self.shift:
            return self.inner(x, q_residual, pos, None, 0)
        inner, m = self.inner, self.inner.compress_rate
        keys = _hf_keys(inner, x)
        q = inner.q_b_proj(q_residual).unflatten(-1, (inner.num_heads, inner.head_dim))
        scores = inner.scorer(q, keys, x)
        threshold = (pos + 1 + self.shift) // m  # off by one
        future = torch.arange(keys.shape[1]).view(1, 1, -1) >= threshold.unsqueeze(-1)
        picks = scores.masked_fill(future, float("-inf")).topk(min(4, keys.shape[1])).indices
        return torch.where(picks >= threshold.unsqueeze(-1), -1, picks)


def _hf_keys(inner, x: torch.Tensor) -> torch.Tensor:
    """Compressed keys from the indexer's weights (plain blocks, no overlap or rope: the near
    miss is in the visibility, the keys only need to be [B, T//m, c])."""
    b, t, _ = x.shape
    m, d = inner.compress_rate, inner.head_dim
    kv = inner.kv_proj(x).view(b, t // m, m, -1)
    gate = inner.gate_proj(x).view(b, t // m, m, -1) + inner.position_bias
    pooled = (kv[..., d:] * gate[..., d:].softmax(dim=2)).sum(dim=2)
    return inner.kv_norm(pooled)


def _indexer_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, T, 64, generator=g), torch.randn(1, T, 32, generator=g)


def test_hf_indexer_forms_indexer_topk_and_compress_and_interprets_exactly() -> None:
    module = _Indexer().eval()
    args = _indexer_inputs()
    g = fuse_attention(passes.canonicalize(capture(module, args)))
    assert _attn_counts(g) == {"attn.compress": 1, "attn.indexer_topk": 1, "attn.sparse_mqa": 0}
    (got,) = ir.interpret(g, *args, params=_params(module))
    with torch.no_grad():
        want = module(*args)
    assert torch.equal(got, want)  # the scores have no exact ties (random fp32 inputs)


def test_indexer_off_by_one_does_not_fuse_stays_right_and_is_explained() -> None:
    module = _Indexer(shift=1).eval()
    args = _indexer_inputs()
    g = fuse_attention(passes.canonicalize(capture(module, args)))
    assert _attn_counts(g)["attn.indexer_topk"] == 0
    (got,) = ir.interpret(g, *args, params=_params(module))
    with torch.no_grad():
        assert torch.equal(got, module(*args))
    rule = next(r for r in RULES if r.name == "fuse_attention.attn.indexer_topk")
    text = str(passes.explain(rule, g))
    assert "causal" in text and "test_hf_attention_forms.py:" in text, text


# --- the whole model ------------------------------------------------------------------------

CSA_HCA = ("compressed_sparse_attention", "heavily_compressed_attention")
ALL = ("sliding_attention", *CSA_HCA)


def test_hf_v4_forms_compress_indexer_and_sparse_mqa_and_interprets_like_eager() -> None:
    g, fused = _fused(CSA_HCA)
    assert _attn_counts(g) == {"attn.compress": 0, "attn.indexer_topk": 0, "attn.sparse_mqa": 0}
    # CSA: compressor + indexer compressor, indexer, attention; HCA: compressor, attention
    assert _attn_counts(fused) == {"attn.compress": 3, "attn.indexer_topk": 1,
                                   "attn.sparse_mqa": 2}
    model, ids = _hf_model(CSA_HCA), _tokens(T)
    (got,) = ir.interpret(fused, ids, params=_params(model))
    with torch.no_grad():
        want = model(ids).logits
    assert _relative(got, want) <= 1e-5


def _ours_like(layers: tuple[str, ...]) -> torch.nn.Module:
    """models.deepseek_v4 with the HF tiny config's attention/MoE shape (layer kinds by ratio)."""
    from models.deepseek_v4 import Config, Transformer

    hf = _hf_config(layers)
    ratios = {"sliding_attention": 0, **RATES}
    cfg = Config(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=len(layers), n_heads=4,
        head_dim=32, rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        window_size=8, compress_ratios=tuple(ratios[k] for k in layers), index_n_heads=4,
        index_head_dim=16, index_topk=4, n_routed_experts=4, n_activated_experts=2,
        moe_inter_dim=32, n_hash_layers=1, route_scale=1.0, n_shared_experts=1,
        max_seq_len=256, n_mtp_layers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@slow
def test_hf_v4_forms_the_same_attention_ops_as_ours_with_the_same_config() -> None:
    g, _ = _fused(ALL)
    ours = passes.pipeline(capture(_ours_like(ALL), (_tokens(T),), method="prefill"))
    assert _attn_counts(passes.pipeline(g)) == _attn_counts(ours)
    assert _attn_counts(ours) == {"attn.compress": 3, "attn.indexer_topk": 1,
                                  "attn.sparse_mqa": 3}


@slow
@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_hf_v4_compiles_with_fused_attention_and_equals_eager(backend: str, monkeypatch) -> None:
    import dsv4c

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors
    model, ids = _hf_model(ALL), _tokens(T)
    compiled = dsv4c.compile(model, (ids,), backend=backend, target="cpu")
    (got,) = compiled(ids)
    with torch.no_grad():
        want = model(ids).logits
    assert _relative(got, want) <= 1e-4


# --- DSA (token-level indexer, models/attention_dsa.py) --------------------------------------


def test_dsa_prefill_indexer_forms_indexer_topk_with_ratio_1() -> None:
    layer = dsa_layer()
    x = torch.randn(1, 12, layer.wq_a.in_features, generator=torch.Generator().manual_seed(5))
    g = capture(layer, (x,))
    fused = fuse_attention(passes.canonicalize(g))
    (op,) = [n for n in fused.ops if n.name == "attn.indexer_topk"]
    assert op.attrs["ratio"] == 1 and not op.attrs["decode"]
    p = _params(layer)
    torch.testing.assert_close(ir.interpret(fused, x, params=p)[0], ir.interpret(g, x, params=p)[0],
                               rtol=1e-5, atol=1e-6)


def test_dsa_decode_indexer_forms_indexer_topk_at_a_position() -> None:
    layer = dsa_layer()
    gen = torch.Generator().manual_seed(6)
    cache = layer.init_cache(1, 16, torch.float32, torch.device("cpu"))
    kv, keys = (torch.randn(v.shape, generator=gen) for v in cache.values())
    x = torch.randn(1, 1, layer.wq_a.in_features, generator=gen)
    module = DSADecode(layer)
    g = capture(module, (x, torch.tensor(9), kv, keys))
    fused = fuse_attention(passes.canonicalize(g))
    (op,) = [n for n in fused.ops if n.name == "attn.indexer_topk"]
    assert op.attrs["ratio"] == 1 and op.attrs["decode"]
    p = _params(module)
    for pos in (9, 3):  # fewer visible keys than k at 3: -1 picks
        args = (x, torch.tensor(pos), kv, keys)
        for a, b in zip(ir.interpret(fused, *args, params=p), ir.interpret(g, *args, params=p)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- HF DeepSeek-V3.2 (token-level indexer, sparse attention through an index mask) ----------


def _v32_config(**kw):
    base = dict(
        vocab_size=96, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16,
        v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, mlp_layer_types=["dense"], layer_types=["indexed_attention"],
        index_topk=4, index_head_dim=16, index_n_heads=16, head_dim=16,
        max_position_embeddings=256, use_cache=False,
    )  # fmt: skip
    base.update(kw)
    return transformers.DeepseekV32Config(**base)


class _V32Attention(torch.nn.Module):
    """One HF DeepseekV32Attention (eager) on a causal boolean mask built from positions.
    16 index heads: an all-heads-zero relu score (an exact tie at 0) is rare, and the inputs
    below have no tie at the k-th pick (the fused and the eager picks would differ only by
    tie order there, both right)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf

        cfg = _v32_config()
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        self.attn = hf.DeepseekV32Attention(cfg, 0)
        self.rotary = hf.DeepseekV32RotaryEmbedding(cfg)
        with torch.no_grad():
            for p in self.attn.parameters():
                p.normal_(0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t).unsqueeze(0)
        mask = (torch.arange(t).view(1, -1) <= torch.arange(t).view(-1, 1)).view(1, 1, t, t)
        return self.attn(x, self.rotary(x, pos), mask, position_ids=pos)[0]


def test_hf_v32_indexer_forms_indexer_topk_and_attention_stays_right() -> None:
    module = _V32Attention().eval()
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(7))
    g = capture(module, (x,))
    fused = fuse_attention(passes.canonicalize(g))
    (op,) = [n for n in fused.ops if n.name == "attn.indexer_topk"]
    assert op.attrs["ratio"] == 1 and op.attrs["k"] == 4
    (got,) = ir.interpret(fused, x, params=_params(module))
    with torch.no_grad():
        want = module(x)
    assert _relative(got, want) <= 1e-5


@slow
@pytest.mark.parametrize("backend", ["tvm", "triton"])
@pytest.mark.parametrize("which", ["hf_v32", "dsa"])
def test_token_level_indexers_compile_and_equal_eager(which: str, backend: str, monkeypatch):
    import dsv4c

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = _V32Attention().eval() if which == "hf_v32" else dsa_layer()
    x = torch.randn(1, T, 64 if which == "hf_v32" else module.wq_a.in_features,
                    generator=torch.Generator().manual_seed(7))
    compiled = dsv4c.compile(module, (x,), backend=backend, target="cpu")
    (got,) = compiled(x)
    with torch.no_grad():
        want = module(x)
    assert _relative(got, want) <= 1e-4


# --- the dense-mask attention alone: the band, and a band one token into the future ---------


class _WindowAttention(torch.nn.Module):
    """HF's sliding-window DeepseekV4Attention on a band mask t-w+lead < j <= t+lead built from
    positions: lead 0 is the causal window of w rows; lead 1 lets each query see one token of
    its future (a near miss: not the op's window)."""

    def __init__(self, lead: int) -> None:
        super().__init__()
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

        cfg = _hf_config(("sliding_attention",))
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        self.attn = hf.DeepseekV4Attention(cfg, 0)
        self.rotary = hf.DeepseekV4RotaryEmbedding(cfg)
        with torch.no_grad():
            for p in self.attn.parameters():
                p.normal_(0, 0.2)
        self.lead, self.window = lead, cfg.sliding_window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t).unsqueeze(0)
        i, j = torch.arange(t).view(-1, 1), torch.arange(t).view(1, -1)
        band = (j <= i + self.lead) & (j > i + self.lead - self.window)
        mask = torch.where(band, 0.0, float("-inf")).view(1, 1, t, t)
        tables = {"main": self.rotary(x, pos, layer_type="main")}
        return self.attn(x, tables, pos, mask)[0]


@pytest.mark.parametrize("lead", [0, 1])
def test_dense_window_attention_fuses_only_on_the_causal_band(lead: int) -> None:
    module = _WindowAttention(lead).eval()
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(8))
    fused = fuse_attention(passes.canonicalize(capture(module, (x,))))
    assert _attn_counts(fused)["attn.sparse_mqa"] == (1 if lead == 0 else 0)
    (got,) = ir.interpret(fused, x, params=_params(module))
    with torch.no_grad():
        assert _relative(got, module(x)) <= 1e-5
    if lead:
        rule = next(r for r in RULES if r.name == "fuse_attention.attn.sparse_mqa")
        text = str(passes.explain(rule, fused))
        assert "mask.window" in text and "test_hf_attention_forms.py:" in text, text


@slow
def test_hf_v4_symbolic_length_forms_compress_and_indexer() -> None:
    """Captured with a symbolic length, the compressors and the indexer (top_k = min(k, S))
    still fuse; the attention's masks cannot be evaluated at a symbolic length, so it stays
    unfused (passes/fuse_dense_mqa.py) — and the graph stays right at other lengths."""
    model = _hf_model(CSA_HCA)
    g = capture(model, (_tokens(T),), dynamic={"input_ids": {1: "T"}})
    fused = fuse_attention(passes.canonicalize(g))
    assert _attn_counts(fused) == {"attn.compress": 3, "attn.indexer_topk": 1,
                                   "attn.sparse_mqa": 0}
    for length in (T, 12):
        ids = _tokens(length, seed=length)
        (got,) = ir.interpret(fused, ids, params=_params(model))
        with torch.no_grad():
            assert _relative(got, model(ids).logits) <= 1e-5
