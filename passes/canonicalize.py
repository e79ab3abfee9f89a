"""Canonicalisation: one spelling per computation, before any fusion pattern looks at the graph.

`canonicalize(g)` repeats CSE, the rules below (to a fixed point) and DCE until nothing changes.
Afterwards:
- no op is computed twice and every op is used (inputs stay, even unused ones);
- elementwise/broadcast ops on uniform tensors (`constant`/`full`) are folded into one
  `constant` (0-d) or `full`; views of uniform tensors are `full`s too;
- a commutative binary op with one uniform operand has it on the right: `2 * x` is `x * 2`;
- `x ** 2` is `x * x` (exact);
- identities are gone: `x + 0`, `x - 0`, `x * 1`, `x / 1`, `x ** 1`, `-(-x)`, casts to the same
  dtype, round trips through a wider dtype, `copy`, no-op views (reshape/expand/squeeze to the
  same type, full slices, zero pads, unit repeats, identity permutations, single-operand concat);
- `x * -1` and `0 - x` are `neg(x)`; `x + neg(y)` is `x - y`; `x - neg(y)` is `x + y`;
  `x / 2**k` is `x * 2**-k` (exact); `not(not(x))` is `x`; `where(not(c), a, b)` is
  `where(c, b, a)`;
- reductions, scans, softmax, top-k and sorts name their dims non-negative, in order
  (`softmax(x, -1)` on a rank-3 x is `softmax(x, 2)`);
- spelled-out library functions are the op: `exp(x - amax(x)) / sum(exp(x - amax(x)))` (or
  without the max) along one dim is `softmax(x)` (fp32 only: the op rounds once where the
  spelling rounds per step, a few ulps apart), and the first k entries of `sort(x)` are
  `topk(x, k)` (ties between equal scores are implementation-defined for both), fp32
  `x * sigmoid(x)` is `silu(x)`, and a `scatter_add` whose index is a 1-D index broadcast
  across the other dims is `index_put(accumulate)` (index_add; both leave the order in which
  duplicates are summed unspecified);
- `index_select(x, i, d)` is `index(x, i, d)` (one spelling of a gather by a 1-D index);
- binary broadcasting ops take un-expanded operands (`expand(x) + y` is `x + y`);
- views that only add or drop size-1 dims or regroup dims (`unsqueeze`, `squeeze`, `select` of a
  size-1 dim, `reshape`) are all spelled `reshape` with an explicit shape (no -1), chains of
  reshapes are one reshape, chains of permutes one permute, chains of expands one expand.

Every rule keeps types (the driver checks) and the matched op's location. `x + 0 -> x` assumes
`-0.0 + 0.0` may become `-0.0` (as every fast-math compiler does); the others are exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ir
from ir import DType, Graph, Kind, Node, Value
from passes.cleanup import common_subexpression_elimination, dead_code_elimination
from passes.context import PassContext
from passes.pattern import COMMUTATIVE, Match, Rule, const, op, var
from passes.rewrite import Rewriter, rewrite

__all__ = ["RULES", "canonicalize"]

_UNIFORM = frozenset({"constant", "full"})
# Elementwise/broadcast ops with operands: uniform in, uniform out.
_FOLDABLE = (
    frozenset(
        m for m, c in ir.OPS.items() if c.kind in (Kind.ELEMENTWISE, Kind.BROADCAST) and m != "iota"
    )
    - _UNIFORM
)
# Binary ops that broadcast their operands (an explicit expand in front is redundant).
_BROADCASTING = frozenset(
    m for m, c in ir.OPS.items() if c.kind == Kind.BROADCAST and c.num_operands == 2
)
# Injective views whose result is uniform when the operand is.
_DIM_OPS = frozenset(  # ops reducing, scanning or ordering along `dim` / `dims`
    {"sum", "mean", "prod", "amax", "amin", "any", "all", "argmax", "argmin", "softmax"}
    | {"log_softmax", "cumsum", "topk", "sort", "argsort"}
)
_VIEWS = frozenset(
    {"reshape", "permute", "expand", "squeeze", "unsqueeze", "select", "slice", "flip", "repeat"}
)
# dtype -> dtypes it converts to exactly (so a round trip through them is the identity).
_LOSSLESS = {
    DType.bool: {DType.i8, DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32},
    DType.i8: {DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32},
    DType.i32: {DType.i64},
    DType.f16: {DType.f32},
    DType.bf16: {DType.f32},
    DType.f8e4m3: {DType.f16, DType.bf16, DType.f32},
    DType.f8e5m2: {DType.f16, DType.bf16, DType.f32},
}


# --- constraints (return True, or a reason) ----------------------------------------------------


def same_type(m: Match) -> bool | str:
    """The matched op's result has exactly x's type (no broadcast, no promotion)."""
    got, want = m.root.results[0].type, m["x"].type
    return got == want or f"result type {got} differs from x's {want}"


def x_not_uniform(m: Match) -> bool | str:
    n = m.node("x")
    return n is None or n.name not in _UNIFORM or "both operands are uniform (folding applies)"


def numeric_operands(m: Match) -> bool | str:
    """Every operand (at least one) is a uniform tensor with a plain number, not a symbol."""
    if not m.root.operands:
        return "no operands"
    for v in m.root.operands:
        n = m.producer(v)
        if n is None or n.name not in _UNIFORM:
            return f"operand %{v.name} is not a constant/full"
        if not isinstance(n.attrs["value"], (bool, int, float)) or v.dtype.is_f8:
            return f"operand %{v.name} is symbolic or float8"
    return True


def _is_pow2(v: Any) -> bool:
    """A (possibly negative or fractional) power of two: 0.25, 2.0, -16, ..."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v == 0 or not math.isfinite(v):
        return False
    mant, _ = math.frexp(abs(v))
    return mant == 0.5


