"""The pipeline: debug switches (DEBUG_IR, VERIFY_EACH, STATS), options, and the captured tiny
DeepSeek-V4 prefill (verifies, fewer ops, same outputs as before the pipeline)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from passes_helpers import tiny_model, tiny_prefill_graph

import ir
import passes
from ir import DType, TensorType
from passes import PassContext


def small_graph() -> ir.Graph:
    b = ir.Builder(name="small")
    x = b.input("x", TensorType((ir.sym("T"), 4), DType.f32))
    y = b.op("mul", [b.op("unsqueeze", [x], dim=0), b.constant(1.0, DType.f32)])
    b.output(b.op("exp", [y]))
    return b.build()


def test_env_switches_are_read_at_call_time(monkeypatch, capsys) -> None:
    monkeypatch.setenv("DEBUG_IR", "1")
    monkeypatch.setenv("STATS", "1")
    monkeypatch.setenv("VERIFY_EACH", "0")
    out = passes.pipeline(small_graph())
    err = capsys.readouterr().err
    assert "// ----- after canonicalize: 2 ops -----" in err
    assert "graph small(%x: f32[T,4] activation) {" in err  # the graph text follows
    assert "pass times:" in err and "canonicalize" in err
    assert "rule hits:" in err and "mul_one" in err and "unsqueeze_squeeze_to_reshape" in err
    assert "rules that never fired (" in err and "neg_neg" in err
    assert [n.name for n in out.ops] == ["reshape", "exp"]

    monkeypatch.delenv("DEBUG_IR")
    monkeypatch.delenv("STATS")
    passes.pipeline(small_graph())
    assert capsys.readouterr().err == ""


def test_verify_each_names_the_pass_that_broke_the_graph() -> None:
    def breaks(g: ir.Graph, ctx: PassContext) -> ir.Graph:
        return ir.Graph(g.inputs, [], [ir.Value("nowhere", g.inputs[0].type)], name=g.name)

    ctx = PassContext.from_env(env={"VERIFY_EACH": "1"})
    assert ctx.verify_each and not ctx.debug_ir and not ctx.stats
    with pytest.raises(ir.VerifyError, match="after pass breaks:\nverify: graph output %nowhere"):
        ctx.run("breaks", breaks, small_graph())
    PassContext.from_env(env={"VERIFY_EACH": "false"}).run("breaks", breaks, small_graph())


def test_options_and_target_reach_the_context() -> None:
    ctx = PassContext.from_env(target="sm_90", options={"fuse": False}, env={})
    out = passes.pipeline(small_graph(), ctx=ctx)
    assert ctx.target == "sm_90" and ctx.options == {"fuse": False}
    assert "canonicalize" in ctx.times and ctx.counters["mul_one"] == 1
    ir.verify(out)


def test_tiny_prefill_pipeline_keeps_outputs() -> None:
    model, g = tiny_model(), tiny_prefill_graph()
    ctx = PassContext()
    start = time.perf_counter()
    out = passes.pipeline(g, ctx=ctx)
    elapsed = time.perf_counter() - start
    ir.verify(out)
    print(f"\ntiny prefill: {len(g.ops)} -> {len(out.ops)} ops in {elapsed:.2f} s")
    print(ctx.report())
    before, after = Counter(n.name for n in g.ops), Counter(n.name for n in out.ops)
    for name in sorted(before | after, key=lambda k: -before[k]):
        if before[name] != after[name]:
            print(f"  {name:<12} {before[name]:5d} -> {after[name]:5d}")
    assert len(out.ops) < 0.8 * len(g.ops)
    assert ctx.counters["cse"] > 0 and ctx.counters["unsqueeze_squeeze_to_reshape"] > 0
    assert [v.name for v in out.inputs] == [v.name for v in g.inputs]

    params = model.state_dict()
    for seed, shape in ((1, (2, 40)), (2, (1, 37))):
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, model.cfg.vocab_size, shape, generator=gen)
        (want,) = ir.interpret(g, tokens, params=params)
        (got,) = ir.interpret(out, tokens, params=params)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert (got - want).abs().max().item() <= 1e-5
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_tiny_prefill_is_canonical_after_one_run() -> None:
    out = passes.canonicalize(tiny_prefill_graph())
    ctx = PassContext()
    again = passes.canonicalize(out, ctx)
    assert sum(ctx.counters.values()) == 0, ctx.report()
    assert again is out or again == out
