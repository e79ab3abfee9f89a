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

Decode graphs: the ring window at a 0-d position gives `decode=true` variants, and the
compressor's decode step becomes `attn.compress_step` (passes/fuse_compress_step.py).

Counters: `fuse_attention.attn.compress`, `fuse_attention.attn.compress_step`,
`fuse_attention.attn.indexer_topk`, `fuse_attention.attn.sparse_mqa`.
"""

from __future__ import annotations

from typing import Any

import ir
from ir import Graph, Node, Value
from ir.symbolic import same_dim
from passes.context import PassContext
from passes.fuse_common import (
    Fusion,
    FusionView,
    apply,
    const_value,
    narrow,
    rounded,
    scalar,
)
from passes.pattern import Match, const, either, op, var

__all__ = ["fuse_attention"]

# --- rope ----------------------------------------------------------------------------------

_PAIRS = op("reshape", op("slice", var("x"), name="rot"), name="pairs")
_A = op("select", _PAIRS, name="a", attrs={"index": 0})
_B = op("select", _PAIRS, name="b", attrs={"index": 1})
_RE = op("sub", op("mul", _A, var("cb")), op("mul", _B, var("sb")))
_IM = op("add", op("mul", _A, var("sb")), op("mul", _B, var("cb")))
_ROT = op("reshape", op("concat", op("reshape", _RE), op("reshape", _IM), name="ri"))
ROPES = tuple(  # rotated channels rounded back to x's dtype (bf16 models) or not (fp32)
    op("concat", op("slice", var("x"), name="keep"), rot, name="out")
    for rot in (_ROT, op("cast", _ROT))
)


def _unbroadcast(view: FusionView, v: Value) -> Value:
    n = view.producer(v)
    return n.operands[0] if n is not None and n.name in ("reshape", "unsqueeze") else v


def match_rope(view: FusionView, v: Value) -> dict[str, Any] | None:
    """-> {x, cos, sin, inverse} when v = rope(x) over the last 2·cos.shape[-1] channels."""
    m = view.match(ROPES[narrow(v)], v)
    if m is None:
        return None
    x, rank = m["x"], m["x"].type.rank
    last = (-1, rank - 1)
    if m.attr("out", "dim") not in last or m.attr("keep", "dim") not in last:
        return None
    if m.attr("a", "dim") not in (-1, rank) or m.attr("b", "dim") not in (-1, rank):
        return None
    inverse = False
    sb = m["sb"]
    neg = view.producer(sb)
    if neg is not None and neg.name == "neg":
        inverse, sb = True, neg.operands[0]
    cos, sin = _unbroadcast(view, m["cb"]), _unbroadcast(view, sb)
    if cos.type.rank != 2 or cos.type != sin.type or not isinstance(cos.type.shape[1], int):
        return None
    rope = 2 * cos.type.shape[1]
    width = x.type.shape[-1]
    rot, keep = m.node("rot").attrs, m.node("keep").attrs
    if (rot["start"], rot["step"], keep["start"], keep["step"]) != (-rope, 1, 0, 1):
        return None
    if keep["end"] not in (-rope, width - rope if isinstance(width, int) else None):
        return None
    if m["pairs"].type.shape[-2:] != (rope // 2, 2):
        return None
    return {"x": x, "cos": cos, "sin": sin, "inverse": inverse}


def _fits(mnemonic: str, operands: list[Value], attrs: dict, replaced: list[Value]) -> bool:
    try:
        types = ir.OPS[mnemonic](**attrs).infer_type(*(v.type for v in operands))
    except ir.IRTypeError:
        return False
    return all(r is None or r.type.shape == t.shape for r, t in zip(replaced, types))


def _iota_ok(view: FusionView, v: Value, end: Any) -> bool:
    n = view.producer(v)
    if n is None or n.name != "iota":
        return False
    a = n.attrs
    return a["start"] == 0 and a["step"] == 1 and same_dim(a["end"], end)


# --- attn.compress -------------------------------------------------------------------------

RMS = op(
    "mul",
    op(
        "mul",
        var("p"),
        op("rsqrt", op("add", op("mean", op("mul", var("p"), var("p"))), const(name="eps"))),
    ),
    var("norm", rank=1),
)
POOL = op(
    "sum",
    op("mul", var("kv"), op("softmax", var("z"), attrs={"dim": 2}), commute=True),
    attrs={"dims": (2,), "keepdim": False},
)
ROWS = op("reshape", op("iota", name="iota_rows"), name="rows")
CUR = op("add", ROWS, const(name="m"))
KV_PAD = op(
    "pad",
    op("matmul", var("x"), op("permute", var("wkv"), attrs={"dims": (1, 0)})),
    name="kv_pad",
    attrs={"value": 0.0},
)
Z_PAD = op(
    "pad",
    op(
        "add",
        op("matmul", var("x"), op("permute", var("wgate"), attrs={"dims": (1, 0)})),
        op("index", var("ape"), op("remainder", op("iota"), const(name="m2")), attrs={"dim": 0}),
    ),
    name="z_pad",
    attrs={"value": float("-inf")},
)


def _halves(pad, rows_cur) -> object:
    prev = op("slice", op("index", pad, ROWS, attrs={"dim": 1}), name="prev_half")
    cur = op("slice", op("index", pad, rows_cur, attrs={"dim": 1}), name="cur_half")
    return op("concat", prev, cur, attrs={"dim": 2})


def _halves_ok(m: Match, c: Any) -> bool:
    """Block i pools channels [0, c) of block i-1 and [c, 2c) of block i."""
    prev, cur = m.node("prev_half").attrs, m.node("cur_half").attrs
    return (
        prev["dim"] in (-1, 3)
        and cur["dim"] in (-1, 3)
        and (prev["start"], prev["end"], prev["step"]) == (0, c, 1)
        and (cur["start"], cur["step"]) == (c, 1)
        and cur["end"] in (2 * c, None)
    )


KV_OVERLAP, Z_OVERLAP = _halves(KV_PAD, CUR), _halves(Z_PAD, CUR)
KV_PLAIN = op("index", KV_PAD, CUR, attrs={"dim": 1})
Z_PLAIN = op("index", Z_PAD, CUR, attrs={"dim": 1})


def _fuse_compress(view: FusionView, root: Node) -> Fusion | None:
    rope = match_rope(view, root.results[0])
    if rope is None or rope["inverse"]:
        return None
    normed = rounded(view, rope["x"])
    rm = view.match(RMS, normed)
    pooled = rm and rounded(view, rm["p"])
    pm = rm and view.match(POOL, pooled)
    rounds = narrow(root.results[0])  # the reference rounds the pooled and the normed entry
    if not pm or (normed != rope["x"]) != rounds or (pooled != rm["p"]) != rounds:
        return None
    kv, z = pm["kv"], pm["z"]
    for overlap, kv_pat, z_pat in ((True, KV_OVERLAP, Z_OVERLAP), (False, KV_PLAIN, Z_PLAIN)):
        km, zm = view.match(kv_pat, kv), view.match(z_pat, z)
        if km is not None and zm is not None and km["x"] == zm["x"]:
            break
    else:
        return None
    m = scalar(km, "m")
    eps = scalar(rm, "eps")
    if m is None or m != int(m) or eps is None or scalar(zm, "m2") != m:
        return None
    ratio = int(m)
    if km.attr("kv_pad", "pads") != (0, 0, ratio, 0) or zm.attr("z_pad", "pads") != (
        0,
        0,
        ratio,
        0,
    ):
        return None
    if km["rows"] != zm["rows"] or km["rows"].type.shape[-1] != ratio:
        return None
    c = rm["norm"].type.shape[0]
    if overlap and not (_halves_ok(km, c) and _halves_ok(zm, c)):
        return None
    operands = [km["x"], km["wkv"], zm["wgate"], zm["ape"], rm["norm"], rope["cos"], rope["sin"]]
    attrs = {"ratio": ratio, "overlap": overlap, "eps": eps}
    if not _fits("attn.compress", operands, attrs, [root.results[0]]):
        return None
    return Fusion("attn.compress", operands, attrs, (root.results[0],), root.loc)


# --- attn.indexer_topk ---------------------------------------------------------------------

VISIBLE = op(
    "lt",
    op({"reshape", "unsqueeze"}, var("cols")),
    op(
        {"reshape", "unsqueeze"},
        op("floordiv", op("add", var("rows"), const(1)), const(name="ratio")),
    ),
)
_QK = op(
    "matmul",
    op("reshape", var("q", rank=4)),
    op("permute", var("keys", rank=3), attrs={"dims": (0, 2, 1)}),
)
SCORE = op(  # Σ_h relu(q·kᵀ)·w: the relu before or after the [B, T·H, S] -> [B, T, H, S] view
    "sum",
    op(
        "mul",
        either(op("relu", op("reshape", _QK)), op("reshape", op("relu", _QK))),
        op("reshape", var("w")),
    ),
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


def visible_ratio(view: FusionView, visible: Value, t: Any, s: Any) -> Causal | None:
    """(m, None) when visible[t, s] = s < (t + 1) // m with iotas over T and S (prefill),
    (m, pos) when visible[s] = s < (pos + 1) // m (decode), else None."""
    m = view.match(VISIBLE, visible)
    pos = None
    if m is None or not _iota_ok(view, m["rows"], t):
        m = view.match(VISIBLE_AT, visible)
        pos = m and m["pos"]
    if not m or not _iota_ok(view, m["cols"], s):
        return None
    ratio = scalar(m, "ratio")
    ok = ratio is not None and ratio == int(ratio) and ratio >= 1
    return (int(ratio), pos) if ok else None


