"""Fuse Native Sparse Attention (NSA, models/attention_nsa.py) into `attn.sdpa` (one per branch)
and `attn.block_select` — the op families CSA forms (attention ops and a selection op), with the
same attention kernels as every dense model: no NSA copy of them.

Every branch is GQA attention with the query heads grouped as q [B,T,G,hg,D] and a visibility
`valid` guarding the softmax (a query that sees nothing gets 0):

    o = where(valid, softmax(where(valid, c·q·kᵀ, -inf)), 0) · v          (P·V, rank 5)

The keys decide the branch:

    shared    k [B,1,G,N,D] = the G heads of [B,G,N,D] for every query       (cmp)
              -> attn.sdpa(q, k, v, mask=valid): the block-causal visibility i·d + l − 1 <= t
                 is no causal band for d > 1, so it stays a bool mask operand [1,1,T,N]
                 (prefill: computed from iotas; decode: from the position)
    rows      k [B,T,m,G,D] = k_src[:, rows[t, j]]                            (win)
              prefill: (rows, valid) evaluate to the band t − w < s <= t (each key once)
                 -> attn.sdpa(q, k_src, v_src, causal, window=w);
              decode over the ring: rows[j] = j wherever valid, at the checked positions
                 -> attn.sdpa(q, ring_k, ring_v, mask=valid)
    tokens    k [B,T,G,m,D] = k_src[b, tok[b,t,g,j], g]                       (slc)
              -> attn.sdpa(q, k_src, v_src, indices=where(valid, tok, -1)), indexed: the
                 picked blocks' token rows per query and KV head (the model already masks
                 them to s <= t, so no causal attribute is needed)

The rows and tokens branches read k_src, v_src [B,S,G,D] as stored (kv_layout="bshd"): no
[B,G,S,D] permute, which a backend would materialise — at 64K tokens a 160 MiB copy of the cache
per decode step to read the 1024 selected rows.

Selection (`attn.block_select`), matched from the picks back to the cmp branch's probabilities:

    picks = where(isinf(v) | i >= S', -1, i), (v, i) = topk(pad(where(vis_slc, rank, -inf)), n)
    rank  = Σ_hg(p_cmp) · overlap + forced · bonus          (bonus > hg: forced blocks first)

with overlap [N,S'], vis_slc, forced and the cmp visibility evaluated from positions and checked
against the op's definitions (ir/ops/attn_select.py): at the graph's static T in prefill; in
decode (those masks read only the 0-d position) at every position below DENSE and at SPREAD
pairs of neighbouring positions beyond — a sampled check there. The selection
recomputes q·kᵀ over the compressed keys instead of reading the cmp branch's probabilities: they
are [B,T,H,N] floats (64 GiB at 64K tokens, H = 64, d = 16), while the recomputation is 1/d of
a dense attention's QKᵀ and lets the kernel sum the group's heads in registers.

Not formed: logits computed below fp32 (a bf16 model rounds q·kᵀ before its softmaxes; the ops
would not be exact), masks per head or per sequence, masks at symbolic sizes (the cmp and slc
attentions still form there: their mask and indices stay computed tensors).

Rules (and counters): `fuse_nsa.attn.sdpa`, `fuse_nsa.attn.block_select`. Runs after
`fuse_attention` and before `fuse_sdpa` (whose dense rule wants [B,H,T,S] heads).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import ir
from ir import Graph, Node, Value
from ir.ops.attn_select import block_overlap, forced_blocks
from ir.symbolic import same_dim
from passes.context import PassContext
from passes.fuse_attention import PICKS, TOPK
from passes.fuse_common import Checks, FusionView, const_value, fusion_rule, replace
from passes.pattern import Match, const, op, var
from passes.rewrite import Replace, Rewriter, rewrite
from passes.structural_hash import graph_signature

__all__ = ["RULES", "fuse_nsa"]

MAX_CONE = 200  # a position mask is a short chain of iota/constant ops
# decode masks are functions of the 0-d position: checked at every position below DENSE, then at
# SPREAD pairs of neighbouring positions up to 8 per block (a sampled check past DENSE)
DENSE, SPREAD = 256, 64
NEG_INF = float("-inf")

LOGITS = op("mul", op("matmul", var("q", rank=5), var("kt", rank=5), name="qk"),
            const(name="scale"))  # fmt: skip
GUARDED = op(  # where(valid, softmax(where(valid, c·q·kᵀ, -inf)), 0)
    "where",
    var("valid"),
    op("softmax", op("where", var("valid"), LOGITS, const(NEG_INF)), name="softmax"),
    const(0.0),
)


# --- positions: masks evaluated at the positions a layer sees ----------------------------------

Evaluate = Callable[[int], Any]  # position (decode) or 0 (prefill) -> tensor


def _cone(view: FusionView, v: Value) -> tuple[list[Node], Value | None] | None:
    """(ops computing v in graph order, the 0-d integer graph input they read or None), when
    they read no other input; else None."""
    seen: dict[int, Node] = {}
    free: list[Value] = []
    stack = [v]
    while stack:
        x = stack.pop()
        n = view.producer(x)
        if n is None:
            ok = x.type.rank == 0 and x.dtype.is_int and all(f == x for f in free)
            if not ok:
                return None
            free.append(x)
            continue
        if id(n) in seen:
            continue
        if len(seen) > MAX_CONE:
            return None
        seen[id(n)] = n
        stack.extend(n.operands)
    order = view.memo("fuse_nsa.order", lambda: {id(n): i for i, n in enumerate(view.graph_ops)})
    return sorted(seen.values(), key=lambda n: order.get(id(n), -1)), (free[0] if free else None)


def positional(c: Checks, name: str, v: Value) -> tuple[Evaluate, Value | None]:
    """(at, pos): `at(p)` is the value of v when the decode position is p (any p in prefill),
    pos the 0-d position it reads (None in prefill). Raises Miss when v reads other inputs
    or has a symbolic shape."""
    static = all(isinstance(d, int) for d in v.type.shape)
    c.need(static, name, f"%{v.name}: {v.type} has a symbolic shape (masks are checked at "
           "static sizes)", c.view.producer(v))  # fmt: skip
    cone = _cone(c.view, v)
    c.need(cone is not None, name, f"%{v.name} depends on inputs other than the position",
           c.view.producer(v))  # fmt: skip
    ops, pos = cone
    g = Graph([] if pos is None else [pos], ops, [v])
    # every layer computes its masks with the same ops: evaluate each structure once per sweep
    # (the evaluator itself is shared, so callers may key further results by its identity)
    key = f"fuse_nsa.positional.{graph_signature(g)}"
    if pos is None:
        return c.view.memo(key, lambda: _constant(ir.interpret(g)[0])), None
    at = c.view.memo(key, lambda: functools.cache(lambda p: ir.interpret(g, _int(p, pos))[0]))
    return at, pos


def _constant(value: Any) -> Evaluate:
    return lambda p: value


def _int(p: int, like: Value) -> Any:
    from ir._lazy import torch

    return torch.tensor(p, dtype=torch.int32 if like.dtype == ir.DType.i32 else torch.int64)


def _positions(t: int, pos: Value | None, p: int) -> Any:
    """[T] positions of the query rows: t in prefill, p + t in decode."""
    from ir._lazy import torch

    return torch.arange(t) + (p if pos is not None else 0)


def _rows2(x: Any, t: int) -> Any:
    """A mask [.., T, .., S] with unit dims elsewhere as [T, S] (None if other dims are not 1)."""
    if x.numel() % x.shape[-1] or x.numel() // x.shape[-1] != t:
        return None
    return x.reshape(t, x.shape[-1])


def _first_diff(got: Any, want: Any) -> str:
    t, s = (int(i) for i in (got != want).nonzero()[0])
    return f"row {t} column {s} is {bool(got[t, s])}, expected {bool(want[t, s])}"


# --- heads: q [B,T,G,hg,D] <-> [B,H,T,D] -----------------------------------------------------


def _heads(rw: Rewriter, q: Value) -> Value:
    """q [B,T,G,hg,D] -> [B,G·hg,T,D]: head h = g·hg + j reads KV head h // hg = g."""
    b, t, g, hg, d = q.type.shape
    q = rw.op("permute", [q], dims=(0, 2, 3, 1, 4))
    return rw.op("reshape", [q], shape=[b, g * hg, t, d])


