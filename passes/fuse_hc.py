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

The Sinkhorn chain is walked forward from the softmax and its length becomes the `iters`
attribute: the op keeps the loop, the graph loses the 6·iters unrolled ops. Rules (and
counters): `fuse_hc.hc.pre`, `fuse_hc.hc.post`, `fuse_hc.hc.head`.
"""

from __future__ import annotations

from ir import Graph, Value
from passes.context import PassContext
from passes.fuse_common import Checks, FusionView, const_value, fusion_rule, replace, scalar
from passes.pattern import Match, const, either, op, var
from passes.rewrite import Replace, Rewriter, rewrite

__all__ = ["RULES", "fuse_hc"]

_BCAST = ("reshape", "unsqueeze")


def _mix_pattern() -> object:
    flat = op("reshape", var("x"), name="flat")
    ms = op("mean", op("mul", flat, flat), attrs={"keepdim": True})
    rs = op("rsqrt", op("add", ms, const(name="norm_eps")))
    gemm = op("matmul", flat, op("permute", var("fn"), attrs={"dims": (1, 0)}))
    return op("mul", gemm, rs, name="mix")


def _weighted_sum(pre) -> object:
    """Σ_j pre_j · X_j spelled sum(mul(reshape(pre), X), dims=[-2])."""
    return op("sum", op("mul", op(_BCAST, pre, name="pre_b"), var("x")), attrs={"keepdim": False})


MIX = _mix_pattern()
PRE = _weighted_sum(
    op(
        "add",
        op(
            "sigmoid",
            op(
                "add",
                op("mul", op("slice", MIX, name="s_pre"), op("select", var("scale"), name="a_pre")),
                op("slice", var("base"), name="b_pre"),
            ),
        ),
        const(name="eps"),
    )
)
POST = op(
    "mul",
    op(
        "sigmoid",
        op(
            "add",
            op("mul", op("slice", var("mix"), name="s_post"), op("select", var("scale"), name="a")),
            op("slice", var("base"), name="b_post"),
        ),
    ),
    const(2.0),
)
COMB_LOGITS = op(
    "softmax",
    op(
        "reshape",
        op(
            "add",
            op("mul", op("slice", var("mix"), name="s_comb"), op("select", var("scale"), name="a")),
            op("slice", var("base"), name="b_comb"),
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


def _select_ok(m: Match, name: str, index: int) -> bool:
    n = m.node(name)
    return n.attrs["dim"] == 0 and n.attrs["index"] == index


def _sum_over_streams(root: Node, x: Value) -> bool:
    return root.attrs["dims"] in ((x.type.rank - 2,), (-2,))


def _pre_ok(m: Match, n: int) -> bool:
    x = m["x"]
    return (
        _slice_ok(m, "s_pre", 0, n)
        and _slice_ok(m, "b_pre", 0, n)
        and _select_ok(m, "a_pre", 0)
        and m["pre_b"].type.shape == x.type.shape[:-1] + (1,)
        and _sum_over_streams(m.root, x)
    )


def _sinkhorn(view: FusionView, start: Value, eps: float) -> tuple[Value, int] | None:
    """Walk `softmax -> +eps -> (÷ column sums) -> [(÷ row sums), (÷ column sums)]*` forward;
    returns (last value after a column step, iteration count) or None."""
    add = view.only_user(start, "add")
    if add is None or const_value(view, add.operands[1]) != eps:
        return None
    m = add.results[0]
    rank = m.type.rank
    axes, values = [], []
    while True:
        step = _norm_step(view, m, eps)
        if step is None:
            break
        axis, m = step
        axes.append(axis)
        values.append(m)
    want = [rank - 2 if i % 2 == 0 else rank - 1 for i in range(len(axes))]
    good = 0
    while good < len(axes) and axes[good] == want[good]:
        good += 1
    if good % 2 == 0:  # must end on a column step
        good -= 1
    if good < 1:
        return None
    return values[good - 1], (good + 1) // 2


def _norm_step(view: FusionView, m: Value, eps: float) -> tuple[int, Value] | None:
    """m / (sum(m, dims=[a], keepdim) + eps) -> (a, result)."""
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
    return total.attrs["dims"][0] % m.type.rank, div.results[0]


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
        if ok and _select_ok(m, "a", 1):
            return value
    return None


def _find_comb(view: FusionView, mix: Value, n: int, eps: float) -> tuple[Value, int] | None:
    for s in view.users(mix):
        if s.name != "slice":
            continue
        soft = _only_user_chain(view, s.results[0], ("mul", "add", "reshape", "softmax"))
        if soft is None:
            continue
        m = view.matches(COMB_LOGITS, soft)
        ok = m is not None and m["mix"] == mix and _select_ok(m, "a", 2)
        ok = ok and _slice_ok(m, "s_comb", 2 * n, (2 + n) * n)
        ok = ok and _slice_ok(m, "b_comb", 2 * n, (2 + n) * n)
        rank = soft.type.rank
        ok = ok and soft.type.shape[-2:] == (n, n)
        ok = ok and view.producer(soft).attrs["dim"] % rank == rank - 1
        if ok:
            return _sinkhorn(view, soft, eps)
    return None


def _only_user_chain(view: FusionView, v: Value, mnemonics: tuple[str, ...]) -> Value | None:
    for mn in mnemonics:
        u = view.only_user(v, mn)
        if u is None:
            return None
        v = u.results[0]
    return v


def _pre(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """y = Σ_j (sigmoid(mix[:n]·α₀ + b) + ε)_j X_j, post and Sinkhorn comb of the same mix."""
    view, y = c.view, root.root.results[0]
    m = c.match("pre", PRE, y)
    c.need(m["x"].type.rank >= 3, "pre", f"streams {m['x'].type} have no [.., n, d] layout")
    n = m["x"].type.shape[-2]
    eps, norm_eps = scalar(m, "eps"), scalar(m, "norm_eps")
    c.need(isinstance(n, int), "pre", f"the stream count {n} is not static")
    c.need(eps is not None and norm_eps is not None, "pre", "ε or the norm's ε is not constant")
    c.need(_pre_ok(m, n), "pre.slices", f"pre does not read mix[..., :{n}] summed over streams")
    post = _find_post(view.memo("hc.posts", lambda: _posts(view)), m["mix"], n)
    c.need(post is not None, "post", f"no 2·sigmoid(mix[{n}:{2 * n}]·α₁ + base) of this mix")
    comb = _find_comb(view, m["mix"], n, eps)
    c.need(comb is not None, "comb", "no Sinkhorn(softmax(mix[2n:]·α₂ + base)) of this mix")
    attrs = {"iters": comb[1], "eps": eps, "norm_eps": norm_eps}
    out = rw.op("hc.pre", [m["x"], m["fn"], m["scale"], m["base"]], **attrs)
    return replace(view, list(zip((y, post, comb[0]), out)))


def _head(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """y = Σ_j (sigmoid(mix·α + base) + ε)_j X_j -> hc.head."""
    view, y = c.view, root.root.results[0]
    m = c.match("head", HEAD, y)
    x = m["x"]
    c.need(x.type.rank >= 3 and _sum_over_streams(root.root, x), "head", "not a sum over streams")
    eps, norm_eps = scalar(m, "eps"), scalar(m, "norm_eps")
    c.need(eps is not None and norm_eps is not None, "head", "ε or the norm's ε is not constant")
    ok = m["pre_b"].type.shape == x.type.shape[:-1] + (1,)
    c.need(ok, "head.weights", f"the stream weights {m['pre_b'].type} do not broadcast over d")
    out = rw.op("hc.head", [x, m["fn"], m["scale"], m["base"]], eps=eps, norm_eps=norm_eps)
    return replace(view, [(y, out)])


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
