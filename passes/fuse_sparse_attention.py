"""Fuse attention over index-selected keys (DeepSeek Sparse Attention, V3.2) into `attn.sdpa`
with an `indices` operand (`indexed=true`): cost ∝ T·n picked keys instead of T·S.

Two spellings, one rule each (after `canonicalize`, `fuse_attention` and `fuse_sdpa`):

gathered (models/attention_dsa.py `sparse_mla`, prefill and decode):

    G   = entries[b, clamp(idx, 0)]                       [B,T,n,D]  idx [B,T,n], -1 = none
    z   = where(idx >= 0, scale · q·Gᵀ, -inf)              [B,T,H,n]  q [B,T,H,D] (MQA: one G)
    o   = softmax(z) · G[..., :Dv]                         [B,T,H,Dv]
       -> permute(attn.sdpa(permute(q), entries [B,1,N,D], idx [B,1,T,n], scale, indexed,
                            value_dim=Dv))

  The softmax over slot j of the gathered rows is the op's softmax over its index slots (slot
  j is row idx[t, j] when idx >= 0, no key at -1): the same terms in the same order, so exact.
  A row whose slots are all -1 is softmax(all -inf) = NaN in the model and 0 in the op; the
  model is only defined where each query has a key (`sparse_mla`'s contract; the indexer gives
  each query at least one), so nothing observable changes.

dense with a top-k mask (Hugging Face DeepseekV32Attention, eager or SDPA; `fuse_sdpa` formed
a dense `attn.sdpa` whose mask operand is):

    keep[b,t,s] = C[b,t,s] ∧ ¬I[b,t,s],   I = scatter(full(true, [B,T,S+1]),
                                              where(p >= 0, p, S), false)[..., :S]
    mask = keep (bool), where(keep, 0, -inf) (add), or where(I, -big, C') (add, masked_fill)
       -> attn.sdpa(q, k, v [, C], reshape(p, [B,1,T,n]), indexed)   C: causal attrs when it
                                                                      is a static causal mask

  Proof: ¬I[t,s] holds iff s = p[t,j] for some j with p[t,j] >= 0 (the scatter clears those
  columns; -1 goes to the extra column S, which the slice drops). So the dense row keeps
  exactly the keys {p[t,j] >= 0} ∩ C[t], and a dense softmax over a row masked to -inf outside
  that set is the softmax over the set itself — exp(-inf - m) = 0 contributes nothing to the
  sum or to P·V. The indexed op's softmax runs over the slots j with p[t,j] >= 0 and C[t, p]:
  the same keys once each when p holds distinct picks (a top-k does; checked: p comes from
  `attn.indexer_topk`). Empty rows: both give 0 (both are attn.sdpa). A finite drop (-big,
  finfo.min) equals -inf here (exp underflows to exactly 0 once a kept logit is the max) when
  every row keeps a key: required, via picks from a prefill `attn.indexer_topk` with ratio 1
  over the same S keys (each query has key 0 visible, so at least one valid pick s <= t) and C
  causal with offset >= 0 (so C sees that pick).

Rules (and counters): `fuse_sparse_attention.attn.sdpa.gathered`,
`fuse_sparse_attention.attn.sdpa.topk_mask`.
"""

from __future__ import annotations

from typing import Any

from ir import Graph, Value
from ir.ops.attn_dense import INDEXED_HEAD_DIM, INDEXED_VALUE_DIM, visible_reference
from ir.symbolic import same_dim
from passes.context import PassContext
from passes.fuse_attention import GATHERED, LOGITS
from passes.fuse_common import Checks, fusion_rule, replace, scalar
from passes.fuse_dense_mqa import evaluate
from passes.fuse_rope import iota_ok
from passes.pattern import Match, const, either, op, var
from passes.rewrite import Replace, Rewriter, rewrite

__all__ = ["RULES", "fuse_sparse_attention"]

NEG_BIG = -1e30  # an additive mask value at or below this never attends

# --- gathered: softmax(where(idx >= 0, scale·q·Gᵀ, -inf)) · G[..., :Dv] ----------------------

_MASKED = op("where", var("valid"), LOGITS, const(float("-inf")))
VALID = op("reshape", op("ge", var("idx"), const(0)), name="valid")  # idx >= 0 per slot
_PROBS = op("softmax", _MASKED, name="softmax")
_P = either(_PROBS, op("cast", _PROBS))  # probabilities rounded to q's dtype (bf16) or not
_VALUES = either(op("slice", var("g"), name="vslice"), var("g"))
ATTEND = either(
    op("reshape", op("matmul", op("reshape", _P, name="p3"), op("reshape", _VALUES), name="pv"),
       rank=4),
    op("matmul", _P, _VALUES, name="pv", rank=4),
)  # fmt: skip


