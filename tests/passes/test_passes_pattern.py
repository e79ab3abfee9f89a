"""The pattern language (every kind of constraint), the rewrite driver and `explain`."""

from __future__ import annotations

import time

import pytest
from passes_helpers import assert_same_outputs

import ir
import passes
from ir import DType, Kind, Loc, TensorType
from passes import Match, PassContext, Rule, const, either, explain, op, rewrite, var
from passes.pattern import match_node
from passes.rewrite import GraphView

F32 = DType.f32


def silu_graph(*, same: bool = True, dtype: DType = F32) -> ir.Graph:
    """y = x * sigmoid(x) (or x * sigmoid(z) when not `same`), with locations."""
    b = ir.Builder(name="g")
    x = b.input("x", TensorType((4, 8), dtype))
    z = b.input("z", TensorType((4, 8), dtype))
    s = b.op("sigmoid", [x if same else z], loc=Loc("mlp.act", "mlp.py:10"))
    b.output(b.op("mul", [x, s], loc=Loc("mlp.act", "mlp.py:11")))
    return b.build()


def root(g: ir.Graph, mnemonic: str) -> ir.Node:
    return next(n for n in g.ops if n.name == mnemonic)


def matches(pat, g: ir.Graph, mnemonic: str) -> bool:
    return isinstance(match_node(pat, root(g, mnemonic), GraphView(g)), Match)


SILU = op("mul", var("x"), op("sigmoid", var("x")))


def test_mnemonic_operands_and_repeated_capture() -> None:
    assert matches(SILU, silu_graph(), "mul")
    assert not matches(SILU, silu_graph(same=False), "mul")  # x must be the same value
    assert matches(op({"mul", "add"}, var(), var()), silu_graph(), "mul")
    assert not matches(op("add"), silu_graph(), "mul")


def test_commutative_operands_match_in_either_order() -> None:
    swapped = op("mul", op("sigmoid", var("x")), var("x"))
    assert matches(swapped, silu_graph(), "mul")
    assert not matches(op("mul", op("sigmoid"), var(), commute=False), silu_graph(), "mul")


def test_commutative_choice_is_revisited_when_a_later_sibling_fails() -> None:
    # (a * b) - b: matching mul(x, y) first binds x = a; the sibling needs x = b, so the
    # matcher goes back and tries the mul's other order.
    b = ir.Builder()
    a, c = b.input("a", TensorType((4,), F32)), b.input("b", TensorType((4,), F32))
    b.output(b.op("sub", [b.op("mul", [a, c]), c]))
    g = b.build()
    pat = op("sub", op("mul", var("x"), var("y")), var("x"))
    m = match_node(pat, root(g, "sub"), GraphView(g))
    assert isinstance(m, Match) and m["x"].name == "b" and m["y"].name == "a"
    assert not matches(op("sub", op("mul", var("x"), var("y"), commute=False), var("x")), g, "sub")


def test_either_matches_each_spelling_and_backtracks() -> None:
    # silu as one op or spelled out: the graph's x * sigmoid(x) matches the second alternative
    act = either(op("silu", var("x")), op("mul", var("x"), op("sigmoid", var("x"))))
    assert matches(act, silu_graph(), "mul")
    assert not matches(act, silu_graph(same=False), "mul")
    b = ir.Builder()
    a, c = b.input("a", TensorType((4,), F32)), b.input("c", TensorType((4,), F32))
    b.output(b.op("sub", [b.op("add", [a, c]), c]))
    g = b.build()
    # alternative 0 binds y = a (and fails on the sibling), alternative 1 binds y = c
    pat = op(
        "sub",
        either(op("add", var("y"), var(), commute=False), op("add", var(), var("y"))),
        var("y"),
    )
    m = match_node(pat, root(g, "sub"), GraphView(g))
    assert isinstance(m, Match) and m["y"].name == "c"
    assert act.mnemonics() == frozenset({"silu", "mul"})
    assert act.describe() == "either(silu(x) | mul(x, sigmoid(x)))"
    with pytest.raises(ValueError, match="at least two"):
        either(op("silu"))