def _fuse_indexer(view: FusionView, root: Node) -> Fusion | None:
    pm = view.match(PICKS, root.results[0])
    if pm is None:
        return None
    topk = view.producer(pm["indices"])
    tm = topk and view.match(TOPK, topk.results[0])
    if not tm or topk.results != (pm["values"], pm["indices"]):
        return None
    score = tm["score"]
    sm = view.match(SCORE, score)
    if sm is None or score.type.rank != 3:
        return None
    _, t, s = score.type.shape
    k = topk.attrs["k"]
    n_cols = view.producer(pm["n_cols"])
    if n_cols is None or n_cols.name != "constant" or not same_dim(n_cols.attrs["value"], s):
        return None
    if tm.attr("padded", "pads") != (0, k) or topk.attrs["dim"] not in (-1, 2):
        return None
    causal = visible_ratio(view, tm["visible"], t, s)
    w, scale = sm["w"], 1.0
    wn = view.producer(w)
    if wn is not None and wn.name == "mul" and const_value(view, wn.operands[1]) is not None:
        w, scale = wn.operands[0], float(const_value(view, wn.operands[1]))
    if causal is None or not isinstance(k, int):
        return None
    ratio, pos = causal
    operands = [sm["q"], sm["keys"], w] + ([] if pos is None else [pos])
    attrs = {"k": k, "ratio": ratio, "scale": scale, "decode": pos is not None}
    if not _fits("attn.indexer_topk", operands, attrs, [root.results[0]]):
        return None
    return Fusion("attn.indexer_topk", operands, attrs, (root.results[0],), root.loc)


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
SINK = op("expand", op("reshape", var("sink", rank=1)))
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
WINDOW = op(
    "expand",
    op("where", op("lt", var("wr"), const(0)), const(-1), var("wr")),
)
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
ALL_VISIBLE = op("expand", op("where", var("visible"), var("cols"), const(-1)))
ALL_VISIBLE_AT = op("expand", op("reshape", op("where", var("visible"), var("cols"), const(-1))))


