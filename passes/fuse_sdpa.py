"""Fuse dense transformer attention, in any of its spellings, into one `attn.sdpa` op.

After `canonicalize` the spellings meet in one shape, matched from the P·V matmul backwards:

    o      = probs · v'                         v' = v, or GQA-repeated v (see `kv heads`)
    probs  = softmax(z) | exp(z)/Σexp(z) | where(any(z != -inf), softmax(z), 0) (SDPA's guard)
           | softmax([z, sinks])[..., :S]                               (sinks as a logit column)
    z      = scores (+ float mask) | where(bool mask, scores, -big)      (any mix, up to 3)
    scores = c · q'·kᵀ  with c the product of constant factors on q, on kᵀ and on the product,
           or cap·tanh(scores / cap) (logit soft-capping, Gemma 2)
    kv heads: reshape(expand(reshape(k, [B,Hkv,1,S,D]), [B,Hkv,G,S,D]), [B,Hkv·G,S,D]) — what
           HF's repeat_kv, `repeat_interleave(G, dim=1)` and SDPA's `enable_gqa` become — and
           expand(k [B,1,S,D], [B,H,S,D]) (broadcast MQA) give k with its Hkv heads; or GQA by
           broadcasting: q as [B,Hkv,G,T,D] against k, v [B,Hkv,1,S,D] (reshape(q4) = q, since
           query head h = kv·G + g either way), the result reshaped back.

A mask computed from positions alone (iota, constants: a causal `tril`, HF's mask builders, a
sliding-window band), at static sizes, is evaluated once at compile time and must be causal
with some query offset, optionally banded to a window: it becomes the op's attributes. A
position mask of another shape is refused with the first (query, key) where it differs — most
likely a bug in the model — and a mask that depends on inputs (padding) or on symbolic sizes
stays an operand. `torch.nn.functional.scaled_dot_product_attention` decomposes to the same ops
(q and kᵀ each scaled by √scale, mask added, guarded softmax), so it needs no rule of its own.

Rule (and counter): `fuse_sdpa.attn.sdpa`. Runs after `fuse_attention`, whose V4 sparse ops
consume their own softmax·matmul chains first.
"""

from __future__ import annotations

from typing import Any

import ir
from ir import Graph, Node, Value
from ir.ops.attn_dense import KERNEL_HEAD_DIM, visible_reference
from ir.symbolic import same_dim
from passes.context import PassContext
from passes.fuse_common import Checks, FusionView, const_value, fusion_rule, replace, rounded
from passes.pattern import Match, op
from passes.rewrite import Replace, Rewriter, rewrite

__all__ = ["RULES", "fuse_sdpa"]

NEG_BIG = -1e30  # an additive mask value at or below this is "never attend" (finfo.min, -inf)
MAX_MASK_OPS = 256  # a position mask is a short chain; past this it is not evaluated
MAX_MASKS = 3  # mask layers peeled off the logits


def _last(v: Value, dims: Any) -> bool:
    """Whether `dims` (an int or a 1-tuple) names the last dim of `v`."""
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return len(dims) == 1 and dims[0] % v.type.rank == v.type.rank - 1


# --- probabilities: softmax, its empty-row guard, sinks -----------------------------------------


def _unshift(view: FusionView, z: Value) -> Value:
    """z for z - rowmax(z): softmax(z - c_row) = softmax(z) for any per-row c."""
    n = view.producer(z)
    if n is None or n.name != "sub":
        return z
    mx = view.producer(n.operands[1])
    ok = mx is not None and mx.name in ("amax", "max") and mx.operands[0] == n.operands[0]
    return n.operands[0] if ok and _last(n.operands[0], mx.attrs.get("dims", ())) else z


