"""Canonical forms of MoE spellings, so `fuse_moe`'s two rules see one form whatever the model.

Run at the start of `fuse_moe` (after `canonicalize`), on the one rewrite driver. Each rule is an
exact identity (one-line algebra comment at the rule) from a spelling found in third-party
models — Hugging Face's routers and its `grouped_mm` experts (`integrations/moe.py`) — to the
form `fuse_moe` matches (its module docstring):

- top-k values are a gather of the scores at the top-k indices (HF routers renormalise
  `topk(s).values`; ours gather `s` at the chosen experts) — for any rank-2 top-k whose values
  feed a div/sum/softmax/mul, routing or not (exact either way);
- a softmax over the top-k logits is the renormalised top-k of the softmax (GPT-OSS-style
  top-k-then-softmax routers);
- `histc` of the sorted expert ids over E bins [0, E-1] is their bincount (HF's offsets);
- un-permuting the expert-sorted rows and summing each token's k slots is a scatter-add by
  token (HF's combine);
- a column slice of a grouped GEMM with stacked [gate; up] weights is the grouped GEMM with the
  sliced weights (HF's `gate_up_proj`), also for interleaved columns (step 2, GPT-OSS's
  gate = gate_up[..., ::2], up = gate_up[..., 1::2]), for weights stored transposed [E, in, out]
  and through an added per-row expert bias b[e] (GPT-OSS's `gate_up_proj_bias`); and likewise
  for per-row GEMMs with gathered weights (HF's `batched_mm` experts, either weight layout).

A rule that does not apply returns a `Fail` naming the sub-pattern and why (`STATS=1`,
`explain`). Rule names: `canonical_moe.<name>`.
"""

from __future__ import annotations

from ir import DType, Graph, Value
from passes.context import PassContext
from passes.fuse_common import Checks, FusionView, const_value, fusion_rule
from passes.pattern import Fail, Match, Rule, const, either, op, var
from passes.rewrite import Replace, Rewriter, rewrite

__all__ = ["RULES", "canonical_moe"]

_LAST = {"dim": lambda d: d in (-1, 1)}


_RENORMS = ("div", "sum", "softmax", "mul")  # the users of routing weights a rule looks at


def _topk_values(m: Match, rw: Rewriter) -> Replace | Fail:
    """topk(s, k).values = gather(s, topk(s, k).indices) for routing weights (rank-2 s).

    A plain rule (no cast-blind view): it must see the operands as already rewritten in this
    sweep, or the second user of the values would gather them again."""
    found = [(v, rw.producer(v)) for v in m.root.operands]
    found = [(v, n) for v, n in found if n is not None and n.name == "topk" and n.results[0] == v]
    if not found:
        return Fail(1, "values", "no operand is the values of a top-k", m.root)
    values, topk = found[0]
    s = topk.operands[0]
    if s.type.rank != 2 or topk.attrs["dim"] not in (-1, 1):
        dim = topk.attrs["dim"]
        reason = f"not a top-k over the last dim of [N, E] scores ({s.type}, dim {dim})"
        return Fail(2, "scores", reason, topk)
    return Replace(((values, rw.op("gather", [s, topk.results[1]], dim=1)),))


