"""Fuse the KV compressor's prefill into `attn.compress`; its rule is one of `fuse_attention`'s.

    compress = rope(rmsnorm(Σ_rows kv ⊙ softmax(z, rows)); cos, sin)

over blocks of m rows of the projections kv = x·wkvᵀ, z = x·wgateᵀ + ape[t % m] — with overlap
(CSA, m = 4), block i pools channels [0, c) of block i-1 (zero kv, -inf score before block 0)
and [c, 2c) of block i. Three spellings of the blocks are matched:

    gathered (models/attention.py)  index(pad(kv, m leading rows), iota(nb·m).view(nb, m) + m),
                                    overlap: [prev half ++ this half] of two such gathers
    viewed (HF, no overlap)         kv[:, :nb·m].view(B, nb, m, W), z likewise + ape
    scattered (HF, overlap)         full(0 / -inf, [B, nb, 2m, c]) with rows [m, 2m) <- this
                                    block's [c, 2c) and rows [0, m) of blocks 1.. <- the
                                    previous block's [0, c) (index_put of iota ranges)

Rule (and counter): `fuse_attention.attn.compress`.
"""

from __future__ import annotations

from typing import Any

from ir import Value
from ir.symbolic import same_dim
from passes.fuse_common import Checks, FusionView, fusion_rule, narrow, replace, rounded, scalar
from passes.fuse_rope import RMS, match_rope, unit_dims
from passes.pattern import Match, const, either, op, var
from passes.rewrite import Replace, Rewriter

__all__ = ["COMPRESS_RULE"]

# --- attn.compress -------------------------------------------------------------------------

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


# HF's spelling: the projections viewed as [B, T//m, m, W] blocks (after dropping a partial
# block), the position bias broadcast over the blocks (no overlap)
_PROJ = op("matmul", var("x"), op("permute", var("w"), attrs={"dims": (1, 0)}))
_USABLE = either(op("slice", _PROJ, name="usable"), _PROJ)
KV_VIEW = op("reshape", _USABLE, name="blocks")
Z_VIEW = op("add", op("reshape", _USABLE, name="blocks"), var("ape", rank=2))


def _viewed_blocks(c: Checks, kv: Value, z: Value) -> tuple | None:
    """(x, wkv, wgate, ape, ratio) when kv/z are HF's viewed blocks, else None."""
    view = c.view
    km, zm = view.matches(KV_VIEW, kv), view.matches(Z_VIEW, z)
    if km is None or zm is None:
        return None
    c.need(km["x"] == zm["x"], "blocks", "kv and scores project different inputs")
    shape = kv.type.shape
    ok = kv.type.rank == 4 and zm["blocks"].type.shape == shape
    c.need(ok, "blocks.view", f"blocks {kv.type} are not [B, T//m, m, W]", km.node("blocks"))
    ratio, width = shape[2], shape[3]
    c.need(isinstance(ratio, int) and zm["ape"].type.shape == (ratio, width), "blocks.ape",
           f"the position bias is not [{ratio}, {width}]", view.producer(z))
    for bm in (km, zm):
        cut = bm.node("usable")
        ok = cut is None or (cut.attrs["dim"] in (1, -2) and cut.attrs["start"] == 0
                             and cut.attrs["step"] == 1)
        c.need(ok, "blocks.usable", "the blocks do not start at row 0", cut)
        rows = bm.node("blocks").operands[0].type.shape[1]
        t = bm["x"].type.shape[1]
        c.need(cut is not None or same_dim(rows, t), "blocks.usable",
               "the blocks do not cover the rows from 0", bm.node("blocks"))
    return km["x"], km["w"], zm["w"], zm["ape"], ratio


def _put(view: FusionView, v: Value, dim: int) -> tuple | None:
    """(base, (start, end) of the iota rows, value) when v = index_put(base, iota, value, dim)."""
    n = view.producer(v)
    if n is None or n.name != "index_put" or n.attrs["accumulate"] or n.attrs["dim"] != dim:
        return None
    rows = view.producer(n.operands[1])
    if rows is None or rows.name != "iota" or rows.attrs["step"] != 1:
        return None
    return n.operands[0], (rows.attrs["start"], rows.attrs["end"]), n.operands[2]


def _cut(view: FusionView, v: Value, dim: int) -> tuple | None:
    """(x, (start, end)) when v = x[dim: start:end] with step 1."""
    n = view.producer(v)
    if n is None or n.name != "slice" or n.attrs["dim"] != dim or n.attrs["step"] != 1:
        return None
    return n.operands[0], (n.attrs["start"], n.attrs["end"])