def _value_dim(c: Checks, m: Match, d: Any) -> int:
    """Dv of the values G[..., :Dv] (all of G without the slice)."""
    if m.node("vslice") is None:
        c.need(isinstance(d, int), "values", f"the entry width {d} is symbolic")
        return int(d)
    a = m.node("vslice").attrs
    end = min(a["end"], d) if isinstance(a["end"], int) and isinstance(d, int) else a["end"]
    ok = a["dim"] in (-1, 3) and a["start"] == 0 and a["step"] == 1 and isinstance(end, int)
    c.need(ok and end > 0, "values", "the values are not the first channels G[..., :Dv] of the "
           "gathered entries", m.node("vslice"))  # fmt: skip
    return int(end)


def _merged_views(c: Checks, m: Match, q: Value, g: Value, out: Value, dv: int) -> None:
    """Each reshape of the batched-over-(B,T) spelling only merges or splits (B, T): the
    queries [B,T,H,D], entries [B,T,n,D] and output [B,T,H,Dv] line up."""
    b, t, h, d = q.type.shape
    n = g.type.shape[2]
    ok = same_dim(g.type.shape[0], b) and same_dim(g.type.shape[1], t)
    c.need(ok and same_dim(g.type.shape[3], d), "entries", f"gathered entries {g.type} do not "
           f"pair with the queries {q.type} ([B,T,n,D] against [B,T,H,D])")  # fmt: skip
    want = {"qk": (h, n), "pv": (h, dv)}
    for name, tail in want.items():
        shape = m[name].type.shape
        ok = tuple(shape[-2:]) == tail and (len(shape) == 4 or same_dim(shape[0], b * t))
        c.need(ok, name, f"%{m[name].name}: {m[name].type} is not the per-(B,T) product "
               f"[B·T, {tail[0]}, {tail[1]}]", m.node(name))  # fmt: skip
    c.need(tuple(out.type.shape) == (b, t, h, dv), "output", f"{out.type} is not [B,T,H,Dv]")
    probs = m["softmax"].type.shape  # the logits viewed back per (B, T) in order, not scrambled
    c.need(tuple(probs) == (b, t, h, n), "attend.softmax", f"the probabilities {list(probs)} "
           "are not [B,T,H,n]", m.node("softmax"))  # fmt: skip
    valid = m["valid"].type.shape
    c.need(tuple(valid) == (b, t, 1, n), "mask", f"the -1 mask {list(valid)} is not [B,T,1,n]")


def _lowerable(c: Checks, q: Value, k: Value, dv: int) -> None:
    """The backends' kernels take it: one float dtype, static head dims up to INDEXED_HEAD_DIM
    (keys) and INDEXED_VALUE_DIM (values)."""
    d = q.type.shape[-1]
    c.need(q.dtype == k.dtype and q.dtype.is_float, "lowering",
           f"q {q.dtype} and entries {k.dtype} differ")  # fmt: skip
    ok = isinstance(d, int) and d <= INDEXED_HEAD_DIM and dv <= INDEXED_VALUE_DIM
    c.need(ok, "lowering", f"head dims ({d}, {dv}): the kernels take static head dims up to "
           f"({INDEXED_HEAD_DIM}, {INDEXED_VALUE_DIM})")  # fmt: skip