def _ungroup(rw: Rewriter, o: Value, like: Value) -> Value:
    """o [B,H,T,Dv] -> the model's [B,T,G,hg,Dv] (`like`'s shape)."""
    b, t, g, hg, dv = like.type.shape
    o = rw.op("reshape", [o], shape=[b, g, hg, t, dv])
    return rw.op("permute", [o], dims=(0, 3, 1, 2, 4))


def _unit(c: Checks, name: str, x: Value, shape: list[Any], rw: Rewriter) -> Value:
    """x reshaped to `shape` when only unit dims move (else Miss)."""
    same = [d for d in x.type.shape if d != 1] == [d for d in shape if d != 1]
    c.need(same, name, f"%{x.name}: {x.type} is not a [T,S] mask (per head or batch masks are "
           "not supported)", c.view.producer(x))  # fmt: skip
    return rw.op("reshape", [x], shape=shape)


# --- branch attention ---------------------------------------------------------------------------


def _logits(c: Checks, probs: Value) -> Match:
    """The guarded softmax over c·q·kᵀ (q [B,T,G,hg,D]) behind probs."""
    m = c.match("probs", GUARDED, probs)
    c.need(m.attr("softmax", "dim") in (-1, 4), "probs", "the softmax is not over the keys",
           m.node("softmax"))  # fmt: skip
    c.need(m["valid"].dtype == ir.DType.bool, "probs.valid", "the guard is not a bool mask")
    scale = const_value(c.view, m["scale"])
    c.need(isinstance(scale, float), "logits.scale", "the logits' factor is not a constant")
    qk = m.node("qk").results[0]
    c.need(qk.dtype == ir.DType.f32, "logits.qk", f"q·kᵀ is computed in {qk.dtype.value}: the "
           "model rounds the logits, the ops compute them in fp32 (not formed, to stay "
           "exact)", m.node("qk"))  # fmt: skip
    return m


