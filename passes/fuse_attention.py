"""Fuse the attention layers of DeepSeek-V4 into `attn.compress`, `attn.indexer_topk` and
`attn.sparse_mqa` (window / hca / csa).

Matches the canonical form (after `canonicalize`) of models/attention.py (prefill):

    rope(v; cos, sin)   = concat(v[..., :-r], reshape(concat(re, im)))   interleaved pairs (a, b):
                          re = a·cos - b·sin, im = a·sin + b·cos; inverse: sin -> neg(sin)
    compress            = rope(rmsnorm(Σ_rows kv ⊙ softmax(z, rows)); cos, sin)  where kv, z are
                          the zero/-inf padded projections x·wkvᵀ, x·wgateᵀ + ape[t % m] gathered
                          per block ([prev b-half ++ this a-half] when overlapping)
    indexer_topk        = where(isinf(vals) | idx >= S, -1, idx),
                          (vals, idx) = topk(pad(where(visible, Σ_h relu(q·kᵀ)·w·c, -inf)), k)
    sparse_mqa          = inv_rope(softmax([mask(scale·q'·Gᵀ), sink])[:-1] · G)   with
                          q' = rope(q·rsqrt(mean(q²)+ε)), G = entries[b, clamp(idx)], idx = window
                          [++ visible compressed entries (hca) | ++ indexer picks (csa)] + T

Other spellings meet these forms first (passes/attention_forms.py: rotate-half rope, masked
top-k picks, a head sum as a matmul, HF V3.2's index mask, ...), or are matched as alternatives
of one sub-pattern where the math is spelled as a different computation: the compressor's blocks
viewed or scattered (passes/fuse_compress.py), the indexer's scores batched over (B, T) with
relu(c·x), token-level visibility s <= t (ratio 1, DSA), and the attention as dense softmax
with an additive [window band ++ blocks | scattered picks] mask (passes/fuse_dense_mqa.py).

Decode graphs: the ring window at a 0-d position gives `decode=true` variants, and the
compressor's decode step becomes `attn.compress_step` (passes/fuse_compress_step.py).

Rules (and counters): `fuse_attention.attn.compress`, `fuse_attention.attn.compress_step`,
`fuse_attention.attn.indexer_topk`, `fuse_attention.attn.sparse_mqa`.
"""

from __future__ import annotations

from typing import Any

from ir import Graph, Value
from ir.symbolic import same_dim
from passes.attention_forms import RULES as FORM_RULES
from passes.context import PassContext
from passes.fuse_common import (
    Checks,
    const_value,
    fusion_rule,
    narrow,
    replace,
    rounded,
    scalar,
)
from passes.fuse_compress import COMPRESS_RULE
from passes.fuse_compress_step import STEP_RULE
from passes.fuse_dense_mqa import CSA_MASK, DENSE, csa_picks, dense_entries, hca_ratio, window_of
from passes.fuse_rope import iota_ok as _iota_ok
from passes.fuse_rope import match_rope, unit_dims
from passes.pattern import Match, const, either, op, var
from passes.rewrite import Replace, Rewriter, rewrite

__all__ = ["RULES", "fuse_attention"]

# --- attn.indexer_topk ---------------------------------------------------------------------

