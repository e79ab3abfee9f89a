"""Fuse MoE routing into `moe.route` and dispatch + expert FFNs + combine into `moe.experts`.

Matches the canonical form (after `canonicalize` and `canonical_moe`, which brings Hugging Face's
spellings — top-k values, top-k-then-softmax, histc offsets, un-permute + sum combine, stacked
gate_up weights — to it) of models/moe.py:

    s  = score(x @ gateᵀ [+ b])           sqrt(softplus(·)), sigmoid(·) or softmax(·, -1)
                                          (b: the router's own bias, GPT-OSS: `logit_bias`)
    c  = s + bias | s                     [grouped: where(c's group in the topk_group groups
                                           with the best Σ top-2, c, fill)]
    e  = index(tid2eid, ids) | topk(c).indices
    w  = gather(s, e) [/ (Σ_k gather(s, e) [+ eps])] [· route_scale]  -> moe.route(...) = (w, e)

    order = argsort(reshape(e)) (or sort's indices); token = order // k;
    offs  = i32(cumsum([i32](scatter_add(0, e, 1))))
    g, u  = grouped_mm(x[token], w1ᵀ, offs) [+ b1[sorted e]], the same with w3 [+ b3[sorted e]]
            (wᵀ a permute of w [E, out, in], or a weight stored [E, in, out]: GPT-OSS)
    h     = silu([clamp](g, max=L)) · [clamp](u, ±L)
            or (clamp(u, ±L) + 1) · g' · sigmoid(g' · alpha), g' = clamp(g, max=L)  (GPT-OSS)
    y     = index_put(0, token, grouped_mm(h · w[order], w2ᵀ, offs), accumulate)
            (fp32: or (grouped_mm(h, w2ᵀ, offs) [+ b2[sorted e]]) · w[order]; scatter_add
            spellings canonicalise to index_put)
    [y   += (silu([clamp](x @ s1ᵀ)) · [clamp](x @ s3ᵀ)) @ s2ᵀ]        -> moe.experts(...)
            (the shared expert on [N, d], or on the model's [B, S, d] before the flattening)

Two more expert spellings form the same op: HF's `batched_mm` (each (token, slot) row times its
gathered expert's weights in either layout [+ its bias row], then a reshape to [N, k, d] and a
sum over the slots; rule
`fuse_moe.moe.experts_batched`) and a dense loop over an nn.ModuleList of experts
(Σ_i (Σ_k w · [e = i]) · FFN_i(x) over every expert; the weights are stacked in the graph; rule
`fuse_moe.moe.experts_loop`), both in fp32 only.

The SwiGLU is clamped (activation "clamped_swiglu", limit L) or not ("swiglu"), or GPT-OSS's
gate ("gpt_oss", limit L, alpha); routed and shared experts must agree. Per-expert biases
(`expert_bias`; zeros for a GEMM without one) and the GPT-OSS gate are matched in fp32 only.
The grouped GEMMs' offsets come from a host-free histogram, so the fused op needs no counts: it
takes the [N,k] expert indices. Rules (and counters):
`fuse_moe.moe.route`, `fuse_moe.moe.experts`.
bf16 models match too: widening casts are looked through, and the rounding of the hidden rows
before w2 and of the routed sum is required exactly when x is narrower than fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

from ir import DType, Graph, Node, Value
from ir.ops.moe import Experts
from passes.canonical_moe import canonical_moe
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

ALPHA = Experts.alpha  # moe.experts' default sigmoid scale, read by the "gpt_oss" activation only

# --- routing -------------------------------------------------------------------------------

_W1 = op("gather", var("s"), var("experts"), name="picked", attrs={"dim": 1})
# Σ over the k picks of each token (a sum over tokens is no renormalisation)
_SUM = op("sum", _W1, attrs={"dims": lambda d: tuple(d) in ((1,), (-1,)), "keepdim": True})
_RENORMED = op("div", _W1, either(_SUM, op("add", _SUM, const(name="eps"))))  # Σ [+ eps]
ROUTE_ROOTS = (  # (pattern, renorm, scaled)
    (op("mul", _RENORMED, const(name="scale")), 1, 1),
    (_RENORMED, 1, 0),
    (op("mul", _W1, const(name="scale")), 0, 1),
)
_GATE_MM = op("matmul", var("x", rank=2), op("permute", var("gate"), attrs={"dims": (1, 0)}))
# x·Wᵀ + b (GPT-OSS's biased router linear: the bias moves the scores, `logit_bias`) or x·Wᵀ
LOGITS = either(op("add", _GATE_MM, var("logit_bias", rank=1)), _GATE_MM)
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


# DeepSeek-V3 group-limited choice: keep the topk_group groups whose two best choosers sum
# highest, fill the rest, then top-k: where(expand(scatter(0, topk(Σ top2(c.view(N, G, E/G))),
# 1)), c, fill)
_GROUP_SCORE = op(
    "sum",
    op("topk", op("reshape", var("c", rank=2), name="groups", rank=3),
       attrs={"k": 2, "dim": lambda d: d in (-1, 2), "largest": True}, result=0),
    attrs={"dims": (2,), "keepdim": False},
)
_KEPT = op("scatter", const(0), op("topk", _GROUP_SCORE, name="best_groups", result=1,
                                   attrs={"largest": True}), const(1), attrs={"dim": 1})
_GROUP_COLS = op("expand", op("reshape", _KEPT, name="kept", rank=3), name="group_cols")
GROUPED = op(
    "where",
    op("cast", op("reshape", _GROUP_COLS), dtype=DType.bool),
    var("c"),
    const(name="fill"),
)


def _groups(c: Checks, chooser: Value) -> tuple[Value, dict]:
    """(the chooser before group masking, grouped attrs) when `chooser` is group-limited."""
    m = c.view.matches(GROUPED, chooser)
    if m is None:
        return chooser, {}
    c.score += STEP
    n, n_group, size = m["groups"].type.shape
    topk_group = m.attr("best_groups", "k")
    c.need(m["c"].type.shape == (n, n_group * size), "choice.groups",
           f"groups {m['groups'].type} are not a split of the chooser {m['c'].type}")
    c.need(m.attr("best_groups", "dim") in (-1, 1), "choice.groups", "groups ranked on a wrong dim")
    # group g's mask covers columns g·size .. (g+1)·size - 1: [N, G] -> [N, G, 1] -> [N, G, size]
    cols = m["group_cols"].type
    ok = m["kept"].type.shape == (n, n_group, 1) and cols.shape == (n, n_group, size)
    c.need(ok, "choice.mask", f"the group mask {cols} does not cover each group's contiguous "
           "columns", m.node("group_cols"))
    fill = scalar(m, "fill")
    c.need(fill is not None, "choice.fill", "the masked chooser is not a constant")
    return m["c"], {"n_group": n_group, "topk_group": topk_group, "group_fill": fill}


def _choice(c: Checks, experts: Value, s: Value) -> tuple[list[Value], dict]:
    """-> (extra operands, attrs) of the expert choice: hash table, top-k (+ bias), grouped."""
    view = c.view
    m = view.matches(HASHED, experts)
    if m is not None:
        return [m["table"], m["ids"]], {"hash": True, "bias": False}
    m = view.matches(TOPK, experts)
    if m is not None and view.producer(experts).results[1] != experts:
        m = None
    m = m or c.match("choice", either(TOPK, SORTED, HASHED), experts)
    chooser, grouped = _groups(c, m["chooser"])
    if chooser == s:
        return [], {"hash": False, "bias": False, **grouped}
    add = view.producer(chooser)
    c.need(add is not None and add.name == "add" and s in add.operands, "choice",
           "the top-k ranks neither the scores nor scores + bias", add)
    bias = add.operands[1] if add.operands[0] == s else add.operands[0]
    c.need(bias.type.rank == 1 and chooser.type == s.type, "choice.bias",
           f"the bias {bias.type} is not one value per expert", add)
    return [bias], {"hash": False, "bias": True, **grouped}


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
    eps = scalar(m, "eps") if "eps" in m else 0.0
    c.need(eps is not None, "weights.eps", "the renormalising sum adds a non-constant")
    name, sm = _score(c, s)
    extra, attrs = _choice(c, experts, s)
    c.need(s.type.dtype == DType.f32, "score", f"scores are {s.type.dtype}, the op scores in f32")
    c.need(isinstance(experts.type.shape[1], int), "choice", "k is not a static size")
    attrs.update(k=experts.type.shape[1], score=name, route_scale=scale, renorm=bool(renorm))
    if eps:
        attrs["eps"] = eps
    if "logit_bias" in sm:  # the router's own bias: last operand
        b = sm["logit_bias"]
        c.need(b.type.shape == sm["gate"].type.shape[:1], "score.logit_bias",
               f"the bias {b.type} added to the logits is not one value per expert")
        extra, attrs["logit_bias"] = [*extra, b], True
    c.fits("moe.route", [sm["x"], sm["gate"], *extra], attrs, [value, experts])
    w, e = rw.op("moe.route", [sm["x"], sm["gate"], *extra], **attrs)
    return replace(view, [(value, w), (experts, e)])


# --- experts -------------------------------------------------------------------------------

_FLAT = op("reshape", var("experts", rank=2), name="flat")
ORDER = either(  # argsort, or the indices of a sort
    op("argsort", _FLAT, attrs={"descending": False}, name="order"),
    op("sort", _FLAT, attrs={"descending": False}, result=1, name="order"),
)
TOKEN = op("floordiv", ORDER, const(name="k"))
_COUNTS = op("scatter_add", const(0), var("flat"), const(1))  # per-expert row counts
OFFS = op("cast", op("cumsum", either(_COUNTS, op("cast", _COUNTS))), name="offs")
ROWS = op("index", var("x", rank=2), TOKEN, attrs={"dim": 0})


def _gemm(rows, w: str) -> object:
    """grouped_mm(rows, wᵀ) with w [E, out, in] (a permute of it), or with the weight stored
    transposed [E, in, out] (captured as `<w>_t`, GPT-OSS)."""
    wt = either(op("permute", var(w), attrs={"dims": (0, 2, 1)}), var(f"{w}_t", rank=3))
    return op("grouped_mm", rows, wt, OFFS)


# each row's expert bias b[e_row]: gathered by the expert ids in sorted order (the values of
# the sort whose indices are `order`; `_experts` checks it is the same sort)
_SORTED_IDS = op("sort", _FLAT, attrs={"descending": False}, result=0, name="sorted_ids")


def _biased(gemm, b: str) -> object:
    """gemm + b[sorted expert ids] (per-expert bias rows, GPT-OSS) or gemm."""
    bias = op("index", var(b, rank=2), _SORTED_IDS, attrs={"dim": 0})
    return either(op("add", gemm, bias, name=f"{b}_add"), gemm)


def _swiglu(gate, up, prefix: str) -> object:
    """silu(gate) · up, each optionally clamped (`_activation` checks the clamps agree), or
    GPT-OSS's (clamp(up) + 1) · g · sigmoid(g · alpha) with g = clamp(gate)."""
    g = op("clamp", gate, name=f"{prefix}_gate")
    swiglu = op("mul", op("silu", either(g, gate)),
                either(op("clamp", up, name=f"{prefix}_up"), up))
    glu = op("mul", g, op("sigmoid", op("mul", g, const(name=f"{prefix}_alpha"))),
             name=f"{prefix}_glu")
    # glu first: a near miss (up not shifted by one) then fails at the add, past the whole glu
    gpt_oss = op("mul", glu, op("add", op("clamp", up, name=f"{prefix}_up"),
                                const(name=f"{prefix}_one")))
    return either(swiglu, gpt_oss)


