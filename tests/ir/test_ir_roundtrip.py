"""Printer/parser round trip, structural equality, and symbolic dim text."""

from __future__ import annotations

import math

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

import graphs
import ir
from ir import DType, TensorType
from ir.symbolic import canon_dim, dim_str, parse_dim


@pytest.mark.parametrize("name", sorted(graphs.ALL))
def test_roundtrip(name: str) -> None:
    g = graphs.ALL[name]()
    text = ir.to_text(g)
    g2 = ir.parse(text)
    ir.assert_structural_equal(g, g2)
    assert g2 == g
    assert ir.to_text(g2) == text  # printing is a fixed point
    ir.verify(g2)


def test_text_form_reads_as_documented() -> None:
    text = ir.to_text(graphs.moe_gate())
    assert text.startswith("graph prefill(\n    %tokens: i64[B,T] activation,\n")
    assert "    %embed.weight: f32[100,64] parameter,\n" in text
    assert "    %cache.k: bf16[B,128,64] cache,\n" in text
    assert (
        "  %vals: f32[B,T,2], %idx: i64[B,T,2] = topk(%scores, k=2, dim=-1, largest=true, "
        "sorted=true)  # layers.0.ffn.gate @ model.py:120\n"
    ) in text
    assert "= slice(%0, dim=1, start=0, end=T//2, step=1)  # @ model.py:7\n" in text
    assert "= matmul(%0, %layers.0.ffn.gate.weight)  # layers.0.ffn.gate\n" in text
    assert "  return %4, %idx, %2, %5\n}\n" in text


def test_attribute_values_print_and_parse() -> None:
    g = graphs.attrs_zoo()
    text = ir.to_text(g)
    for frag in (
        "min=none, max=inf",
        "min=-0.0, max=1e+30",
        "beta=nan, threshold=-1e-30",
        "shape=[T, D, 4]",
        "shape=[-1, 4]",
        "start=T - T//4 - 1, end=none, step=2",
        "pads=[1, -1, 0, T % 128], value=-2",
        "dims=[], keepdim=false",
        "dim=none, keepdim=true",
        "shape=[T + 8, 2], value=true, dtype=bool",
        "start=1, end=2*T, step=3, dtype=i32",
    ):
        assert frag in text, frag
    g2 = ir.parse(text)
    clamp = g2.ops[1].op
    assert math.copysign(1.0, clamp.min) == -1.0 and isinstance(g2.ops[6].op.value, int)
    assert math.isnan(g2.ops[2].op.beta)


def test_nested_body_is_printed_inline_and_indented() -> None:
    text = ir.to_text(graphs.fused())
    assert (
        "= fused.kernel(%x, %layers.1.mlp.bias, body=graph fused_0(%p: f32[T,8] activation" in text
    )
    assert "\n    %2: f32[T,8] = silu(%1)\n" in text  # body ops one level deeper
    assert "\n      %e: f32[T,8] = exp(%u)\n" in text  # doubly nested
    assert "\n  })  # layers.1.mlp\n" in text


def test_structural_inequality_is_reported_with_marker() -> None:
    g = graphs.chain(12)
    h = graphs.chain(12)
    h.ops[7] = ir.Node(ir.OPS["log"](), h.ops[7].operands, h.ops[7].results)
    assert not ir.structurally_equal(g, h)
    with pytest.raises(AssertionError) as e:
        ir.assert_structural_equal(g, h)
    msg = str(e.value)
    assert msg.startswith("graphs differ at op 7: op exp != log")
    assert ">>> %7: f32[4] = exp(%6)" in msg and ">>> %7: f32[4] = log(%6)" in msg


def test_structural_equality_details() -> None:
    g = graphs.moe_gate()
    text = ir.to_text(g)
    # attribute value, float vs int, loc and names all matter
    assert ir.parse(text.replace("dim=-1, largest", "dim=1, largest")) != g
    assert ir.parse(text.replace("value=0.5", "value=1")) != g
    assert ir.parse(text.replace("@ model.py:120", "@ model.py:121")) != g
    assert ir.structurally_equal(ir.parse(text.replace("@ model.py:120", "")), g, locs=False)
    renamed = ir.parse(text.replace("%scores", "%probs"))
    assert not ir.structurally_equal(renamed, g)
    assert ir.structurally_equal(renamed, g, names=False)
    diff = ir.parse(text.replace("k=2", "k=3").replace(",2]", ",3]"))
    with pytest.raises(AssertionError, match=r"at op 3: attribute k: 2 != 3|at op 3: result"):
        ir.assert_structural_equal(g, diff)