VISIBLE = op(
    "lt",
    op({"reshape", "unsqueeze"}, var("cols")),
    op(
        {"reshape", "unsqueeze"},
        op("floordiv", op("add", var("rows"), const(1)), const(name="ratio")),
    ),
)
_QK = either(
    op(  # over merged (T, H) rows: [B, T·H, c] @ [B, c, S]
        "matmul",
        op("reshape", var("q", rank=4)),
        op("permute", var("keys", rank=3), attrs={"dims": (0, 2, 1)}),
    ),
    op(  # batched over (B, T): [B, T, H, c] @ [B, 1, c, S]
        "matmul",
        var("q", rank=4),
        op("reshape", op("permute", var("keys", rank=3), attrs={"dims": (0, 2, 1)}), name="kt"),
    ),
)
_RELU = either(
    op("relu", op("reshape", _QK)),
    op("reshape", op("relu", _QK)),
    op("relu", _QK),
    op("relu", op("mul", _QK, const(name="c_in"))),  # relu(c·x) = c·relu(x) for c > 0
)
SCORE = op(  # Σ_h relu(q·kᵀ)[·c]·w: the relu before or after a [B, T·H, S] -> [B, T, H, S] view
    "sum",
    op(
        "mul",
        either(op("mul", _RELU, const(name="c")), _RELU),
        op("reshape", var("w")),
    ),
    name="sum",
    attrs={"keepdim": False},
)
TOPK = op(
    "topk",
    op(
        "pad",
        op("where", var("visible"), var("score"), const(float("-inf"))),
        name="padded",
        attrs={"value": float("-inf")},
    ),
    name="topk",
    attrs={"largest": True},
)
PICKS = op(
    "where",
    op(
        "logical_or",
        op("eq", op("abs", var("values")), const(float("inf"))),
        op("ge", var("indices"), var("n_cols")),
    ),
    const(-1),
    var("indices"),
)


VISIBLE_AT = op(  # decode: s < (pos + 1) // m for one 0-d position
    "lt",
    var("cols", rank=1),
    op("floordiv", op("add", var("pos", rank=0), const(1)), const(name="ratio")),
)
Causal = tuple[int, Value | None]  # (ratio m, decode position or None for prefill)


VISIBLE_LE = op(  # token level (DSA): s <= t, i.e. s < (t + 1) // 1
    "le",
    op({"reshape", "unsqueeze"}, var("cols")),
    op({"reshape", "unsqueeze"}, var("rows")),
)
VISIBLE_LE_AT = op("le", var("cols", rank=1), var("pos", rank=0))  # decode: s <= pos


def visible_ratio(c: Checks, visible: Value, t: Any, s: Any) -> Causal:
    """(m, None) when visible[t, s] = s < (t + 1) // m with iotas over T and S (prefill),
    (m, pos) when visible[s] = s < (pos + 1) // m (decode); raises `Miss` otherwise. The
    token-level s <= t (s <= pos) is m = 1."""
    view = c.view
    n = view.producer(visible)
    if n is not None and n.name == "le":
        m = c.match("causal", either(VISIBLE_LE_AT, VISIBLE_LE), visible)
        pos = m["pos"] if "pos" in m else None
        if pos is None and unit_dims(view, m["rows"]).type.rank == 0:  # decode: pos.view(1)
            pos = unit_dims(view, m["rows"])
        c.need(pos is not None or _iota_ok(view, m["rows"], t), "causal.rows",
               "the query rows are not iota(T)", n)
        c.need(_iota_ok(view, m["cols"], s), "causal.cols", "the key columns are not iota(S)", n)
        return 1, pos
    m = view.matches(VISIBLE, visible)
    pos = None
    if m is None or not _iota_ok(view, m["rows"], t):
        m = c.match("causal", either(VISIBLE_AT, VISIBLE), visible)
        pos = m["pos"] if "pos" in m else None
        rows = view.producer(visible)
        c.need(pos is not None, "causal.rows", "the query rows are not iota(T)", rows)
    c.need(_iota_ok(view, m["cols"], s), "causal.cols", "the key columns are not iota(S)",
           view.producer(visible))
    ratio = scalar(m, "ratio")
    ok = ratio is not None and ratio == int(ratio) and ratio >= 1
    c.need(ok, "causal.ratio", "the block ratio is not a positive integer constant")
    return int(ratio), pos


