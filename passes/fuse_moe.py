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
it takes the [N,k] expert indices. Counters: `fuse_moe.moe.route`, `fuse_moe.moe.experts`.
bf16 models match too: widening casts are looked through, and the rounding of the hidden rows
before w2 and of the routed sum is required exactly when x is narrower than fp32.
"""

from __future__ import annotations

from ir import DType, Graph, Node, Value
from passes.context import PassContext
from passes.fuse_common import Fusion, FusionView, apply, narrow, scalar
from passes.pattern import Match, const, either, op, var

__all__ = ["fuse_moe"]

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
HASHED = op("index", var("table"), var("ids", rank=1), attrs={"dim": 0})
TOPK = op("topk", var("chooser"), attrs={"dim": lambda d: d in (-1, 1), "largest": True})
SORTED = op(  # sort(descending)[..., :k].indices
    "slice",
    op("sort", var("chooser"), attrs={"dim": lambda d: d in (-1, 1), "descending": True}, result=1),
    attrs={"dim": lambda d: d in (-1, 1), "start": 0, "step": 1},
)


def _score(view: FusionView, s: Value) -> tuple[str, Match] | None:
    for name, pat in SCORES:
        m = view.match(pat, s)
        if m is not None:
            return name, m
    return None


def _choice(view: FusionView, experts: Value, s: Value) -> tuple[list[Value], dict] | None:
    """-> (extra operands, attrs) of the expert choice: hash table, top-k (+ bias)."""
    m = view.match(HASHED, experts)
    if m is not None:
        return [m["table"], m["ids"]], {"hash": True, "bias": False}
    m = view.match(TOPK, experts)
    if m is not None and view.producer(experts).results[1] != experts:
        m = None
    m = m or view.match(SORTED, experts)
    if m is None:
        return None
    chooser = m["chooser"]
    if chooser == s:
        return [], {"hash": False, "bias": False}
    add = view.producer(chooser)
    if add is None or add.name != "add" or s not in add.operands:
        return None
    bias = add.operands[1] if add.operands[0] == s else add.operands[0]
    if bias.type.rank != 1 or chooser.type != s.type:
        return None
    return [bias], {"hash": False, "bias": True}


def _fuse_route(view: FusionView, root: Node) -> Fusion | None:
    for pat, renorm, scaled in ROUTE_ROOTS:
        m = view.match(pat, root.results[0])
        if m is not None:
            break
    else:
        return None
    s, experts = m["s"], m["experts"]
    scale = scalar(m, "scale") if scaled else 1.0
    score = _score(view, s)
    choice = _choice(view, experts, s)
    if scale is None or score is None or choice is None or s.type.dtype != DType.f32:
        return None
    if not isinstance(experts.type.shape[1], int):
        return None
    name, sm = score
    extra, attrs = choice
    attrs.update(k=experts.type.shape[1], score=name, route_scale=scale, renorm=bool(renorm))
    operands = [sm["x"], sm["gate"], *extra]
    return Fusion("moe.route", operands, attrs, (root.results[0], experts), root.loc)


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


def _fuse_experts(view: FusionView, root: Node) -> Fusion | None:
    found = view.match_first(ROUTEDS, root.results[0])
    if found is None or found[0] != narrow(found[1]["x"]):  # rounds before w2 iff x is narrow
        return None
    m = found[1]
    gemms = [n for n in view.users(m["offs"]) if n.name == "grouped_mm"]
    if any(n.results[0].dtype != m["x"].dtype for n in gemms):  # the op's GEMMs are in x's dtype
        return None
    k, experts = scalar(m, "k"), m["experts"]
    limit = _limit(m, "routed")
    if limit is None or k != experts.type.shape[1] or m.attr("offs", "dtype") != DType.i32:
        return None
    if m["weights"].type.shape != experts.type.shape:
        return None
    operands = [m["x"], m["weights"], experts, m["w1"], m["w3"], m["w2"]]
    out = root.results[0]
    cast = view.only_user(out, "cast")  # the fp32 sum rounded to x's dtype (bf16 models)
    add = view.only_user(out if cast is None else cast.results[0], "add")
    if add is not None:
        mine = out if cast is None else cast.results[0]
        other = add.operands[1] if add.operands[0] == mine else add.operands[0]
        sm = view.match(SHAREDS[narrow(m["x"])], other)
        if sm is not None and sm["x"] == m["x"] and _limit(sm, "shared") == limit:
            operands += [sm["s1"], sm["s3"], sm["s2"]]
            attrs = {"limit": limit, "shared": True}
            return Fusion("moe.experts", operands, attrs, (add.results[0],), add.loc)
    return Fusion("moe.experts", operands, {"limit": limit}, (out,), root.loc)


def fuse_moe(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace routing and dispatch/expert/combine subgraphs by their ops (module docstring)."""
    view = FusionView(g)
    routes: dict[str, Fusion] = {}  # by expert-index value: the outermost root wins
    fusions: list[Fusion] = []
    for node in g.ops:
        if node.name in ("mul", "div"):
            f = _fuse_route(view, node)
            if f is not None:
                routes[f.replaces[1].name] = f
        elif node.name == "index_put":
            f = _fuse_experts(view, node)
            if f is not None:
                fusions.append(f)
    return apply(g, [*routes.values(), *fusions], ctx, "fuse_moe")
