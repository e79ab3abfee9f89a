"""Fuse MoE routing into `moe.route` and dispatch + expert FFNs + combine into `moe.experts`.

Matches the canonical form (after `canonicalize`) of models/moe.py:

    s  = score(x @ gateᵀ)                 sqrt(softplus(·)), sigmoid(·) or softmax(·, -1)
    e  = index(tid2eid, ids) | topk(s + bias | s).indices
    w  = gather(s, e) [/ sum(gather(s, e))] [· route_scale]      -> moe.route(...) = (w, e)

    order = argsort(reshape(e)) (or sort's indices); token = order // k; offs = i32(cumsum(scatter_add(0, e, 1)))
    h     = silu(clamp(grouped_mm(x[token], w1ᵀ, offs), max=L)) · clamp(grouped_mm(.., w3ᵀ), ±L)
    y     = index_put(0, token, grouped_mm(h · w[order], w2ᵀ, offs), accumulate)
            (fp32: or grouped_mm(h, w2ᵀ, offs) · w[order]; scatter_add spellings canonicalise
            to index_put)
    [y   += (silu(clamp(x @ s1ᵀ)) · clamp(x @ s3ᵀ)) @ s2ᵀ]          -> moe.experts(...)

The grouped GEMMs' offsets come from a host-free histogram, so the fused op needs no counts:
it takes the [N,k] expert indices. Rules (and counters): `fuse_moe.moe.route`,
`fuse_moe.moe.experts`.
bf16 models match too: widening casts are looked through, and the rounding of the hidden rows
before w2 and of the routed sum is required exactly when x is narrower than fp32.
"""

from __future__ import annotations

from ir import DType, Graph, Node, Value
from passes.context import PassContext
from passes.fuse_common import (
    STEP,
    Checks,
    FusionView,
    const_value,
    fusion_rule,
    narrow,
    replace,
    scalar,
)
from passes.pattern import Match, const, either, op, var
from passes.rewrite import Replace, Rewriter, rewrite

__all__ = ["RULES", "fuse_moe"]

# --- routing -------------------------------------------------------------------------------

_W1 = op("gather", var("s"), var("experts"), name="picked", attrs={"dim": 1})
ROUTE_ROOTS = (  # (pattern, renorm, scaled)
    (op("mul", op("div", _W1, op("sum", _W1, attrs={"keepdim": True})), const(name="scale")), 1, 1),
    (op("div", _W1, op("sum", _W1, attrs={"keepdim": True})), 1, 0),
    (op("mul", _W1, const(name="scale")), 0, 1),
)
LOGITS = op("matmul", var("x", rank=2), op("permute", var("gate"), attrs={"dims": (1, 0)}))
SCORES = (
    ("sqrtsoftplus", op("sqrt", op("softplus", LOGITS, attrs={"beta": 1.0, "threshold": 20.0}))),
    ("sigmoid", op("sigmoid", LOGITS)),
    ("softmax", op("softmax", LOGITS, attrs={"dim": lambda d: d in (-1, 1)})),
)
SCORE_OF = {"sqrt": "sqrtsoftplus", "sigmoid": "sigmoid", "softmax": "softmax"}
HASHED = op("index", var("table"), var("ids", rank=1), attrs={"dim": 0})
TOPK = op("topk", var("chooser"), attrs={"dim": lambda d: d in (-1, 1), "largest": True})
SORTED = op(  # sort(descending)[..., :k].indices
    "slice",
    op("sort", var("chooser"), attrs={"dim": lambda d: d in (-1, 1), "descending": True}, result=1),
    attrs={"dim": lambda d: d in (-1, 1), "start": 0, "step": 1},
)


def _score(c: Checks, s: Value) -> tuple[str, Match]:
    """The score function (sqrt-softplus, sigmoid or softmax over the router logits) of `s`."""
    m = c.match("score", either(*(p for _, p in SCORES)), s)
    return SCORE_OF[c.view.producer(s).name], m


