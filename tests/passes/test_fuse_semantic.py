"""Semantic fusions (passes/fuse_attention.py, fuse_moe.py, fuse_hc.py) on the captured tiny model:
how often each fires, that the interpreter gives the same logits before and after, and that
look-alike subgraphs (one attribute changed) are left alone."""

from __future__ import annotations

import functools
import re
from collections import Counter

import pytest
import torch
from passes_helpers import tiny_model, tiny_prefill_graph

import ir
import passes
from passes.fuse_attention import fuse_attention
from passes.fuse_hc import fuse_hc
from passes.fuse_moe import fuse_moe

# tiny: 4 layers with compress ratios (0, 4, 8, 4), 2 hash-routed; each layer has mHC around
# attention and MoE; the model ends with hc_head.
EXPECTED = {
    "fuse_attention.attn.compress": 5,  # CSA main + indexer keys (layers 1, 3), HCA (layer 2)
    "fuse_attention.attn.indexer_topk": 2,
    "fuse_attention.attn.sparse_mqa": 4,
    "fuse_moe.moe.route": 4,
    "fuse_moe.moe.experts": 4,
    "fuse_hc.hc.pre": 8,
    "fuse_hc.hc.post": 8,
    "fuse_hc.hc.head": 1,
}
SEMANTIC = ("attn.", "moe.", "hc.")


def fuse_all(g: ir.Graph, ctx: passes.PassContext) -> ir.Graph:
    for fuse in (fuse_attention, fuse_moe, fuse_hc):
        g = fuse(g, ctx)
        ir.verify(g)
    return g


@functools.cache
def canonical_tiny() -> ir.Graph:
    return passes.canonicalize(tiny_prefill_graph())


@functools.cache
def fused_tiny() -> tuple[ir.Graph, passes.PassContext]:
    ctx = passes.PassContext()
    return fuse_all(canonical_tiny(), ctx), ctx


def fired(ctx: passes.PassContext) -> dict[str, int]:
    return {k: v for k, v in ctx.counters.items() if k.startswith("fuse_")}


def test_every_fusion_fires_the_expected_number_of_times() -> None:
    g, ctx = fused_tiny()
    assert fired(ctx) == EXPECTED
    kinds = Counter(
        (n.name, n.attrs.get("variant"), n.attrs.get("hash"), n.attrs.get("shared"))
        for n in g.ops
        if n.name.startswith(SEMANTIC)
    )
    assert kinds[("attn.sparse_mqa", "window", None, None)] == 1
    assert kinds[("attn.sparse_mqa", "hca", None, None)] == 1
    assert kinds[("attn.sparse_mqa", "csa", None, None)] == 2
    assert kinds[("moe.route", None, True, None)] == 2
    assert kinds[("moe.route", None, False, None)] == 2
    assert kinds[("moe.experts", None, None, True)] == 4
    assert {n.attrs["iters"] for n in g.ops if n.name == "hc.pre"} == {20}
    left = Counter(n.name for n in g.ops)
    for gone in ("softmax", "topk", "argsort", "grouped_mm", "index_multi", "index_put", "div"):
        assert left[gone] <= (1 if gone == "div" else 0), (gone, left[gone])  # 1 div: RoPE table
    n_before, n_after = len(tiny_prefill_graph().ops), len(g.ops)
    print(f"tiny prefill: {n_before} ops -> {n_after} after the semantic fusions")
    assert n_after < n_before // 5


def test_fusions_fire_only_through_their_own_pass() -> None:
    g = canonical_tiny()
    for fuse, prefix in ((fuse_attention, "attn."), (fuse_moe, "moe."), (fuse_hc, "hc.")):
        ctx = passes.PassContext()
        out = fuse(g, ctx)
        ir.verify(out)
        want = {k: v for k, v in EXPECTED.items() if k.startswith(fuse.__name__ + ".")}
        assert fired(ctx) == want
        made = {n.name for n in out.ops if n.name.startswith(SEMANTIC)}
        assert made == {k.split(".", 1)[1] for k in want}
        assert all(name.startswith(prefix) for name in made)