def _guarded(c: Checks, p: Value) -> Value:
    """softmax(z) for where(any(z != -inf, -1), softmax(z), 0) (SDPA's math path), else p."""
    view = c.view
    n = view.producer(p)
    sm = view.producer(n.operands[1]) if n is not None and n.name == "where" else None
    if sm is None or sm.name != "softmax":
        return p
    c.need(const_value(view, n.operands[2]) == 0, "probs.guard", "the guard's else is not 0", n)
    z = sm.operands[0]
    any_ = view.producer(n.operands[0])
    ok = any_ is not None and any_.name == "any" and _last(z, any_.attrs["dims"])
    not_ = view.producer(any_.operands[0]) if ok else None
    ok = not_ is not None and not_.name == "logical_not"
    eq = view.producer(not_.operands[0]) if ok else None
    ok = eq is not None and eq.name == "eq" and z in eq.operands
    ok = ok and any(const_value(view, x) == float("-inf") for x in eq.operands)
    c.need(ok, "probs.guard", "the softmax is guarded by something other than 'row not all "
           "-inf'", n)  # fmt: skip
    return sm.results[0]


def _sink_column(c: Checks, col: Value, hq: Any) -> Value:
    """sinks [Hq] for expand(reshape(sinks, [1,Hq,1,1]), [B,Hq,T,1])."""
    view = c.view
    v = col
    for _ in range(3):
        n = view.producer(v)
        if n is None or n.name not in ("expand", "reshape"):
            break
        v = n.operands[0]
    ok = v.type.rank == 1 and same_dim(v.type.shape[0], hq) and v.type.dtype.is_float
    c.need(ok, "probs.sinks", f"the extra logit column is not one sink per head [{hq}], "
           f"it comes from %{v.name}: {v.type}", view.producer(col))  # fmt: skip
    c.need(col.type.shape[-1] == 1, "probs.sinks", "the sink column is wider than 1")
    return v


def _probs(c: Checks, p: Value) -> tuple[Value, Value | None, bool]:
    """(logits z, sinks or None, whether a row of z that is all -inf gives 0 rather than NaN:
    guarded, or with a sink) of the attention probabilities p."""
    view = c.view
    p = rounded(view, p)
    guard = _guarded(c, p)
    guarded, p = guard != p, guard
    n = view.producer(p)
    sinks = None
    if n is not None and n.name == "slice":
        sm = view.producer(n.operands[0])
        ok = sm is not None and sm.name == "softmax" and _last(p, n.attrs["dim"])
        ok = ok and n.attrs["start"] == 0 and n.attrs["step"] == 1
        c.need(ok, "probs.sinks", "the probabilities are a slice, not softmax(z ++ sinks)[:S]", n)
        cat = view.producer(_unshift(view, sm.operands[0]))
        ok = cat is not None and cat.name == "concat" and len(cat.operands) == 2
        ok = ok and _last(cat.results[0], cat.attrs["dim"])
        c.need(ok, "probs.sinks", "the softmax before the slice is not over [z, sinks]", sm)
        z, col = cat.operands
        end = n.attrs["end"]
        end = end + cat.results[0].type.shape[-1] if isinstance(end, int) and end < 0 else end
        c.need(same_dim(z.type.shape[-1], end), "probs.sinks",
               "the slice does not drop exactly the sink column", n)  # fmt: skip
        sinks = _sink_column(c, col, z.type.shape[1])
        return z, sinks, True
    written = _written_softmax(view, p)
    if written is not None:
        return _unshift(view, written), sinks, guarded
    c.need(n is not None and n.name == "softmax", "probs",
           "the P·V matmul's left operand is not a softmax", n or c.root)  # fmt: skip
    c.need(_last(p, n.attrs["dim"]), "probs", f"softmax over dim {n.attrs['dim']}, not over "
           "the keys (the last dim)", n)  # fmt: skip
    return _unshift(view, n.operands[0]), sinks, guarded


def _written_softmax(view: FusionView, p: Value) -> Value | None:
    """z for exp(z) / sum(exp(z), -1, keepdim): exp(z)/Σexp(z) = softmax(z)."""
    n = view.producer(p)
    if n is None or n.name != "div":
        return None
    e, total = n.operands
    ex, sm = view.producer(e), view.producer(total)
    if ex is None or ex.name != "exp" or sm is None or sm.name != "sum" or sm.operands[0] != e:
        return None
    ok = _last(e, sm.attrs["dims"]) and sm.attrs["keepdim"]
    return ex.operands[0] if ok else None