# Largest |exponent| of a power of two with a normal, finite reciprocal per float dtype.
_POW2_RANGE = {DType.f32: 125, DType.bf16: 125, DType.f16: 14}


# --- rewrite functions --------------------------------------------------------------------------


def keep_x(m: Match, rw: Rewriter) -> Value:
    return m["x"]


def uniform(rw: Rewriter, value: Any, like: Value) -> Value:
    """A `constant` (0-d) or `full` with `like`'s type holding `value`."""
    if like.type.rank == 0:
        return rw.op("constant", [], value=value, dtype=like.dtype)
    return rw.op("full", [], shape=like.type.shape, value=value, dtype=like.dtype)


def fold(m: Match, rw: Rewriter) -> Value | None:
    """Evaluate the op once on size-1 copies of its uniform operands (same ranks, so the same
    type promotion) with the reference interpreter."""
    root = m.root
    b = ir.Builder()
    args = []
    for v in root.operands:
        n = rw.producer(v)
        assert n is not None
        value, dtype = n.attrs["value"], v.dtype
        if v.type.rank == 0:
            args.append(b.op("constant", [], value=value, dtype=dtype))
        else:
            args.append(b.op("full", [], shape=(1,) * v.type.rank, value=value, dtype=dtype))
    try:
        b.output(b.op(root.op, args))
        (out,) = ir.interpret(b.build())
    except Exception:  # noqa: BLE001 - e.g. integer division by zero: leave it to run time
        return None
    return uniform(rw, out.reshape(-1)[0].item(), root.results[0])


def full_to_constant(m: Match, rw: Rewriter) -> Value:
    n = m.root
    return rw.op("constant", [], value=n.attrs["value"], dtype=n.attrs["dtype"])


def view_of_uniform(m: Match, rw: Rewriter) -> Value:
    return uniform(rw, m.attr("c", "value"), m.root.results[0])


def commute(m: Match, rw: Rewriter) -> Value:
    return rw.op(m.root.op, [m["x"], m["c"]])


