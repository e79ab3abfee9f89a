"""Fuse manifold-constrained hyper-connections into `hc.pre`, `hc.post` and `hc.head`.

Matches the canonical form (after `canonicalize`) of models/hc.py:

    flat = reshape(X)                               mix = (flat @ fnᵀ) * rsqrt(mean(flat²) + ε₁)
    pre  = sigmoid(mix[:n]·α₀ + base[:n]) + ε       post = 2·sigmoid(mix[n:2n]·α₁ + base[n:2n])
    comb = Sinkhorn(reshape(mix[2n:]·α₂ + base[2n:]))    (softmax + ε, then divisions by sum + ε
                                                          along columns / rows, any count)
    y    = Σ_j reshape(pre)_j · X_j                 -> hc.pre(X, fn, scale, base) = (y, post, comb)

    out  = reshape(post)·reshape(f) + reshape(reshape(permute(comb))ᵀ-matmul reshape(R))
                                                    -> hc.post(f, R, post, comb)
    y    = Σ_j reshape(sigmoid(mix·α + base) + ε)_j · X_j     -> hc.head(X, fn, scale, base)

Hugging Face's spelling (transformers' DeepseekV4HyperConnection / HyperHead) meets the same
patterns through alternatives, each an identity: the RMS factor before the projection,
(flat·r)·fnᵀ = (flat·fnᵀ)·r for one r per row; unbind's scale picks, reshape(scale[i:i+1]) =
scale[i]; the comb split before the affine map, reshape(s·α + b) = reshape(s)·α + reshape(b);
and the first layer's expanded streams, whose weighted sum canonicalize rewrote to read the
unexpanded X₀ (pre ⊙ expand(X₀) = pre ⊙ X₀).

The Sinkhorn chain is walked forward from the softmax and its length becomes the `iters`
attribute: the op keeps the loop, the graph loses the 6·iters unrolled ops. A chain that breaks
the column/row alternation is taken up to its last good column step (the rest stays in the
graph); one that starts on the rows is not hc.pre's. Rules (and counters): `fuse_hc.hc.pre`,
`fuse_hc.hc.post`, `fuse_hc.hc.head`; every non-match returns a Fail naming the sub-pattern.
"""

from __future__ import annotations

from ir import Graph, Node, Value
from passes.context import PassContext
from passes.fuse_common import (
    Checks,
    FusionView,
    Miss,
    const_value,
    fusion_rule,
    replace,
    scalar,
)
from passes.pattern import Match, const, either, op, var
from passes.rewrite import Replace, Rewriter, rewrite

__all__ = ["RULES", "fuse_hc"]

_BCAST = ("reshape", "unsqueeze")


def _rms_rows(m: Match) -> bool | str:
    """The RMS factor is one per row of the flattened stream (mean over its last dim), the
    condition under which it commutes with the projection."""
    flat, ms = m["flat"], m.node("ms")
    rank = ms.operands[0].type.rank
    dims = tuple(d % rank for d in ms.attrs["dims"])
    if dims != (rank - 1,):
        return f"the RMS mean runs over dims {list(dims)}, not the last dim ({rank - 1})"
    return m["rs"].type.shape == flat.type.shape[:-1] + (1,) or f"RMS factor {m['rs'].type}"


def _mix_pattern() -> object:
    """mix = (flat·fnᵀ)·r with r = rsqrt(mean(flat²) + ε₁) per row (models/hc.py), or HF's
    (flat·r)·fnᵀ: (diag(r)·F)·Wᵀ = diag(r)·(F·Wᵀ), so both spellings are one `hc.*` op."""
    flat = op("reshape", var("x"), name="flat")
    ms = op("mean", op("mul", flat, flat), attrs={"keepdim": True}, name="ms")
    rs = op("rsqrt", op("add", ms, const(name="norm_eps")), name="rs")
    fn_t = op("permute", var("fn"), attrs={"dims": (1, 0)})
    return either(
        op("mul", op("matmul", flat, fn_t), rs, name="mix", where=_rms_rows),
        op("matmul", op("mul", flat, rs), fn_t, name="mix", where=_rms_rows),
    )


def _pick(name: str) -> object:
    """α_i of the [3] scale: select(scale, 0, i), or HF's unbind, reshape(scale[i:i+1], [])."""
    return either(
        op("select", var("scale"), name=name),
        op("reshape", op("slice", var("scale"), name=name), rank=0),
    )


