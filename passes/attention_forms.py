"""Canonical forms of attention pieces, run by `fuse_attention` before its fusion rules, so that
other spellings of the same math (Hugging Face `transformers`' DeepSeek-V4, ...) meet the form
the fusion rules match (the one models/attention.py produces after `canonicalize`).

    rope, rotate-half form   x·rep2(cos) + rotate_half(x)·rep2(sin), rep2 = repeat_interleave(2),
                             rotate_half(x)[2i, 2i+1] = (-x[2i+1], x[2i])
                          -> pairs (a, b) = (x[2i], x[2i+1]): interleave(a·cos - b·sin,
                             a·sin + b·cos) — the same products and sums, so exact
    softmax shift            softmax(x - max(x)) -> softmax(x)   (softmax is shift-invariant; its
                             lowering subtracts the max itself)
    empty concat piece       concat(a, e) -> a when e = full(...) has a zero-sized concat dim
    whole-row write          index_put(b, iota(0, n), v, dim) over all n rows of b -> v
    masked top-k picks       where(i >= c_t, -1, i), (v, i) = topk(where(s >= c_t, -inf, x), k)
                          -> where(isinf(v) | i >= S, -1, i), (v, i) = topk(pad(where(s < c_t,
                             x, -inf), k), k)   for finite x: the masked columns are exactly the
                             -inf values and the columns s >= c_t (module `fuse_attention`'s form);
                             k = min(k', S) (symbolic S): the first k of the k'-pick form
    broadcasts after the math  f(expand(x)) -> expand(f(x)) for cos, sin, cast;
                             expand(x)·y -> expand(x·y) when y is constant along the grown dims;
                             reshape(expand(x)) -> expand(reshape(x)) when the reshape appends
                             unit dims; expand(expand(x)) -> expand(x) — so a rope table computed
                             from positions expanded over the batch (HF's position_ids [B, n]) is
                             one [n, r/2] table broadcast, at any batch size (exact: the same
                             values, computed once per position instead of once per sequence)

Each rule's comment states its algebra; `STATS=1` counts them like any rule.
"""

from __future__ import annotations

from typing import Any

from ir import DType, Value
from passes.context import PassContext
from passes.fuse_common import FusionView
from passes.pattern import Fail, Match, Rule, const, op, var
from passes.rewrite import GraphView, Rewriter, rewrite

__all__ = ["RULES", "attention_forms"]

_I64 = DType.i64


# --- rope: rotate-half form -> interleaved pairs ---------------------------------------------

def _rep2(name: str) -> Any:
    """rep2(t) = repeat_interleave(t, 2, dim=-1) as capture spells it: reshape [.., n, 1],
    expand [.., n, 2], reshape [.., 2n] (possibly with broadcast dims)."""
    return op(
        "reshape",
        op("expand", op("reshape", var(name), name=f"{name}_col"), name=f"{name}_pair"),
        name=f"{name}_rep",
    )


_HALF = op(
    "reshape",
    op(
        "concat",
        op("reshape", op("neg", op("slice", var("x"), name="odd"))),
        op("reshape", op("slice", var("x"), name="even")),
        name="pairs",
    ),
)
ROTATE_HALF = op(
    "add",
    op("mul", var("x"), _rep2("cos")),
    op("mul", _HALF, _rep2("sin")),
    commute=False,
)


def _table(rw: Rewriter, t: Value) -> Value:
    """t [1.., T, n] as the [T, n] table the canonical rope broadcasts (t has unit leading
    dims, checked by the caller)."""
    return t if t.type.rank == 2 else rw.op("reshape", [t], shape=tuple(t.type.shape[-2:]))