# --- logits: masks, scale, q·kᵀ ----------------------------------------------------------------


def _scaled(view: FusionView, v: Value) -> tuple[Value, float]:
    """(x, c) for x · c1 · c2 ... / d (constant factors), else (v, 1)."""
    scale = 1.0
    for _ in range(4):
        n = view.producer(v)
        if n is None or n.name not in ("mul", "div"):
            break
        k = const_value(view, n.operands[1])
        if n.name == "mul" and k is None:
            n_k = const_value(view, n.operands[0])
            if n_k is None:
                break
            scale, v = scale * float(n_k), n.operands[1]
            continue
        if k is None or isinstance(k, bool) or (n.name == "div" and k == 0):
            break
        scale, v = (scale * float(k) if n.name == "mul" else scale / float(k)), n.operands[0]
    return v, scale


def _is_scores(view: FusionView, v: Value) -> bool:
    """Whether v is c·q·kᵀ, or its soft-capped form c·tanh(c'·q·kᵀ)."""
    n = view.producer(_scaled(view, v)[0])
    if n is not None and n.name == "tanh":
        n = view.producer(_scaled(view, n.operands[0])[0])
    return n is not None and n.name == "matmul"


def _softcap(view: FusionView, scores: Value) -> tuple[Value, float]:
    """(the uncapped logits, cap) for cap·tanh(x / cap) (Gemma 2's logit soft-capping), else
    (scores, 0). The cap is the outer constant factor; the inner 1/cap is folded into the
    logits' scale by the caller (cap·tanh(s·q·kᵀ) = cap·tanh((s·cap)·q·kᵀ / cap))."""
    x, cap = _scaled(view, scores)
    n = view.producer(x)
    if n is None or n.name != "tanh" or cap <= 0:
        return scores, 0.0
    return n.operands[0], cap


Masks = list[tuple[str, Value, float | None]]  # (kind, mask, where's drop value or None)


def _masks(c: Checks, z: Value) -> tuple[Value, Masks]:
    """(scores, masks) peeling additive float masks, where(keep, z, -big) ("bool") and
    where(drop, -big, z) ("not": masked_fill) masks."""
    view = c.view
    masks: Masks = []
    for _ in range(MAX_MASKS):
        n = view.producer(z)
        if n is None or _is_scores(view, z) or n.name not in ("add", "where"):
            break
        if n.name == "add":
            a, b = n.operands
            if _leads(view, b) and not _leads(view, a):
                a, b = b, a
            c.need(_leads(view, a) and not _leads(view, b), "logits.mask",
                   "neither or both terms of the sum lead to a q·kᵀ product", n)  # fmt: skip
            c.need(b.dtype.is_float, "logits.mask", f"additive mask %{b.name} is not float", n)
            masks.append(("add", b, None))
            z = a
            continue
        cond, keep, drop = n.operands
        kind = "bool"
        if _leads(view, drop) and not _leads(view, keep):  # masked_fill(drop_mask, -inf)
            kind, keep, drop = "not", drop, keep
        value = const_value(view, drop)
        ok = value is not None and not isinstance(value, bool) and value <= NEG_BIG
        c.need(ok, "logits.mask", f"where(mask, z, {value}) does not drop to -inf", n)
        masks.append((kind, cond, float(value)))
        z = keep
    return z, masks


def _leads(view: FusionView, v: Value, depth: int = MAX_MASKS) -> bool:
    """Whether v is q·kᵀ logits, possibly under further add/where masks."""
    if _is_scores(view, v):
        return True
    n = view.producer(v)
    if n is None or depth == 0 or n.name not in ("add", "where"):
        return False
    return any(_leads(view, x, depth - 1) for x in n.operands if x.dtype.is_float)