@pytest.mark.parametrize("t", [24, 37])
def test_interpreter_gives_the_same_logits(t: int) -> None:
    g, _ = fused_tiny()
    params = tiny_model().state_dict()
    tokens = torch.randint(0, 128, (2, t), generator=torch.Generator().manual_seed(t))
    (before,) = ir.interpret(tiny_prefill_graph(), tokens, params=params)
    (after,) = ir.interpret(g, tokens, params=params)
    assert (after - before).abs().max().item() <= 1e-5
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    with torch.no_grad():
        eager = tiny_model().prefill(tokens)
    assert (after - eager).abs().max().item() <= 1e-5


def test_costs_of_the_semantic_ops() -> None:
    g, _ = fused_tiny()
    env = {ir.sym("B"): 2, ir.sym("T"): 24}
    for n in g.ops:
        if not n.name.startswith(SEMANTIC):
            continue
        cost = n.op.cost([v.type for v in n.operands], [v.type for v in n.results])
        flops, nbytes = (int(ir.symbolic.subs_dim(x, env)) for x in (cost.flops, cost.bytes))
        assert flops > 0 and nbytes >= sum(
            int(ir.symbolic.subs_dim(v.type.nbytes, env)) for v in n.results
        ), n


def test_fused_graph_round_trips() -> None:
    g, _ = fused_tiny()
    assert ir.parse(ir.to_text(g)) == g


# --- look-alikes: one attribute changed, the fusion must not fire there ----------------------


def mutated(pattern: str, repl: str, loc: str) -> ir.Graph:
    """The canonical tiny graph with the first op at `loc` whose text matches `pattern` edited."""
    lines = ir.to_text(canonical_tiny()).splitlines()
    for i, line in enumerate(lines):
        if loc in line and re.search(pattern, line):
            lines[i] = re.sub(pattern, repl, line, count=1)
            return ir.parse("\n".join(lines))
    raise AssertionError(f"no line at {loc} matches {pattern}")


@pytest.mark.parametrize(
    "pattern,repl,loc,counter,fires",
    [
        # compressor softmax over channels instead of the block's rows
        (r"softmax\((%\w+), dim=2\)", r"softmax(\1, dim=3)", "layers.2.attn.compressor @", "attn.compress", 4),
        # indexer top-k with masked scores padded by 0 instead of -inf
        (r"value=-inf\)", "value=0.0)", "layers.1.attn @ attention.py:283", "attn.indexer_topk", 1),
        # attention softmax over heads instead of entries (sink concat stays)
        (r"softmax\((%\w+), dim=3\)", r"softmax(\1, dim=2)", "layers.0.attn @ attention.py:288", "attn.sparse_mqa", 3),
        # Sinkhorn logits normalised along the wrong axis
        (r"softmax\((%\w+), dim=3\)", r"softmax(\1, dim=2)", "layers.3 @ deepseek_v4.py:", "hc.pre", 7),
        # sliding window shifted by two (t-9 .. t-2): shared by every layer, so no attention fuses
        (r"= add\((%\w+), (%\w+)\)", r"= sub(\1, \2)", "attention.py:273", "attn.sparse_mqa", 0),
        # routing that picks the lowest-scoring experts
        (r"largest=true", "largest=false", "layers.2.ffn.gate @", "moe.route", 3),
        # shared expert clamped differently: routed experts fuse, the shared expert does not
        (r"min=-10.0, max=10.0", "min=-5.0, max=5.0", "layers.0.ffn.shared_experts @", "moe.experts", 4),
        # tokens ordered by descending expert id: the offsets no longer bound each expert's rows
        (r"descending=false", "descending=true", "layers.2.ffn.experts @", "moe.experts", 3),
    ],
)  # fmt: skip
def test_look_alikes_are_not_fused(pattern, repl, loc, counter, fires) -> None:
    try:
        g = mutated(pattern, repl, loc)
    except ir.ParseError as e:  # a mutation that breaks types is a bad test, not a pass
        raise AssertionError(f"mutation does not type-check: {e}") from None
    ctx = passes.PassContext()
    out = fuse_all(g, ctx)
    assert fired(ctx).get(next(k for k in EXPECTED if k.endswith(counter)), 0) == fires
    if counter == "moe.experts":
        assert sum(1 for n in out.ops if n.name == counter and n.attrs["shared"]) == 3