RING = op(  # decode: where(slot <= pos, slot, -1) over the ring's slots
    "expand",
    op("reshape", op("where", op("le", var("slots"), var("pos", rank=0)), var("slots"), const(-1))),
)


def _window(view: FusionView, idx: Value, t: Any) -> tuple[int, Value | None] | None:
    """(window, None) for the prefill window t-w+1..t, (window, pos) for the decode ring."""
    rm = view.match(RING, idx)
    if rm is not None:
        n = view.producer(rm["slots"])
        w = n.attrs["end"] if n is not None and n.name == "iota" else None
        return (w, rm["pos"]) if isinstance(w, int) and _iota_ok(view, rm["slots"], w) else None
    m = view.match(WINDOW, idx)
    wm = m and view.match(WINDOW_ROWS, m["wr"])
    if not wm or not _iota_ok(view, wm["pos"], t):
        return None
    w = scalar(wm, "w")
    if w is None or w != int(w) or not _iota_ok(view, wm["offsets"], int(w)):
        return None
    return int(w), None


def _variant(view: FusionView, idx: Value, entries: Value, t: Any) -> tuple | None:
    """-> (variant, window, ratio, extra operands, kv, decode pos or None) from the index and
    entry construction; prefill and decode parts must agree."""
    win = _window(view, idx, t)
    if win is not None:
        return "window", win[0], 0, [], entries, win[1]
    cat, ecat = view.producer(idx), view.producer(entries)
    if cat is None or ecat is None or cat.name != "concat" or ecat.name != "concat":
        return None
    if cat.attrs["dim"] not in (-1, 2) or ecat.attrs["dim"] != 1 or len(cat.operands) != 2:
        return None
    win = _window(view, cat.operands[0], t)
    sm = view.match(SHIFTED, cat.operands[1])
    kv, comp = ecat.operands if len(ecat.operands) == 2 else (None, None)
    if win is None or sm is None or kv is None:
        return None
    w, pos = win
    if not same_dim(sm.attr("t", "value"), t if pos is None else w):  # rows before comp
        return None
    picks = sm["picks"]
    s = comp.type.shape[1]
    am = view.match(ALL_VISIBLE, picks) or view.match(ALL_VISIBLE_AT, picks)
    if am is not None and _iota_ok(view, am["cols"], s):
        causal = visible_ratio(view, am["visible"], t, s)
        if causal is None or causal[1] != pos:
            return None
        return "hca", w, causal[0], [comp], kv, pos
    causal = _csa_causal(view, picks)
    if causal is None or causal[1] != pos:
        return None
    return "csa", w, causal[0], [comp, picks], kv, pos