def _qk(c: Checks, scores: Value) -> tuple[Value, Value, float]:
    """(q, k', scale) of scores = scale · q·k'ᵀ."""
    view = c.view
    prod, scale = _scaled(view, scores)
    n = view.producer(prod)
    c.need(n is not None and n.name == "matmul", "logits.qk", "the logits are not a q·kᵀ "
           "matmul times constants", view.producer(scores))  # fmt: skip
    q, q_scale = _scaled(view, n.operands[0])
    kt, kt_scale = _scaled(view, n.operands[1])
    t = view.producer(kt)
    swap = (*range(kt.type.rank - 2), kt.type.rank - 1, kt.type.rank - 2)
    ok = t is not None and t.name == "permute" and tuple(t.attrs["dims"]) == swap
    c.need(ok, "logits.keys", "the right factor of q·kᵀ is not k with its last two dims "
           "swapped", t or n)  # fmt: skip
    k, k_scale = _scaled(view, t.operands[0])
    return q, k, scale * q_scale * kt_scale * k_scale


def _kv_heads(c: Checks, name: str, x: Value) -> tuple[Value, int | Any]:
    """(kv with its Hkv heads, group G) of kv repeated to query heads, else (x, 1)."""
    view = c.view
    c.need(x.type.rank == 4, name, f"%{x.name}: {x.type} is not [B,H,S,D]", view.producer(x))
    outer = view.producer(x)
    if outer is not None and outer.name == "expand":  # broadcast MQA: [B,1,S,D] -> [B,H,S,D]
        src = outer.operands[0]
        if src.type.rank == 4 and src.type.shape[1] == 1:
            ok = all(same_dim(a, b) for i, (a, b) in enumerate(zip(src.type.shape, x.type.shape))
                     if i != 1)  # fmt: skip
            c.need(ok, name, "the expand broadcasts more than the head dim", outer)
            return src, x.type.shape[1]
    if outer is None or outer.name != "reshape":
        return x, 1
    rep = view.producer(outer.operands[0])
    inner = view.producer(rep.operands[0]) if rep is not None and rep.name == "expand" else None
    if inner is None or inner.name != "reshape":
        return x, 1
    src, five = inner.operands[0], rep.results[0].type.shape
    b, hkv, s, d = (src.type.shape if src.type.rank == 4 else (None,) * 4)
    ok = src.type.rank == 4 and len(five) == 5
    ok = ok and inner.results[0].type.shape == (b, hkv, 1, s, d)
    ok = ok and five[:2] == (b, hkv) and five[3:] == (s, d)
    ok = ok and same_dim(five[1] * five[2], x.type.shape[1])
    c.need(ok, name, "the head repeat is not reshape(expand(reshape(kv, [B,Hkv,1,S,D]), "
           "[B,Hkv,G,S,D]), [B,Hkv·G,S,D])", outer)  # fmt: skip
    return src, five[2]


# --- position masks -----------------------------------------------------------------------------


def _position_cone(view: FusionView, v: Value) -> list[Node] | None:
    """The ops computing v, in graph order, when they read no graph input (None otherwise)."""
    seen: dict[int, Node] = {}
    stack = [v]
    while stack:
        x = stack.pop()
        n = view.producer(x)
        if n is None or len(seen) > MAX_MASK_OPS:
            return None
        if id(n) in seen:
            continue
        seen[id(n)] = n
        stack.extend(n.operands)
    order = {id(n): i for i, n in enumerate(view.graph_ops)}
    return sorted(seen.values(), key=lambda n: order.get(id(n), -1))


def _evaluate(view: FusionView, v: Value) -> Any | None:
    """The value of a static position mask (computed from iota/constants alone), else None."""
    if not all(isinstance(d, int) for d in v.type.shape):
        return None
    cone = _position_cone(view, v)
    if cone is None:
        return None
    return view.memo(f"sdpa.mask.{v.name}", lambda: ir.interpret(Graph([], cone, [v]))[0])


def _visibility(kind: str, mask: Any, drop: float | None) -> tuple[Any, bool] | None:
    """([T,S] bool, whether masked logits are exactly -inf) of a position mask that is the same
    for every batch and head, else None (a bias like ALiBi, or a per-sequence mask)."""
    if kind == "add":
        if not bool(((mask == 0) | (mask <= NEG_BIG)).all()):
            return None
        exact = bool((mask[mask != 0] == float("-inf")).all())
        mask = mask == 0
    else:
        exact = drop == float("-inf")
        mask = ~mask if kind == "not" else mask
    rows = mask.reshape(-1, *mask.shape[-2:]) if mask.dim() >= 2 else None
    if rows is None or not bool((rows == rows[:1]).all()):
        return None
    return rows[0], exact