def _key_source(c: Checks, kt: Value) -> tuple[str, Node, Value]:
    """(form, gathering node or None, keys before the transpose) for kᵀ [B,*,G,D,m]."""
    view = c.view
    t = view.producer(kt)
    c.need(t is not None and t.name == "permute", "keys", "kᵀ is not a permute", t or c.root)
    src = view.producer(t.operands[0])
    dims = tuple(t.attrs["dims"])
    if dims == (0, 1, 3, 4, 2) and src is not None and src.name == "index":
        return "rows", src, t.operands[0]
    if dims == (0, 1, 2, 4, 3) and src is not None and src.name == "index_multi":
        return "tokens", src, t.operands[0]
    c.need(dims == (0, 1, 2, 4, 3) and t.operands[0].type.shape[1] == 1, "keys",
           f"kᵀ = permute({dims}) of %{t.operands[0].name}: not shared keys [B,1,G,N,D], rows "
           "k[:, rows] or tokens k[b, tok, g]", t)  # fmt: skip
    return "shared", src, t.operands[0]


def _shared_kv(c: Checks, keys5: Value, v5: Value) -> tuple[Value, Value]:
    """k, v [B,G,N,D] behind the broadcast views [B,1,G,N,D]."""
    out = []
    for name, x in (("keys", keys5), ("values", v5)):
        n = c.view.producer(x)
        ok = n is not None and n.name == "reshape" and x.type.shape[1] == 1
        ok = ok and tuple(n.operands[0].type.shape) == tuple(x.type.shape[:1] + x.type.shape[2:])
        c.need(ok, name, f"%{x.name}: {x.type} is not [B,G,N,D] viewed as [B,1,G,N,D]", n)
        out.append(n.operands[0])
    return out[0], out[1]