def _weighted_sum(pre) -> object:
    """Σ_j pre_j · X_j spelled sum(mul(reshape(pre), X), dims=[-2]); X is `xs`, the streams the
    mix flattens or, where those are expand(X₀), X₀ (canonicalize drops an expand feeding a
    broadcasting op: pre ⊙ expand(X₀) = pre ⊙ X₀)."""
    mul = op("mul", op(_BCAST, pre, name="pre_b"), var("xs"))
    return op("sum", mul, attrs={"keepdim": False})


def _gate(part: str, mix) -> object:
    """mix[part]·α + base[part] (the slices' bounds are checked by the rule)."""
    return op(
        "add",
        op("mul", op("slice", mix, name=f"s_{part}"), _pick(f"a_{part}")),
        op("slice", var("base"), name=f"b_{part}"),
    )


MIX = _mix_pattern()
PRE = _weighted_sum(op("add", op("sigmoid", _gate("pre", MIX)), const(name="eps")))
POST = op("mul", op("sigmoid", _gate("post", var("mix"))), const(2.0))
# Sinkhorn's logits, split into the n×n matrix after the affine map (ours) or before it (HF's
# comb_w.view(.., n, n)·α + base.view(n, n)): reshape(s·α + b) = reshape(s)·α + reshape(b).
COMB_LOGITS = either(
    op("softmax", op("reshape", _gate("comb", var("mix")), name="r_comb")),
    op(
        "softmax",
        op(
            "add",
            op(
                "mul",
                op("reshape", op("slice", var("mix"), name="s_comb"), name="r_comb"),
                _pick("a_comb"),
            ),
            op("reshape", op("slice", var("base"), name="b_comb"), name="rb_comb"),
        ),
    ),
)
HEAD = _weighted_sum(
    op(
        "add",
        op("sigmoid", op("add", op("mul", MIX, var("scale", rank=1)), var("base"))),
        const(name="eps"),
    )
)
_POST_F = op("mul", op(_BCAST, var("post"), name="post_b"), op(_BCAST, var("f"), name="f_b"))
POST_MIXES = (  # combᵀ·R flattened to 3-D batches (einsum) or as one batched matmul
    op(
        "add",
        _POST_F,
        op(
            "reshape",
            op(
                "matmul",
                op("reshape", op("permute", var("comb"), name="comb_t")),
                op("reshape", var("res")),
            ),
        ),
    ),
    op("add", _POST_F, op("matmul", op("permute", var("comb"), name="comb_t"), var("res"))),
)


def _slice_ok(m: Match, name: str, start: int, end: int) -> bool:
    n = m.node(name)
    v = n.operands[0]
    return (
        n.attrs["dim"] in (-1, v.type.rank - 1)
        and n.attrs["start"] == start
        and n.attrs["end"] in (end, None)
        and n.attrs["step"] == 1
    )


def _pick_ok(m: Match, name: str, index: int) -> bool:
    """Capture `name` (a `_pick`) reads scale[index]."""
    n = m.node(name)
    if n.name == "select":
        return n.attrs["dim"] == 0 and n.attrs["index"] == index
    bounds = (n.attrs["start"], n.attrs["end"], n.attrs["step"])
    return n.attrs["dim"] == 0 and bounds == (index, index + 1, 1)


def _sum_over_streams(root: Node, x: Value) -> bool:
    return root.attrs["dims"] in ((x.type.rank - 2,), (-2,))


def _streams(c: Checks, m: Match, name: str) -> tuple[int, int]:
    """(n, d) of the matched streams X [.., n, d]; the mix must flatten exactly (n, d)."""
    x, xs = m["x"], m["xs"]
    c.need(x.type.rank >= 3, name, f"streams {x.type} have no [.., n, d] layout")
    grown = c.view.producer(x)
    ok = xs == x or (grown is not None and grown.name == "expand" and grown.operands[0] == xs)
    c.need(ok, f"{name}.streams", f"Σ_j pre_j·X_j reads %{xs.name}, the mix flattens %{x.name}")
    n, d = x.type.shape[-2], x.type.shape[-1]
    c.need(isinstance(n, int) and isinstance(d, int), name, f"n={n}, d={d} are not static")
    flat = m["flat"].type.shape
    c.need(flat == x.type.shape[:-2] + (n * d,), f"{name}.mix", f"{flat} does not flatten (n, d)")
    c.need(_sum_over_streams(m.root, x), name, "the weighted sum does not run over the streams")
    ok = m["pre_b"].type.shape == x.type.shape[:-1] + (1,)
    c.need(ok, f"{name}.weights", f"the stream weights {m['pre_b'].type} do not broadcast over d")
    return n, d


def _pre_ok(m: Match, n: int) -> bool:
    return _slice_ok(m, "s_pre", 0, n) and _slice_ok(m, "b_pre", 0, n) and _pick_ok(m, "a_pre", 0)