def _rope_pairs(m: Match, rw: Rewriter) -> Value | Fail:
    x = m["x"]
    rank, width = x.type.rank, x.type.shape[-1]
    last = (-1, rank - 1)
    odd, even = m.node("odd").attrs, m.node("even").attrs
    ok = odd["dim"] in last and even["dim"] in last
    ok = ok and (odd["start"], odd["step"], even["start"], even["step"]) == (1, 2, 0, 2)
    ok = ok and m.attr("pairs", "dim") in (-1, rank)
    if not ok or not isinstance(width, int) or width % 2:
        return Fail(3, "rotate_half", "the rotated pairs are not (-x[2i+1], x[2i]) of x's last dim")
    half = width // 2
    cos, sin = m["cos"], m["sin"]
    inverse = False
    env = rw.env
    neg = env.producer(sin)
    if neg is not None and neg.name == "neg":
        sin, inverse = neg.operands[0], True
    if cos.type.shape[-1:] != (half,) or sin.type != cos.type:
        return Fail(4, "rotate_half.table", f"cos {cos.type} / sin {sin.type} are not [.., {half}]")
    for n in ("cos", "sin"):
        col, pair = m.node(f"{n}_col"), m.node(f"{n}_pair")
        if col.results[0].type.shape[-2:] != (half, 1) or pair.results[0].type.shape[-1] != 2:
            return Fail(4, "rotate_half.table", f"{n} is not repeated twice per pair")
    rep = m.node("cos_rep").results[0].type.shape
    if rep[-1] != width or cos.type.rank < 2 or any(d != 1 for d in cos.type.shape[:-2]):
        return Fail(4, "rotate_half.table", f"cos {cos.type} is not one [T, {half}] table "
                    f"repeated over x's {width} channels")
    bshape = (1,) * (len(rep) - 2) + (rep[-2], half)  # the table broadcasts over the rest
    cos_t, sin_t = _table(rw, cos), _table(rw, sin)
    pairs = rw.op("reshape", [x], shape=tuple(x.type.shape[:-1]) + (half, 2))
    a = rw.op("select", [pairs], dim=rank, index=0)
    b = rw.op("select", [pairs], dim=rank, index=1)
    cb = rw.op("reshape", [cos_t], shape=bshape)
    sb = rw.op("reshape", [sin_t], shape=bshape)
    if inverse:
        sb = rw.op("neg", [sb])
    re = rw.op("sub", [rw.op("mul", [a, cb]), rw.op("mul", [b, sb])])
    im = rw.op("add", [rw.op("mul", [a, sb]), rw.op("mul", [b, cb])])
    col = tuple(a.type.shape) + (1,)
    ri = rw.op("concat", [rw.op("reshape", [re], shape=col), rw.op("reshape", [im], shape=col)],
               dim=rank)
    return rw.op("reshape", [ri], shape=tuple(x.type.shape))


# --- softmax shift, empty concat pieces --------------------------------------------------------

def _unshift(m: Match, rw: Rewriter) -> Value | Fail:
    mx = m.node("max").attrs
    sm = m.root.attrs
    x = m["x"]
    dims = [d % x.type.rank for d in mx["dims"]]
    if dims != [sm["dim"] % x.type.rank] or not mx["keepdim"]:
        return Fail(3, "shift", "the max is not over the softmax dim (keepdim)")
    return rw.op("softmax", [x], **sm)


def _drop_empty(m: Match, rw: Rewriter) -> Value | Fail:
    n = m.root
    d = n.attrs["dim"] % n.results[0].type.rank
    env = rw.env

    def empty_fill(v: Value) -> bool:  # a zero-sized `full` (HF's new_zeros for no entries)
        p = env.producer(v)
        return v.type.shape[d] == 0 and p is not None and p.name in ("full", "constant")

    keep = [v for v in n.operands if not empty_fill(v)]
    if len(keep) == len(n.operands) or not keep:
        return Fail(1, "pieces", "no zero-sized piece to drop")
    return keep[0] if len(keep) == 1 else rw.op("concat", keep, dim=n.attrs["dim"])


# --- masked top-k picks -> padded top-k picks -------------------------------------------------

_MASKED_TOPK = op(
    "topk",
    op("where", op("ge", var("cols"), var("thr"), name="future"), const(float("-inf")),
       var("score")),
    name="topk",
    attrs={"largest": True},
)
MASKED_PICKS = op(
    "where",
    op("ge", var("indices"), var("thr2")),
    const(-1),
    var("indices"),
)


