"""MoE fusions on third-party spellings (issue 15): Hugging Face's Mixtral, GPT-OSS, DeepSeek-V4
and DeepSeek-V3.2 routers and `grouped_mm` experts form `moe.route` + `moe.experts` like our model.

Counter tests assert the fused op counts; the fused graph, interpreted, equals HF eager (fp32).
HF's experts come in its default `grouped_mm` form and in its `batched_mm` form (its eager
per-expert loop does not capture: the loop runs over a data-dependent set of experts).
Variants come from patching one Mixtral layer's router: top-k-then-softmax (canonicalised to the
renormalised softmax) and a near miss — top-k weights "renormalised" over the tokens (dim 0)
instead of the k picks — that must not fuse to moe.route, stays exact, and is explained with its
sub-pattern and source line. GPT-OSS (a biased router, top-k-then-softmax; experts with
interleaved gate/up columns, per-expert biases and its clamped (up + 1)·g·sigmoid(1.702·g) gate;
`grouped_mm` and `batched_mm` experts) forms one attn.sdpa + moe.route + moe.experts per layer;
its near misses (up not shifted by one, the router bias added after the softmax) do not fuse
and are explained. The slow tier
(DSV4C_SLOW=1) adds DeepSeek-V4/V3.2, Mixtral and GPT-OSS compiled with TVM and the Triton
interpreter.
"""

from __future__ import annotations

import os
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

# the slow tier runs Triton kernels on CPU tensors: the interpreter must be on before triton loads
# (as tests/backends/conftest.py does; nothing imported above loads triton)
os.environ.setdefault("TRITON_INTERPRET", "1")

import ir
import passes
from frontend import capture
from passes import PassContext, explain
from passes.canonicalize import canonicalize
from passes.fuse_moe import RULES, fuse_moe

sys.path.insert(0, str(Path(__file__).parents[1] / "frontend"))
import hf_tiny  # noqa: E402

slow = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="minutes on 2 cores")
RTOL = 1e-5  # relative to the largest logit: fp32, the fused ops reassociate sums


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **model.state_dict()}


def _moe_counts(g: ir.Graph) -> dict[str, int]:
    return dict(Counter(n.name for n in g.ops if n.name.startswith("moe.")))