def _gathered(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """softmax(where(idx >= 0, scale·q·Gᵀ, -inf))·G[..., :Dv], G = entries[b, idx] -> op."""
    view = c.view
    out = root.root.results[0]
    if out.type.rank != 4:
        user = view.only_user(out, "reshape")
        c.need(user is not None and user.results[0].type.rank == 4, "output",
               f"P·V {out.type} is neither [B,T,H,Dv] nor viewed as it")  # fmt: skip
        out = user.results[0]
    m = c.match("attend", ATTEND, out)
    scale = scalar(m, "scale")
    c.need(scale is not None, "attend.scale", "the logit scale is not a constant", m.node("qk"))
    c.need(m.attr("softmax", "dim") in (-1, 3), "attend.softmax",
           "the softmax is not over the gathered entries", m.node("softmax"))  # fmt: skip
    vm = c.match("mask", VALID, m["valid"])
    c.need(vm["idx"] == m["idx"], "mask", "the -1 test reads other indices than the gather",
           vm.node("valid"))  # fmt: skip
    q, g, entries, idx = m["qr"], m["g"], m["entries"], m["idx"]
    c.need(q.type.rank == 4 and entries.type.rank == 3 and idx.type.rank == 3, "query",
           f"q {q.type}, entries {entries.type}, idx {idx.type} are not [B,T,H,D], [B,N,D], "
           "[B,T,n]")  # fmt: skip
    batch = m.node("g").operands[1]  # entries[iota(B)[:, None, None], idx]: row b of sequence b
    ok = iota_ok(view, batch, q.type.shape[0]) and len(batch.type.shape) == 3
    c.need(ok and tuple(batch.type.shape[1:]) == (1, 1), "gather", f"the batch index "
           f"%{batch.name}: {batch.type} is not iota(B) viewed [B,1,1]", m.node("g"))  # fmt: skip
    dv = _value_dim(c, m, entries.type.shape[2])
    _merged_views(c, m, q, g, out, dv)
    _lowerable(c, q, entries, dv)
    b, t, _, d = q.type.shape
    operands = [
        rw.op("permute", [q], dims=(0, 2, 1, 3)),
        rw.op("reshape", [entries], shape=(b, 1, entries.type.shape[1], d)),
        rw.op("reshape", [idx], shape=(b, 1, t, idx.type.shape[2])),
    ]
    attrs = {"scale": scale, "indexed": True, "value_dim": dv}
    c.fits("attn.sdpa", operands, attrs, [None])
    o = rw.op("attn.sdpa", operands, **attrs)
    return replace(view, [(out, rw.op("permute", [o], dims=(0, 2, 1, 3)))])


# --- dense attn.sdpa with "-inf except at scatter(top-k picks)" ---------------------------------

def _truthy(v: object) -> bool:
    return v is True or (isinstance(v, (int, float)) and v == 1)


def _falsy(v: object) -> bool:
    return v is False or (isinstance(v, (int, float)) and v == 0)


# I = scatter(full(true, [B,T,S+1]), where(p >= 0, p, S), false)[..., :S], viewed [B,1,T,S]
PICKED_OUT = op(
    "reshape",
    op(
        "slice",
        op(
            "scatter",
            const(_truthy, name="base"),  # `new_ones(dtype=bool)` is true, `ones` 1
            op("where", op("ge", var("picks"), const(0)), var("picks"), const(name="past")),
            const(_falsy),
            name="scatter",
        ),
        name="cut",
    ),
    name="index_mask",
)
KEEP = either(
    op({"logical_and", "bitwise_and"}, var("causal"), op("logical_not", PICKED_OUT)),
    op("logical_not", PICKED_OUT),
)
ADD_KEEP = op("where", KEEP, const(0), const(name="drop"))  # where(keep, 0, -inf)
ADD_FILL = op("where", PICKED_OUT, const(name="drop"), var("causal"))  # masked_fill(I, -big)


def _is_const(view: Any, v: Value) -> bool:
    n = view.producer(v)
    return n is not None and n.name in ("constant", "full")


def _index_mask(c: Checks, m: Match, t: Any, s: Any) -> Value:
    """The picks p [B,T,n] of a matched scatter mask I, whose shape is checked here."""
    p, scat = m["picks"], m.node("scatter")
    ok = p.type.rank == 3 and p.dtype.is_int and scat.attrs["dim"] in (-1, 2)
    ok = ok and same_dim(p.type.shape[1], t) and scat.results[0].type.rank == 3
    c.need(ok, "picks", f"the scatter does not write picks [B,T,n] along the keys: "
           f"p {p.type}", scat)  # fmt: skip
    width = scat.results[0].type.shape[2]
    past = m.node("past").attrs["value"]
    ok = not isinstance(past, (bool, float)) and same_dim(past, s) and same_dim(width, s + 1)
    cut = m.node("cut").attrs
    ok = ok and cut["dim"] in (-1, 2) and cut["start"] == 0 and cut["step"] == 1
    ok = ok and same_dim(cut["end"], s)
    c.need(ok, "picks.pad", f"-1 picks are not sent to an extra column {s} that the slice "
           "drops", scat)  # fmt: skip
    shape = m["index_mask"].type.shape
    ok = len(shape) == 4 and shape[1] == 1 and same_dim(shape[2], t) and same_dim(shape[3], s)
    c.need(ok, "picks", f"the index mask {list(shape)} is not [B,1,T,S] (one set per query "
           "for every head)", m.node("index_mask"))  # fmt: skip
    return p


def _causal_part(c: Checks, causal: Value | None, kind: str, t: Any, s: Any) -> tuple:
    """(attrs, mask operands) for the C part: causal attrs when C is a static causal mask with
    offset S - T (prefill over a cache), else C itself as the op's mask."""
    if causal is None:
        return {"causal": False, "offset": 0}, [], "none"
    value = evaluate(c.view, causal)
    if value is not None and isinstance(t, int) and isinstance(s, int):
        seen = value == 0 if kind == "add" else value
        drop_ok = kind != "add" or bool(((value == 0) | (value <= NEG_BIG)).all())
        rows = seen.reshape(-1, t, s) if seen.dim() >= 2 and drop_ok else None
        want = visible_reference(t, s, True, s - t, 0)
        if rows is not None and bool((rows == want).all()):
            return {"causal": True, "offset": s - t}, [], "none"
    return {"causal": False, "offset": 0}, [causal], kind


def _nonempty_rows(c: Checks, picks: Value, attrs: dict, drop: float, s: Any) -> None:
    """A finite drop value equals -inf only if every row keeps a key (module docstring): the
    indexer (ratio 1, prefill, over the same S keys) picks some s <= t, which causal C sees."""
    if drop == float("-inf"):
        return
    n = c.view.producer(picks)
    ok = n is not None and n.name == "attn.indexer_topk" and n.attrs["ratio"] == 1
    ok = ok and not n.attrs["decode"] and same_dim(n.operands[1].type.shape[1], s)
    ok = ok and attrs["causal"] and attrs["offset"] >= 0
    c.need(ok, "mask.drop", f"masked logits drop to {drop}, not -inf: only equal when every "
           "query keeps a key (picks of a ratio-1 attn.indexer_topk under a causal mask)")


def _topk_mask(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """attn.sdpa masked to -inf except at scatter(top-k picks) -> indexed attn.sdpa."""
    view, node = c.view, root.root
    sd = node.op
    c.need(not sd.indexed and sd.mask != "none", "attn.sdpa",
           "not a dense attn.sdpa with a mask operand")  # fmt: skip
    r = sd.roles(node.operands)
    t, s = r["q"].type.shape[2], r["k"].type.shape[1 if sd.kv_layout == "bshd" else 2]
    # kind: how the C part masks — a bool (under ∧) or an additive float (masked_fill form)
    if sd.mask == "bool":
        m, drop, kind = c.match("mask", KEEP, r["mask"]), float("-inf"), "bool"
    else:
        # masked_fill(C, I, -big) = where(I, -big, C); where(keep, 0, -big) has two constants
        w = view.producer(r["mask"])
        fill = w is not None and w.name == "where" and _is_const(view, w.operands[1])
        fill = fill and not _is_const(view, w.operands[2])
        pat, kind = (ADD_FILL, "add") if fill else (ADD_KEEP, "bool")
        m = c.match("mask", pat, r["mask"])
        drop = scalar(m, "drop")
        c.need(drop is not None and drop <= NEG_BIG, "mask.drop",
               f"masked logits get {drop}, not -inf or below {NEG_BIG}")  # fmt: skip
    c.need(sd.causal is False and sd.window == 0, "attn.sdpa",
           "position attributes and a top-k mask together")  # fmt: skip
    picks = _index_mask(c, m, t, s)
    pm = view.producer(picks)
    c.need(pm is not None and pm.name == "attn.indexer_topk", "picks",
           "the picks are not an attn.indexer_topk (distinct keys per query)", pm)  # fmt: skip
    causal = m["causal"] if "causal" in m else None
    attrs, mask_ops, mask_kind = _causal_part(c, causal, kind, t, s)
    _nonempty_rows(c, picks, attrs, drop, s)
    b = r["q"].type.shape[0]
    indices = rw.op("reshape", [picks], shape=(b, 1, t, picks.type.shape[2]))
    extra = [r["sinks"]] if r["sinks"] is not None else []
    v = [] if r["v"] is None else [r["v"]]
    operands = [r["q"], r["k"], *v, *mask_ops, indices, *extra]
    attrs.update(scale=sd.scale, window=0, mask=mask_kind, sinks=sd.sinks, softcap=sd.softcap,
                 indexed=True, value_dim=sd.value_dim, kv_layout=sd.kv_layout)  # fmt: skip
    c.fits("attn.sdpa", operands, attrs, [node.results[0]])
    return replace(view, [(node.results[0], rw.op("attn.sdpa", operands, **attrs))])


RULES = [
    # softmax(where(idx >= 0, scale·q·Gᵀ, -inf))·G[..., :Dv], G = entries[b, clamp(idx)]
    fusion_rule("fuse_sparse_attention.attn.sdpa.gathered", op("matmul"), _gathered),
    # attn.sdpa(mask = C ∧ ¬scatter(true, picks, false)) = attn.sdpa over the picks (∩ C)
    fusion_rule("fuse_sparse_attention.attn.sdpa.topk_mask", op("attn.sdpa"), _topk_mask),
]


def fuse_sparse_attention(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace attention over index-selected keys (module docstring) by an indexed attn.sdpa."""
    return rewrite(g, RULES, ctx=ctx)