def test_kind_dtype_rank_uses_and_attrs() -> None:
    g = silu_graph()
    assert matches(op(None, kind=Kind.BROADCAST), g, "mul")
    assert not matches(op(None, kind=Kind.REDUCTION), g, "mul")
    assert matches(op("mul", dtype=F32, rank=2), g, "mul")
    assert not matches(op("mul", dtype=DType.bf16), g, "mul")
    assert not matches(op("mul", rank={1, 3}), g, "mul")
    assert matches(op("mul", type=TensorType((4, 8), F32)), g, "mul")
    assert not matches(op("mul", type=lambda t: t.shape[-1] == 16), g, "mul")
    assert matches(op("mul", var("x", uses=2), op("sigmoid", uses=1)), g, "mul")
    assert not matches(op("mul", var("x", uses=1), var(), commute=False), g, "mul")

    b = ir.Builder()
    x = b.input("x", TensorType((2, 3), F32))
    b.output(b.op("sum", [x], dims=(1,), keepdim=True))
    g2 = b.build()
    assert matches(op("sum", attrs={"dims": (1,), "keepdim": True}), g2, "sum")
    assert matches(op("sum", attrs={"dims": lambda d: len(d) == 1}), g2, "sum")
    assert not matches(op("sum", attrs={"keepdim": False}), g2, "sum")
    assert not matches(op("sum", attrs={"dims": (1.0,)}), g2, "sum")  # strict: 1 is not 1.0


def test_const_compares_numerically_and_where_constraints() -> None:
    b = ir.Builder()
    x = b.input("x", TensorType((3,), F32))
    b.output(b.op("mul", [x, b.constant(1, DType.i64)]))
    g = b.build()
    assert matches(op("mul", var("x"), const(1.0)), g, "mul")
    assert not matches(op("mul", var("x"), const(True)), g, "mul")
    assert matches(op("mul", var("x"), const(lambda v: v > 0)), g, "mul")
    big = op("mul", var("x"), const(), where=lambda m: m["x"].type.rank > 1 or "x is 1-D")
    fail = match_node(big, root(g, "mul"), GraphView(g))
    assert isinstance(fail, passes.Fail) and "x is 1-D" in fail.reason


# --- the driver ----------------------------------------------------------------------------------


def to_silu(m: Match, rw: passes.Rewriter):
    return rw.op("silu", [m["x"]])


def test_driver_rewrites_counts_and_keeps_locations() -> None:
    g = silu_graph()
    ctx = PassContext()
    out = rewrite(g, [Rule("silu", SILU, to_silu)], ctx=ctx)
    ir.verify(out)
    assert ctx.counters["silu"] == 1
    assert [n.name for n in out.ops] == ["silu"]  # the sigmoid is dead and removed
    assert out.ops[0].loc == Loc("mlp.act", "mlp.py:11")
    assert_same_outputs(g, out, atol=1e-6)


def test_driver_reaches_a_fixed_point_through_chains() -> None:
    b = ir.Builder()
    x = b.input("x", TensorType((4,), F32))
    for _ in range(10):
        x = b.op("neg", [b.op("neg", [x])])
    b.output(x)
    ctx = PassContext()
    out = rewrite(b.build(), passes.CANONICAL_RULES, ctx=ctx)
    assert out.ops == [] and out.outputs == out.inputs
    assert ctx.counters["neg_neg"] == 10


def test_driver_stops_at_the_iteration_cap() -> None:
    # A rule that always rewrites (exp -> exp) never reaches a fixed point.
    again = Rule("again", op("exp", var("x")), lambda m, rw: rw.op("exp", [m["x"]]))
    b = ir.Builder()
    b.output(b.op("exp", [b.input("x", TensorType((2,), F32))]))
    ctx = PassContext(stream=open("/dev/null", "w"))  # noqa: SIM115
    out = rewrite(b.build(), [again], ctx=ctx, max_iters=5)
    ir.verify(out)
    assert ctx.counters["again"] == 5 and ctx.counters["rewrite.iteration_cap"] == 1


def test_driver_rejects_a_rule_that_changes_types() -> None:
    bad = Rule("bad", op("exp", var("x")), lambda m, rw: rw.op("cast", [m["x"]], dtype=DType.bf16))
    b = ir.Builder()
    b.output(b.op("exp", [b.input("x", TensorType((2,), F32))]))
    with pytest.raises(passes.RewriteError, match=r"rule bad: replaces %\d+: f32\[2\] with"):
        rewrite(b.build(), [bad])


def test_rule_may_decline() -> None:
    ctx = PassContext()
    out = rewrite(silu_graph(), [Rule("never", SILU, lambda m, rw: None)], ctx=ctx)
    assert ctx.counters["never"] == 0 and len(out.ops) == 2