def _scattered(c: Checks, w: Value, fill: float, width: Any) -> Value:
    """The viewed blocks R [B, nb, m, 2c] when w [B, nb, 2m, c] is HF's overlap layout:
    w = full(fill); w[:, :, m:] = R[..., c:]; w[:, 1:, :m] = R[:, :-1, :, :c], else Miss."""
    view = c.view
    b, nb, rows, _ = w.type.shape
    m = rows // 2
    outer = _put(view, w, 1)
    a = w if outer is None else outer[0]
    cur = _put(view, a, 2)
    fn = None if cur is None else view.producer(cur[0])
    ok = cur is not None and cur[1] == (m, 2 * m) and fn is not None and fn.name == "full"
    ok = ok and fn.attrs["value"] == fill
    c.need(ok, "blocks.current", f"rows [{m}, {2 * m}) of {fill}-filled blocks are not written",
           view.producer(a))
    half = _cut(view, cur[2], 3)
    c.need(half is not None and half[1] in ((width, 2 * width), (width, None)), "blocks.current",
           f"the current rows are not channels [{width}, {2 * width}) of the blocks",
           view.producer(cur[2]))
    r = half[0]
    if outer is None:
        c.need(nb == 1, "blocks.previous", "the previous block's rows are not written")
        return r
    inner = _put(view, outer[2], 2)
    ok = outer[1] == (1, nb) and inner is not None and inner[1] == (0, m)
    ok = ok and _cut(view, inner[0], 1) == (a, (1, nb))
    prev = _cut(view, inner[2], 3) if ok else None
    prev_rows = _cut(view, prev[0], 1) if prev is not None else None
    ok = ok and prev is not None and prev[1] == (0, width) and prev_rows is not None
    ok = ok and prev_rows[0] == r and prev_rows[1] in ((0, -1), (0, nb - 1))
    c.need(ok, "blocks.previous", f"rows [0, {m}) of block i are not channels [0, {width}) "
           "of block i-1", view.producer(w))
    return r


def _padded_blocks(c: Checks, kv: Value, z: Value, width: Any) -> tuple:
    """(x, wkv, wgate, ape, ratio, overlap) of the gathered padded blocks (module docstring)."""
    view = c.view
    km = view.matches(KV_OVERLAP, kv)
    zm = view.matches(Z_OVERLAP, z)
    overlap = km is not None and zm is not None and km["x"] == zm["x"]
    if not overlap:
        km = c.match("kv_blocks", KV_PLAIN, kv)
        zm = c.match("score_blocks", Z_PLAIN, z)
        c.need(km["x"] == zm["x"], "blocks", "kv and scores project different inputs")
    m = scalar(km, "m")
    c.need(m is not None and m == int(m) and scalar(zm, "m2") == m, "blocks.ratio",
           "the block offsets and the ape index use different ratios")
    ratio = int(m)
    pads = (0, 0, ratio, 0)
    c.need(km.attr("kv_pad", "pads") == pads and zm.attr("z_pad", "pads") == pads, "blocks.pad",
           f"the projections are not padded by {ratio} leading rows", km.node("kv_pad"))
    c.need(km["rows"] == zm["rows"] and km["rows"].type.shape[-1] == ratio, "blocks.rows",
           f"blocks are not {ratio} consecutive rows")
    c.need(not overlap or (_halves_ok(km, width) and _halves_ok(zm, width)), "blocks.halves",
           f"overlapping blocks do not take channels [0, {width}) of the previous block")
    return km["x"], km["wkv"], zm["wgate"], zm["ape"], ratio, overlap


def _compress(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """rope(rmsnorm(Σ_rows kv ⊙ softmax(z, rows))) over padded blocks -> attn.compress."""
    view, out = c.view, root.root.results[0]
    rope = match_rope(c, "rope", out, inverse=False)
    normed = rounded(view, unit_dims(view, rope["x"]))
    rm = c.match("rmsnorm", RMS, normed)
    pooled = rounded(view, rm["p"])
    pm = c.match("pool", POOL, pooled)
    rounds = narrow(out)  # the reference rounds the pooled and the normed entry
    ok = (normed != unit_dims(view, rope["x"])) == rounds and (pooled != rm["p"]) == rounds
    c.need(ok, "rounding", f"pooled/normed entries are rounded iff the output is ({out.dtype})")
    width, eps = rm["norm"].type.shape[0], scalar(rm, "eps")
    kv, z = pm["kv"], pm["z"]
    put = view.producer(kv)
    if put is not None and put.name == "index_put":  # HF's overlap layout
        kv, z = _scattered(c, kv, 0.0, width), _scattered(c, z, float("-inf"), width)
        blocks = _viewed_blocks(c, kv, z)
        c.need(blocks is not None, "blocks.view", "the overlapped blocks are not projections")
        blocks = (*blocks, True)
    else:
        blocks = _viewed_blocks(c, kv, z)
        blocks = None if blocks is None else (*blocks, False)
    if blocks is None:  # models/attention.py's gathered padded blocks
        blocks = _padded_blocks(c, pm["kv"], pm["z"], width)
    x, wkv, wgate, ape, ratio, overlap = blocks
    c.need(eps is not None, "rmsnorm", "ε is not a constant")
    operands = [x, wkv, wgate, ape, rm["norm"], rope["cos"], rope["sin"]]
    attrs = {"ratio": ratio, "overlap": overlap, "eps": eps}
    c.fits("attn.compress", operands, attrs, [None])
    new = rw.op("attn.compress", operands, **attrs)
    if new.type.shape != out.type.shape:  # HF's entries carry a unit head dim
        new = rw.op("reshape", [new], shape=tuple(out.type.shape))
    return replace(view, [(out, new)])


# rope(rmsnorm(Σ_rows kv ⊙ softmax(z, rows))) over the blocks of x
COMPRESS_RULE = fusion_rule("fuse_attention.attn.compress", op("concat"), _compress)