def _csa_causal(view: FusionView, picks: Value) -> Causal | None:
    """The indexer's (ratio, pos) when `picks` comes from one (fused or not yet fused)."""
    n = view.producer(picks)
    if n is not None and n.name == "attn.indexer_topk":
        return n.attrs["ratio"], (n.operands[3] if n.attrs["decode"] else None)
    pm = view.match(PICKS, picks)
    topk = pm and view.producer(pm["indices"])
    tm = topk and view.match(TOPK, topk.results[0])
    if not tm:
        return None
    score = tm["score"]
    return visible_ratio(view, tm["visible"], score.type.shape[1], score.type.shape[2])


def _query(view: FusionView, qr: Value, cos: Value, sin: Value) -> tuple[Value, float | None]:
    """(pre-norm query, q_norm_eps) from the rotated query, or (None, None)."""
    rope = match_rope(view, qr)
    if rope is None or rope["inverse"] or (rope["cos"], rope["sin"]) != (cos, sin):
        return None, None
    normed = rounded(view, rope["x"])
    if (normed != rope["x"]) != narrow(rope["x"]):
        return None, None
    qm = view.match(QNORM, normed)
    if qm is None or scalar(qm, "eps") is None:
        return rope["x"], None
    return qm["q"], scalar(qm, "eps")


def _fuse_mqa(view: FusionView, root: Node) -> Fusion | None:
    rope = match_rope(view, root.results[0])
    if rope is None or not rope["inverse"]:
        return None
    m = view.match(ATTENDS[narrow(rope["x"])], rope["x"])
    scale = m and scalar(m, "scale")
    if not m or scale is None or m.attr("softmax", "dim") not in (-1, 3):
        return None
    if m.attr("cat", "dim") not in (-1, 3):
        return None
    q, eps = _query(view, m["qr"], rope["cos"], rope["sin"])
    if q is None or q.type.rank != 4:
        return None
    if m["qk"].dtype != q.dtype or m["pv"].dtype != q.dtype:  # the op's products are in q's dtype
        return None
    t = q.type.shape[1]
    found = _variant(view, m["idx"], m["entries"], t)
    if found is None:
        return None
    variant, window, ratio, extra, kv, pos = found
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
    if not _fits("attn.sparse_mqa", operands, attrs, [root.results[0]]):
        return None
    return Fusion("attn.sparse_mqa", operands, attrs, (root.results[0],), root.loc)


def fuse_attention(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace compressors, indexers and sparse attention by their ops (module docstring)."""
    from passes.fuse_compress_step import fuse_step  # it builds on this module's patterns

    view = FusionView(g)
    fusions: list[Fusion] = []
    for node in g.ops:
        f = None
        if node.name == "concat":
            f = _fuse_compress(view, node) or _fuse_mqa(view, node)
        elif node.name == "where":
            f = _fuse_indexer(view, node) or fuse_step(view, node)
        if f is not None:
            fusions.append(f)
    return apply(g, fusions, ctx, "fuse_attention")