def repeated_blocks(n: int) -> ir.Graph:
    """`n` copies of a 10-op block with identities and view chains, chained through `h`.
    Built once with the builder, then copied node by node (no type inference: fast)."""
    b = ir.Builder(name="big")
    x = b.input("x", TensorType((ir.sym("T"), 8), F32))
    one = b.constant(1.0, F32)
    u = b.op("unsqueeze", [x], dim=0)
    r = b.op("reshape", [u], shape=(ir.sym("T"), 8))
    m = b.op("mul", [r, one])
    neg = b.op("neg", [b.op("neg", [m])])
    p = b.op("permute", [b.op("permute", [neg], dims=(1, 0))], dims=(1, 0))
    s = b.op("sigmoid", [p])
    b.output(b.op("mul", [p, b.op("cast", [s], dtype=F32)]))
    block = b.build()
    ops, h = [block.ops[0]], x
    for i in range(n):
        env = {x.name: h, one.name: one}
        for node in block.ops[1:]:
            results = tuple(ir.Value(f"{i}_{v.name}", v.type) for v in node.results)
            operands = tuple(env[v.name] for v in node.operands)
            ops.append(ir.Node(node.op, operands, results, node.loc))
            env.update(zip((v.name for v in node.results), results))
        h = env[block.outputs[0].name]
    return ir.Graph([x], ops, [h], name="big")


def test_sweep_over_100k_ops() -> None:
    """10k blocks of 10 ops all rewritten in one canonicalisation (the time is printed; speed
    goals live in benchmarks/)."""
    g = repeated_blocks(10_000)
    assert len(g.ops) == 100_001
    ctx = PassContext()
    start = time.perf_counter()
    out = passes.canonicalize(g, ctx)
    print(
        f"canonicalize: {len(g.ops)} -> {len(out.ops)} ops in {time.perf_counter() - start:.2f} s"
    )
    assert [n.name for n in out.ops[:2]] == ["silu", "silu"]
    assert len(out.ops) == 10_000  # x * sigmoid(x) -> silu per block, the constant is gone
    assert ctx.counters["neg_neg"] == ctx.counters["permute_permute"] == 10_000
    assert ctx.counters["spelled_silu"] == 10_000
    ir.verify(repeated_blocks(3))
    assert_same_outputs(repeated_blocks(3), passes.canonicalize(repeated_blocks(3)), atol=1e-6)


# --- explain -------------------------------------------------------------------------------


def test_explain_names_the_failing_sub_pattern_with_text_and_location() -> None:
    rule = Rule("silu", SILU, to_silu)
    why = explain(rule, silu_graph(same=False))
    assert not why.fires
    text = str(why)
    assert "rule silu does not fire (1 candidate mul ops, 1 near miss)" in text
    assert "nearest: %" in text and "= mul(%x, %" in text and "mlp.act @ mlp.py:11" in text
    assert "capture x is %x here but %z there" in text
    assert "there: graph input %z: f32[4,8]" in text
    assert "operand of: %0: f32[4,8] = sigmoid(%z)  # mlp.act @ mlp.py:10" in text
    assert "pattern: mul(x, sigmoid(x))" in text


def test_explain_picks_the_deepest_candidate() -> None:
    b = ir.Builder()
    x = b.input("x", TensorType((4,), F32))
    b.op("mul", [x, x], loc=Loc("a", "a.py:1"))  # fails at operand 1 (not a constant)
    y = b.op("mul", [x, b.constant(2.0, F32)], loc=Loc("b", "b.py:2"))  # fails at the value
    b.output(y)
    rule = next(r for r in passes.CANONICAL_RULES if r.name == "mul_one")
    text = str(explain(rule, b.build()))
    assert "nearest: " in text and "b.py:2" in text and "a.py:1" not in text
    assert "attribute value=2.0 does not satisfy 1" in text


def test_explain_reports_type_and_use_count_failures() -> None:
    rule = next(r for r in passes.CANONICAL_RULES if r.name == "mul_one")
    b = ir.Builder()
    x = b.input("x", TensorType((3,), DType.i32))
    b.output(b.op("mul", [x, b.constant(1.0, F32)]))  # i32 * 1.0 -> f32: not an identity
    text = str(explain(rule, b.build()))
    assert "constraint failed: result type f32[3] differs from x's i32[3]" in text

    single = Rule("single", op("mul", var("x"), op("sigmoid", var("x"), uses=1)), to_silu)
    b = ir.Builder()
    x = b.input("x", TensorType((3,), F32))
    s = b.op("sigmoid", [x])
    b.output(b.op("mul", [x, s]), s)
    assert "has 2 use(s), expected 1" in str(explain(single, b.build()))


def test_explain_when_the_rule_fires_or_has_no_candidate() -> None:
    rule = Rule("silu", SILU, to_silu)
    assert str(explain(rule, silu_graph())).startswith("rule silu fires on 1 op(s); first: %")
    none = Rule("no_div", op("div", var(), var()), to_silu)
    assert "the graph has no div op" in str(explain(none, silu_graph()))
    declines = Rule("declines", SILU, lambda m, rw: None)
    assert "the pattern matches 1 op(s) but the rewrite declines" in str(
        explain(declines, silu_graph())
    )