def _choice(c: Checks, experts: Value, s: Value) -> tuple[list[Value], dict]:
    """-> (extra operands, attrs) of the expert choice: hash table, top-k (+ bias)."""
    view = c.view
    m = view.matches(HASHED, experts)
    if m is not None:
        return [m["table"], m["ids"]], {"hash": True, "bias": False}
    m = view.matches(TOPK, experts)
    if m is not None and view.producer(experts).results[1] != experts:
        m = None
    m = m or c.match("choice", either(TOPK, SORTED, HASHED), experts)
    chooser = m["chooser"]
    if chooser == s:
        return [], {"hash": False, "bias": False}
    add = view.producer(chooser)
    c.need(add is not None and add.name == "add" and s in add.operands, "choice",
           "the top-k ranks neither the scores nor scores + bias", add)
    bias = add.operands[1] if add.operands[0] == s else add.operands[0]
    c.need(bias.type.rank == 1 and chooser.type == s.type, "choice.bias",
           f"the bias {bias.type} is not one value per expert", add)
    return [bias], {"hash": False, "bias": True}


def _outer_scale(view: FusionView, v: Value) -> Node | None:
    """The `mul` scaling renormalised weights `v` by a constant (the rule fires there)."""
    for u in view.users(v):
        if u.name == "mul" and any(const_value(view, o) is not None for o in u.operands):
            return u
    return None