def _padded_picks(m: Match, rw: Rewriter) -> Value | Fail:
    env = rw.env
    topk = env.producer(m["indices"])
    tm = _match(env, _MASKED_TOPK, topk)
    if isinstance(tm, Fail):
        return tm
    if topk.results[1] != m["indices"]:
        return Fail(3, "picks", "the picks are not the top-k's indices")
    if _unsqueezed(env, m["thr2"]) != _unsqueezed(env, tm["thr"]):
        return Fail(4, "picks.bound", "picks and the mask compare with different thresholds")
    score = tm["score"]
    made = env.producer(score)
    if made is None or made.name != "sum":  # exactness needs finite scores: Σ_h relu(q·k)·w
        return Fail(3, "score", "the scores are not a head sum (may hold -inf: not exact)")
    if score.type.rank != 3 or topk.attrs["dim"] not in (-1, 2):
        return Fail(4, "topk", f"the top-k is not over the keys of [B, T, S] scores {score.type}")
    k, s = topk.attrs["k"], score.type.shape[2]
    kept = k  # HF's top_k = min(index_topk, S): the static top-k's first kept picks
    if not isinstance(k, int):
        k = _min_of_keys(k, s)
        if k is None:
            return Fail(4, "topk", f"k={topk.attrs['k']} is neither static nor min(k, S={s})")
    visible = rw.op("lt", [tm["cols"], tm["thr"]])
    masked = rw.op("where", [visible, score, _scalar(rw, float("-inf"), score)])
    padded = rw.op("pad", [masked], pads=(0, k), value=float("-inf"))
    values, indices = rw.op("topk", [padded], k=k, dim=2, largest=True, sorted=True)
    inf = rw.op("eq", [rw.op("abs", [values]), _scalar(rw, float("inf"), values)])
    past = rw.op("ge", [indices, _scalar(rw, s, indices)])
    bad = rw.op("logical_or", [inf, past])
    picks = rw.op("where", [bad, _scalar(rw, -1, indices), indices])
    if kept is k:
        return picks
    return rw.op("slice", [picks], dim=2, start=0, end=kept, step=1)


def _min_of_keys(k: Any, s: Any) -> int | None:
    """c when the symbolic k is min(c, S) for the key count S, else None."""
    from ir.symbolic import same_dim

    args = getattr(k, "args", ())
    if type(k).__name__ != "Min" or len(args) != 2:
        return None
    consts = [a for a in args if getattr(a, "is_Integer", False)]
    others = [a for a in args if not getattr(a, "is_Integer", False)]
    if len(consts) != 1 or len(others) != 1 or not same_dim(others[0], s):
        return None
    return int(consts[0])


def _whole_put(m: Match, rw: Rewriter) -> Value | Fail:
    base, v = m["base"], m["v"]
    rows = m.node("rows").attrs
    d = m.root.attrs["dim"] % base.type.rank
    from ir.symbolic import same_dim

    whole = rows["start"] == 0 and rows["step"] == 1 and same_dim(rows["end"], base.type.shape[d])
    if not whole or v.type != base.type:
        return Fail(2, "rows", "the write does not cover every row with a same-shaped value")
    return v


def _scalar(rw: Rewriter, value: Any, like: Value) -> Value:
    return rw.op("constant", [], value=value, dtype=like.dtype)


def _unsqueezed(env: GraphView, v: Value) -> Value:
    n = env.producer(v)
    while n is not None and n.name in ("reshape", "unsqueeze"):
        v = n.operands[0]
        n = env.producer(v)
    return v


def _match(env: GraphView, pat: Any, n: Any) -> Match | Fail:
    from passes.pattern import match_node

    if n is None:
        return Fail(2, "topk", "the picks come from a graph input")
    return match_node(pat, n, env)


# --- Σ_h w_h·s_h spelled as a matmul ----------------------------------------------------------

HEAD_SUM = op("reshape", op("matmul", op("reshape", var("w"), name="row"), var("s"), name="mm"))


def _head_sum(m: Match, rw: Rewriter) -> Value | Fail:
    row, s = m.node("row").results[0], m["s"]
    rank = s.type.rank
    want = tuple(s.type.shape[:-2]) + (1, s.type.shape[-2])
    if rank < 3 or row.type.shape != want or m.root.results[0].type.shape != \
            tuple(s.type.shape[:-2]) + (s.type.shape[-1],):
        return Fail(2, "head_sum", "not a [.., 1, H] @ [.., H, S] product squeezed to [.., S]")
    col = rw.op("reshape", [m["w"]], shape=tuple(s.type.shape[:-1]) + (1,))
    return rw.op("sum", [rw.op("mul", [s, col])], dims=(rank - 2,), keepdim=False)


# --- HF V3.2's index mask: picks of masked columns are masked again ------------------------

INDEX_MASK = op(
    "scatter",
    const(True, name="ones"),
    op("cast", op("cast", var("indices"), name="i32"), name="i64"),
    const(False),
    name="scatter",
)