def _softmax_after_topk(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """softmax(topk(l).values) = renormalised topk(softmax(l)) (exp is monotone: the same picks,
    up to ties that rounding may create between nearly equal logits)."""
    m = c.match("picked", op("gather", var("l", rank=2), var("e"), attrs={"dim": 1}),
                root.root.operands[0])
    e = m["e"]
    topk = c.view.producer(e)
    ok = topk is not None and topk.name == "topk" and topk.results[1] == e
    c.need(ok and topk.operands[0] == m["l"], "choice", "the gathered indices are not the top-k "
           "of the same logits", topk)
    c.need(topk.attrs["largest"], "choice", "the top-k takes the smallest logits", topk)
    c.need(m["l"].dtype == DType.f32, "logits", f"logits are {m['l'].dtype}, not f32")
    s = rw.op("softmax", [m["l"]], dim=1)
    _, experts = rw.op("topk", [s], k=topk.attrs["k"], dim=1, largest=True,
                       sorted=topk.attrs["sorted"])
    picked = rw.op("gather", [s, experts], dim=1)
    w = rw.op("div", [picked, rw.op("sum", [picked], dims=(1,), keepdim=True)])
    return Replace(((root.root.results[0], w), (e, experts)))


# histc(v, bins, lo, hi) as torch decomposes it (lo = 0): the bin of v is
# min(i64(floor(v · bins / (hi - lo))), bins - 1) where lo <= v <= hi, each counted once.
_V = op("cast", op("sort", op("reshape", var("e", rank=2), name="flat"), result=0), name="v")
_IN_RANGE = op("logical_and", op("ge", _V, const(name="lo")), op("le", _V, const(name="hi")),
               name="in_range")
_BIN = op("minimum", op("cast", op("floor", op("div", op("mul", _V, const(name="bins")),
                                                  const(name="width")))), const(name="last"))
HISTC = op("scatter_add", const(0), op("where", _IN_RANGE, _BIN, var()),
           op("cast", _IN_RANGE), attrs={"dim": 0})


def _expert_count(view: FusionView, e: Value) -> int | None:
    """E when `e` [N, k] holds expert ids in [0, E): top-k indices over E columns, or
    `moe.route`'s experts (E = gate rows); -1 for a hash router's tid2eid[ids], whose entries
    are expert ids by the table's contract (histc would drop an out-of-range id, bincount and
    moe.experts would not: such a table is invalid input either way)."""
    n = view.producer(e)
    if n is None:
        return None
    if n.name == "topk" and n.results[1] == e:
        return n.operands[0].type.shape[-1]
    if n.name == "moe.route":
        return n.operands[1].type.shape[0]
    if n.name == "index" and n.operands[0].dtype == DType.i64:  # tid2eid[ids] of a hash router
        return -1
    return None


def _histc(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """histc(sort(e).values, E, 0, E-1) = bincount(e) for expert ids e in [0, E-1]."""
    m = c.match("histc", HISTC, root.root.results[0])
    counts = root.root.results[0]
    n_exp = counts.type.shape[0]
    c.need(isinstance(n_exp, int) and n_exp >= 2, "histc", f"{n_exp} bins: not a static E >= 2")
    want = {"lo": 0, "hi": n_exp - 1, "bins": n_exp, "width": n_exp - 1, "last": n_exp - 1}
    got = {k: const_value(c.view, m[k]) for k in want}
    c.need(got == want, "histc.bins", f"bins {got} are not one per expert id 0..{n_exp - 1}")
    e_count = _expert_count(c.view, m["e"])
    c.need(e_count in (n_exp, -1), "histc.ids", f"the ids are not expert ids in [0, {n_exp})",
           c.view.producer(m["e"]))
    flat = m["flat"]
    ones = rw.op("full", [], shape=flat.type.shape, value=1.0, dtype=counts.dtype)
    zeros = rw.op("full", [], shape=counts.type.shape, value=0.0, dtype=counts.dtype)
    return Replace(((counts, rw.op("scatter_add", [zeros, flat, ones], dim=0)),))


_ORDER = either(
    op("sort", var("flat", rank=1), result=1, name="order"),
    op("argsort", var("flat", rank=1), name="order"),
)
_INVERSE = op("index_put", const(0), _ORDER, op("iota", name="iota"),
              attrs={"dim": 0, "accumulate": False})
UNSORT_SUM = op("sum", op("reshape", op("index", var("rows", rank=2), _INVERSE, attrs={"dim": 0}),
                          name="slots", rank=3), attrs={"dims": (1,), "keepdim": False})


def _unsort_sum(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """Σ_j rows[inv(order)].view(N, k, d)[:, j] = index_add(0, order // k, rows) by token."""
    m = c.match("combine", UNSORT_SUM, root.root.results[0])
    k = m["slots"].type.shape[1]
    iota, p = m.node("iota").attrs, m["flat"].type.shape[0]
    c.need((iota["start"], iota["end"], iota["step"]) == (0, p, 1), "combine.inverse",
           f"the scattered values are not 0..{p}: not an inverse permutation", m.node("iota"))
    c.need(isinstance(k, int), "combine.slots", f"k = {k} is not static", m.node("slots"))
    order = m["order"]
    token = next((u.results[0] for u in c.view.users(order) if u.name == "floordiv"
                  and u.operands[0] == order and const_value(c.view, u.operands[1]) == k), None)
    if token is None:
        token = rw.op("floordiv", [order, rw.constant(k, order.dtype)])
    out = root.root.results[0]
    zeros = rw.op("full", [], shape=out.type.shape, value=0.0, dtype=out.dtype)
    y = rw.op("index_put", [zeros, token, m["rows"]], dim=0, accumulate=True)
    return Replace(((out, y),))


# The products a stacked [gate; up] slice is taken of, [S, out]:
# - grouped: grouped_mm(rows, Wᵀ) with W [E, out, in] (HF's default layout, a permute in the
#   graph) or grouped_mm(rows, Wt) with Wt [E, in, out] (transposed storage, GPT-OSS);
# - batched: row i times its gathered expert's weights, W[e] [S, out, in] · rows [S, in, 1], or
#   rows [S, 1, in] · Wt[e] [S, in, out] (transposed storage), flattened to [S, out];
# optionally plus per-row expert bias rows b[e_row] (HF adds `gate_up_proj_bias[ids]`).
_GROUPED = op("grouped_mm", var("rows", rank=2),
              either(op("permute", var("w", rank=3), attrs={"dims": (0, 2, 1)}),
                     var("wt", rank=3)),
              var("offs"), name="product_g")
_GATHERED, _GATHERED_T = (op("index", var(w, rank=3), var("ids"), attrs={"dim": 0})
                          for w in ("w", "wt"))
_BATCHED = op("reshape", either(op("matmul", _GATHERED, var("rows3", rank=3), name="product"),
                                op("matmul", var("rows3", rank=3), _GATHERED_T, name="product")),
              rank=2, name="flat_product")
_PRODUCT = either(_GROUPED, _BATCHED)
_ROW_BIAS = op("index", var("b", rank=2), var("bias_ids", rank=1), attrs={"dim": 0})
STACKED = op("slice", either(op("add", _PRODUCT, _ROW_BIAS, name="biased"), _PRODUCT),
             attrs=_LAST)


def _stacked_slice(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """(P [+ b[e]])[:, a:b:s] = P' [+ b[:, a:b:s][e]] where P = A · Wᵀ per expert group and P'
    takes W[:, a:b:s] (stacked [gate; up] weights, or interleaved with step 2: GPT-OSS), in the
    grouped form and the batched form (each row times its own expert's W)."""
    out = root.root.results[0]
    m = c.match("stacked", STACKED, out)
    attrs = root.root.attrs
    cols = {"start": attrs["start"], "end": attrs["end"], "step": attrs["step"]}
    y = _sliced_rows(c, m, rw, out, cols) if "offs" not in m else _sliced_grouped(m, rw, cols)
    if "biased" in m:
        ids, b = m["bias_ids"], m["b"]
        product = m["product_g" if "offs" in m else "flat_product"].type.shape
        ok = ids.type.shape[0] == product[0] and b.type.shape[1] == product[1]
        c.need(ok, "stacked.bias", f"the bias {b.type} gathered by {ids.type} is not one row "
               f"per expert and output column of {product}", m.node("biased"))
        y = rw.op("add", [y, rw.op("index", [rw.op("slice", [b], dim=1, **cols), ids], dim=0)])
    return Replace(((out, y),))


def _sliced_grouped(m: Match, rw: Rewriter, cols: dict) -> Value:
    """grouped_mm(A, W[:, cols]ᵀ) (or Wt[:, :, cols]), the grouped form of `_stacked_slice`."""
    if "w" in m:  # W [E, out, in]: its rows are the output columns
        wt = rw.op("permute", [rw.op("slice", [m["w"]], dim=1, **cols)], dims=(0, 2, 1))
    else:  # Wt [E, in, out]
        wt = rw.op("slice", [m["wt"]], dim=2, **cols)
    return rw.op("grouped_mm", [m["rows"], wt, m["offs"]])


def _sliced_rows(c: Checks, m: Match, rw: Rewriter, out: Value, cols: dict) -> Value:
    """(W[e_i] r_i)[cols] = W[e_i][cols] r_i (or r_iᵀ Wt[e_i][:, cols]), the batched form."""
    product, rows = m["product"].type.shape, m["rows3"].type.shape
    transposed = "wt" in m  # rows [S, 1, in] · Wt[e] [S, in, out]
    unit = (1, 2) if transposed else (2, 1)  # the unit dim of the rows and of the product
    ok = rows[unit[0]] == 1 and product[unit[0]] == 1
    ok = ok and m["flat_product"].type.shape == (product[0], product[unit[1]])
    want = "[S, 1, in]" if transposed else "[S, in, 1]"
    c.need(ok, "stacked.rows", f"rows {m['rows3'].type} are not {want} or the product "
           f"{product} is regrouped", m.node("product"))
    if transposed:
        w = rw.op("slice", [m["wt"]], dim=2, **cols)
        product = rw.op("matmul", [m["rows3"], rw.op("index", [w, m["ids"]], dim=0)])
    else:
        w = rw.op("slice", [m["w"]], dim=1, **cols)
        product = rw.op("matmul", [rw.op("index", [w, m["ids"]], dim=0), m["rows3"]])
    return rw.op("reshape", [product], shape=(product.type.shape[0], out.type.shape[1]))


RULES = [
    # topk(s).values = gather(s, topk(s).indices)
    Rule("canonical_moe.topk_values", op(set(_RENORMS)), _topk_values, near=2),
    # softmax(topk(l).values) = gather(softmax(l), e) / Σ gather(softmax(l), e), e = topk(...)
    fusion_rule(
        "canonical_moe.softmax_after_topk", op("softmax", attrs=_LAST), _softmax_after_topk
    ),
    # histc(sort(e), E, 0, E-1) = scatter_add(0, e, 1) for e in [0, E)
    fusion_rule("canonical_moe.histc", op("scatter_add"), _histc),
    # Σ_k unsort(rows).view(N, k, d) = index_put(0, order // k, rows, accumulate)
    fusion_rule("canonical_moe.unsort_sum", op("sum"), _unsort_sum),
    # (grouped_mm(A, Wᵀ) [+ b[e]])[:, a:b:s] = grouped_mm(A, W[:, a:b:s]ᵀ) [+ b[:, a:b:s][e]];
    # (W[e_i] r_i [+ b[e_i]])[a:b:s] = W[e_i][a:b:s] r_i [+ b[e_i][a:b:s]]
    fusion_rule("canonical_moe.stacked_slice", op("slice"), _stacked_slice),
]


def canonical_moe(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Rewrite the MoE spellings above to `fuse_moe`'s canonical form (module docstring)."""
    return rewrite(g, RULES, ctx=ctx)