_HIDDEN = _swiglu(_biased(_gemm(ROWS, "w1"), "b1"), _biased(_gemm(ROWS, "w3"), "b3"), "routed")
_ROW_WEIGHTS = op("index", op("reshape", var("weights", rank=2)), ORDER, attrs={"dim": 0})
ROW_WEIGHTS = either(op("reshape", _ROW_WEIGHTS), _ROW_WEIGHTS)  # [N·k, 1] before or after
WEIGHTED = op("mul", _HIDDEN, ROW_WEIGHTS)
ROUTEDS = (  # hidden rows rounded to x's dtype before w2 (bf16 models) or not (fp32)
    op(
        "index_put",
        const(0.0),
        TOKEN,
        # fp32: the weights scale the rows before or after w2 (and its bias: GPT-OSS),
        # equal up to rounding
        either(_gemm(WEIGHTED, "w2"), op("mul", _biased(_gemm(_HIDDEN, "w2"), "b2"), ROW_WEIGHTS)),
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


def _activation(m: Match, prefix: str) -> tuple[str, float, float] | str:
    """(activation, limit L, alpha): ("clamped_swiglu", L, -) for clamps (-inf, L] on the gate and
    [-L, L] on up, ("swiglu", 10.0, -) without clamps (the limit is unused), ("gpt_oss", L, a)
    for (up + 1)·g·sigmoid(a·g) with those clamps; else the reason none holds."""
    if m.node(f"{prefix}_glu") is not None:
        return _gpt_oss(m, prefix)
    gate, up = m.node(f"{prefix}_gate"), m.node(f"{prefix}_up")
    if gate is None and up is None:
        return ("swiglu", 10.0, ALPHA)
    if gate is None or up is None:
        return "only one of gate and up is clamped"
    limit = _activation_clamps(m, prefix)
    return limit if isinstance(limit, str) else ("clamped_swiglu", limit, ALPHA)


def _gpt_oss(m: Match, prefix: str) -> tuple[str, float, float] | str:
    """("gpt_oss", L, alpha) when the GPT-OSS gate's constants are an alpha and up + 1."""
    one, alpha = scalar(m, f"{prefix}_one"), scalar(m, f"{prefix}_alpha")
    if one != 1.0:
        return f"up is shifted by {one}, not by 1: (up + 1)·glu is GPT-OSS's gate"
    if alpha is None:
        return "the sigmoid's scale alpha is not a constant"
    act = _activation_clamps(m, prefix)
    return act if isinstance(act, str) else ("gpt_oss", act, alpha)


def _activation_clamps(m: Match, prefix: str) -> float | str:
    """L for clamps (-inf, L] on the gate and [-L, L] on up, else the reason."""
    gate, up = m.node(f"{prefix}_gate"), m.node(f"{prefix}_up")
    limit = gate.attrs["max"]
    if gate.attrs["min"] is not None or not isinstance(limit, (int, float)):
        return f"the gate clamp is [{gate.attrs['min']}, {limit}], not (-inf, L]"
    if (up.attrs["min"], up.attrs["max"]) != (-limit, limit):
        return f"the up clamp is [{up.attrs['min']}, {up.attrs['max']}], not [-{limit}, {limit}]"
    return float(limit)


def _shared(view: FusionView, x: Value, mine: Value, act: tuple, base: Value | None = None
            ) -> tuple | None:
    """(s1, s3, s2, the add it ends in, reshape shape or None) when `mine` (the routed sum) is
    added to a shared SwiGLU expert of the same tokens and activation — on [N, d] or, through a
    reshape, on the model's [B, S, d] (the shared expert then reads x before its flattening,
    `base`: by default the operand of x's reshape)."""
    shape, add = None, view.only_user(mine, "add")
    view_op = view.only_user(mine, "reshape")
    if add is None and view_op is not None:
        shape, add = view_op.attrs["shape"], view.only_user(view_op.results[0], "add")
    if add is None:
        return None
    sum_in = mine if shape is None else view_op.results[0]
    other = add.operands[1] if add.operands[0] == sum_in else add.operands[0]
    sm = view.matches(SHAREDS[narrow(x)], other)
    if sm is None or _activation(sm, "shared") != act:
        return None
    if base is None:
        flat = view.producer(x)
        base = flat.operands[0] if flat is not None and flat.name == "reshape" else None
    same = sm["x"] == (x if shape is None else base)
    return (sm["s1"], sm["s3"], sm["s2"], add, shape) if same else None


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
    act = _activation(m, "routed")
    c.need(not isinstance(act, str), "routed.swiglu", str(act), m.node("routed_gate"))
    c.need(m.attr("offs", "dtype") == DType.i32, "routed.offsets", "offsets are not int32")
    c.need(m["weights"].type.shape == experts.type.shape, "routed.weights",
           f"weights {m['weights'].type} and expert ids {experts.type} differ in shape")
    gpt_oss = act[0] == "gpt_oss"
    c.need(not narrow(x) or not gpt_oss, "routed.dtype", f"x is {x.dtype}: the GPT-OSS gate is "
           "matched in fp32 only (its eager rounding points are not the op's)",
           m.node("routed_glu"))
    ws = _expert_weights(m, rw)
    if _has_biases(m):
        sort = view.producer(m["sorted_ids"])
        c.need(sort is view.producer(m["order"]), "routed.bias", "the bias rows are gathered by "
               "expert ids of another sort than the rows' order", sort)
        c.need(not narrow(x), "routed.bias", f"x is {x.dtype}: expert biases are matched in "
               "fp32 only (their eager rounding points are not the op's)", m.node("b1_add"))
    biases = _biases(m, rw, ws, x)
    operands = [x, m["weights"], experts, *ws]
    c.fits("moe.experts", operands + biases, _attrs(act, biases), [out])
    return _build(view, rw, out, operands, act, biases=biases)


def _expert_weights(m: Match, rw: Rewriter) -> list[Value]:
    """[w1, w3, w2] in the op's layout: captured as such, or a permute of a weight captured in
    its transposed storage (`<w>_t`, GPT-OSS)."""
    return [m[w] if w in m else rw.op("permute", [m[f"{w}_t"]], dims=(0, 2, 1))
            for w in ("w1", "w3", "w2")]


def _has_biases(m: Match) -> bool:
    return any(f"{b}_add" in m.nodes for b in ("b1", "b3", "b2"))


def _biases(m: Match, rw: Rewriter, ws: list[Value], x: Value) -> list[Value]:
    """[b1, b3, b2] (zeros for a GEMM without one) when a GEMM adds per-expert bias rows, else
    []."""
    if not _has_biases(m):
        return []
    e, inter, d = ws[0].type.shape
    widths = {"b1": inter, "b3": inter, "b2": d}
    return [m[b] if b in m else rw.op("full", [], shape=(e, w), value=0.0, dtype=x.dtype)
            for b, w in widths.items()]


def _attrs(act: tuple, biases: list[Value]) -> dict:
    """moe.experts' attributes for activation `act` (`_activation`), with biases or not."""
    attrs = {"limit": act[1]} | ({} if act[0] == "clamped_swiglu" else {"activation": act[0]})
    if act[0] == "gpt_oss":
        attrs["alpha"] = act[2]
    return attrs | ({"expert_bias": True} if biases else {})


def _build(view: FusionView, rw: Rewriter, out: Value, operands: list[Value], act: tuple,
           base: Value | None = None, biases: list[Value] | None = None) -> Replace:
    """moe.experts(operands [+ shared] [+ biases]) standing for the routed sum `out`, or for
    `out` + the shared expert when one is added to it (`_shared`)."""
    x, biases = operands[0], biases or []
    attrs = _attrs(act, biases)
    cast = view.only_user(out, "cast")  # the fp32 sum rounded to x's dtype (bf16 models)
    mine = out if cast is None else cast.results[0]
    shared = _shared(view, x, mine, act, base)
    why = None if shared is None else _shared_unusable(rw, x, shared[:3])
    if why is not None:  # the routed experts still form; the shared expert stays as it is
        rw.ctx.count("fuse_moe.shared_not_folded")
        if rw.ctx.stats:
            rw.ctx.log(f"fuse_moe: shared expert at {shared[3].loc} not folded: {why}")
        shared = None
    if shared is not None:
        *weights, add, shape = shared
        y = rw.op("moe.experts", operands + weights + biases, shared=True, loc=add.loc, **attrs)
        if shape is not None:
            y = rw.op("reshape", [y], shape=shape, loc=add.loc)
        return replace(view, [(add.results[0], y)])
    y = rw.op("moe.experts", operands + biases, **attrs)
    return replace(view, [(out, y)])


def _shared_unusable(rw: Rewriter, x: Value, weights: Sequence[Value]) -> str | None:
    """Why the shared expert's [s1, s3, s2] cannot be operands of the op replacing the routed sum,
    or None: the op needs them defined before that sum (e.g. FP8 weights dequantised next to
    the shared expert, after the routed experts, are not) and in x's dtype."""
    late = [w for w in weights if not rw.defined(w)]
    if late:
        return (f"shared.weights: %{late[0].name} is computed after the routed experts (not "
                "parameters in x's dtype); expected parameters or values defined before them")
    bad = next((w for w in weights if w.dtype != x.dtype), None)
    if bad is not None:
        return f"shared.weights: %{bad.name} is {bad.dtype}, expected x's dtype {x.dtype}"
    return None


# --- experts, batched form: each (token, slot) row times its gathered expert's weights --------
# (HF's batched_mm experts): rows = x repeated k times, GEMMs against W[e] per row, combine by a
# reshape to [N, k, d] and a sum over the slots

_FLAT_E = op("reshape", var("experts", rank=2), name="flat_e", rank=1)
_REPEATED = op("reshape", op("expand", op("reshape", var("base"), name="one_slot", rank=3)),
               name="rows", rank=3)  # [N·k, d, 1]


def _per_row(rows, w: str, b: str) -> object:
    """[S, out]: row i times W[e_i]ᵀ, as a batched matmul of the gathered weights W[e] [S, out,
    in] · rows [S, in, 1], or rows [S, 1, in] · Wt[e] [S, in, out] (weights stored transposed:
    GPT-OSS), flattened [+ the expert's bias row b[e_i]]."""
    gathered = op("index", var(w, rank=3), _FLAT_E, attrs={"dim": 0})
    gathered_t = op("index", var(f"{w}_t", rank=3), _FLAT_E, attrs={"dim": 0})
    product = either(op("matmul", gathered, rows, name=f"{w}_rows"),
                     op("matmul", rows, gathered_t, name=f"{w}_rows"))
    flat = op("reshape", product, rank=2, name=f"{w}_2d")
    bias = op("index", var(b, rank=2), _FLAT_E, attrs={"dim": 0})
    return either(op("add", flat, bias, name=f"{b}_add"), flat)


_HIDDEN_B = _swiglu(_per_row(_REPEATED, "w1", "b1"), _per_row(_REPEATED, "w3", "b3"), "routed")
_DOWN_B = _per_row(op("reshape", _HIDDEN_B, rank=3, name="h_col"), "w2", "b2")
BATCHED = op(
    "sum",
    op("reshape", op("mul", _DOWN_B, op("reshape", var("weights", rank=2), rank=2)),
       name="slots", rank=3),
    attrs={"dims": (1,), "keepdim": False},
)


def _experts_batched(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """Σ_slots w · W2[e] · SwiGLU(W1[e] x, W3[e] x) per (token, slot) row [+ shared] ->
    moe.experts."""
    view, out = c.view, root.root.results[0]
    m = c.match("batched", BATCHED, out)
    n, k, d = m["slots"].type.shape
    experts, weights, base = m["experts"], m["weights"], m["base"]
    c.need(experts.type.shape == weights.type.shape == (n, k), "batched.slots",
           f"[N, k] = {experts.type.shape} ids, {weights.type.shape} weights, rows [{n}, {k}]")
    rows = (n * k, 1, d) if "w1_t" in m else (n * k, d, 1)
    c.need(m["one_slot"].type.shape == (n, 1, d) and m["rows"].type.shape == rows,
           "batched.rows", "the rows are not each token's x repeated k times", m.node("rows"))
    c.need(not narrow(base), "batched.dtype", f"x is {base.dtype}: the batched form is matched "
           "in fp32 only (where its rounding points do not matter)", m.node("rows"))
    for w in ("w1", "w3", "w2"):  # [S, out, 1] products flattened to [S, out], not regrouped
        product, flat = m[f"{w}_rows"].type.shape, m[f"{w}_2d"].type.shape
        unit = 1 if f"{w}_t" in m else 2  # [S, 1, out] from transposed weights
        ok = product[unit] == 1 and flat == (product[0], product[3 - unit])
        c.need(ok, "batched.gemm", f"{product} is reshaped to {flat}", m.node(f"{w}_2d"))
    h_col, unit = m["h_col"], 1 if "w2_t" in m else 2  # [S, 1, I] or [S, I, 1]
    c.need(h_col.type.shape[unit] == 1, "batched.gemm", f"hidden rows are {h_col.type}, not "
           f"{'[S, 1, I]' if unit == 1 else '[S, I, 1]'}", m.node("h_col"))
    act = _activation(m, "routed")
    c.need(not isinstance(act, str), "batched.swiglu", str(act), m.node("routed_gate"))
    x = rw.op("reshape", [base], shape=(n, d))
    ws = _expert_weights(m, rw)
    biases = _biases(m, rw, ws, x)
    operands = [x, weights, experts, *ws]
    c.fits("moe.experts", operands + biases, _attrs(act, biases), [out])
    return _build(view, rw, out, operands, act, base, biases=biases)


# --- experts, dense loop form: y = Σ_i (Σ_k w · [e == i]) · FFN_i(x), one term per expert ----
# (a Python loop over nn.ModuleList experts, each run on every token with its routing weight or
# 0): moe.experts over the experts' weights stacked along a new dim 0

LOOP_TERM = op(
    "mul",
    op("sum", op("mul", var("weights", rank=2), op("eq", var("experts", rank=2), const(name="i"))),
       attrs={"dims": (1,), "keepdim": True}),
    SHAREDS[0],
)


def _loop_terms(c: Checks, out: Value) -> list[Match]:
    """The terms of the add chain ending in `out`, in chain order (the first term first)."""
    view, terms, v = c.view, [], out
    while True:
        add = view.producer(v)
        if add is None or add.name != "add":
            break
        a, b = add.operands
        m = view.matches(LOOP_TERM, b) or view.matches(LOOP_TERM, a)
        if m is None:
            break
        terms.append(m)
        rest = a if m.root.results[0] == b else b
        if v != out:
            c.need(view.uses(v) == 1, "loop.chain", f"a partial sum %{v.name} is used elsewhere")
        v = rest
    terms.append(c.match("loop.term", LOOP_TERM, v))
    return terms[::-1]


def _experts_loop(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """Σ_i (Σ_k w · [e = i]) · SwiGLU-FFN_i(x) over every expert i [+ shared] -> moe.experts."""
    view, out = c.view, root.root.results[0]
    terms = _loop_terms(c, out)
    first = terms[0]
    x, weights, experts = first["x"], first["weights"], first["experts"]
    same = all((t["x"], t["weights"], t["experts"]) == (x, weights, experts) for t in terms)
    c.need(same, "loop.operands", "the terms read different tokens, weights or expert ids")
    ids = sorted(const_value(view, t["i"]) for t in terms)
    n_exp = len(ids)
    every = ids == list(range(n_exp)) and all(type(i) is int for i in ids)
    c.need(every, "loop.experts", f"the terms are for experts {ids}, not each of 0..{n_exp - 1}")
    count = _expert_count(view, experts)
    c.need(count == n_exp, "loop.experts", f"{n_exp} terms, but the ids choose among {count}")
    acts = {_activation(t, "shared") for t in terms}
    act = next(iter(acts))
    c.need(len(acts) == 1 and not isinstance(act, str), "loop.swiglu",
           f"the experts' activations differ or are not a SwiGLU: {acts}")
    c.need(not narrow(x), "loop.dtype", f"x is {x.dtype}: the loop form is matched in fp32 only")
    stacked = [_stack(rw, [t[w] for t in terms]) for w in ("s1", "s3", "s2")]
    operands = [x, weights, experts, *stacked]
    c.fits("moe.experts", operands, {}, [out])
    return _build(view, rw, out, operands, act)


def _expert_count(view: FusionView, experts: Value) -> int | None:
    """The number of experts the ids `experts` choose among (top-k columns, moe.route's gate
    rows), or None when unknown."""
    n = view.producer(experts)
    if n is not None and n.name == "topk" and n.results[1] == experts:
        return n.operands[0].type.shape[-1]
    if n is not None and n.name == "moe.route":
        return n.operands[1].type.shape[0]
    return None


def _stack(rw: Rewriter, weights: list[Value]) -> Value:
    """[E, ...]: the experts' weight matrices stacked along a new dim 0."""
    rows = [rw.op("reshape", [w], shape=(1, *w.type.shape)) for w in weights]
    return rw.op("concat", rows, dim=0)


RULES = [
    # w = gather(s, e) [/ (Σ_k gather(s, e) + ε)] [· c], s = score(x Wᵀ),
    # e = top-k(s [+ b]) (within the best groups) or hash
    fusion_rule("fuse_moe.moe.route", op({"mul", "div"}), _route),
    # Σ_experts scatter(token, w · SwiGLU_e(x[token])) [+ SwiGLU_shared(x)] = moe.experts
    fusion_rule("fuse_moe.moe.experts", op("index_put"), _experts),
    # Σ_slots (w · W2[e] SwiGLU(W1[e] x, W3[e] x)).view(N, k, d) [+ shared] = moe.experts
    fusion_rule("fuse_moe.moe.experts_batched", op("sum"), _experts_batched),
    # Σ_i (Σ_k w · [e = i]) · FFN_i(x) over all experts i [+ shared] = moe.experts
    fusion_rule("fuse_moe.moe.experts_loop", op("add"), _experts_loop),
]


def fuse_moe(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace routing and dispatch/expert/combine subgraphs by their ops (module docstring),
    after rewriting other spellings to the canonical form (`passes.canonical_moe`)."""
    return rewrite(canonical_moe(g, ctx), RULES, ctx=ctx)