def _sinkhorn(c: Checks, soft: Value, eps: float) -> tuple[Value, int]:
    """Walk `softmax -> +eps -> (÷ column sums) -> [(÷ row sums), (÷ column sums)]*` forward;
    returns (the value after the last column step of the alternation, iteration count). Steps
    after the alternation breaks stay in the graph, reading that value."""
    view = c.view
    add = view.only_user(soft, "add")
    ok = add is not None and const_value(view, add.operands[1]) == eps
    c.need(ok, "comb.sinkhorn", f"the softmax is not followed by + ε ({eps}) alone", add)
    m = add.results[0]
    rank = m.type.rank
    axes, values, sums = [], [], []
    while (step := _norm_step(view, m, eps)) is not None:
        axis, m, total = step
        axes.append(axis)
        values.append(m)
        sums.append(total)
    c.need(axes, "comb.sinkhorn", f"no m / (sum(m) + {eps}) step after softmax + ε", add)
    want = [rank - 2 if i % 2 == 0 else rank - 1 for i in range(len(axes))]
    good = 0
    while good < len(axes) and axes[good] == want[good]:
        good += 1
    good -= 1 if good % 2 == 0 else 0  # must end on a column step
    reason = f"step 1 normalises dim {axes[0]}; Sinkhorn starts with the columns (dim {rank - 2})"
    c.need(good >= 1, "comb.sinkhorn", reason, sums[0])
    return values[good - 1], (good + 1) // 2


def _norm_step(view: FusionView, m: Value, eps: float) -> tuple[int, Value, Node] | None:
    """m / (sum(m, dims=[a], keepdim) + eps) -> (a, result, the sum)."""
    users = view.users(m)
    if len(users) != 2 or m.name in view.outputs:
        return None
    total = next((u for u in users if u.name == "sum"), None)
    div = next((u for u in users if u.name == "div" and u.operands[0] == m), None)
    if total is None or div is None or not total.attrs["keepdim"] or len(total.attrs["dims"]) != 1:
        return None
    add = view.only_user(total.results[0], "add")
    if add is None or const_value(view, add.operands[1]) != eps:
        return None
    if div.operands[1] != add.results[0]:
        return None
    return total.attrs["dims"][0] % m.type.rank, div.results[0], total


def _posts(view: FusionView) -> dict[str, list[tuple[Match, Value]]]:
    """Every `2·sigmoid(mix[..]·α + base[..])`, by the name of its mix (one sweep)."""
    out: dict[str, list[tuple[Match, Value]]] = {}
    for node in view.graph_ops:
        if node.name != "mul":
            continue
        m = view.matches(POST, node.results[0])
        if m is not None:
            out.setdefault(m["mix"].name, []).append((m, node.results[0]))
    return out


def _find_post(posts: dict, mix: Value, n: int) -> Value | None:
    for m, value in posts.get(mix.name, ()):
        ok = _slice_ok(m, "s_post", n, 2 * n) and _slice_ok(m, "b_post", n, 2 * n)
        if ok and _pick_ok(m, "a_post", 1):
            return value
    return None


def _softmaxes(view: FusionView, mix: Value) -> list[Value]:
    """Softmaxes reached from a slice of `mix` through single-use ops (at most three: the
    affine map and a reshape, in either order)."""
    out = []
    for s in view.users(mix):
        v = s.results[0] if s.name == "slice" else None
        for _ in range(4):
            u = None if v is None else view.only_user(v)
            v = None if u is None else u.results[0]
            if u is not None and u.name == "softmax":
                out.append(v)
                break
    return out


def _find_comb(c: Checks, mix: Value, n: int, eps: float) -> tuple[Value, int]:
    """The Sinkhorn comb of `mix` and its iteration count, or a Miss saying what is missing."""
    softs = _softmaxes(c.view, mix)
    c.need(softs, "comb", "no softmax of a slice of this mix (Sinkhorn's logits)")
    for i, soft in enumerate(softs):
        score = c.score
        try:
            return _comb_at(c, soft, mix, n, eps)
        except Miss:
            if i == len(softs) - 1:
                raise
            c.score = score
    raise AssertionError("unreachable")