def _index_mask(m: Match, rw: Rewriter) -> Value | Fail:
    """scatter(true, picks, false) whose only use is `mask & ~it` over the indexer's own mask:
    HF's top-k picks of masked (-inf) columns and the padded top-k's -1 picks give the same
    result there, so the index mask may come from the canonical picks (module docstring)."""
    from passes.fuse_dense_mqa import evaluate  # the static mask evaluation

    env = rw.env
    topk = env.producer(m["indices"])
    tm = _match(env, _VISIBLE_TOPK, topk)
    if isinstance(tm, Fail):
        return tm
    if topk.results[1] != m["indices"] or m.node("scatter").attrs["dim"] not in (-1, 2):
        return Fail(3, "index_mask", "the scattered picks are not the top-k's over the keys")
    visible, score = _unsqueezed(env, tm["visible"]), tm["score"]
    if not _only_masks(env, m.root.results[0], visible):
        return Fail(4, "index_mask.uses", "the index mask is used other than as mask & ~index")
    b, t, s = score.type.shape
    vals = evaluate(env, visible)
    if vals is None or not isinstance(t, int) or vals.shape[-2:] != (t, s):
        return Fail(4, "index_mask.causal", "the indexer's mask is not a static [T, S] mask")
    from ir._lazy import torch

    causal = torch.arange(s).unsqueeze(0) <= torch.arange(t).unsqueeze(1)
    if not bool((vals.reshape(-1, t, s) == causal).all()):
        return Fail(5, "index_mask.causal", "the indexer's mask is not s <= t")
    k = topk.attrs["k"]
    cols = rw.op("reshape", [rw.op("iota", [], start=0, end=s, step=1, dtype=_I64)], shape=(1, s))
    rows = rw.op("reshape", [rw.op("iota", [], start=0, end=t, step=1, dtype=_I64)], shape=(t, 1))
    seen = rw.op("le", [cols, rows])
    masked = rw.op("where", [seen, score, _scalar(rw, float("-inf"), score)])
    padded = rw.op("pad", [masked], pads=(0, k), value=float("-inf"))
    values, indices = rw.op("topk", [padded], k=k, dim=2, largest=True, sorted=True)
    inf = rw.op("eq", [rw.op("abs", [values]), _scalar(rw, float("inf"), values)])
    past = rw.op("ge", [indices, _scalar(rw, s, indices)])
    picks = rw.op("where", [rw.op("logical_or", [inf, past]), _scalar(rw, -1, indices), indices])
    spill = rw.op("where", [rw.op("ge", [picks, _scalar(rw, 0, picks)]), picks,
                            _scalar(rw, s, picks)])
    ones = rw.op("full", [], shape=(b, t, s + 1), value=True, dtype=m["ones"].dtype)
    off = rw.op("full", [], shape=tuple(spill.type.shape), value=False, dtype=m["ones"].dtype)
    marked = rw.op("scatter", [ones, spill, off], dim=2)
    return rw.op("slice", [marked], dim=2, start=0, end=s, step=1)


_VISIBLE_TOPK = op(
    "topk",
    op("where", var("visible"), var("score"), const(float("-inf"))),
    attrs={"largest": True},
)


def _only_masks(env: Any, v: Value, visible: Value) -> bool:
    """Every use of v (through reshapes) is logical_not, and every use of that is an `and`
    with the indexer's visibility (any view of it)."""
    users = getattr(env, "users", None)
    if users is None:
        return False
    for u in users(v):
        if u.name in ("reshape", "unsqueeze"):
            if not _only_masks(env, u.results[0], visible):
                return False
        elif u.name == "logical_not":
            for a in users(u.results[0]):
                other = [x for x in a.operands if x != u.results[0]]
                ok = a.name in ("bitwise_and", "logical_and") and len(other) == 1
                if not ok or _unsqueezed(env, other[0]) != visible:
                    return False
        else:
            return False
    return bool(users(v))


# --- broadcasts after the math: one table, not one per sequence -----------------------------

def _grown(e: Any) -> tuple[int, ...]:
    """Dims (from the right, 1-based) that expand e grows from size 1."""
    src, out = e.operands[0].type.shape, e.results[0].type.shape
    return tuple(i for i in range(1, len(out) + 1)
                 if (src[-i] if i <= len(src) else 1) == 1 and out[-i] != 1)