def square(m: Match, rw: Rewriter) -> Value:
    return rw.op("mul", [m["x"], m["x"]])


def to_neg(m: Match, rw: Rewriter) -> Value:
    return rw.op("neg", [m["x"]])


def to_sub(m: Match, rw: Rewriter) -> Value:
    return rw.op("sub", [m["x"], m["y"]])


def to_add(m: Match, rw: Rewriter) -> Value:
    return rw.op("add", [m["x"], m["y"]])


def div_to_mul(m: Match, rw: Rewriter) -> Value | None:
    x, c = m["x"], m.node("c")
    assert c is not None
    inv = 1.0 / c.attrs["value"]
    if abs(math.frexp(inv)[1] - 1) > _POW2_RANGE.get(x.dtype, -1):
        return None  # 2**-k would overflow or be subnormal in x's dtype
    if c.name == "constant":
        return rw.op("mul", [x, rw.op("constant", [], value=inv, dtype=x.dtype)])
    scale = rw.op("full", [], shape=c.attrs["shape"], value=inv, dtype=x.dtype)
    return rw.op("mul", [x, scale])


def cast_through_wider(m: Match, rw: Rewriter) -> Value | None:
    x, mid = m["x"], m["mid"]
    if mid.dtype not in _LOSSLESS.get(x.dtype, ()):
        return None
    return rw.op("cast", [x], dtype=m.root.attrs["dtype"])


def as_reshape(m: Match, rw: Rewriter) -> Value:
    return rw.op("reshape", [m["x"]], shape=m.root.results[0].type.shape)


def compose_permutes(m: Match, rw: Rewriter) -> Value:
    x = m["x"]
    inner = [d % x.type.rank for d in m.attr("p", "dims")]
    outer = [d % x.type.rank for d in m.root.attrs["dims"]]
    dims = [inner[d] for d in outer]
    if dims == list(range(x.type.rank)):
        return x
    return rw.op("permute", [x], dims=dims)


def as_expand(m: Match, rw: Rewriter) -> Value:
    return rw.op("expand", [m["x"]], shape=m.root.results[0].type.shape)


def implicit_broadcast(m: Match, rw: Rewriter) -> Value | None:
    """The op on the un-expanded operand, if broadcasting gives the same type (a 0-d operand
    expanded to a tensor can promote differently, so the type is checked)."""
    root, e = m.root, m["e"]
    operands = [m["x"] if v == e else v for v in root.operands]
    out = rw.op(root.op, operands)
    return out if out.type == root.results[0].type else None


def nonnegative_dims(m: Match, rw: Rewriter) -> Any:
    root = m.root
    rank = root.operands[0].type.rank
    attrs = dict(root.attrs)
    if "dims" in attrs:
        attrs["dims"] = tuple(sorted(d % rank for d in attrs["dims"]))
    else:
        attrs["dim"] %= rank
    return rw.op(root.name, root.operands, **attrs)


def _negative_or_unordered(m: Match) -> bool | str:
    attrs = m.root.attrs
    if m.root.operands[0].type.rank == 0:
        return "a 0-d operand has no dims to name"
    if "dims" in attrs:
        dims = list(attrs["dims"])
        return any(d < 0 for d in dims) or dims != sorted(dims) or "dims are canonical"
    return attrs["dim"] is not None and attrs["dim"] < 0 or "dim is non-negative"


def swap_branches(m: Match, rw: Rewriter) -> Value:
    a, b = m.root.operands[1:]
    return rw.op("where", [m["c"], b, a])


def as_softmax(m: Match, rw: Rewriter) -> Value:
    return rw.op("softmax", [m["x"]], dim=m.attr("e_sum", "dims")[0] % m["x"].type.rank)


def as_topk(m: Match, rw: Rewriter) -> Value:
    sort, r = m.node("sorted"), m.root.results[0]
    d = sort.attrs["dim"] % r.type.rank
    picked = rw.op("topk", [m["x"]], k=r.type.shape[d], dim=d, largest=sort.attrs["descending"])
    return picked[m.root.operands[0] == sort.results[1]]


