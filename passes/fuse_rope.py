"""Patterns shared by the attention fusions (fuse_attention, fuse_compress, fuse_compress_step):
rotary embedding on interleaved pairs and RMSNorm in their canonical forms, iotas and unit views.

    rope(v; cos, sin) = concat(v[..., :-r], reshape(concat(re, im)))   interleaved pairs (a, b):
                        re = a·cos - b·sin, im = a·sin + b·cos; inverse: sin -> neg(sin)
    rmsnorm(p)        = p · rsqrt(mean(p²) + ε) · w
"""

from __future__ import annotations

from typing import Any

from ir import Node, Value
from ir.symbolic import same_dim
from passes.fuse_common import STEP, Checks, FusionView, narrow
from passes.pattern import const, op, var

__all__ = ["RMS", "ROPES", "iota_ok", "match_rope", "unit_dims", "unit_view"]


# --- views and iotas -----------------------------------------------------------------------


def iota_ok(view: FusionView, v: Value, end: Any) -> bool:
    """v = iota(0, end), possibly viewed with extra unit dims (HF's position_ids [1, T])."""
    n = view.producer(v)
    while n is not None and n.name == "reshape" and unit_view(n):
        n = view.producer(n.operands[0])
    if n is None or n.name != "iota":
        return False
    a = n.attrs
    return a["start"] == 0 and a["step"] == 1 and same_dim(a["end"], end)


def unit_view(n: Node) -> bool:
    """A reshape that only adds or drops unit dims."""
    src = [d for d in n.operands[0].type.shape if d != 1]
    dst = [d for d in n.results[0].type.shape if d != 1]
    return len(src) == len(dst) and all(same_dim(a, b) for a, b in zip(src, dst))


def unit_dims(view: FusionView, v: Value) -> Value:
    """v before reshapes that only add or drop unit dims."""
    n = view.producer(v)
    while n is not None and n.name == "reshape" and unit_view(n):
        v = n.operands[0]
        n = view.producer(v)
    return v


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


def match_rope(c: Checks, name: str, v: Value, inverse: bool) -> dict[str, Any]:
    """-> {x, cos, sin} when v = rope(x) (`inverse`: the inverse rotation, sin -> -sin) over
    the last 2·cos.shape[-1] channels; raises `Miss` naming sub-pattern `name` otherwise."""
    view = c.view
    m = c.match(name, ROPES[narrow(v)], v)
    sb = m["sb"]
    neg = view.producer(sb)
    is_inverse = neg is not None and neg.name == "neg"
    if is_inverse:
        sb = neg.operands[0]
    if is_inverse != inverse:  # the other direction: not a near miss of this rule
        c.score -= STEP  # (the pattern matched, the direction does not)
        want = "an inverse rope (sin negated)" if inverse else "a rope (sin not negated)"
        c.need(False, name, f"expected {want}", m.node("out"))
    x, rank = m["x"], m["x"].type.rank
    last = (-1, rank - 1)
    ok = m.attr("out", "dim") in last and m.attr("keep", "dim") in last
    ok = ok and m.attr("a", "dim") in (-1, rank) and m.attr("b", "dim") in (-1, rank)
    c.need(ok, name, "the rotated pairs are not the last channels of x", m.node("out"))
    cos, sin = _unbroadcast(view, m["cb"]), _unbroadcast(view, sb)
    ok = cos.type.rank == 2 and cos.type == sin.type and isinstance(cos.type.shape[1], int)
    c.need(ok, f"{name}.table", f"cos {cos.type} and sin {sin.type} are not one [T, r/2] table")
    rope = 2 * cos.type.shape[1]
    width = x.type.shape[-1]
    rot, keep = m.node("rot").attrs, m.node("keep").attrs
    ok = (rot["start"], rot["step"], keep["start"], keep["step"]) == (-rope, 1, 0, 1)
    ok = ok and keep["end"] in (-rope, width - rope if isinstance(width, int) else None)
    ok = ok and m["pairs"].type.shape[-2:] == (rope // 2, 2)
    c.need(ok, f"{name}.channels", f"the rotation does not cover the last {rope} channels")
    return {"x": x, "cos": cos, "sin": sin}


RMS = op(
    "mul",
    op(
        "mul",
        var("p"),
        op("rsqrt", op("add", op("mean", op("mul", var("p"), var("p"))), const(name="eps"))),
    ),
    var("norm", rank=1),
)
