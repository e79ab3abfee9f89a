"""The semantic fusions as rules on the one driver: `explain` answers for every fusion rule, and
a near miss (one wrong piece) stays unfused, stays right, and is explained by sub-pattern and
source line."""

from __future__ import annotations

import functools
import inspect
import os

import pytest
import torch
from passes_helpers import RouteBiasSubtracted, route_args, tiny_prefill_graph

import ir
import passes
from frontend import capture
from passes.fuse_attention import RULES as ATTENTION_RULES
from passes.fuse_hc import RULES as HC_RULES
from passes.fuse_moe import RULES as MOE_RULES
from passes.fuse_moe import fuse_moe
from passes.fuse_nsa import RULES as NSA_RULES
from passes.fuse_sdpa import RULES as SDPA_RULES
from passes.fuse_sparse_attention import RULES as SPARSE_RULES

# tiny V4 prefill: how often each fusion rule fires (the decode step only fires on decode graphs)
FIRES = {
    "fuse_attention.attn.compress": 5,
    "fuse_attention.attn.sparse_mqa": 4,
    "fuse_attention.attn.indexer_topk": 2,
    "fuse_attention.attn.compress_step": 0,
    "fuse_moe.moe.route": 4,
    "fuse_moe.moe.experts": 4,
    "fuse_moe.moe.experts_batched": 0,  # HF's batched_mm form
    "fuse_moe.moe.experts_loop": 0,  # a loop over nn.ModuleList experts
    "fuse_hc.hc.pre": 8,
    "fuse_hc.hc.post": 8,
    "fuse_hc.hc.head": 1,
    "fuse_sdpa.attn.sdpa": 0,  # dense attention: V4 has none
    "fuse_nsa.attn.sdpa": 0,  # NSA's branches: V4 (CSA) has none
    "fuse_nsa.attn.block_select": 0,
    "fuse_sparse_attention.attn.sdpa.gathered": 0,  # DSA's gathered MQA: CSA is sparse_mqa
    "fuse_sparse_attention.attn.sdpa.topk_mask": 0,  # rooted at attn.sdpa: none before fusion
}
# rules whose root op the canonical graph lacks: explain says so instead of naming a candidate
NO_CANDIDATE = {"fuse_sparse_attention.attn.sdpa.topk_mask"}


@functools.cache
def canonical_tiny() -> ir.Graph:
    return passes.canonicalize(tiny_prefill_graph())


@pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="a minute on 2 cores; DSV4C_SLOW=1")
def test_explain_answers_for_every_fusion_rule() -> None:
    g = canonical_tiny()
    rules = [*ATTENTION_RULES, *MOE_RULES, *HC_RULES, *SDPA_RULES, *NSA_RULES, *SPARSE_RULES]
    assert {r.name for r in rules} == set(FIRES)
    for rule in rules:
        why = passes.explain(rule, g)
        assert why.matches == FIRES[rule.name], (rule.name, str(why))
        text = str(why)
        if rule.name in NO_CANDIDATE:
            assert "0 candidate" in text, text
        elif not why.fires:  # names the nearest candidate, the failing sub-pattern and its line
            assert "failed at " in text and " @ " in text and "computes: " in text, text


def test_route_near_miss_is_not_fused_and_explained() -> None:
    args = route_args()
    g = passes.canonicalize(capture(RouteBiasSubtracted(), args))
    ctx = passes.PassContext()
    out = fuse_moe(g, ctx)
    assert ctx.counters["fuse_moe.moe.route"] == 0
    assert ctx.near_misses["fuse_moe.moe.route"] == 1
    for a, b in zip(ir.interpret(out, *args), ir.interpret(g, *args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    text = str(passes.explain(MOE_RULES[0], g))
    assert "1 near miss" in text, text
    assert "failed at choice after 2 steps" in text, text
    assert "the top-k ranks neither the scores nor scores + bias" in text, text
    line = inspect.getsourcelines(RouteBiasSubtracted.forward)[1] + 2  # `(s - bias).topk(...)`
    assert f"= sub(%3, %bias)  # @ passes_helpers.py:{line}" in text, text  # op and line