def as_index(m: Match, rw: Rewriter) -> Value:
    return rw.op("index", [m["x"], m["i"]], dim=m.root.attrs["dim"])


def as_silu(m: Match, rw: Rewriter) -> Value:
    return rw.op("silu", [m["x"]])


def as_index_add(m: Match, rw: Rewriter) -> Value:
    root = m.root
    base, _, src = root.operands
    return rw.op("index_put", [base, m["i"], src], dim=root.attrs["dim"], accumulate=True)


def _broadcast_row_index(m: Match) -> bool | str:
    """The scatter index is i (1-D) along `dim`, broadcast across the others to src's shape."""
    base, idx, src = m.root.operands
    d = m.root.attrs["dim"] % base.type.rank
    column = tuple(m["i"].type.shape[0] if j == d else 1 for j in range(base.type.rank))
    if m["col"].type.shape != column:
        return f"index {m['col'].type.shape} is not i along dim {d}, size 1 elsewhere"
    if idx.type.shape != src.type.shape:
        return "index and src shapes differ"
    same = all(a == b for j, (a, b) in enumerate(zip(base.type.shape, src.type.shape)) if j != d)
    return same or "src and base differ outside the scattered dim"


def _one_dim_kept(m: Match) -> bool | str:
    """The normaliser sums `e` over one dim, keeping it; a max (if any) is over the same dim."""
    rank = m["x"].type.rank
    dims = [d % rank for d in m.attr("e_sum", "dims")]
    if len(dims) != 1 or not m.attr("e_sum", "keepdim"):
        return f"sum over dims {dims} (keepdim={m.attr('e_sum', 'keepdim')}), not one kept dim"
    if "max" in m.nodes:
        mx = m.node("max")
        if [d % rank for d in mx.attrs["dims"]] != dims or not mx.attrs["keepdim"]:
            return f"max over dims {mx.attrs['dims']}, sum over {dims}"
    return True


def _leading_slice(m: Match) -> bool | str:
    """The slice keeps entries 0..k of the sorted dim."""
    attrs, d = m.root.attrs, m.node("sorted").attrs["dim"]
    rank = m.root.results[0].type.rank
    if attrs["dim"] % rank != d % rank:
        return f"slice along dim {attrs['dim']}, sort along {d}"
    return True


def _identity_dims(dims: tuple[int, ...]) -> bool:
    return [d % len(dims) for d in dims] == list(range(len(dims)))


def _has_hole(shape: tuple) -> bool:
    return any(d == -1 for d in shape)


def _unit_select(m: Match) -> bool | str:
    x = m["x"]
    d = m.root.attrs["dim"] % x.type.rank
    return x.type.shape[d] == 1 or f"selected dim {d} has size {x.type.shape[d]}, not 1"


# --- the rules ---------------------------------------------------------------------------------

x, y = var("x"), var("y")
c = const(name="c")