def _late_unary(m: Match, rw: Rewriter) -> Value | Fail:
    e = m.node("e")
    if e.operands[0].type.rank != e.results[0].type.rank:
        return Fail(2, "expand", "the expand adds dims")
    inner = rw.op(m.root.name, [m["x"]], **m.root.attrs)
    return rw.op("expand", [inner], shape=tuple(m.root.results[0].type.shape))


def _late_mul(m: Match, rw: Rewriter) -> Value | Fail:
    e, y = m.node("e"), m["y"]
    if e.operands[0].type.rank != e.results[0].type.rank:
        return Fail(2, "expand", "the expand adds dims")
    ys = y.type.shape
    if any(i <= len(ys) and ys[-i] != 1 for i in _grown(e)):
        return Fail(3, "y", f"{y.type} varies along a dim the expand grows")
    inner = rw.op("mul", [m["x"], y])
    return rw.op("expand", [inner], shape=tuple(m.root.results[0].type.shape))


def _late_reshape(m: Match, rw: Rewriter) -> Value | Fail:
    e, x = m.node("e"), m["x"]
    shape, grown = tuple(m.root.results[0].type.shape), tuple(e.results[0].type.shape)
    k = len(shape) - len(grown)
    if k < 1 or shape[: len(grown)] != grown or any(d != 1 for d in shape[len(grown):]):
        return Fail(2, "reshape", "the reshape does not only append unit dims")
    inner = rw.op("reshape", [x], shape=tuple(x.type.shape) + (1,) * k)
    return rw.op("expand", [inner], shape=shape)


def _merge_expands(m: Match, rw: Rewriter) -> Value:
    return rw.op("expand", [m["x"]], shape=tuple(m.root.results[0].type.shape))


RULES = [
    # x·rep2(cos) + rotate_half(x)·rep2(sin) = interleave(a·cos - b·sin, a·sin + b·cos)
    Rule("attention_forms.rope_pairs", ROTATE_HALF, _rope_pairs),
    # softmax(x - max(x)) = softmax(x)
    Rule("attention_forms.softmax_unshift",
         op("softmax", op("sub", var("x"), op("amax", var("x"), name="max"), commute=False)),
         _unshift),
    # concat(a, full(<0 rows>)) = a
    Rule("attention_forms.concat_empty", op("concat"), _drop_empty),
    # finite x: picks of topk(where(s >= c, -inf, x)) past c = the padded top-k's -inf picks
    Rule("attention_forms.masked_topk", MASKED_PICKS, _padded_picks),
    # index_put(base, iota(0, n), v) over all n rows of base = v
    Rule("attention_forms.whole_put",
         op("index_put", var("base"), op("iota", name="rows"), var("v"),
            attrs={"accumulate": False}),
         _whole_put),
    # squeeze([.., 1, H] @ [.., H, S]) = Σ_h w_h·s_h
    Rule("attention_forms.head_sum", HEAD_SUM, _head_sum),
    # mask & ~scatter(true, topk(causal x), false) = mask & ~scatter(true, padded picks, false)
    Rule("attention_forms.index_mask", INDEX_MASK, _index_mask, view=FusionView),
    # f(expand(x)) = expand(f(x)) for elementwise f: rope tables of positions expanded over
    # the batch (HF's position_ids [B, n]) are one table broadcast
    Rule("attention_forms.expand_late_unary",
         op({"cos", "sin", "cast"}, op("expand", var("x"), name="e")), _late_unary),
    # expand(x)·y = expand(x·y) when y is constant along every dim the expand grows
    Rule("attention_forms.expand_late_mul",
         op("mul", op("expand", var("x"), name="e"), var("y"), commute=True), _late_mul),
    # reshape(expand(x), s ++ [1..]) = expand(reshape(x, shape(x) ++ [1..]), s ++ [1..])
    Rule("attention_forms.expand_late_reshape",
         op("reshape", op("expand", var("x"), name="e")), _late_reshape),
    # expand(expand(x)) = expand(x)
    Rule("attention_forms.expand_expand", op("expand", op("expand", var("x"))), _merge_expands),
]


def attention_forms(g, ctx: PassContext | None = None):
    """Rewrite other spellings of attention pieces into the canonical ones (module docstring)."""
    return rewrite(g, RULES, ctx=ctx)