def _route(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """w = gather(s, e) [/ Σ] [· c], s = score(x @ gateᵀ), e = top-k or hash -> moe.route."""
    view, value = c.view, root.root.results[0]
    outer = _outer_scale(view, value) if root.root.name == "div" else None
    c.need(outer is None, "route", "the renormalised weights are scaled next: the mul fuses", outer)
    for pat, renorm, scaled in ROUTE_ROOTS:
        m = view.matches(pat, value)
        if m is not None:
            c.score += STEP
            break
    else:
        c.match("weights", either(*(p for p, _, _ in ROUTE_ROOTS)), value)
    s, experts = m["s"], m["experts"]
    scale = scalar(m, "scale") if scaled else 1.0
    c.need(scale is not None, "weights.scale", "the route scale is not a constant")
    name, sm = _score(c, s)
    extra, attrs = _choice(c, experts, s)
    c.need(s.type.dtype == DType.f32, "score", f"scores are {s.type.dtype}, the op scores in f32")
    c.need(isinstance(experts.type.shape[1], int), "choice", "k is not a static size")
    attrs.update(k=experts.type.shape[1], score=name, route_scale=scale, renorm=bool(renorm))
    w, e = rw.op("moe.route", [sm["x"], sm["gate"], *extra], **attrs)
    return replace(view, [(value, w), (experts, e)])


# --- experts -------------------------------------------------------------------------------

_FLAT = op("reshape", var("experts", rank=2), name="flat")
ORDER = either(  # argsort, or the indices of a sort
    op("argsort", _FLAT, attrs={"descending": False}, name="order"),
    op("sort", _FLAT, attrs={"descending": False}, result=1, name="order"),
)
TOKEN = op("floordiv", ORDER, const(name="k"))
OFFS = op("cast", op("cumsum", op("scatter_add", const(0), var("flat"), const(1))), name="offs")
ROWS = op("index", var("x", rank=2), TOKEN, attrs={"dim": 0})


def _gemm(rows, w: str) -> object:
    return op("grouped_mm", rows, op("permute", var(w), attrs={"dims": (0, 2, 1)}), OFFS)


def _swiglu(gate, up, limit: str) -> object:
    clamp_gate = op("clamp", gate, name=f"{limit}_gate")
    return op("mul", op("silu", clamp_gate), op("clamp", up, name=f"{limit}_up"))


_HIDDEN = _swiglu(_gemm(ROWS, "w1"), _gemm(ROWS, "w3"), "routed")
_ROW_WEIGHTS = op("index", op("reshape", var("weights", rank=2)), ORDER, attrs={"dim": 0})
ROW_WEIGHTS = either(op("reshape", _ROW_WEIGHTS), _ROW_WEIGHTS)  # [N·k, 1] before or after
WEIGHTED = op("mul", _HIDDEN, ROW_WEIGHTS)
ROUTEDS = (  # hidden rows rounded to x's dtype before w2 (bf16 models) or not (fp32)
    op(
        "index_put",
        const(0.0),
        TOKEN,
        # fp32: the weights scale the rows before or after w2 (equal up to rounding)
        either(_gemm(WEIGHTED, "w2"), op("mul", _gemm(_HIDDEN, "w2"), ROW_WEIGHTS)),
        attrs={"dim": 0, "accumulate": True},
    ),
    op(
        "index_put",
        const(0.0),
        TOKEN,
        _gemm(op("cast", WEIGHTED), "w2"),
        attrs={"dim": 0, "accumulate": True},
    ),
)


def _dense(w: str) -> object:
    return op("matmul", var("x"), op("permute", var(w), attrs={"dims": (1, 0)}))


_SWIGLU = _swiglu(_dense("s1"), _dense("s3"), "shared")
SHAREDS = tuple(
    op("matmul", h, op("permute", var("s2"), attrs={"dims": (1, 0)}))
    for h in (_SWIGLU, op("cast", _SWIGLU))
)


def _limit(m: Match, prefix: str) -> float | None:
    gate, up = m.node(f"{prefix}_gate").attrs, m.node(f"{prefix}_up").attrs
    limit = gate["max"]
    if gate["min"] is not None or not isinstance(limit, (int, float)):
        return None
    return float(limit) if (up["min"], up["max"]) == (-limit, limit) else None


def _experts(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """Dispatch (sort by expert, grouped GEMMs, weighted scatter-add) [+ shared] -> moe.experts."""
    view, out = c.view, root.root.results[0]
    narrow_rows = None
    for i, pat in enumerate(ROUTEDS):
        m = view.matches(pat, out)
        if m is not None:
            narrow_rows = i
            break
    m = m or c.match("routed", either(*ROUTEDS), out)
    c.score += STEP
    x = m["x"]
    c.need(narrow_rows == narrow(x), "routed.rounding",
           f"hidden rows {'are' if narrow_rows else 'are not'} rounded before w2, x is {x.dtype}")
    gemms = [n for n in view.users(m["offs"]) if n.name == "grouped_mm"]
    bad = next((n for n in gemms if n.results[0].dtype != x.dtype), None)
    c.need(bad is None, "routed.gemm", f"a grouped GEMM is not in x's dtype {x.dtype}", bad)
    k, experts = scalar(m, "k"), m["experts"]
    c.need(k == experts.type.shape[1], "routed.token", f"rows // {k} is not rows // top-k")
    limit = _limit(m, "routed")
    c.need(limit is not None, "routed.swiglu", "gate and up clamps are not (-L, L], [-L, L]",
           m.node("routed_gate"))
    c.need(m.attr("offs", "dtype") == DType.i32, "routed.offsets", "offsets are not int32")
    c.need(m["weights"].type.shape == experts.type.shape, "routed.weights",
           f"weights {m['weights'].type} and expert ids {experts.type} differ in shape")
    operands = [x, m["weights"], experts, m["w1"], m["w3"], m["w2"]]
    cast = view.only_user(out, "cast")  # the fp32 sum rounded to x's dtype (bf16 models)
    mine = out if cast is None else cast.results[0]
    add = view.only_user(mine, "add")
    if add is not None:
        other = add.operands[1] if add.operands[0] == mine else add.operands[0]
        sm = view.matches(SHAREDS[narrow(x)], other)
        if sm is not None and sm["x"] == x and _limit(sm, "shared") == limit:
            shared = [sm["s1"], sm["s3"], sm["s2"]]
            y = rw.op("moe.experts", operands + shared, limit=limit, shared=True, loc=add.loc)
            return replace(view, [(add.results[0], y)])
    y = rw.op("moe.experts", operands, limit=limit)
    return replace(view, [(out, y)])


RULES = [
    # w = gather(s, e) [/ Σ_k gather(s, e)] [· c], s = score(x Wᵀ), e = top-k(s [+ b]) or hash
    fusion_rule("fuse_moe.moe.route", op({"mul", "div"}), _route),
    # Σ_experts scatter(token, w · SwiGLU_e(x[token])) [+ SwiGLU_shared(x)] = moe.experts
    fusion_rule("fuse_moe.moe.experts", op("index_put"), _experts),
]


def fuse_moe(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace routing and dispatch/expert/combine subgraphs by their ops (module docstring)."""
    return rewrite(g, RULES, ctx=ctx)