def _check_logits(g: ir.Graph, model: torch.nn.Module, ids: torch.Tensor) -> None:
    (got,) = ir.interpret(g, ids, params=_params(model))
    with torch.no_grad():
        want = model(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= RTOL, err


def _fused(model: torch.nn.Module, ids: torch.Tensor, ctx: PassContext) -> ir.Graph:
    """The graph after canonicalize and fuse_moe (the MoE fusion needs no attention op: the
    other semantic fusions are left out, so these tests see the MoE rules alone)."""
    return fuse_moe(canonicalize(capture(model, (ids,)), ctx), ctx)


def test_mixtral_one_route_and_experts_per_layer():
    """HF Mixtral (softmax, top-2, renormalised; grouped_mm experts over stacked gate_up):
    one moe.route + one moe.experts per layer after the whole pipeline, equal to HF eager."""
    model, ids = hf_tiny.mixtral(), hf_tiny.tokens(1, 16)
    ctx = PassContext()
    g = passes.pipeline(capture(model, (ids,)), ctx=ctx)
    layers = model.config.num_hidden_layers
    assert _moe_counts(g) == {"moe.route": layers, "moe.experts": layers}
    route = next(n for n in g.ops if n.name == "moe.route")
    assert (route.attrs["score"], route.attrs["k"], route.attrs["renorm"]) == ("softmax", 2, True)
    experts = next(n for n in g.ops if n.name == "moe.experts")
    assert experts.attrs["activation"] == "swiglu" and not experts.attrs["shared"]
    for rule in ("topk_values", "histc", "unsort_sum", "stacked_slice"):
        assert ctx.counters[f"canonical_moe.{rule}"] >= layers, rule
    _check_logits(g, model, ids)


def test_mixtral_batched_mm_experts():
    """HF's other stacked-weight experts form (`batched_mm`: each (token, slot) row times its
    gathered expert's weights, reshape + sum over the slots) forms the same moe.experts."""
    model, ids = hf_tiny.mixtral(), hf_tiny.tokens(1, 16)
    for layer in model.model.layers:
        layer.mlp.experts.config._experts_implementation = "batched_mm"
    ctx = PassContext()
    g = _fused(model, ids, ctx)
    assert _moe_counts(g) == {"moe.route": 2, "moe.experts": 2}
    assert ctx.counters["fuse_moe.moe.experts_batched"] == 2
    _check_logits(g, model, ids)


def _topk_softmax(self, hidden_states):
    """GPT-OSS-style router: softmax over the top-k logits."""
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    values, experts = torch.topk(logits, self.top_k, dim=-1)
    return logits, values.softmax(dim=-1), experts


def _over_tokens(self, hidden_states):
    """A near miss: top-k weights divided by their sum over the tokens, not over the picks."""
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    values, experts = torch.topk(logits.softmax(dim=-1), self.top_k, dim=-1)
    return logits, values / values.sum(dim=0, keepdim=True), experts


def test_topk_then_softmax_fuses_and_a_near_miss_does_not():
    """Layer 0 routes top-k-then-softmax (fuses: the renormalised softmax), layer 1 renormalises
    over the wrong dim (no moe.route, a near miss explained at its source line); both layers'
    experts fuse, and the graph equals eager."""
    model, ids = hf_tiny.mixtral(), hf_tiny.tokens(1, 16)
    gates = [layer.mlp.gate for layer in model.model.layers]
    gates[0].forward = types.MethodType(_topk_softmax, gates[0])
    gates[1].forward = types.MethodType(_over_tokens, gates[1])
    ctx = PassContext()
    g = _fused(model, ids, ctx)
    assert _moe_counts(g) == {"moe.route": 1, "moe.experts": 2}
    assert ctx.counters["canonical_moe.softmax_after_topk"] == 1
    assert ctx.near_misses["fuse_moe.moe.route"] >= 1
    _check_logits(g, model, ids)

    # the sub-pattern (the renormalising sum), why (its dims), and where: the patched router's
    # module and the model line calling it (the frontend's location of a method's ops)
    why = str(explain(RULES[0], g))
    assert "does not fire" in why and "failed at weights" in why, why
    assert "sum(%" in why and "dims=[0]" in why, why
    assert "model.layers.1.mlp.gate @ modeling_mixtral.py:" in why, why


def test_deepseek_v32_grouped_topk_route(tmp_path):
    """HF DeepSeek-V3.2: the sparse layer's grouped top-k (sigmoid + bias, n_group 2,
    topk_group 1, masked by -inf) forms moe.route; its experts + shared expert moe.experts."""
    model, ids = hf_tiny.deepseek_v32(), hf_tiny.tokens(1, 16)
    g = _fused(model, ids, PassContext())
    assert _moe_counts(g) == {"moe.route": 1, "moe.experts": 1}
    route = next(n for n in g.ops if n.name == "moe.route").attrs
    cfg = model.config
    assert (route["n_group"], route["topk_group"], route["score"]) == (
        cfg.n_group, cfg.topk_group, "sigmoid")
    assert route["bias"] and route["group_fill"] == float("-inf") and route["eps"] == 1e-20
    experts = next(n for n in g.ops if n.name == "moe.experts").attrs
    assert experts["shared"] and experts["activation"] == "swiglu"
    _check_logits(g, model, ids)


class GroupedRouter(torch.nn.Module):
    """DeepSeek-V3's group-limited router (as HF writes it): E = 8 experts in 4 groups, the 2
    groups whose best two biased scores sum highest, top-3 within them. `interleaved`: a near
    miss whose group mask covers columns g, g+4 (not g·2, g·2+1) — another routing."""

    def __init__(self, interleaved: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 16) * 0.5)
        self.bias = torch.nn.Parameter(torch.randn(8) * 0.2)
        self.interleaved = interleaved

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.nn.functional.linear(x, self.weight).sigmoid()
        choice = scores + self.bias
        group_scores = choice.view(-1, 4, 2).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=2, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        if self.interleaved:
            mask = group_mask.unsqueeze(1).expand(-1, 2, 4).reshape(-1, 8)
        else:
            mask = group_mask.unsqueeze(-1).expand(-1, 4, 2).reshape(-1, 8)
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
        experts = torch.topk(choice, k=3, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * 2.5, experts


def _by_expert(weights: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (weight, expert) slots ordered by expert id (top-k(sorted=False) leaves the
    slot order to the implementation)."""
    order = experts.argsort(-1)
    return weights.gather(1, order), experts.gather(1, order)


@pytest.mark.parametrize("interleaved", [False, True], ids=["grouped", "near_miss"])
def test_grouped_router_module(interleaved):
    torch.manual_seed(0)
    module, x = GroupedRouter(interleaved).eval(), torch.randn(11, 16)
    ctx = PassContext()
    g = fuse_moe(canonicalize(capture(module, (x,))), ctx)
    params = dict(module.state_dict())
    got, want = ir.interpret(g, x, params=params), module(x)
    (got_w, got_e), (want_w, want_e) = _by_expert(*got), _by_expert(*want)
    assert torch.equal(got_e, want_e)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-6)
    if not interleaved:
        route = next(n for n in g.ops if n.name == "moe.route").attrs
        assert (route["n_group"], route["topk_group"], route["k"]) == (4, 2, 3)
        return
    assert _moe_counts(g) == {} and ctx.near_misses["fuse_moe.moe.route"] == 1
    why = str(explain(RULES[0], g))
    assert "failed at choice.mask" in why and "contiguous columns" in why, why
    assert "test_moe_forms.py:" in why, why


class _Expert(torch.nn.Module):
    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.w1, self.w3 = (torch.nn.Linear(d, inter, bias=False) for _ in range(2))
        self.w2 = torch.nn.Linear(inter, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class LoopMoE(torch.nn.Module):
    """A hand-written MoE: every expert of an nn.ModuleList runs on every token, scaled by the
    token's routing weight for it (0 unless chosen). `skip_last`: a near miss whose loop leaves
    the last expert out (its tokens lose that contribution: not moe.experts)."""

    def __init__(self, skip_last: bool = False, d: int = 16, n_experts: int = 4) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(d, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(_Expert(d, 8) for _ in range(n_experts))
        self.skip_last = skip_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = torch.topk(self.gate(x).softmax(-1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for i, expert in enumerate(self.experts[:-1] if self.skip_last else self.experts):
            y = y + (weights * (experts == i)).sum(-1, keepdim=True) * expert(x)
        return y


@pytest.mark.parametrize("skip_last", [False, True], ids=["loop", "near_miss"])
def test_expert_loop_module(skip_last):
    """The dense loop over experts forms moe.experts (weights stacked in the graph); the loop
    that misses an expert does not, and explain says which experts the terms cover."""
    torch.manual_seed(0)
    module, x = LoopMoE(skip_last).eval(), torch.randn(7, 16)
    ctx = PassContext()
    g = fuse_moe(canonicalize(capture(module, (x,))), ctx)
    (got,) = ir.interpret(g, x, params=dict(module.state_dict()))
    torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-6)
    if not skip_last:
        assert _moe_counts(g) == {"moe.route": 1, "moe.experts": 1}
        return
    assert _moe_counts(g) == {"moe.route": 1}
    why = str(explain(RULES[3], g))
    assert "failed at loop.experts" in why and "choose among 4" in why, why


def _our_config(hf: dict):
    """models.config.Config of a transformers 5.x DeepseekV4Config dict: from_hf reads the
    official config.json, whose `compress_ratios` / `num_hash_layers` 5.x spells per layer."""
    from models.config import Config

    per_layer = {
        "compress_ratios": [hf["compress_rates"].get(t, 0) for t in hf["layer_types"]],
        "num_hash_layers": hf["mlp_layer_types"].count("hash_moe"),
    }
    return Config.from_hf({**hf, **per_layer})


@slow
def test_deepseek_v4_counts_match_our_model():
    """HF DeepSeek-V4 (hash layer + sqrt-softplus-with-bias layer, shared expert, clamped
    SwiGLU): as many moe.route / moe.experts as models.deepseek_v4 from the same config."""
    from models.deepseek_v4 import Transformer

    hf, ids = hf_tiny.deepseek_v4(), hf_tiny.tokens(1, 16)
    g = _fused(hf, ids, PassContext())
    ours = Transformer(_our_config(hf.config.to_dict())).eval()
    mine = fuse_moe(canonicalize(capture(ours, (ids,), method="prefill")))
    assert _moe_counts(g) == _moe_counts(mine) == {"moe.route": 2, "moe.experts": 2}
    hashed = [n.attrs["hash"] for n in g.ops if n.name == "moe.route"]
    assert hashed == [True, False]
    _check_logits(g, hf, ids)


@slow
@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_mixtral_compiled_equals_hf_eager(backend):
    import dsv4c

    model, ids = hf_tiny.mixtral(), hf_tiny.tokens(1, 12)
    compiled = dsv4c.compile(model, (ids,), backend=backend, target="cpu")
    assert _moe_counts(compiled.graph) == {"moe.route": 2, "moe.experts": 2}
    (got,) = compiled(ids)
    with torch.no_grad():
        want = model(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4


# --- GPT-OSS ------------------------------------------------------------------------------------


def gpt_oss() -> torch.nn.Module:
    """A tiny HF GptOssForCausalLM (eager attention with sinks; a sliding then a full layer) whose
    router, biases and sinks are drawn N(0, 1): HF initialises the biases and sinks to 0 and the
    router near 0, which would hide the terms the fusion must keep (and make top-k ties)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=hf_tiny.VOCAB, hidden_size=32, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=256, use_cache=False,
                       layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"  # the layers read it at call time
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias")) or ".router." in name:
                p.normal_(generator=gen)
    return model


def _router_gap(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """The smallest margin between a token's k-th and (k+1)-th router logit over all layers (a
    near tie could let the fused and the eager top-k pick different experts)."""
    logits = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, o: logits.append(o[0]))
             for layer in model.model.layers]  # fmt: skip
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    k = model.config.num_experts_per_tok
    top = torch.cat(logits).sort(-1, descending=True).values
    return (top[:, k - 1] - top[:, k]).min().item()


def test_gpt_oss_one_sdpa_route_experts_per_layer():
    """HF GPT-OSS after the whole pipeline: per layer one attn.sdpa (sinks), one moe.route (the
    router bias on the logits, softmax over the top-2 = the renormalised softmax) and one
    moe.experts (gpt_oss gate, limit 7, alpha 1.702, expert biases), equal to HF eager."""
    model, ids = gpt_oss(), hf_tiny.tokens(1, 12)
    assert _router_gap(model, ids) > 1e-3
    ctx = PassContext()
    g = passes.pipeline(capture(model, (ids,)), ctx=ctx)
    counts = Counter(n.name for n in g.ops if n.name.startswith(("moe.", "attn.")))
    assert counts == {"attn.sdpa": 2, "moe.route": 2, "moe.experts": 2}, counts
    for n in g.ops:
        if n.name == "moe.route":
            assert n.attrs["logit_bias"] and not n.attrs["bias"] and n.attrs["renorm"]
            assert (n.attrs["score"], n.attrs["k"]) == ("softmax", 2)
        if n.name == "moe.experts":
            assert n.attrs["activation"] == "gpt_oss" and n.attrs["expert_bias"]
            assert (n.attrs["limit"], n.attrs["alpha"]) == (7.0, 1.702)
    for rule in ("softmax_after_topk", "stacked_slice", "histc", "unsort_sum"):
        assert ctx.counters[f"canonical_moe.{rule}"] >= 2, rule
    _check_logits(g, model, ids)


def test_gpt_oss_batched_mm_experts():
    """HF's `batched_mm` experts on GPT-OSS's transposed storage (rows [S, 1, d] times the
    gathered W[e] [S, d, 2I], plus the gathered bias rows) form the same moe.experts."""
    model, ids = gpt_oss(), hf_tiny.tokens(1, 12)
    for layer in model.model.layers:
        layer.mlp.experts.config._experts_implementation = "batched_mm"
    ctx = PassContext()
    g = _fused(model, ids, ctx)
    assert _moe_counts(g) == {"moe.route": 2, "moe.experts": 2}
    assert ctx.counters["fuse_moe.moe.experts_batched"] == 2
    assert ctx.counters["canonical_moe.stacked_slice"] == 4  # gate and up of each layer
    experts = next(n for n in g.ops if n.name == "moe.experts").attrs
    assert experts["activation"] == "gpt_oss" and experts["expert_bias"]
    _check_logits(g, model, ids)


def _up_not_shifted(self, gate_up: torch.Tensor) -> torch.Tensor:
    """A near miss of GPT-OSS's gate: up · glu, not (up + 1) · glu."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=self.limit)
    up = up.clamp(min=-self.limit, max=self.limit)
    return up * (gate * torch.sigmoid(gate * self.alpha))


def _bias_after_softmax(self, hidden_states: torch.Tensor):
    """A near miss of GPT-OSS's router: the bias added to the softmax scores, and the top-k of
    those renormalised (the bias moves the weights after scoring: no score function of the
    logits)."""
    logits = torch.nn.functional.linear(hidden_states, self.weight)
    values, experts = torch.topk(logits.softmax(dim=-1) + self.bias, self.top_k, dim=-1)
    return logits, values / values.sum(dim=-1, keepdim=True), experts


def test_gpt_oss_near_misses_stay_unfused_and_are_explained():
    """Layer 0's router adds its (positive) bias after the softmax, layer 1's experts drop the
    +1 on up: those two do not fuse (the other layer's route / experts do), the graph equals
    eager, and explain names the failing sub-pattern and the source line."""
    model, ids = gpt_oss(), hf_tiny.tokens(1, 12)
    router, experts = model.model.layers[0].mlp.router, model.model.layers[1].mlp.experts
    with torch.no_grad():
        router.bias.abs_()  # positive: the renormalising sum stays away from 0
    router.forward = types.MethodType(_bias_after_softmax, router)
    experts._apply_gate = types.MethodType(_up_not_shifted, experts)
    ctx = PassContext()
    g = _fused(model, ids, ctx)
    assert _moe_counts(g) == {"moe.route": 1, "moe.experts": 1}
    assert ctx.near_misses["fuse_moe.moe.experts"] >= 1
    _check_logits(g, model, ids)

    why = str(explain(RULES[0], g))  # the router: its weights are not a score of the logits
    assert "failed at score" in why and "add(%" in why and "mlp.router.bias" in why, why
    assert "model.layers.0.mlp.router @ modeling_gpt_oss.py:" in why, why
    why = str(explain(RULES[1], g))  # the experts: the gate's (up + 1) is a bare clamp(up)
    assert "failed at routed" in why and "expected op add, got clamp" in why, why
    assert "model.layers.1.mlp.experts @ moe.py:" in why, why


@slow
@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_gpt_oss_compiled_equals_hf_eager(backend):
    import dsv4c

    model, ids = gpt_oss(), hf_tiny.tokens(1, 12)
    compiled = dsv4c.compile(model, (ids,), backend=backend, target="cpu")
    counts = Counter(n.name for n in compiled.graph.ops if n.name.startswith(("moe.", "attn.")))
    assert counts == {"attn.sdpa": 2, "moe.route": 2, "moe.experts": 2}, counts
    (got,) = compiled(ids)
    with torch.no_grad():
        want = model(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
