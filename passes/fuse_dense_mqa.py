"""The dense-mask spelling of `attn.sparse_mqa` (Hugging Face's DeepSeek-V4 eager attention),
matched by `fuse_attention`'s sparse_mqa rule beside the gathered form.

    o = softmax([scale·q'·Eᵀ + M, sink])[:-1] · E,   E = [kv ++ comp] broadcast to the H heads

over every raw row and compressed entry, with an additive mask M [.., T, T+S]. A column j with
M[t, j] = 0 is an entry of query t; a column with M = -inf (or any value below -1e30: exp
underflows to exactly 0 once the row's max, a visible logit, is subtracted) is not. That is the
gathered form's math when the visible columns are the ones `attn.sparse_mqa` reads:

    M[:, :T]   the window band t-w < j <= t                       (data-independent: evaluated)
    M[:, T:]   hca: s < (t+1)//m (evaluated), or csa: 0 exactly at the indexer's picks —
               scatter(full(-inf), where(p >= 0, p, S), 0)[..., :S]

Data-independent masks (built from iotas and constants only, like HF's mask functions) are
evaluated at the graph's static shapes and compared with the band / block visibility; a mask
over a symbolic length cannot be evaluated, and the rule says so.
"""

from __future__ import annotations

from typing import Any

import ir
from ir import Graph, Value
from passes.fuse_common import Checks, FusionView
from passes.pattern import Match, const, op, var

__all__ = ["CSA_MASK", "DENSE", "csa_picks", "dense_entries", "hca_ratio", "window_of"]

MASKED_OUT = -1e30  # an additive mask value at or below this gives weight exactly 0

_HEADS = op("reshape", op("expand", op("reshape", var("entries", rank=4))), name="heads")
DENSE = op(
    "matmul",
    op(
        "slice",
        op(
            "softmax",
            op(
                "concat",
                op(
                    "add",
                    op("mul", op("matmul", var("qr", rank=4),
                                 op("permute", _HEADS, attrs={"dims": (0, 1, 3, 2)}), name="qk"),
                       const(name="scale")),
                    var("mask", rank=4),
                    commute=False,
                ),
                op("expand", op("reshape", var("sink", rank=1))),
                name="cat",
            ),
            name="softmax",
        ),
        name="probs",
        attrs={"start": 0, "end": -1, "step": 1},
    ),
    var("values"),
    name="pv",
)

CSA_MASK = op(
    "slice",
    op(
        "scatter",
        const(float("-inf"), name="fill"),
        op("reshape", op("where", op("ge", var("picks"), const(0)), var("picks"),
                         const(name="past"))),
        const(0),
        name="scatter",
    ),
    name="cut",
)


def evaluate(view: FusionView, v: Value, limit: int = 400) -> Any:
    """The tensor `v` holds when it depends on no graph input (only iotas and constants) and
    has a static shape, else None. Runs the reference interpreter on that subgraph."""
    if not all(isinstance(d, int) for d in v.type.shape):
        return None
    need, stack = {}, [v]
    while stack:
        x = stack.pop()
        n = view.producer(x)
        if n is None:
            return None
        if id(n) in need:
            continue
        need[id(n)] = n
        if len(need) > limit:
            return None
        stack.extend(n.operands)
    order = {id(n): i for i, n in enumerate(view.graph_ops)}
    ops = sorted(need.values(), key=lambda n: order.get(id(n), -1))
    if any(id(n) not in order for n in ops):
        return None
    (out,) = ir.interpret(Graph((), ops, (v,), name="mask"))
    return out


def _allowed(mask: Any) -> Any:
    """Boolean visibility of an additive mask [.., T, N] (None if some value is neither 0 nor
    masked out), reduced over its leading broadcast dims."""
    visible = mask == 0
    if not bool((visible | (mask <= MASKED_OUT)).all()):
        return None
    flat = visible.reshape(-1, *visible.shape[-2:])
    if not bool((flat == flat[0]).all()):
        return None
    return flat[0]


def _band(t: int, window: int, cols: int) -> Any:
    from ir._lazy import torch

    rows = torch.arange(t).unsqueeze(1)
    j = torch.arange(cols).unsqueeze(0)
    return (j <= rows) & (j > rows - window)


def _blocks(t: int, s: int, ratio: int) -> Any:
    from ir._lazy import torch

    rows = torch.arange(t).unsqueeze(1)
    return torch.arange(s).unsqueeze(0) < (rows + 1) // ratio


def window_of(c: Checks, mask: Value, t: int) -> int:
    """w when the evaluated mask [.., T, T] is the band t-w < j <= t (w <= T), else Miss."""
    vals = evaluate(c.view, mask)
    c.need(vals is not None, "mask.window",
           "the window mask depends on inputs or a symbolic length (cannot evaluate it)",
           c.view.producer(mask))
    allowed = _allowed(vals)
    c.need(allowed is not None, "mask.window", "the mask holds values other than 0 and -inf",
           c.view.producer(mask))
    w = int(allowed[-1].sum())
    ok = allowed.shape == (t, t) and bool((allowed == _band(t, w, t)).all())
    c.need(ok, "mask.window", f"the mask is not the causal band of {w} rows",
           c.view.producer(mask))
    return w


def hca_ratio(c: Checks, mask: Value, t: int, s: int, ratio: int) -> int:
    """`ratio` when the evaluated block mask [.., T, S] is s < (t+1)//ratio, else Miss."""
    vals = evaluate(c.view, mask)
    c.need(vals is not None, "mask.blocks", "the block mask depends on inputs (not hca)",
           c.view.producer(mask))
    allowed = _allowed(vals)
    ok = allowed is not None and allowed.shape == (t, s)
    ok = ok and bool((allowed == _blocks(t, s, ratio)).all())
    c.need(ok, "mask.blocks", f"the block mask is not s < (t+1)//{ratio}", c.view.producer(mask))
    return ratio


def csa_picks(c: Checks, mask: Value, s: Any) -> Value:
    """The picks [B, T, k] when mask = scatter(-inf, picks or S, 0)[..., :S], else Miss."""
    m = c.match("mask.picks", CSA_MASK, mask)
    cut, sc = m.node("cut").attrs, m.node("scatter").attrs
    past = m.node("past").attrs.get("value")
    ok = cut["dim"] in (-1, 3) and (cut["start"], cut["end"], cut["step"]) == (0, s, 1)
    ok = ok and sc["dim"] in (-1, 3) and past == s
    c.need(ok, "mask.picks", f"picks past {s} are not dropped by the mask's last column",
           m.node("cut"))
    return m["picks"]


def dense_entries(c: Checks, m: Match) -> tuple[Value, Value | None, Value]:
    """(kv [B,1,T,c], comp [B,1,S,c] or None, mask) of a matched DENSE attention whose keys
    and values are the same entries broadcast over the heads."""
    view = c.view
    entries = m["entries"]
    c.need(entries.type.shape[1] == 1, "entries", f"entries {entries.type} are not one KV head",
           view.producer(entries))
    c.need(m["values"] == m["heads"], "entries", "keys and values are different tensors",
           m.node("pv"))
    cat = view.producer(entries)
    if cat is not None and cat.name == "concat" and cat.attrs["dim"] in (2, -2):
        c.need(len(cat.operands) == 2, "entries", "entries are not [window ++ compressed]", cat)
        return cat.operands[0], cat.operands[1], m["mask"]
    return entries, None, m["mask"]