RULES: list[Rule] = [
    # f(uniform...) -> uniform: evaluate elementwise/broadcast ops on constants once
    Rule("fold_constants", op(_FOLDABLE, where=numeric_operands), fold),
    # full(shape=[]) -> constant: 0-d uniform tensors are constants
    Rule("full_to_constant", op("full", rank=0), full_to_constant),
    # view(uniform) -> full: reshaping/broadcasting/slicing a uniform tensor keeps it uniform
    Rule("fold_view_of_uniform", op(_VIEWS, c), view_of_uniform),
    # c op x -> x op c: uniform operands of commutative ops go right
    Rule(
        "commute_constant_right", op(COMMUTATIVE, c, x, commute=False, where=x_not_uniform), commute
    ),
    # x + 0 -> x
    Rule("add_zero", op("add", x, const(0), where=same_type), keep_x),
    # x - 0 -> x
    Rule("sub_zero", op("sub", x, const(0), where=same_type), keep_x),
    # x * 1 -> x
    Rule("mul_one", op("mul", x, const(1), where=same_type), keep_x),
    # x / 1 -> x
    Rule("div_one", op("div", x, const(1), where=same_type), keep_x),
    # x ** 1 -> x
    Rule("pow_one", op("pow", x, const(1), where=same_type), keep_x),
    # x ** 2 -> x * x
    Rule("pow_two", op("pow", x, const(2), where=same_type), square),
    # -(-x) -> x
    Rule("neg_neg", op("neg", op("neg", x)), keep_x),
    # x * -1 -> -x
    Rule("mul_minus_one", op("mul", x, const(-1), where=same_type), to_neg),
    # 0 - x -> -x
    Rule("zero_sub", op("sub", const(0), x, where=same_type), to_neg),
    # x + (-y) -> x - y
    Rule("add_neg", op("add", x, op("neg", y)), to_sub),
    # x - (-y) -> x + y
    Rule("sub_neg", op("sub", x, op("neg", y)), to_add),
    # x / 2**k -> x * 2**-k (exact in binary floating point)
    Rule(
        "div_pow2",
        op(
            "div",
            x,
            const(_is_pow2, name="c"),
            dtype=[DType.f32, DType.bf16, DType.f16],
            where=same_type,
        ),
        div_to_mul,
    ),
    # where(c, x, x) -> x
    Rule("where_same", op("where", var(), x, x, where=same_type), keep_x),
    # cast(x: t, t) -> x
    Rule("cast_noop", op("cast", x, where=same_type), keep_x),
    # cast(cast(x: a, b), c) -> cast(x, c) when a -> b is exact
    Rule("cast_cast", op("cast", op("cast", x, name="mid")), cast_through_wider),
    # copy(x) -> x: values are immutable, a copy is the same value
    Rule("copy", op("copy", x), keep_x),
    # reshape/expand/squeeze(x) to x's own type -> x
    Rule("view_noop", op({"reshape", "expand", "squeeze"}, x, where=same_type), keep_x),
    # x[0:n:1] over the whole dim -> x
    Rule("slice_noop", op("slice", x, attrs={"start": 0, "step": 1}, where=same_type), keep_x),
    # pad(x, 0, 0, ...) -> x
    Rule("pad_noop", op("pad", x, attrs={"pads": lambda p: all(v == 0 for v in p)}), keep_x),
    # repeat(x, 1, 1, ...) -> x
    Rule("repeat_noop", op("repeat", x, where=same_type), keep_x),
    # concat(x) -> x
    Rule("concat_single", op("concat", x, where=same_type), keep_x),
    # permute(x, identity) -> x
    Rule("permute_identity", op("permute", x, attrs={"dims": _identity_dims}), keep_x),
    # permute(permute(x, p), q) -> permute(x, p∘q)
    Rule("permute_permute", op("permute", op("permute", x, name="p")), compose_permutes),
    # unsqueeze/squeeze(x) -> reshape(x): one spelling for size-1 dim changes
    Rule("unsqueeze_squeeze_to_reshape", op({"unsqueeze", "squeeze"}, x), as_reshape),
    # select(x, d, i) with x.shape[d] == 1 -> reshape(x)
    Rule("select_unit_to_reshape", op("select", x, where=_unit_select), as_reshape),
    # reshape(reshape(x)) -> reshape(x)
    Rule("reshape_reshape", op("reshape", op("reshape", x)), as_reshape),
    # reshape(x, [.., -1, ..]) -> reshape(x, explicit shape)
    Rule("reshape_explicit", op("reshape", x, attrs={"shape": _has_hole}), as_reshape),
    # expand(expand(x)) -> expand(x)
    Rule("expand_expand", op("expand", op("expand", x)), as_expand),
    # expand(x, [.., -1, ..]) -> expand(x, explicit shape)
    Rule("expand_explicit", op("expand", x, attrs={"shape": _has_hole}), as_expand),
    # f(expand(x), y) -> f(x, y) for broadcasting f: broadcasting is implicit
    Rule(
        "expand_into_broadcast",
        op(_BROADCASTING, op("expand", x, name="e"), var(), commute=True),
        implicit_broadcast,
    ),
    # sum(x, dims=[-1, 0]) -> sum(x, dims=[0, r-1]), softmax(x, -1) -> softmax(x, r-1), ...
    Rule("nonnegative_dims", op(_DIM_OPS, where=_negative_or_unordered), nonnegative_dims),
    # where(not(c), a, b) -> where(c, b, a)
    Rule("where_not", op("where", op("logical_not", var("c")), var(), var()), swap_branches),
    # exp(x - amax(x, d)) / sum(exp(x - amax(x, d)), d) -> softmax(x, d), and without the max
    *(
        Rule(
            name,
            op("div", e, op("sum", e, name="e_sum"), dtype=DType.f32, where=_one_dim_kept),
            as_softmax,
        )
        for name, e in (
            ("spelled_softmax", op("exp", op("sub", x, op("amax", x, name="max")), name="e")),
            ("spelled_softmax_unshifted", op("exp", x, name="e")),
        )
    ),
    # index_select(x, i, d) -> index(x, i, d)
    Rule("index_select_to_index", op("index_select", x, var("i")), as_index),
    # x * sigmoid(x) -> silu(x)
    Rule("spelled_silu", op("mul", x, op("sigmoid", x), dtype=DType.f32), as_silu),
    # scatter_add(b, d, expand(reshape(i)), src) -> index_put(b, i, src, d, accumulate)
    Rule(
        "scatter_add_to_index_add",
        op(
            "scatter_add",
            var(),
            op("expand", op("reshape", var("i", rank=1), name="col")),
            var(),
            where=_broadcast_row_index,
        ),
        as_index_add,
    ),
    # sort(x, d)[r][.., 0:k] -> topk(x, k, d)[r]
    Rule(
        "sort_slice_to_topk",
        op(
            "slice",
            op("sort", x, name="sorted"),
            attrs={"start": 0, "step": 1},
            where=_leading_slice,
        ),
        as_topk,
    ),
    # not(not(x)) -> x for bool x
    Rule("not_not", op("logical_not", op("logical_not", x), where=same_type), keep_x),
]