def test_loc_quoting_roundtrip() -> None:
    locs = [
        ir.Loc("a @ b", "x.py:1"),
        ir.Loc(" spaced ", ""),
        ir.Loc("", ""),
        ir.Loc('q"uote', "#1 @2"),
        ir.Loc("m", ""),
    ]
    bl = ir.Builder()
    v = bl.input("x", TensorType((2,), DType.f32))
    for loc in locs:
        v = bl.op("neg", [v], loc=loc)
    bl.output(v)
    g = bl.build()
    g2 = ir.parse(ir.to_text(g))
    assert [n.loc for n in g2.ops] == locs


def test_anonymous_graph_and_empty_return() -> None:
    g = ir.Graph([], [], [], name=None)
    assert ir.to_text(g) == "graph() {\n  return\n}\n"
    assert ir.parse(ir.to_text(g)) == g


def test_strings_and_names_roundtrip() -> None:
    bl = ir.Builder(name="g.v1")
    x = bl.input("0.weight", TensorType((), DType.i64), role="parameter")
    y = bl.op("copy", [x], name="layers.10.out_proj")
    bl.output(y)
    g = bl.build()
    assert "%0.weight: i64[] parameter" in ir.to_text(g)
    assert ir.parse(ir.to_text(g)) == g
    for bad in ("a b", "x-y", "", ".x", "x.", "a..b", "%x", "é"):
        with pytest.raises(ir.IRTypeError, match="invalid value name"):
            ir.Value(bad, TensorType((), DType.f32))


# --- symbolic dims ---------------------------------------------------------------------------

T, B = ir.sym("T"), ir.sym("B")


@pytest.mark.parametrize(
    "expr,text",
    [
        (T // 4, "T//4"),
        (T + 8, "T + 8"),
        (4 * T, "4*T"),
        (sympy.Max(T, 4), "Max(4, T)"),
        (T % 128, "T % 128"),
        (T - 1, "T - 1"),
        (B * T, "B*T"),
        ((T + 3) % 128, "(T + 3) % 128"),
        (sympy.ceiling(T / 4), "ceiling(T/4)"),
        (T**2, "T**2"),
        (sympy.Min(T, 8) - 2, "Min(8, T) - 2"),
    ],
)
def test_dim_text(expr, text) -> None:
    assert dim_str(canon_dim(expr)) == text
    assert parse_dim(text) == canon_dim(expr)


def test_foreign_symbols_are_canonicalised() -> None:
    t = TensorType((sympy.Symbol("T") * 2, sympy.Integer(3)), DType.f32)
    assert t == TensorType((2 * T, 3), DType.f32)
    assert isinstance(t.shape[1], int)


_atoms = st.sampled_from([T, B, sympy.Integer(1), sympy.Integer(3), sympy.Integer(128)])


_divisors = st.sampled_from([T, B, sympy.Integer(2), sympy.Integer(3), sympy.Integer(128), T + 1])


def _combine(children):
    pair = st.tuples(children, children)
    div = st.tuples(children, _divisors)
    return st.one_of(
        pair.map(lambda p: p[0] + p[1]),
        pair.map(lambda p: p[0] - p[1]),
        pair.map(lambda p: p[0] * p[1]),
        div.map(lambda p: sympy.floor(p[0] / p[1])),
        div.map(lambda p: sympy.Mod(p[0], p[1])),
        pair.map(lambda p: sympy.Max(p[0], p[1])),
        pair.map(lambda p: sympy.Min(p[0], p[1])),
        div.map(lambda p: sympy.ceiling(p[0] / p[1])),
    )


@settings(max_examples=150, deadline=None)
@given(st.recursive(_atoms, _combine, max_leaves=6))
def test_random_dims_roundtrip(expr) -> None:
    d = canon_dim(expr)
    assert parse_dim(dim_str(d)) == d
