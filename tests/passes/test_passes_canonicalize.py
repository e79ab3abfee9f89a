"""Canonicalisation: each rule on a small graph (fires N times, interpreter output unchanged), and
different spellings of one computation reaching structurally equal graphs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from passes_helpers import assert_same_outputs, canonical

import ir
import passes
from ir import DType, Loc, TensorType

F32, BF16, I32, I64 = DType.f32, DType.bf16, DType.i32, DType.i64
LOC = Loc("layers.0.ffn", "model.py:7")


def graph(build: Callable, *types: TensorType) -> ir.Graph:
    """A graph with inputs x0, x1, ... of `types`; `build(b, *inputs)` returns the outputs."""
    b = ir.Builder(name="g")
    xs = [b.input(f"x{i}", t) for i, t in enumerate(types)]
    out = build(b, *xs)
    b.output(*(out if isinstance(out, tuple) else (out,)))
    return b.build()


def c(b: ir.Builder, value, dtype=F32):
    return b.op("constant", [], value=value, dtype=dtype, loc=LOC)


def t(*shape, dtype=F32) -> TensorType:
    return TensorType(shape, dtype)


def iota(b: ir.Builder, n: int, modulo: int | None = None):
    """0..n-1 (i64), optionally % modulo: in-range indices with repeats."""
    out = b.op("iota", [], start=0, end=n, step=1, dtype=I64)
    return out if modulo is None else b.op("remainder", [out, c(b, modulo, I64)])


def spelled_softmax(b: ir.Builder, x, shifted: bool = True, dim: int = 1):
    """exp(x - amax(x)) / sum(exp(x - amax(x))) along `dim` (without the max if not shifted)."""
    if shifted:
        x = b.op("sub", [x, b.op("amax", [x], dims=(dim,), keepdim=True)])
    e = b.op("exp", [x])
    return b.op("div", [e, b.op("sum", [e], dims=(dim,), keepdim=True)])


def sorted_head(b: ir.Builder, x, k: int, dim: int = 1, descending: bool = True):
    """The first k values and indices of sort(x) along `dim`."""
    values, indices = b.op("sort", [x], dim=dim, descending=descending)
    return tuple(b.op("slice", [v], dim=dim, start=0, end=k) for v in (values, indices))


# (rule, expected hits, builder, input types)
CASES = [
    ("add_zero", 2, lambda b, x: b.op("add", [b.op("add", [x, c(b, 0.0)]), c(b, 0)]), [t(2, 3)]),
    ("sub_zero", 1, lambda b, x: b.op("sub", [x, c(b, 0.0)]), [t(2, 3)]),
    ("mul_one", 2, lambda b, x: b.op("mul", [b.op("mul", [x, c(b, 1.0)]), c(b, 1)]), [t(4)]),
    ("div_one", 1, lambda b, x: b.op("div", [x, c(b, 1.0)]), [t(4)]),
    ("pow_one", 1, lambda b, x: b.op("pow", [x, c(b, 1.0)]), [t(4)]),
    ("pow_two", 2, lambda b, x: b.op("pow", [b.op("pow", [x, c(b, 2, I64)]), c(b, 2.0)]), [t(4)]),
    ("neg_neg", 1, lambda b, x: b.op("neg", [b.op("neg", [x])]), [t(4)]),
    ("mul_minus_one", 1, lambda b, x: b.op("mul", [x, c(b, -1.0)]), [t(4)]),
    ("zero_sub", 1, lambda b, x: b.op("sub", [c(b, 0.0), x]), [t(4)]),
    ("add_neg", 1, lambda b, x, y: b.op("add", [x, b.op("neg", [y])]), [t(4), t(4)]),
    ("sub_neg", 1, lambda b, x, y: b.op("sub", [x, b.op("neg", [y])]), [t(4), t(4)]),
    ("div_pow2", 1, lambda b, x: b.op("div", [x, c(b, 0.25)]), [t(4)]),
    ("where_same", 1, lambda b, m, x: b.op("where", [m, x, x]), [t(4, dtype=DType.bool), t(4)]),
    ("cast_noop", 1, lambda b, x: b.op("cast", [x], dtype=F32), [t(4)]),
    (
        "cast_cast",
        1,
        lambda b, x: b.op("cast", [b.op("cast", [x], dtype=F32)], dtype=I32),
        [t(4, dtype=BF16)],
    ),
    ("copy", 1, lambda b, x: b.op("copy", [x]), [t(4)]),
    (
        "view_noop",
        2,
        lambda b, x: b.op("expand", [b.op("reshape", [x], shape=(2, 3))], shape=(2, 3)),
        [t(2, 3)],
    ),
    ("slice_noop", 1, lambda b, x: b.op("slice", [x], dim=1, start=0, end=None), [t(2, 3)]),
    ("pad_noop", 1, lambda b, x: b.op("pad", [x], pads=(0, 0)), [t(2, 3)]),
    ("repeat_noop", 1, lambda b, x: b.op("repeat", [x], repeats=(1, 1)), [t(2, 3)]),
    ("concat_single", 1, lambda b, x: b.op("concat", [x], dim=0), [t(2, 3)]),
    ("permute_identity", 1, lambda b, x: b.op("permute", [x], dims=(0, -1)), [t(2, 3)]),
    (
        "permute_permute",
        1,
        lambda b, x: b.op("permute", [b.op("permute", [x], dims=(1, 2, 0))], dims=(2, 0, 1)),
        [t(2, 3, 4)],
    ),
    (
        "unsqueeze_squeeze_to_reshape",
        2,
        lambda b, x: b.op("squeeze", [b.op("unsqueeze", [x], dim=1)], dim=0),
        [t(1, 3)],
    ),
    ("select_unit_to_reshape", 1, lambda b, x: b.op("select", [x], dim=1, index=0), [t(2, 1, 3)]),
    (
        "reshape_reshape",
        2,
        lambda b, x: b.op(
            "reshape",
            [b.op("reshape", [b.op("reshape", [x], shape=(6,))], shape=(3, 2))],
            shape=(1, 6),
        ),
        [t(2, 3)],
    ),
    ("reshape_explicit", 1, lambda b, x: b.op("reshape", [x], shape=(-1, 2)), [t(2, 3)]),
    (
        "expand_expand",
        1,
        lambda b, x: b.op("expand", [b.op("expand", [x], shape=(3, 4))], shape=(2, 3, 4)),
        [t(3, 1)],
    ),
    ("expand_explicit", 1, lambda b, x: b.op("expand", [x], shape=(2, -1, 4)), [t(3, 1)]),
    (
        "full_to_constant",
        1,
        lambda b, x: b.op("add", [x, b.op("full", [], shape=(), value=2.0)]),
        [t(4)],
    ),
    (
        "fold_constants",
        3,  # (2 + 3) * 4 -> 20; cast(20 -> i32)
        lambda b, x: b.op(
            "add",
            [
                x,
                b.op(
                    "cast",
                    [b.op("mul", [b.op("add", [c(b, 2.0), c(b, 3.0)]), c(b, 4.0)])],
                    dtype=I32,
                ),
            ],
        ),
        [t(4, dtype=I32)],
    ),
    (
        "fold_view_of_uniform",
        2,
        lambda b, x: b.op(
            "add",
            [
                x,
                b.op(
                    "expand",
                    [b.op("unsqueeze", [b.op("full", [], shape=(3,), value=2.0)], dim=0)],
                    shape=(2, 3),
                ),
            ],
        ),
        [t(2, 3)],
    ),
    ("commute_constant_right", 1, lambda b, x: b.op("mul", [c(b, 3.0), x]), [t(4)]),
    (
        "expand_into_broadcast",
        1,
        lambda b, x, y: b.op("sub", [y, b.op("expand", [x], shape=(2, 3))]),
        [t(3), t(2, 3)],
    ),
    (
        "nonnegative_dims",
        3,  # the sum's dims, then softmax's and topk's dim
        lambda b, x: b.op(
            "topk",
            [b.op("softmax", [b.op("sum", [x], dims=(-1, 0), keepdim=True)], dim=-2)],
            k=1,
            dim=-1,
        ),
        [t(2, 3, 4)],
    ),
    (
        "where_not",
        1,
        lambda b, m, x, y: b.op("where", [b.op("logical_not", [m]), x, y]),
        [t(4, dtype=DType.bool), t(4), t(4)],
    ),
    ("spelled_softmax", 1, lambda b, x: spelled_softmax(b, x), [t(2, 5)]),
    ("spelled_softmax_unshifted", 1, lambda b, x: spelled_softmax(b, x, False), [t(2, 5)]),
    ("sort_slice_to_topk", 2, lambda b, x: sorted_head(b, x, 3), [t(2, 5)]),
    ("spelled_silu", 1, lambda b, x: b.op("mul", [b.op("sigmoid", [x]), x]), [t(2, 5)]),
    (
        "index_select_to_index",
        1,
        lambda b, x: b.op("index_select", [x, iota(b, 4)], dim=1),
        [t(2, 5)],
    ),
    (
        "scatter_add_to_index_add",
        1,  # out[j % 3, :] += src[j, :]
        lambda b, x, src: b.op(
            "scatter_add",
            [
                x,
                b.op("expand", [b.op("reshape", [iota(b, 6, 3)], shape=(6, 1))], shape=(6, 5)),
                src,
            ],
            dim=0,
        ),
        [t(3, 5), t(6, 5)],
    ),
    (
        "not_not",
        1,
        lambda b, x: b.op("logical_not", [b.op("logical_not", [x])]),
        [t(4, dtype=DType.bool)],
    ),
]


@pytest.mark.parametrize("rule, hits, build, types", CASES, ids=[case[0] for case in CASES])
def test_rule_fires_and_keeps_semantics(rule: str, hits: int, build, types) -> None:
    g = graph(build, *types)
    out, ctx = canonical(g)
    assert ctx.counters[rule] == hits, ctx.report()
    assert len(out.ops) <= len(g.ops)
    # softmax and silu round once where their spellings round per step
    assert_same_outputs(g, out, atol=1e-6 if "softmax" in rule or "silu" in rule else 0.0)


def test_every_rule_has_a_case() -> None:
    assert {r.name for r in passes.CANONICAL_RULES} == {case[0] for case in CASES}


def test_rules_do_not_fire_when_the_type_would_change() -> None:
    # x * 1.0 with x: i32 promotes to f32; x + zeros[2,3] with x: [3] broadcasts.
    g = graph(
        lambda b, x, y: (
            b.op("mul", [x, c(b, 1.0)]),
            b.op("add", [y, b.op("full", [], shape=(2, 3), value=0.0)]),
        ),
        t(3, dtype=I32),
        t(3),
    )
    out, ctx = canonical(g)
    assert ctx.counters["mul_one"] == 0 and ctx.counters["add_zero"] == 0
    assert [n.name for n in out.ops] == [n.name for n in g.ops]
    assert_same_outputs(g, out)


def test_integer_division_by_zero_is_not_folded() -> None:
    g = graph(
        lambda b, x: b.op("add", [x, b.op("floordiv", [c(b, 1, I64), c(b, 0, I64)])]),
        t(3, dtype=I64),
    )
    out, ctx = canonical(g)
    assert ctx.counters["fold_constants"] == 0
    assert "floordiv" in [n.name for n in out.ops]


def test_cse_merges_equal_ops_but_not_1_and_1_0_nor_signed_zeros() -> None:
    def build(b, x):
        a1 = b.op("add", [x, c(b, 2.0)])
        a2 = b.op("add", [x, c(b, 2.0)])
        z1 = b.op("div", [x, c(b, 0.0)])
        z2 = b.op("div", [x, c(b, -0.0)])
        return b.op("mul", [a1, a2]), z1, z2

    g = graph(build, t(4))
    out, ctx = canonical(g)
    assert ctx.counters["cse"] == 2  # the second 2.0 constant and the second add
    assert sum(n.name == "div" for n in out.ops) == 2
    assert_same_outputs(g, out)


def test_dce_keeps_outputs_and_unused_inputs() -> None:
    def build(b, x, unused):
        b.op("cos", [x])  # dead
        return b.op("exp", [b.op("sin", [x])])

    g = graph(build, t(4), t(4))
    out, ctx = canonical(g)
    assert ctx.counters["dce"] == 1
    assert [v.name for v in out.inputs] == ["x0", "x1"]
    assert [n.name for n in out.ops] == ["sin", "exp"]


def test_rewrites_keep_locations() -> None:
    def build(b, x):
        return b.op(
            "unsqueeze", [b.op("mul", [x, c(b, 1.0)], loc=LOC)], dim=0, loc=Loc("m", "f.py:3")
        )

    out, _ = canonical(graph(build, t(4)))
    (node,) = out.ops
    assert node.name == "reshape" and node.loc == Loc("m", "f.py:3")


# --- different spellings, one canonical form ----------------------------------------------------

B, T = ir.sym("B"), ir.sym("T")


def spellings_equal(*builds: Callable, types, atol: float = 0.0) -> ir.Graph:
    outs = [canonical(graph(build, *types))[0] for build in builds]
    for other in outs[1:]:
        ir.assert_structural_equal(outs[0], other, names=False, locs=False)
    for build, out in zip(builds, outs):
        assert_same_outputs(graph(build, *types), out, atol=atol)
    return outs[0]


def test_softmax_spellings() -> None:
    out = spellings_equal(
        lambda b, x: b.op("softmax", [x], dim=1),
        lambda b, x: spelled_softmax(b, x, dim=-1),
        lambda b, x: spelled_softmax(b, x, shifted=False, dim=1),
        types=[t(B, 7)],
        atol=1e-6,
    )
    assert [n.name for n in out.ops] == ["softmax"]


def test_top_k_spellings() -> None:
    out = spellings_equal(
        lambda b, x: b.op("topk", [x], k=3, dim=1),
        lambda b, x: sorted_head(b, x, 3),
        lambda b, x: sorted_head(b, x, 3, dim=-1),
        types=[t(B, 7)],
    )
    assert [n.name for n in out.ops] == ["topk"]
    smallest = canonical(graph(lambda b, x: sorted_head(b, x, 2, descending=False), t(4, 6)))[0]
    assert [(n.name, n.attrs["largest"]) for n in smallest.ops] == [("topk", False)]


@pytest.mark.parametrize(
    "build",
    [
        # a scatter whose index differs per column: not an index_add
        lambda b, x: b.op(
            "scatter_add", [x, b.op("reshape", [iota(b, 24, 4)], shape=(4, 6)), x], dim=0
        ),
        # an epsilon in the denominator
        lambda b, x: b.op(
            "div",
            [
                e := b.op("exp", [x]),
                b.op("add", [b.op("sum", [e], dims=(1,), keepdim=True), c(b, 1e-6)]),
            ],
        ),
        # a sum over two dims
        lambda b, x: b.op(
            "div", [e := b.op("exp", [x]), b.op("sum", [e], dims=(0, 1), keepdim=True)]
        ),
        # sort's entries 1..k, not the first k
        lambda b, x: b.op("slice", [b.op("sort", [x], dim=1)[0]], dim=1, start=1, end=3),
        # sorted along one dim, sliced along the other
        lambda b, x: b.op("slice", [b.op("sort", [x], dim=1)[1]], dim=0, start=0, end=2),
    ],
    ids=["scatter_per_element", "softmax_eps", "softmax_two_dims", "sort_offset", "sort_other_dim"],
)
def test_look_alikes_keep_their_spelling(build) -> None:
    g = graph(build, t(4, 6))
    out, _ = canonical(g)
    assert [n.name for n in out.ops] == [n.name for n in g.ops]
    assert_same_outputs(g, out)


def test_bf16_softmax_spelling_is_kept() -> None:
    g = graph(lambda b, x: spelled_softmax(b, x), t(2, 5, dtype=BF16))
    out, ctx = canonical(g)
    assert ctx.counters["spelled_softmax"] == 0 and "softmax" not in [n.name for n in out.ops]


def test_scaling_spellings() -> None:
    out = spellings_equal(
        lambda b, x: b.op("mul", [x, c(b, 2.0)]),
        lambda b, x: b.op("mul", [c(b, 2.0), x]),
        lambda b, x: b.op("div", [x, c(b, 0.5)]),
        lambda b, x: b.op(
            "mul", [b.op("mul", [x, c(b, 1.0)]), b.op("add", [c(b, 1.5), c(b, 0.5)])]
        ),
        types=[t(B, T)],
    )
    assert [n.name for n in out.ops] == ["constant", "mul"]


def test_subtraction_spellings() -> None:
    spellings_equal(
        lambda b, x, y: b.op("sub", [x, y]),
        lambda b, x, y: b.op("add", [x, b.op("neg", [y])]),
        lambda b, x, y: b.op("add", [b.op("mul", [y, c(b, -1.0)]), x]),
        lambda b, x, y: b.op("sub", [x, b.op("neg", [b.op("neg", [y])])]),
        types=[t(B, 8), t(B, 8)],
    )


def test_view_spellings() -> None:
    out = spellings_equal(
        lambda b, x: b.op("unsqueeze", [b.op("unsqueeze", [x], dim=1)], dim=-1),
        lambda b, x: b.op("reshape", [x], shape=(B, 1, T, 1)),
        lambda b, x: b.op("reshape", [b.op("reshape", [x], shape=(B, T, 1))], shape=(B, 1, -1, 1)),
        lambda b, x: b.op("reshape", [b.op("copy", [x])], shape=(B, 1, T, 1)),
        types=[t(B, T)],
    )
    assert [n.name for n in out.ops] == ["reshape"]


def test_transpose_spellings() -> None:
    out = spellings_equal(
        lambda b, x: b.op("permute", [x], dims=(0, 2, 1)),
        lambda b, x: b.op("permute", [b.op("permute", [x], dims=(1, 0, 2))], dims=(1, 2, 0)),
        lambda b, x: b.op(
            "permute",
            [b.op("permute", [b.op("permute", [x], dims=(2, 1, 0))], dims=(2, 1, 0))],
            dims=(0, 2, 1),
        ),
        types=[t(B, T, 4)],
    )
    assert [n.attrs["dims"] for n in out.ops] == [(0, 2, 1)]


def test_dtype_round_trip_spellings() -> None:
    spellings_equal(
        lambda b, x: b.op("exp", [x]),
        lambda b, x: b.op("exp", [b.op("cast", [b.op("cast", [x], dtype=F32)], dtype=BF16)]),
        lambda b, x: b.op("exp", [b.op("cast", [b.op("copy", [x])], dtype=BF16)]),
        types=[t(T, 4, dtype=BF16)],
    )


def test_fused_kernel_bodies_are_canonicalised() -> None:
    body = ir.Builder(name="k")
    a = body.input("a", t(4))
    body.output(
        body.op("exp", [body.op("mul", [body.op("neg", [body.op("neg", [a])]), c(body, 1.0)])])
    )
    g = graph(lambda b, x: b.op("fused.kernel", [x], body=body.build()), t(4))
    out, ctx = canonical(g)
    assert ctx.counters["neg_neg"] == 1 and ctx.counters["mul_one"] == 1
    (kernel,) = out.ops
    assert [n.name for n in kernel.attrs["body"].ops] == ["exp"]
    assert_same_outputs(g, out)


def test_div_by_integer_power_of_two_becomes_an_exact_mul() -> None:
    def build(b, x):
        return (
            b.op("div", [x, c(b, 16, I64)]),
            b.op("div", [x, b.op("full", [], shape=(4,), value=-4, dtype=I32)]),
            b.op("div", [x, c(b, 3.0)]),  # not a power of two: stays
        )

    g = graph(build, t(4))
    out, ctx = canonical(g)
    assert ctx.counters["div_pow2"] == 2
    assert [n.name for n in out.ops].count("div") == 1
    assert {n.attrs["value"] for n in out.ops if n.name in ("constant", "full")} >= {0.0625, -0.25}
    assert_same_outputs(g, out)


def test_div_pow2_declines_when_the_reciprocal_leaves_the_dtype_range() -> None:
    g = graph(lambda b, x: b.op("div", [x, c(b, 2.0**-20, DType.f16)]), t(4, dtype=DType.f16))
    out, ctx = canonical(g)
    assert ctx.counters["div_pow2"] == 0
    assert_same_outputs(g, out)


def test_expand_stays_when_broadcasting_would_promote_differently() -> None:
    # expand(x: i64[]) is a dimensioned i64 tensor, so `i32[3] + it` is i64; `i32[3] + x` is i32.
    g = graph(
        lambda b, x, y: b.op("add", [y, b.op("expand", [x], shape=(3,))]),
        t(dtype=I64),
        t(3, dtype=I32),
    )
    out, ctx = canonical(g)
    assert ctx.counters["expand_into_broadcast"] == 0
    assert [n.name for n in out.ops] == ["expand", "add"]
    assert_same_outputs(g, out)