def _indexer(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """where(isinf(v) | i >= S, -1, i), (v, i) = topk(pad(causal Σ_h relu(q·kᵀ)·w)) -> op."""
    view, out = c.view, root.root.results[0]
    pm = c.match("picks", PICKS, out)
    topk = view.producer(pm["indices"])
    tm = c.match("topk", TOPK, pm["indices"])
    c.need(topk.results == (pm["values"], pm["indices"]), "picks",
           "values and indices come from different top-ks", topk)
    score = tm["score"]
    sm = c.match("score", SCORE, score)
    c.need(score.type.rank == 3, "score", f"scores {score.type} are not [B, T, S]")
    _, t, s = score.type.shape
    k = topk.attrs["k"]
    n_cols = view.producer(pm["n_cols"])
    ok = n_cols is not None and n_cols.name == "constant"
    c.need(ok and same_dim(n_cols.attrs["value"], s), "picks.bound",
           f"picks are not bounded by the key count {s}", root.root)
    c.need(tm.attr("padded", "pads") == (0, k) and topk.attrs["dim"] in (-1, 2), "topk.pad",
           f"the scores are not padded by k={k} columns before a top-k over keys", topk)
    ratio, pos = visible_ratio(c, tm["visible"], t, s)
    c.need(tuple(d % 4 for d in sm.attr("sum", "dims")) == (2,), "score.heads",
           "the scores are not summed over the index heads", sm.node("sum"))
    kt = sm.node("kt")
    ok = kt is None or kt.results[0].type.shape[1] == 1
    c.need(ok, "score.keys", "the keys are not shared by the query rows", kt)
    c_in = scalar(sm, "c_in")
    c.need(c_in is None or c_in > 0, "score.scale", f"relu(c·x) with c = {c_in} <= 0",
           sm.node("c_in"))
    w, scale = sm["w"], 1.0 if scalar(sm, "c") is None else scalar(sm, "c")
    scale *= 1.0 if c_in is None else c_in
    wn = view.producer(w)
    if wn is not None and wn.name == "mul" and const_value(view, wn.operands[1]) is not None:
        w, scale = wn.operands[0], scale * float(const_value(view, wn.operands[1]))
    c.need(isinstance(k, int), "topk", f"k={k} is not static", topk)
    operands = [sm["q"], sm["keys"], w] + ([] if pos is None else [pos])
    attrs = {"k": k, "ratio": ratio, "scale": scale, "decode": pos is not None}
    c.fits("attn.indexer_topk", operands, attrs, [out])
    return replace(view, [(out, rw.op("attn.indexer_topk", operands, **attrs))])


# --- attn.sparse_mqa -----------------------------------------------------------------------

GATHERED = op(
    "index_multi",
    var("entries"),
    op("reshape", op("iota")),
    op("clamp", var("idx"), attrs={"min": 0, "max": None}),
    attrs={"dims": (0, 1)},
    name="g",
)
_GT = op("permute", GATHERED, attrs={"dims": (0, 1, 3, 2)})
LOGITS = op(
    "mul",
    either(
        op(  # over merged (B, T) rows; Gᵀ transposed before or after the merge
            "reshape",
            op(
                "matmul",
                op("reshape", var("qr")),
                either(
                    op("reshape", _GT),
                    op("permute", op("reshape", GATHERED), attrs={"dims": (0, 2, 1)}),
                ),
                name="qk",
            ),
        ),
        op("matmul", var("qr", rank=4), _GT, name="qk"),  # batched over (B, T)
    ),
    const(name="scale"),
)
MASKED = op("where", op("reshape", op("ge", var("idx"), const(0))), LOGITS, const(float("-inf")))


def broadcast(x: Any) -> Any:
    """x broadcast over the (B, T) dims the attention adds: expand(x), or x itself where the
    expand was the identity. expand(x, shape(x)) = x: canonicalize's `view_noop` drops it, so
    at B = T = 1 (one decode sequence) the canonical form of the broadcast is x."""
    return either(op("expand", x), x)


SINK = broadcast(op("reshape", var("sink", rank=1)))
PROBS = op(
    "slice",
    op("softmax", op("concat", MASKED, SINK, name="cat"), name="softmax"),
    name="probs",
    attrs={"start": 0, "end": -1, "step": 1},
)
ATTENDS = tuple(  # probabilities rounded to the entries' dtype (bf16 models) or not (fp32)
    either(
        op("reshape", op("matmul", op("reshape", p), op("reshape", GATHERED), name="pv"), rank=4),
        op("matmul", p, GATHERED, name="pv", rank=4),
    )
    for p in (PROBS, op("cast", PROBS))
)
QNORM = op(
    "mul",
    var("q"),
    op("rsqrt", op("add", op("mean", op("mul", var("q"), var("q"))), const(name="eps"))),
)
WINDOW = broadcast(op("where", op("lt", var("wr"), const(0)), const(-1), var("wr")))
WINDOW_ROWS = op(
    "add",
    op("add", op("sub", op("reshape", var("pos")), const(name="w")), const(1)),
    var("offsets"),
)
SHIFTED = op(
    "where",
    op("ge", var("picks"), const(0)),
    op("add", var("picks"), op("constant", name="t")),
    const(-1),
)
ALL_VISIBLE = broadcast(op("where", var("visible"), var("cols"), const(-1)))
ALL_VISIBLE_AT = broadcast(op("reshape", op("where", var("visible"), var("cols"), const(-1))))


RING = broadcast(  # decode: where(slot <= pos, slot, -1) over the ring's slots
    op("reshape", op("where", op("le", var("slots"), var("pos", rank=0)), var("slots"), const(-1)))
)


def _window(c: Checks, idx: Value, t: Any) -> tuple[int, Value | None]:
    """(window, None) for the prefill window t-w+1..t, (window, pos) for the decode ring."""
    view = c.view
    rm = view.matches(RING, idx)
    if rm is not None:
        n = view.producer(rm["slots"])
        w = n.attrs["end"] if n is not None and n.name == "iota" else None
        ok = isinstance(w, int) and _iota_ok(view, rm["slots"], w)
        c.need(ok, "window.ring", "the ring's slots are not iota(window)", n)
        return w, rm["pos"]
    m = c.match("window", WINDOW, idx)
    wm = c.match("window.rows", WINDOW_ROWS, m["wr"])
    c.need(_iota_ok(view, wm["pos"], t), "window.rows", "the query positions are not iota(T)",
           view.producer(m["wr"]))
    w = scalar(wm, "w")
    ok = w is not None and w == int(w) and _iota_ok(view, wm["offsets"], int(w))
    c.need(ok, "window.offsets", f"rows t - {w} + 1 + iota(w) do not span the window",
           view.producer(m["wr"]))
    return int(w), None


def _variant(c: Checks, idx: Value, entries: Value, t: Any) -> tuple:
    """-> (variant, window, ratio, extra operands, kv, decode pos or None) from the index and
    entry construction; prefill and decode parts must agree."""
    view = c.view
    cat, ecat = view.producer(idx), view.producer(entries)
    if cat is None or cat.name != "concat":
        w, pos = _window(c, idx, t)
        return "window", w, 0, [], entries, pos
    ok = ecat is not None and ecat.name == "concat" and ecat.attrs["dim"] == 1
    ok = ok and len(ecat.operands) == 2
    c.need(ok, "entries", "entries are not [window ++ compressed]", ecat)
    ok = cat.attrs["dim"] in (-1, 2) and len(cat.operands) == 2
    c.need(ok, "indices", "indices are not [window ++ compressed picks]", cat)
    w, pos = _window(c, cat.operands[0], t)
    sm = c.match("picks.shift", SHIFTED, cat.operands[1])
    kv, comp = ecat.operands
    c.need(same_dim(sm.attr("t", "value"), t if pos is None else w), "picks.shift",
           "compressed picks are not shifted past the window rows", view.producer(cat.operands[1]))
    picks = sm["picks"]
    s = comp.type.shape[1]
    am = view.matches(ALL_VISIBLE, picks) or view.matches(ALL_VISIBLE_AT, picks)
    if am is not None and _iota_ok(view, am["cols"], s):
        ratio, at = visible_ratio(c, am["visible"], t, s)
        c.need(at == pos, "causal", "the window and the compressed entries disagree on decode")
        return "hca", w, ratio, [comp], kv, pos
    ratio, at = _csa_causal(c, picks)
    c.need(at == pos, "causal", "the window and the indexer disagree on decode")
    return "csa", w, ratio, [comp, picks], kv, pos


def _csa_causal(c: Checks, picks: Value) -> Causal:
    """The indexer's (ratio, pos) when `picks` comes from one (fused or not yet fused)."""
    n = c.view.producer(picks)
    if n is not None and n.name == "attn.indexer_topk":
        return n.attrs["ratio"], (n.operands[3] if n.attrs["decode"] else None)
    pm = c.match("indexer", PICKS, picks)
    tm = c.match("indexer.topk", TOPK, pm["indices"])
    score = tm["score"]
    return visible_ratio(c, tm["visible"], score.type.shape[1], score.type.shape[2])


def _query(c: Checks, qr: Value, cos: Value, sin: Value) -> tuple[Value, float | None]:
    """(pre-norm query, q_norm_eps) from the rotated query."""
    view = c.view
    rope = match_rope(c, "query.rope", qr, inverse=False)
    same = all(unit_dims(view, a) == unit_dims(view, b) and a.type == b.type
               for a, b in ((rope["cos"], cos), (rope["sin"], sin)))
    c.need(same, "query.rope",
           "the query and the output rotate by different tables", view.producer(qr))
    normed = rounded(view, rope["x"])
    c.need((normed != rope["x"]) == narrow(rope["x"]), "query.rounding",
           "the normed query is rounded iff it is narrower than f32", view.producer(qr))
    qm = view.matches(QNORM, normed)
    if qm is None or scalar(qm, "eps") is None:
        return rope["x"], None
    return qm["q"], scalar(qm, "eps")


def _mqa(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """inv_rope(softmax([mask(scale·q'·Gᵀ), sink])[:-1]·G) over gathered entries -> op."""
    view, out = c.view, root.root.results[0]
    rope = match_rope(c, "output.rope", out, inverse=True)
    dense = view.matches(DENSE, rope["x"]) if not narrow(rope["x"]) else None
    if dense is not None:
        return _dense_mqa(c, dense, rope, out, rw)
    m = c.match("attend", ATTENDS[narrow(rope["x"])], rope["x"])
    scale = _attend_scale(c, m)
    q, eps = _query(c, m["qr"], rope["cos"], rope["sin"])
    c.need(q.type.rank == 4, "query", f"q {q.type} is not [B, T, H, D]")
    ok = m["qk"].dtype == q.dtype and m["pv"].dtype == q.dtype
    c.need(ok, "attend.dtype", f"the products are not in q's dtype {q.dtype}", m.node("qk"))
    t = q.type.shape[1]
    variant, window, ratio, extra, kv, pos = _variant(c, m["idx"], m["entries"], t)
    operands = [q, kv, m["sink"], rope["cos"], rope["sin"], *extra]
    operands += [] if pos is None else [pos]
    attrs = {
        "variant": variant,
        "window": window,
        "ratio": ratio,
        "scale": scale,
        "q_norm_eps": eps,
        "decode": pos is not None,
    }
    c.fits("attn.sparse_mqa", operands, attrs, [out])
    return replace(view, [(out, rw.op("attn.sparse_mqa", operands, **attrs))])


def _attend_scale(c: Checks, m: Match) -> float:
    """The constant logit scale of an attend match whose softmax (with the sink) is over the
    entries; a Fail otherwise."""
    scale = scalar(m, "scale")
    c.need(scale is not None, "attend.scale", "the logit scale is not a constant", m.node("qk"))
    c.need(m.attr("softmax", "dim") in (-1, 3) and m.attr("cat", "dim") in (-1, 3),
           "attend.softmax", "the softmax (with the sink) is not over the entries",
           m.node("softmax"))
    return scale


def _dense_mqa(c: Checks, m: Match, rope: dict, out: Value, rw: Rewriter) -> Replace:
    """The dense-mask spelling over [B, H, T, c] (passes/fuse_dense_mqa.py) -> op."""
    view = c.view
    scale = _attend_scale(c, m)
    q, eps = _query(c, m["qr"], rope["cos"], rope["sin"])
    kv4, comp4, mask = dense_entries(c, m)
    b, _, t, d = kv4.type.shape
    c.need(q.type.rank == 4 and q.type.shape[2] == t, "query", f"q {q.type} is not [B, H, T, c]")
    ok = m["qk"].dtype == q.dtype and m["pv"].dtype == q.dtype
    c.need(ok, "attend.dtype", f"the products are not in q's dtype {q.dtype}", m.node("qk"))
    c.need(isinstance(t, int), "mask", f"the length {t} is symbolic: the mask cannot be checked")
    extra: list[Value] = []
    if comp4 is None:
        variant, ratio, win_mask = "window", 0, mask
    else:
        cat = view.producer(mask)
        ok = cat is not None and cat.name == "concat" and len(cat.operands) == 2
        c.need(ok and cat.attrs["dim"] in (-1, 3), "mask", "the mask is not [window ++ blocks]",
               cat)
        win_mask, block = cat.operands
        s = comp4.type.shape[2]
        comp = rw.op("reshape", [comp4], shape=(b, s, d))
        if view.matches(CSA_MASK, block) is not None:
            picks = csa_picks(c, block, s)
            ratio, pos = _csa_causal(c, picks)
            c.need(pos is None, "causal", "a decode indexer feeds a prefill attention")
            variant, extra = "csa", [comp, picks]
        else:
            src = view.producer(unit_dims(view, comp4))
            ok = src is not None and src.name == "attn.compress"
            c.need(ok, "entries.compressed", "the compressed entries are not an attn.compress",
                   src)
            variant, extra = "hca", [comp]
            ratio = hca_ratio(c, block, t, s, src.attrs["ratio"])
    window = window_of(c, win_mask, t)
    kv = rw.op("reshape", [kv4], shape=(b, t, d))
    qt = rw.op("permute", [q], dims=(0, 2, 1, 3))
    operands = [qt, kv, m["sink"], rope["cos"], rope["sin"], *extra]
    attrs = {"variant": variant, "window": window, "ratio": ratio, "scale": scale,
             "q_norm_eps": eps, "decode": False}
    c.fits("attn.sparse_mqa", operands, attrs, [None])
    o = rw.op("attn.sparse_mqa", operands, **attrs)
    return replace(view, [(out, rw.op("permute", [o], dims=(0, 2, 1, 3)))])


RULES = [
    # rope(rmsnorm(Σ_rows kv ⊙ softmax(z, rows))) over the blocks of x (passes/fuse_compress.py)
    COMPRESS_RULE,
    # inv_rope(softmax([scale·q'Gᵀ masked, sink])[:-1] G), G = entries[window ∪ picks]
    fusion_rule("fuse_attention.attn.sparse_mqa", op("concat"), _mqa),
    # -1 where the top-k of causal Σ_h relu(q·kᵀ)·w picked padding, else the index
    fusion_rule("fuse_attention.attn.indexer_topk", op("where"), _indexer),
    # the compressor's decode step with its cache and state writes
    STEP_RULE,
]


def fuse_attention(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace compressors, indexers and sparse attention by their ops (module docstring)."""
    g = rewrite(g, FORM_RULES, ctx=ctx)  # other spellings -> the forms matched below
    return rewrite(g, RULES, ctx=ctx)