def _sdpa(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """where(valid, softmax(where(valid, c·q·kᵀ, -inf)), 0)·v, q [B,T,G,hg,D] -> attn.sdpa."""
    out = root.root.results[0]
    probs, v5 = root.root.operands
    c.need(out.type.rank == 5 and probs.type.rank == 5, "output",
           f"P·V is {probs.type} · {v5.type}, not grouped [B,T,G,hg,m] · [B,T|1,G,m,Dv]")
    m = _logits(c, probs)
    q5, valid = m["q"], m["valid"]
    b, t, g, _, _ = q5.type.shape
    form, gather, keys5 = _key_source(c, m["kt"])
    attrs = {"scale": float(const_value(c.view, m["scale"])), "causal": False, "offset": 0,
             "window": 0, "mask": "none"}  # fmt: skip
    q = _heads(rw, q5)
    heads_dim = 1  # of k: [B,G,S,D], or [B,S,G,D] read as stored (rows, tokens)
    if form == "shared":
        k, v = _shared_kv(c, keys5, v5)
        operands = [q, k, v, _unit(c, "probs.valid", valid, [1, 1, t, k.type.shape[2]], rw)]
        attrs["mask"] = "bool"
    elif form == "rows":
        operands = _ring_or_band(c, gather, v5, valid, attrs, rw)
        operands.insert(0, q)
        attrs["kv_layout"], heads_dim = "bshd", 2
    else:
        operands = [q, *_picked(c, gather, v5, valid, rw)]
        attrs.update(indexed=True, kv_layout="bshd")
        heads_dim = 2
    _grouping(c, q5, operands[1], valid, heads_dim)
    c.fits("attn.sdpa", operands, attrs, [None])
    return replace(c.view, [(out, _ungroup(rw, rw.op("attn.sdpa", operands, **attrs), out))])


def _grouping(c: Checks, q5: Value, k: Value, valid: Value, heads_dim: int = 1) -> None:
    """q [B,T,G,hg,D] against k [B,G,S,D] (heads_dim 1; 2: k [B,S,G,D]), valid [1|B, T, 1|G,
    1, m]: the query-major grouping NSA uses (not [B,Hkv,G,T,D], which fuse_sdpa takes)."""
    b, t, g, _, d = q5.type.shape
    ok = same_dim(k.type.shape[0], b) and same_dim(k.type.shape[heads_dim], g)
    ok = ok and same_dim(k.type.shape[3], d)
    want = "[B,G,S,D]" if heads_dim == 1 else "[B,S,G,D]"
    c.need(ok, "keys", f"q {q5.type} is not [B,T,G,hg,D] over keys {k.type} {want}",
           c.view.producer(k))  # fmt: skip
    vs = valid.type.shape
    ok = valid.type.rank == 5 and vs[0] in (1, b) and same_dim(vs[1], t) and vs[2] in (1, g)
    c.need(ok and vs[3] == 1, "probs.valid", f"the validity {valid.type} is not [1|B, T, 1|G, "
           "1, m] (one mask row per query, shared by the group's heads)")  # fmt: skip


def _ring_or_band(
    c: Checks, gather: Node, v5: Value, valid: Value, attrs: dict, rw: Rewriter
) -> list[Value]:
    """k, v (, mask) of attention over k_src[:, rows]: a causal window band over every key
    (prefill), or the whole ring read in slot order, masked (decode). Sets `attrs`."""
    view = c.view
    k_src, rows = gather.operands
    vt = view.producer(v5)
    ok = vt is not None and vt.name == "permute" and tuple(vt.attrs["dims"]) == (0, 1, 3, 2, 4)
    vg = view.producer(vt.operands[0]) if ok else None
    ok = ok and vg is not None and vg.name == "index" and vg.operands[1] == rows
    c.need(ok and gather.attrs["dim"] == 1 and vg.attrs["dim"] == 1, "values",
           "the values are not gathered by the keys' rows (dim 1)", vt or c.root)  # fmt: skip
    v_src = vg.operands[0]
    t, m = rows.type.shape[-2:] if rows.type.rank == 2 else (None, None)
    c.need(t is not None, "keys.rows", f"rows {rows.type} are not [T, m]", gather)
    rows_at, pos = positional(c, "keys.rows", rows)
    valid_at, pos2 = positional(c, "probs.valid", valid)
    c.need(pos2 is None or pos is None or pos2 == pos, "probs.valid", "two positions")
    s = k_src.type.shape[1]
    k, v = k_src, v_src  # [B,S,G,D], read as stored (kv_layout="bshd")
    if pos is None and pos2 is None:  # evaluators are shared by equal structures: so is this
        key = f"fuse_nsa.band.{id(rows_at)}.{id(valid_at)}.{s}"
        window = c.view.memo(key, lambda: _band(c, rows_at(0), _rows2(valid_at(0), t), s, gather))
        attrs.update(causal=True, window=window)
        return [k, v]
    c.need(t == 1 and m == s, "keys.rows", f"a decode step reads {m} rows of a {s}-slot ring "
           "with several queries", gather)  # fmt: skip
    for p in _span(pos if pos is not None else pos2, 4 * s):  # every slot fills and wraps
        got, keep = rows_at(p).reshape(-1), _rows2(valid_at(p), 1)
        c.need(keep is not None, "probs.valid", "the validity is not one row of slots")
        keep = keep.reshape(-1)
        ok = bool((got[keep] == got.new_tensor(range(s))[keep]).all())
        c.need(ok, "keys.rows", f"at position {p} the rows are not the ring's slots in order",
               gather)  # fmt: skip
    mask = _unit(c, "probs.valid", valid, [1, 1, 1, s], rw)
    attrs["mask"] = "bool"
    return [k, v, mask]


def _picked(c: Checks, gather: Node, v5: Value, valid: Value, rw: Rewriter) -> list[Value]:
    """k, v [B,S,G,D] (as stored) and indices [B,G,T,m] = where(valid, tok, -1) of attention over
    k_src[b, tok[b,t,g,j], g] (index_multi over dims 0, 1, 2 with iota batch and head rows)."""
    view = c.view
    c.need(len(gather.operands) == 4, "keys.tokens", "the gather is not k_src[b, tok, g] "
           "(three index operands)", gather)  # fmt: skip
    k_src, b_rows, tok, g_rows = gather.operands
    vg = view.producer(v5)
    ok = vg is not None and vg.name == "index_multi" and vg.operands[1:] == gather.operands[1:]
    c.need(ok and tuple(gather.attrs["dims"]) == (0, 1, 2) == tuple(vg.attrs["dims"]), "values",
           "the values are not gathered like the keys: k_src[b, tok, g]", vg or c.root)
    b, t, g, m = tok.type.shape if tok.type.rank == 4 else (None,) * 4
    c.need(b is not None and tuple(valid.type.shape) == (b, t, g, 1, m), "keys.tokens",
           f"tokens {tok.type} and validity {valid.type} are not [B,T,G,m], [B,T,G,1,m]", gather)
    for name, rows, axis, n in (("batch", b_rows, 0, b), ("heads", g_rows, 2, g)):
        at, pos = positional(c, f"keys.{name}", rows)
        got = at(0)
        want = _idx(n).reshape([n if i == axis else 1 for i in range(4)])
        ok = pos is None and tuple(got.shape) == tuple(want.shape) and bool((got == want).all())
        c.need(ok, f"keys.{name}", f"the {name} rows of the gather are not iota({n})", gather)
    keep = rw.op("reshape", [valid], shape=[b, t, g, m])
    none = rw.constant(-1, tok.dtype)
    idx = rw.op("permute", [rw.op("where", [keep, tok, none])], dims=(0, 2, 1, 3))
    return [k_src, vg.operands[0], idx]


def _band(c: Checks, rows: Any, keep: Any, s: int, at: Node) -> int:
    """The window w of rows [T,m] kept where `keep` when they read each key of the causal band
    t − w < s' <= t exactly once; Miss otherwise."""
    from ir._lazy import torch

    from ir.ops.attn_dense import visible_reference

    c.need(keep is not None, "probs.valid", "the validity is not a [T, m] mask", at)
    t = rows.shape[0]
    seen = torch.zeros(t, s, dtype=torch.int64)
    ok = bool(((rows >= 0) & (rows < s) | ~keep).all())
    c.need(ok, "keys.rows", "a kept row index is outside the keys", at)
    seen.scatter_add_(1, rows.clamp(0, s - 1), keep.long())
    c.need(bool((seen <= 1).all()), "keys.rows", "a query reads one key twice", at)
    window = int(seen.sum(1).max())
    want = visible_reference(t, s, True, 0, window)
    ok = bool((want == (seen == 1)).all())
    c.need(ok, "keys.rows", f"the rows are not the causal window {window}: "
           f"{_first_diff(seen == 1, want) if not ok else ''}", at)  # fmt: skip
    return window


# --- selection ----------------------------------------------------------------------------------


def _strip(view: FusionView, v: Value, names: tuple[str, ...]) -> Value:
    """v before a chain of `names` ops (views and casts that do not change the mask)."""
    n = view.producer(v)
    while n is not None and n.name in names:
        v = n.operands[0]
        n = view.producer(v)
    return v


def _importance(c: Checks, x: Value) -> tuple[Match, Value]:
    """(the cmp probabilities' match, overlap) of Σ_hg p_cmp · overlap, reshaped."""
    view = c.view
    mm = view.producer(_strip(view, x, ("reshape",)))
    c.need(mm is not None and mm.name == "matmul", "importance",
           "the importance is not (group sums of p_cmp) · overlap", mm or c.root)  # fmt: skip
    heads = view.producer(_strip(view, mm.operands[0], ("reshape",)))
    ok = heads is not None and heads.name == "sum" and tuple(heads.attrs["dims"]) in ((3,), (-2,))
    c.need(ok, "importance.heads", "p_cmp is not summed over the group's heads (dim 3)",
           heads or mm)  # fmt: skip
    probs = heads.operands[0]
    c.need(probs.type.rank == 5, "importance.heads", f"p_cmp {probs.type} is not [B,T,G,hg,N]")
    return _logits(c, probs), _strip(view, mm.operands[1], ("reshape", "cast"))


def _span(pos: Value | None, limit: int) -> list[int]:
    """The decode positions a mask is checked at: every one below DENSE, then SPREAD pairs
    (p, p + 1) spread up to `limit`; [0] in prefill (the mask's rows are the positions)."""
    if pos is None:
        return [0]
    dense = list(range(min(limit, DENSE)))
    if limit <= DENSE:
        return dense
    step = max(1, (limit - DENSE) // SPREAD)
    return dense + [p + e for p in range(DENSE, limit, step) for e in (0, 1)]


def _table(c: Checks, name: str, at: Evaluate, span: list[int], t: int) -> dict[int, Any]:
    """{position: the mask evaluated there, as [T, S]}."""
    rows = {p: _rows2(at(p), t) for p in span}
    c.need(all(r is not None for r in rows.values()), name, "the mask is not [T, S] (per head or "
           "per sequence masks are not supported)")  # fmt: skip
    return rows


def _first_seen(rows: dict[int, Any], col: int) -> int | None:
    """The first query position at which column `col` is True."""
    seen = [p + t for p, r in rows.items() for t in range(r.shape[0]) if bool(r[t, col])]
    return min(seen, default=None)


def _agrees(c: Checks, name: str, rows: dict, want: Callable[[Any], Any], pos, what: str) -> None:
    for p, got in rows.items():
        expect = want(_positions(got.shape[0], pos, p))
        if not bool((got.bool() == expect).all()):
            c.need(False, name, f"not {what} at position {p}: {_first_diff(got.bool(), expect)}")


def _cmp_geometry(c: Checks, vis: Evaluate, pos: Value | None, t: int, n: int) -> tuple[int, int]:
    """(l, d) with compressed block i visible iff i·d + l − 1 <= p, read off and checked."""
    rows = _table(c, "cmp.visible", vis, _span(pos, 8 * n), t)
    first = [_first_seen(rows, i) for i in range(min(n, 2))]
    c.need(None not in first, "cmp.visible", "a compressed block is never visible")
    l = first[0] + 1
    d = first[1] - first[0] if n > 1 else l
    c.need(0 < d <= l, "cmp.visible", f"blocks become visible at {first}: no stride 0 < d <= l")
    _agrees(c, "cmp.visible", rows, lambda ps: (_idx(n) * d + l - 1)[None] <= ps[:, None], pos,
            f"i·{d} + {l} − 1 <= t")  # fmt: skip
    return l, d


def _idx(n: int) -> Any:
    from ir._lazy import torch

    return torch.arange(n)


def _slc_geometry(c: Checks, rows: dict, pos: Value | None, s: int) -> int:
    """l' with selection block j visible iff j·l' <= p, read off and checked."""
    c.need(s >= 2, "slc.visible", f"{s} selection block: its size cannot be read off")
    ls = _first_seen(rows, 1)
    c.need(ls is not None and ls > 0, "slc.visible", "block 1 is never visible")
    _agrees(c, "slc.visible", rows, lambda ps: (_idx(s) * ls)[None] <= ps[:, None], pos,
            f"j·{ls} <= t")  # fmt: skip
    return ls


def _forced(c: Checks, rows: dict, pos, s: int, ls: int) -> tuple[int, int]:
    """(initial, local) of the forced blocks j < initial or own − local < j <= own."""
    tried = [(1, 2)] + [(i, k) for i in range(3) for k in range(4) if (i, k) != (1, 2)]
    for initial, local in tried:
        ok = all(
            bool((got.bool() == forced_blocks(_positions(got.shape[0], pos, p), s, ls, initial,
                                              local)).all())
            for p, got in rows.items()
        )  # fmt: skip
        if ok:
            return initial, local
    _agrees(c, "forced", rows, lambda ps: forced_blocks(ps, s, ls, 1, 2), pos,
            f"j < initial or own − local < j <= own (own = t // {ls}); against block 0 and the "
            "2 local blocks")  # fmt: skip
    return 0, 0


def _select(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """where(isinf(v) | i >= S', -1, i), (v, i) = topk(pad(where(vis_slc, Σ_hg p_cmp·overlap +
    forced·bonus, -inf)), n) -> attn.block_select."""
    view, out = c.view, root.root.results[0]
    pm = c.match("picks", PICKS, out)
    topk = view.producer(pm["indices"])
    tm = c.match("topk", TOPK, pm["indices"])
    c.need(topk.results == (pm["values"], pm["indices"]), "picks",
           "values and indices come from different top-ks", topk)  # fmt: skip
    rank = tm["score"]
    c.need(rank.type.rank == 4, "rank", f"the ranks {rank.type} are not [B,T,G,S']")
    b, t, g, s = rank.type.shape
    c.need(isinstance(t, int) and isinstance(s, int), "rank", f"ranks {rank.type} have a "
           "symbolic shape (the selection's masks are checked at static sizes)")  # fmt: skip
    n = topk.attrs["k"]
    ok = tm.attr("padded", "pads") == (0, n) and topk.attrs["dim"] in (-1, 3)
    c.need(ok and const_value(view, pm["n_cols"]) == s, "topk.pad",
           f"not the top-{n} of {s} blocks padded by {n} -inf columns", topk)  # fmt: skip
    add = view.producer(rank)
    c.need(add is not None and add.name == "add", "rank", "the rank is not importance + bonus",
           add or topk)  # fmt: skip
    bonus_of = [(x, view.producer(x)) for x in add.operands]
    bonus = next(((x, bn) for x, bn in bonus_of if bn is not None and bn.name == "mul"
                  and const_value(view, bn.operands[1]) is not None), None)  # fmt: skip
    c.need(bonus is not None, "rank.forced", "no forced · constant term", add)
    imp = next((x for x in add.operands if x != bonus[0]), None)
    c.need(imp is not None, "rank", "the rank adds the bonus to itself", add)
    cm, overlap = _importance(c, imp)
    q5, kt = cm["q"], cm["kt"]
    hg = q5.type.shape[3]
    c.need(float(const_value(view, bonus[1].operands[1])) > hg, "rank.forced",
           f"the bonus {const_value(view, bonus[1].operands[1])} does not exceed the group's "
           f"largest importance {hg}: forced blocks may lose", bonus[1])  # fmt: skip
    form, _, keys5 = _key_source(c, kt)
    c.need(form == "shared", "importance.keys", "p_cmp does not attend to shared blocks")
    kn = view.producer(keys5)
    k = kn.operands[0] if kn is not None and kn.name == "reshape" else None
    c.need(k is not None and k.type.rank == 4, "importance.keys", "keys are not [B,G,N,D]")
    _grouping(c, q5, k, cm["valid"])
    vis, pos = positional(c, "cmp.visible", cm["valid"])
    l, d = _cmp_geometry(c, vis, pos, t, k.type.shape[2])
    slc_vis, pos_s = positional(c, "slc.visible", tm["visible"])
    forced, pos_f = positional(c, "forced", _strip(view, bonus[1].operands[0], ("cast",)))
    c.need({pos_s, pos_f} <= {pos, None}, "slc.visible", "masks read different positions")
    span = _span(pos, 8 * s + 8)  # decode: 8 positions a block and more
    ls = _slc_geometry(c, _table(c, "slc.visible", slc_vis, span, t), pos, s)
    initial, local = _forced(c, _table(c, "forced", forced, span, t), pos, s, ls)
    ov, _ = positional(c, "overlap", overlap)
    want = block_overlap(k.type.shape[2], s, l, d, ls)
    c.need(tuple(ov(0).shape) == tuple(want.shape) and bool((ov(0) == want).all()), "overlap",
           f"the overlap [N,S'] is not 'block i shares a token with block j' for l={l}, d={d}, "
           f"l'={ls}")  # fmt: skip
    attrs = {"scale": float(const_value(view, cm["scale"])), "cmp_block": l, "cmp_stride": d,
             "slc_block": ls, "blocks": s, "topn": n, "initial": initial, "local": local,
             "decode": pos is not None}  # fmt: skip
    operands = [_heads(rw, q5), k] + ([pos] if pos is not None else [])
    c.fits("attn.block_select", operands, attrs, [None])
    picks = rw.op("attn.block_select", operands, **attrs)
    return replace(view, [(out, rw.op("permute", [picks], dims=(0, 2, 1, 3)))])


RULES = [
    # where(valid, softmax(where(valid, c·q·kᵀ, -inf)), 0)·v over grouped heads -> attn.sdpa
    fusion_rule("fuse_nsa.attn.sdpa", op("matmul"), _sdpa),
    # top-n of Σ_hg p_cmp·overlap + forced·bonus over visible blocks -> attn.block_select
    fusion_rule("fuse_nsa.attn.block_select", op("where"), _select),
]


def fuse_nsa(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace NSA's branch attentions and block selection (module docstring) by semantic ops."""
    return rewrite(g, RULES, ctx=ctx)