def canonicalize(g: Graph, ctx: PassContext | None = None, *, max_rounds: int = 4) -> Graph:
    """CSE, `RULES` to a fixed point, DCE; repeated while anything changes (`max_rounds`).
    Nested bodies (`fused.kernel`) are canonicalised first, keeping their inputs."""
    ctx = ctx or PassContext()
    g = _canonicalize_bodies(g, ctx, max_rounds)
    for _ in range(max_rounds):
        before = sum(ctx.counters.values())
        g = common_subexpression_elimination(g, ctx)
        g = rewrite(g, RULES, ctx=ctx)
        g = dead_code_elimination(g, ctx)
        if sum(ctx.counters.values()) == before:
            break
    return g


def _canonicalize_bodies(g: Graph, ctx: PassContext, max_rounds: int) -> Graph:
    """Canonicalise every graph-valued attribute (the body keeps its inputs and output types)."""
    if not any(isinstance(a, Graph) for n in g.ops for a in n.attrs.values()):
        return g
    ops = []
    for n in g.ops:
        bodies = {k: a for k, a in n.attrs.items() if isinstance(a, Graph)}
        if bodies:
            new = {k: canonicalize(a, ctx, max_rounds=max_rounds) for k, a in bodies.items()}
            if any(new[k] is not bodies[k] for k in bodies):
                n = Node(dataclasses.replace(n.op, **new), n.operands, n.results, n.loc)
        ops.append(n)
    return Graph(g.inputs, ops, g.outputs, name=g.name, roles=dict(g.roles))
