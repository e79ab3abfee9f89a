"""Dense attention in its spellings fuses into one `attn.sdpa` (passes/fuse_sdpa.py).

The op's reference against torch's SDPA (MHA, GQA, MQA; causal with a query offset, window,
sinks, masks); then modules — hand-written softmax(QKᵀ)V with tril / iota / band masks,
`F.scaled_dot_product_attention`, GQA by `repeat_interleave` and by expand, gpt-oss-style sinks,
padding masks as inputs, a Mistral-style sliding-window GQA layer — each forms exactly one op
whose graph interprets equal to eager. Near misses (a chunked mask, a causal mask that leaves
the first query nothing, a softmax over the wrong dim) do not fuse, stay exact, and `explain`
names the sub-pattern and the source line. HF tiny Mixtral (eager and sdpa), Mistral (sliding
window), gpt-oss (sinks; sliding and full layers) and Gemma 2 (logit soft-capping) form one op
per layer.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ir
import passes
from frontend import capture
from ir import DType, TensorType
from ir.ops.attn_dense import DenseAttention
from passes import PassContext, explain
from passes.fuse_sdpa import RULES, fuse_sdpa

GEN = torch.Generator().manual_seed(0)
RULE = "fuse_sdpa.attn.sdpa"


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


# --- the op against torch -----------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("t,s,offset,window", [(5, 5, 0, 0), (4, 9, 5, 0), (6, 6, 0, 3)])
def test_reference_equals_torch_sdpa(hq, hkv, t, s, offset, window):
    q, k, v = _t(2, hq, t, 8), _t(2, hkv, s, 8), _t(2, hkv, s, 12)
    op = DenseAttention(scale=0.4, causal=True, offset=offset, window=window)
    (got,) = op.reference(q, k, v)
    pos = torch.arange(t).unsqueeze(1) + offset
    keys = torch.arange(s)
    band = (keys <= pos) & ((pos - keys < window) if window else True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=0.4, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_masks_and_sinks():
    q, k, v, sinks = _t(2, 4, 5, 8), _t(2, 2, 6, 8), _t(2, 2, 6, 8), _t(4)
    bias = _t(2, 1, 5, 6)
    keep = torch.rand(2, 1, 1, 6, generator=GEN) > 0.3
    keep[0, 0, 0] = False  # a sequence that sees nothing: 0, with or without the guard
    (got,) = DenseAttention(scale=0.3, mask="add").reference(q, k, v, bias)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (got,) = DenseAttention(scale=0.3, mask="bool").reference(q, k, v, keep)
    assert bool((got[0] == 0).all()) and not got.isnan().any()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # sinks: one more logit per head in each row's softmax (gpt-oss's eager attention)
    (got,) = DenseAttention(scale=0.3, sinks=True).reference(q, k, v, sinks)
    z = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
    col = sinks.view(1, 4, 1, 1).expand(2, 4, 5, 1)
    p = torch.softmax(torch.cat((z, col), -1), -1)[..., :-1]
    torch.testing.assert_close(got, p @ v.repeat_interleave(2, 1), rtol=1e-5, atol=1e-5)


def test_reference_softcap():
    q, k, v = _t(1, 2, 4, 8) * 3, _t(1, 2, 4, 8) * 3, _t(1, 2, 4, 8)
    (got,) = DenseAttention(scale=0.5, softcap=2.0, causal=True).reference(q, k, v)
    z = torch.tanh(q @ k.transpose(-1, -2) * 0.5 / 2.0) * 2.0
    z = z.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(got, torch.softmax(z, -1) @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "attrs,types,message",
    [
        ({}, [(1, 4, 5, 8), (1, 3, 5, 8), (1, 3, 5, 8)], "multiple of KV heads 3"),
        ({"window": 4}, [(1, 4, 5, 8)] * 3, "a window needs causal=true"),
        ({"mask": "add"}, [(1, 4, 5, 8)] * 3, "takes 4 operands (q, k, v, mask)"),
        ({}, [(1, 4, 5, 8), (1, 4, 5, 6), (1, 4, 5, 8)], "head dim of q and k differs"),
        ({"mask": "add"}, [(1, 4, 5, 8)] * 3 + [(3, 5)], "mask dim 3 does not broadcast"),
    ],
)
def test_infer_type_errors(attrs, types, message):
    tt = [TensorType(s, DType.f32) for s in types]
    with pytest.raises(ir.IRTypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DenseAttention(**attrs).infer_type(*tt)


# --- modules --------------------------------------------------------------------------------------


class Attend(nn.Module):
    """q, k, v -> attention by `how` (a function of q, k, v)."""

    def __init__(self, how) -> None:
        super().__init__()
        self.how = how

    def forward(self, q, k, v, *extra):
        return self.how(q, k, v, *extra)


def _fuse(how, *args) -> tuple[ir.Graph, ir.Graph, PassContext]:
    g = passes.canonicalize(capture(Attend(how), args))
    ctx = PassContext()
    out = fuse_sdpa(g, ctx)
    ir.verify(out)
    return g, out, ctx


def _check(how, *args, **want_attrs) -> ir.Node:
    """The module fuses into exactly one attn.sdpa with `want_attrs`, interpreting like eager."""
    g, out, ctx = _fuse(how, *args)
    nodes = [n for n in out.ops if n.name == "attn.sdpa"]
    assert ctx.counters[RULE] == 1 and len(nodes) == 1, str(explain(RULES[0], g))
    assert not any(n.name in ("softmax", "matmul") for n in out.ops)
    for key, value in want_attrs.items():
        assert nodes[0].attrs[key] == pytest.approx(value), (key, nodes[0].attrs)
    torch.testing.assert_close(ir.interpret(out, *args)[0], how(*args), rtol=1e-5, atol=1e-5)
    return nodes[0]


def _repeat(x, g):  # HF's repeat_kv
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, g, s, d).reshape(b, h * g, s, d)


def test_hand_written_causal_mha():
    def how(q, k, v):
        t = q.shape[2]
        z = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        z = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(z, dim=-1) @ v

    _check(how, _t(1, 4, 6, 8), _t(1, 4, 6, 8), _t(1, 4, 6, 8),
           causal=True, offset=0, window=0, scale=8**-0.5, mask="none")  # fmt: skip


def test_softmax_written_as_exp_over_sum():
    def how(q, k, v):
        z = q @ k.transpose(-1, -2) * 0.3
        e = torch.exp(z - z.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True) @ v

    _check(how, _t(1, 2, 5, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8), causal=False, scale=0.3)


def test_sdpa_call_gqa_causal():
    def how(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    node = _check(how, _t(2, 4, 5, 8), _t(2, 2, 5, 8), _t(2, 2, 5, 8), causal=True, offset=0)
    assert [o.type.shape[1] for o in node.operands[:3]] == [4, 2, 2]


def test_repeat_interleave_gqa_and_broadcast_mqa():
    def gqa(q, k, v):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v

    def mqa(q, k, v):
        k, v = k.expand(-1, 4, -1, -1), v.expand(-1, 4, -1, -1)
        return torch.softmax(0.5 * (q @ k.transpose(-1, -2)), -1) @ v

    _check(gqa, _t(1, 4, 5, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 6), causal=False, scale=0.5)
    node = _check(mqa, _t(1, 4, 5, 8), _t(1, 1, 7, 8), _t(1, 1, 7, 8), scale=0.5)
    assert node.operands[1].type.shape[1] == 1


def test_gqa_by_broadcasting_five_dims():
    def how(q, k, v):  # q grouped as [B,Hkv,G,T,D] against k, v [B,Hkv,1,S,D]
        b, h, t, d = q.shape
        g = h // k.shape[1]
        qg = q.reshape(b, k.shape[1], g, t, d)
        z = qg @ k[:, :, None].transpose(-1, -2) * 0.3
        z = z + torch.full((t, t), float("-inf")).triu(1)
        o = torch.softmax(z, -1) @ v[:, :, None]
        return o.reshape(b, h, t, -1)

    node = _check(how, _t(2, 6, 5, 8), _t(2, 2, 5, 8), _t(2, 2, 5, 4), causal=True, scale=0.3)
    assert [o.type.shape[1] for o in node.operands[:3]] == [6, 2, 2]


def test_kv_cache_offset_from_iota_comparison():
    def how(q, k, v):
        t, s = q.shape[2], k.shape[2]
        visible = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
        z = torch.where(visible, q @ k.transpose(-1, -2) * 0.3, torch.finfo(q.dtype).min)
        return torch.softmax(z, -1) @ v

    _check(how, _t(1, 2, 3, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 8), causal=True, offset=4)


def test_sinks_gpt_oss_style():
    def how(q, k, v, sinks):
        t = q.shape[2]
        z = q @ _repeat(k, 2).transpose(2, 3) * 0.35
        z = z + torch.full((t, t), float("-inf")).triu(1)
        col = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, t, -1)
        logits = torch.cat([z, col], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        return F.softmax(logits, dim=-1)[..., :-1] @ _repeat(v, 2)

    _check(how, _t(2, 4, 5, 8), _t(2, 2, 5, 8), _t(2, 2, 5, 8), _t(4), sinks=True, causal=True)


def test_padding_masks_stay_operands():
    q, k, v = _t(2, 2, 4, 8), _t(2, 2, 4, 8), _t(2, 2, 4, 8)
    keep = torch.tensor([[True] * 4, [True, True, False, False]]).view(2, 1, 1, 4)
    bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min)

    def boolean(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    def additive(q, k, v, bias):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.2 + bias, -1) @ v

    node = _check(boolean, q, k, v, keep, causal=False)
    assert node.attrs["mask"] in ("bool", "add")  # SDPA turns a bool mask into where(m, 0, -inf)
    node = _check(additive, q, k, v, bias, mask="add", causal=False)
    assert node.operands[3].type.shape == (2, 1, 1, 4)  # the input itself, never expanded


class SlidingWindowGQA(nn.Module):
    """A Mistral-style layer: GQA projections, a causal band of `window` keys built from
    position comparisons, HF-eager attention (additive finfo.min mask, repeat_kv)."""

    def __init__(self, dim=32, heads=4, kv_heads=2, window=3) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.window, self.hd = heads, kv_heads, window, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.wv(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        g = self.heads // self.kv_heads
        pos = torch.arange(t)
        band = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < self.window)
        mask = torch.zeros(t, t).masked_fill(~band, torch.finfo(x.dtype).min)[None, None]
        z = q @ _repeat(k, g).transpose(2, 3) * self.hd**-0.5 + mask
        p = torch.softmax(z, dim=-1, dtype=torch.float32).to(q.dtype)
        o = (p @ _repeat(v, g)).transpose(1, 2).reshape(b, t, -1)
        return self.wo(o)


def test_mistral_sliding_window_gqa_forms_one_op():
    torch.manual_seed(0)
    layer = SlidingWindowGQA().eval()
    x = _t(2, 7, 32)
    g = passes.canonicalize(capture(layer, (x,)))
    ctx = PassContext()
    out = fuse_sdpa(g, ctx)
    nodes = [n for n in out.ops if n.name == "attn.sdpa"]
    assert ctx.counters[RULE] == 1 and len(nodes) == 1
    assert (nodes[0].attrs["causal"], nodes[0].attrs["window"], nodes[0].attrs["mask"]) == (
        True, 3, "none")  # fmt: skip
    params = dict(layer.state_dict())
    with torch.no_grad():
        want = layer(x)
    torch.testing.assert_close(ir.interpret(out, x, params=params)[0], want, rtol=1e-5, atol=1e-5)
    # the whole pipeline keeps it as one op
    assert sum(n.name == "attn.sdpa" for n in passes.pipeline(g).ops) == 1


# --- near misses ----------------------------------------------------------------------------------


def _near_miss(how, *args) -> str:
    g, out, ctx = _fuse(how, *args)
    assert ctx.counters[RULE] == 0 and not any(n.name == "attn.sdpa" for n in out.ops)
    torch.testing.assert_close(ir.interpret(out, *args)[0], how(*args), equal_nan=True)
    why = str(explain(RULES[0], g))
    assert "does not fire" in why and "test_fuse_sdpa.py:" in why, why
    return why


def test_chunked_mask_is_not_a_band():
    def how(q, k, v):  # Llama-4-style chunks of 3: not one band, the window restarts
        pos = torch.arange(q.shape[2])
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] // 3 == pos[:, None] // 3)
        z = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        return torch.softmax(z, -1) @ v

    why = _near_miss(how, _t(1, 2, 7, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 8))
    assert "mask.positions" in why, why
    assert "query 3 does not see key 1, unlike causal with offset 0 and window 3" in why, why


def test_causal_mask_off_by_one_leaves_a_query_nothing():
    def how(q, k, v):  # strict causal: query 0 sees no key, the unguarded softmax gives NaN
        pos = torch.arange(q.shape[2])
        z = (q @ k.transpose(-1, -2)).masked_fill(pos[None, :] >= pos[:, None], float("-inf"))
        return torch.softmax(z, -1) @ v

    why = _near_miss(how, _t(1, 2, 5, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8))
    assert "mask.positions" in why and "query 0 sees no key" in why, why


def test_softmax_over_queries_is_not_attention():
    def how(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v

    why = _near_miss(how, _t(1, 2, 5, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8))
    assert "failed at probs" in why and "not over the keys" in why, why


def test_tiled_kv_heads_are_not_grouped_heads():
    def how(q, k, v):  # repeat tiles the KV heads: query head h reads h % Hkv, not h // G
        k, v = k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    node = _check(how, _t(1, 4, 5, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8))
    assert [o.type.shape[1] for o in node.operands[:3]] == [4, 4, 4]  # MHA on the tiled K, V


def test_head_dim_past_the_kernels_is_not_formed():
    def how(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.05, -1) @ v

    why = _near_miss(how, _t(1, 1, 3, 320), _t(1, 1, 3, 320), _t(1, 1, 3, 320))
    assert "failed at lowering" in why and "up to 256" in why, why


# --- Hugging Face --------------------------------------------------------------------------------


def _mixtral():
    sys.path.insert(0, str(Path(__file__).parents[1] / "frontend"))
    import hf_tiny

    return hf_tiny.mixtral()


def _mistral():  # sliding window 4 < the 9 tokens
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                        max_position_embeddings=256, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return MistralForCausalLM(cfg).eval()


def _gpt_oss():  # sinks; a sliding layer then a full layer
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                       num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                       use_cache=False, layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # sinks start at 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(generator=GEN)
    return model


def _gemma2():  # logit soft-capping; a sliding layer then a full layer
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       sliding_window=4, attn_logit_softcapping=2.0,
                       max_position_embeddings=256, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return Gemma2ForCausalLM(cfg).eval()


HF = {
    # model, attention implementation, (causal, window, sinks) per layer
    "mixtral-eager": (_mixtral, "eager", [(True, 0, False)] * 2),
    "mixtral-sdpa": (_mixtral, "sdpa", [(True, 0, False)] * 2),
    "mistral-sdpa": (_mistral, "sdpa", [(True, 4, False)]),
    "gpt_oss-eager": (_gpt_oss, "eager", [(True, 4, True), (True, 0, True)]),
    "gemma2-eager": (_gemma2, "eager", [(True, 4, False), (True, 0, False)]),
}


@pytest.mark.parametrize("name", list(HF))
def test_hf_models_form_one_attention_op_per_layer(name):
    pytest.importorskip("transformers")
    build, impl, want = HF[name]
    model = build()
    model.config._attn_implementation = impl  # the layers read it at call time
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    g = capture(model, (ids,))
    assert any(n.name == "any" for n in g.ops) == (impl == "sdpa")  # SDPA's empty-row guard
    ctx = PassContext()
    out = fuse_sdpa(passes.canonicalize(g, ctx), ctx)
    nodes = [n for n in out.ops if n.name == "attn.sdpa"]
    assert ctx.counters[RULE] == len(want) == len(nodes)
    got = [(n.attrs["causal"], n.attrs["window"], n.attrs["sinks"]) for n in nodes]
    assert got == want and all(n.attrs["mask"] == "none" for n in nodes)
    assert all(n.attrs["softcap"] == (2.0 if name.startswith("gemma2") else 0.0) for n in nodes)
    params = {**model.state_dict(), **dict(model.named_buffers())}
    with torch.no_grad():
        eager = model(ids).logits
    torch.testing.assert_close(ir.interpret(out, ids, params=params)[0], eager, rtol=1e-5,
                               atol=1e-5)  # fmt: skip