def _band(vis: Any) -> tuple[bool, int, int]:
    """(causal, offset, window) read off a [T,S] visibility; `_check_band` confirms it."""
    t = vis.shape[0]
    cut = (~vis[:, -1]).nonzero()
    if bool(vis.all()) or len(cut) == 0:
        return False, 0, 0
    row = int(cut[0])
    offset = int(vis[row].nonzero().max()) - row
    # the window: the widest run of keys among rows whose first visible key is not key 0
    window = 0
    for r in range(t):
        keys = vis[r].nonzero()
        if len(keys) and int(keys.min()) > 0:
            window = max(window, r + offset - int(keys.min()) + 1)
    return True, offset, window


def _check_band(c: Checks, vis: Any, at: Node | None) -> tuple[bool, int, int]:
    causal, offset, window = _band(vis)
    want = visible_reference(*vis.shape, causal, offset, window)
    diff = (want != vis).nonzero()
    if len(diff):
        t, s = (int(x) for x in diff[0])
        sees = "sees" if bool(vis[t, s]) else "does not see"
        shape = f"causal with offset {offset}" + (f" and window {window}" if window else "")
        c.need(False, "mask.positions", f"the position mask is not causal or a causal band: "
               f"query {t} {sees} key {s}, unlike {shape}", at)  # fmt: skip
    return causal, offset, window


def _place_masks(
    c: Checks, masks: Masks, sinks: bool, guarded: bool, rw: Rewriter
) -> tuple[dict, list]:
    """(attributes, [mask operand]) of the peeled masks: position masks, combined, become the
    causal/offset/window attributes; other masks stay operands (at most one).

    A query that sees no key gets 0 from the op; the model computes that too when its softmax
    has a sink, or is guarded (SDPA) and the mask drops to exactly -inf. Otherwise (NaN from an
    unguarded softmax, a uniform average under finfo.min) such a position mask is refused."""
    attrs: dict[str, Any] = {"causal": False, "offset": 0, "window": 0}
    operands: list[tuple[str, Value]] = []
    seen, exact, at = None, True, None
    for kind, m, drop in masks:
        value = _evaluate(c.view, m)
        vis = None if value is None else _visibility(kind, value, drop)
        if vis is None and kind == "not":
            operands.append(("bool", rw.op("logical_not", [m])))
            continue
        if vis is None:
            operands.append((kind, m))
            continue
        seen = vis[0] if seen is None else seen & vis[0]
        exact, at = exact and vis[1], at or c.view.producer(m)
    c.need(len(operands) <= 1, "mask", f"{len(operands)} input-dependent masks; the op takes one")
    if seen is None:
        return attrs, operands
    empty = (~seen.any(-1)).nonzero()
    if len(empty) and not (sinks or guarded and exact):
        c.need(False, "mask.positions", f"query {int(empty[0])} sees no key: the model's softmax "
               "gives NaN or a uniform average there, attn.sdpa 0", at)  # fmt: skip
    causal, offset, window = _check_band(c, seen, at)
    return {"causal": causal, "offset": offset, "window": window}, operands


# --- the rule -----------------------------------------------------------------------------------


def _grouped(c: Checks, q: Value, k: Value, v: Value, rw: Rewriter) -> list[Value]:
    """q, k, v as [B,Hq,T,D], [B,Hkv,S,D], [B,Hkv,S,Dv] from GQA by broadcasting: q viewed as
    [B,Hkv,G,T,D] against k, v [B,Hkv,1,S,D] (the group dim G = query head h % G)."""
    b, hkv, g, t, _ = q.type.shape
    ok = k.type.rank == 5 and v.type.rank == 5 and k.type.shape[2] == 1 == v.type.shape[2]
    ok = ok and k.type.shape[:2] == (b, hkv) == v.type.shape[:2]
    c.need(ok, "keys", f"q {q.type}, k {k.type}, v {v.type} are not GQA by broadcasting "
           "([B,Hkv,G,T,D] against [B,Hkv,1,S,D])", c.view.producer(k))  # fmt: skip
    out = []
    for x, heads in ((q, hkv * g), (k, hkv), (v, hkv)):
        shape = [b, heads, x.type.shape[3], x.type.shape[4]]
        src = c.view.producer(x)
        if src is not None and src.name == "reshape" and list(src.operands[0].type.shape) == shape:
            out.append(src.operands[0])  # the 4-D tensor the model grouped
        else:
            out.append(rw.op("reshape", [x], shape=shape))
    return out


