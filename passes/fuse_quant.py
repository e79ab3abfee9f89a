"""Fold block-scaled FP8 dequantisation into the GEMM that consumes it: `linalg.matmul_fp8`.

Matches (the capture of `models.quant.FP8Linear`, `F.linear(x, dequantize_blocks(w, s))`):

    matmul(x [.., K], permute(mul(cast(w: f8e4m3 [N,K], f32), S), dims=[1, 0]))
    S = slice?(slice?(reshape(expand(view(s [R,C]) [R,1,C,1], [R,b,C,b]), [R·b, C·b])))

where `view` is any reshape/unsqueeze chain, the slices keep [:N, :K] and b is the block size
(R = ceil(N/b), C = ceil(K/b)). Rewrites it to `reshape(linalg.matmul_fp8(reshape(x, [M, K]),
w, s), [.., N])`, so the weight is read as 1 byte per element by the kernel instead of being
materialised in fp32. Holds after: same values (the op's reference is the matched computation,
up to the order of the fp32 sum). x must be f32/bf16/f16; s must be f32.
"""

from __future__ import annotations

from typing import Any

from ir import DType, Graph, Value
from passes.context import PassContext
from passes.pattern import Fail, Match, Rule, op, var
from passes.rewrite import Rewriter, rewrite

__all__ = ["fuse_quant", "RULES"]

_DEQ = op(
    "mul",
    op("cast", var("w", dtype=DType.f8e4m3), name="up", dtype=DType.f32),
    var("s_full", rank=2),
    name="deq",
)
_ROOT = op(
    "matmul",
    var("x", dtype={DType.f32, DType.bf16, DType.f16}),
    op("permute", _DEQ, name="wt", attrs={"dims": lambda d: tuple(d) == (1, 0)}),
    name="y",
)
_VIEWS = ("reshape", "unsqueeze")


def _block_scale(m: Match, n: int, k: int) -> tuple[Value, int] | Fail:
    """(s [R,C], block b) when m["s_full"] is s expanded to b×b blocks and cut to [n, k]."""
    v = m["s_full"]
    node = m.producer(v)
    while node is not None and node.name == "slice":  # [:N] / [:K] of the padded blocks
        a = node.attrs
        if a["start"] != 0 or a["step"] != 1:
            return Fail(5, "scale.slice", f"the scale slice {a} is not a [:end] prefix", node)
        v, node = node.operands[0], m.producer(node.operands[0])
    if node is None or node.name != "reshape" or v.type.rank != 2:
        return Fail(5, "scale.blocks", "the scale is not a [R·b, C·b] reshape of block scales",
                    node)
    expand = m.producer(node.operands[0])
    if expand is None or expand.name != "expand" or expand.results[0].type.rank != 4:
        return Fail(6, "scale.expand", "the block scales are not expanded to [R, b, C, b]", node)
    r, b, c, b2 = expand.results[0].type.shape
    ok = all(isinstance(d, int) for d in (r, b, c, b2)) and b == b2
    if not ok or (r, c) != (-(-n // b), -(-k // b)):
        return Fail(7, "scale.shape", f"expanded scales {expand.results[0].type} are not "
                    f"[ceil({n}/b), b, ceil({k}/b), b]", expand)
    src = expand.operands[0]
    if tuple(src.type.shape) != (r, 1, c, 1):
        return Fail(7, "scale.expand", f"expand source {src.type} is not [{r},1,{c},1]", expand)
    src_node = m.producer(src)
    while src_node is not None and src_node.name in _VIEWS and src.type.rank != 2:
        src, src_node = src_node.operands[0], m.producer(src_node.operands[0])
    if tuple(src.type.shape) != (r, c) or src.type.dtype != DType.f32:
        return Fail(8, "scale.source", f"the block scales {src.type} are not f32[{r},{c}]", expand)
    return src, b


def _matmul_fp8(m: Match, rw: Rewriter) -> Any:
    """matmul(x, dequant(w, s)ᵀ) = linalg.matmul_fp8(x, w, s) (x flattened to [M, K])."""
    w, x = m["w"], m["x"]
    n, k = w.type.shape
    if not (isinstance(n, int) and isinstance(k, int)):
        return Fail(4, "w", f"the FP8 weight {w.type} has a symbolic shape", m.node("deq"))
    if x.type.rank < 2:
        return Fail(4, "x", f"x {x.type} is 1-D; expected [.., K]", m.node("y"))
    found = _block_scale(m, n, k)
    if isinstance(found, Fail):
        return found
    scale, block = found
    lead = x.type.shape[:-1]
    rows: Any = 1
    for d in lead:
        rows = rows * d
    flat = x if x.type.rank == 2 else rw.op("reshape", [x], shape=(rows, k))
    y = rw.op("linalg.matmul_fp8", [flat, w, scale], block=block)
    return [y if x.type.rank == 2 else rw.op("reshape", [y], shape=(*lead, n))]


RULES = [
    # x @ (f32(w) · expand(s))ᵀ = linalg.matmul_fp8(x, w, s)
    Rule("fuse_quant.matmul_fp8", _ROOT, _matmul_fp8, near=6,
         summary="a matmul of x by a block-scaled FP8 weight dequantised in the graph"),
]


def fuse_quant(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Form `linalg.matmul_fp8` from dequantise-then-matmul (module docstring)."""
    return rewrite(g, RULES, ctx=ctx)