def _comb_at(c: Checks, soft: Value, mix: Value, n: int, eps: float) -> tuple[Value, int]:
    m = c.match("comb", COMB_LOGITS, soft)
    c.need(m["mix"] == mix, "comb", f"the softmax reads %{m['mix'].name}, not this mix")
    rows = (2 * n, (2 + n) * n)
    ok = _slice_ok(m, "s_comb", *rows) and _slice_ok(m, "b_comb", *rows)
    c.need(ok and _pick_ok(m, "a_comb", 2), "comb.slices", f"logits do not read [{rows}], α₂")
    lead = mix.type.shape[:-1]
    ok = m["r_comb"].type.shape == lead + (n, n)
    if "rb_comb" in m:
        b = m["rb_comb"].type.shape
        ok = ok and b[-2:] == (n, n) and all(d == 1 for d in b[:-2]) and len(b) <= len(lead) + 2
    c.need(ok, "comb.reshape", f"the logits are not split into [.., {n}, {n}] row-major")
    rank, dim = soft.type.rank, c.view.producer(soft).attrs["dim"]
    c.need(dim % rank == rank - 1, "comb.softmax", f"softmax over dim {dim}, not the rows")
    return _sinkhorn(c, soft, eps)


def _pre(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """y = Σ_j (sigmoid(mix[:n]·α₀ + b) + ε)_j X_j, post and Sinkhorn comb of the same mix."""
    view, y = c.view, root.root.results[0]
    m = c.match("pre", PRE, y)
    n, _ = _streams(c, m, "pre")
    eps, norm_eps = scalar(m, "eps"), scalar(m, "norm_eps")
    c.need(eps is not None and norm_eps is not None, "pre", "ε or the norm's ε is not constant")
    c.need(_pre_ok(m, n), "pre.slices", f"pre does not read mix[..., :{n}]·α₀ + base[:{n}]")
    post = _find_post(view.memo("hc.posts", lambda: _posts(view)), m["mix"], n)
    c.need(post is not None, "post", f"no 2·sigmoid(mix[{n}:{2 * n}]·α₁ + base) of this mix")
    comb, iters = _find_comb(c, m["mix"], n, eps)
    attrs = {"iters": iters, "eps": eps, "norm_eps": norm_eps}
    operands = [m["x"], m["fn"], m["scale"], m["base"]]
    c.fits("hc.pre", operands, attrs, (y, post, comb))
    return replace(view, list(zip((y, post, comb), rw.op("hc.pre", operands, **attrs))))


def _head(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """y = Σ_j (sigmoid(mix·α + base) + ε)_j X_j -> hc.head."""
    view, y = c.view, root.root.results[0]
    m = c.match("head", HEAD, y)
    _streams(c, m, "head")
    eps, norm_eps = scalar(m, "eps"), scalar(m, "norm_eps")
    c.need(eps is not None and norm_eps is not None, "head", "ε or the norm's ε is not constant")
    operands, attrs = [m["x"], m["fn"], m["scale"], m["base"]], {"eps": eps, "norm_eps": norm_eps}
    c.fits("hc.head", operands, attrs, (y,))
    return replace(view, [(y, rw.op("hc.head", operands, **attrs))])


def _post(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """out = post ⊗ f + combᵀ·R -> hc.post."""
    view, out = c.view, root.root.results[0]
    m = c.match("post", either(*POST_MIXES), out)
    res, f, post, comb = m["res"], m["f"], m["post"], m["comb"]
    r = res.type.rank
    c.need(r >= 3 and out.type.shape == res.type.shape, "post", f"R is {res.type}, out {out.type}")
    lead, n, d = res.type.shape[:-2], res.type.shape[-2], res.type.shape[-1]
    swap = tuple(range(r - 2)) + (r - 1, r - 2)
    reshape_f = f.type.shape != lead + (d,) and f.type.dtype == res.type.dtype
    ok = (
        post.type.shape == lead + (n,)
        and comb.type.shape == lead + (n, n)
        and m["post_b"].type.shape == lead + (n, 1)
        and m["f_b"].type.shape == lead + (1, d)
    )
    c.need(ok, "post.shapes", f"post {post.type}, comb {comb.type} do not fit R {res.type}")
    c.need(m.attr("comb_t", "dims") == swap, "post.comb_t", "comb is not transposed (combᵀ·R)")
    if reshape_f:  # e.g. the MoE's [B*T, d] output
        f = rw.op("reshape", [f], shape=lead + (d,))
    return replace(view, [(out, rw.op("hc.post", [f, res, post, comb]))])


RULES = [
    # Σ_j pre_j X_j with pre, post, comb from one normalised mix (Sinkhorn kept as a loop)
    fusion_rule("fuse_hc.hc.pre", op("sum"), _pre),
    # post ⊗ f + combᵀ·R
    fusion_rule("fuse_hc.hc.post", op("add"), _post),
    # Σ_j (sigmoid(mix·α + base) + ε)_j X_j
    fusion_rule("fuse_hc.hc.head", op("sum"), _head),
]


def fuse_hc(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Replace every mHC pre/post/head subgraph by its op (module docstring)."""
    return rewrite(g, RULES, ctx=ctx)