def _lowerable(c: Checks, q: Value, k: Value, v: Value) -> None:
    """The backends' kernels take this attention: one float dtype, static heads up to
    KERNEL_HEAD_DIM (an op they could not lower would only run its reference)."""
    dtypes = {q.dtype, k.dtype, v.dtype}
    c.need(len(dtypes) == 1 and q.dtype.is_float, "lowering",
           f"q, k, v dtypes {sorted(d.value for d in dtypes)} differ")  # fmt: skip
    for x in (q, v):
        d = x.type.shape[-1]
        ok = isinstance(d, int) and d <= KERNEL_HEAD_DIM
        c.need(ok, "lowering", f"head dim {d} of %{x.name}: the kernels take static head dims "
               f"up to {KERNEL_HEAD_DIM}", c.view.producer(x))  # fmt: skip


def _attention(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """o = softmax(scale·q·kᵀ + masks [, sinks])·v, GQA by repeated KV heads -> attn.sdpa."""
    view, out = c.view, root.root.results[0]
    p, v_rep = root.root.operands
    rank = out.type.rank
    c.need(rank in (4, 5) and p.type.rank == rank, "output",
           f"P·V is {p.type} · {v_rep.type}, not [B,H,T,S] · [B,H,S,Dv]")  # fmt: skip
    z, sinks, guarded = _probs(c, p)
    c.need(rank == 4 or sinks is None, "probs.sinks", "sinks on heads grouped as [B,Hkv,G,T,S]")
    scores, masks = _masks(c, z)
    inner, softcap = _softcap(view, scores)
    q, k_rep, scale = _qk(c, inner)
    scale *= softcap or 1.0  # inside the tanh the logits are scale·q·kᵀ / softcap
    c.need(q.type.rank == rank, "logits.qk", f"q {q.type} is not rank {rank}",
           view.producer(scores))  # fmt: skip
    attrs, mask_ops = _place_masks(c, masks, sinks is not None, guarded, rw)
    c.need(rank == 4 or not mask_ops, "mask", "a mask tensor on heads grouped as [B,Hkv,G,T,S]")
    if rank == 5:
        q, k, v = _grouped(c, q, k_rep, v_rep, rw)
    else:
        k, _ = _kv_heads(c, "keys", k_rep)
        v, _ = _kv_heads(c, "values", v_rep)
    c.need(same_dim(k.type.shape[1], v.type.shape[1]), "values",
           f"keys have {k.type.shape[1]} heads, values {v.type.shape[1]}")  # fmt: skip
    _lowerable(c, q, k, v)
    operands = [q, k, v] + [m for _, m in mask_ops] + ([sinks] if sinks is not None else [])
    attrs.update(scale=scale, mask=mask_ops[0][0] if mask_ops else "none", sinks=sinks is not None,
                 softcap=softcap)  # fmt: skip
    c.fits("attn.sdpa", operands, attrs, [out if rank == 4 else None])
    o = rw.op("attn.sdpa", operands, **attrs)
    if rank == 5:  # back to the model's grouped view
        o = rw.op("reshape", [o], shape=list(out.type.shape))
    return replace(view, [(out, o)])


RULES = [
    # softmax(c·q·kᵀ + mask [, sinks])·v, with k, v repeated to the query heads -> attn.sdpa
    fusion_rule("fuse_sdpa.attn.sdpa", op("matmul"), _attention),
]


def fuse_sdpa(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace each dense attention (module docstring) by one `attn.sdpa` op."""
    return rewrite(g, RULES, ctx=ctx)
