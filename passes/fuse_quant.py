"""Fold weight dequantisation into the op that consumes it: `linalg.matmul_fp8` for a dense FP8
linear, `moe.experts(weight_format=...)` for FP4 / FP8 routed experts.

Dense linears (rule `fuse_quant.matmul_fp8`) match (the capture of `models.quant.FP8Linear`,
`F.linear(x, dequantize_blocks(w, s))`):

    matmul(x [.., K], permute(mul(cast(w: f8e4m3 [N,K], f32), S), dims=[1, 0]))
    S = slice?(slice?(reshape(expand(view(s [R,C]) [R,1,C,1], [R,b,C,b]), [R·b, C·b])))

where `view` is any reshape/unsqueeze chain, the slices keep [:N, :K] and b is the block size
(R = ceil(N/b), C = ceil(K/b)). Rewrites it to `reshape(linalg.matmul_fp8(reshape(x, [M, K]),
w, s), [.., N])`, so the weight is read as 1 byte per element by the kernel instead of being
materialised in fp32. Holds after: same values (the op's reference is the matched computation,
up to the order of the fp32 sum). x must be f32/bf16/f16; s must be f32.

Routed experts (rule `fuse_quant.experts`): a `moe.experts` with dense weights (as `fuse_moe`
formed it) whose w1, w3 and w2 are each dequantised in the graph, optionally rounded to x's dtype
(`cast(deq, x.dtype)`), in one of the spellings of models/quant.py:

    FP4  deq = mul(where(codes >= 8, -mag, mag), S)       q: i8 [E, R, C/2], s: i8 [E, R, G]
         b     = bitwise_and(cast(q, i32), 255)
         codes = reshape(concat(reshape(b & 15) [E,R,C/2,1], reshape(b // 16), dim=3), [E,R,C])
         m = codes & 7;  e = m // 2;  h = f32(m & 1) · 0.5
         mag   = where(e == 0, h, (h + 1) · pow(2, f32(e - 1)))
         S     = slice?(reshape(expand(view(pow(2, f32((cast(s, i32) & 255) - 127))) [E,R,G,1],
                                       [E,R,G,32]), [E,R,G·32]))   (ue8m0 per 1×32 block)
    FP8  deq = mul(cast(q: f8e4m3 [E, R, C], f32), S)    s: f32 [E, ceil(R/128), ceil(C/128)]
         S     = slice?(slice?(reshape(expand(view(s) [E,r,1,c,1], [E,r,128,c,128]),
                                       [E, r·128, c·128])))

It rewrites to `moe.experts(..., w1q, w3q, w2q, ..., w1s, w3s, w2s, weight_format=fmt)` with the
stored tensors as operands, so the kernels read 0.5 + 1/32 (FP4) or ~1 (FP8) bytes per weight
element. Holds after: same values (the op's reference dequantises exactly the same way and
rounds to x's dtype). All three weights must match one format; `explain` says which did not.
"""

from __future__ import annotations

from typing import Any

from ir import DType, Graph, Node, Value
from passes.context import PassContext
from passes.pattern import Fail, Match, Pat, Rule, const, match_node, op, var
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


# --- routed experts ---------------------------------------------------------------------------

F32, I32, I8 = DType.f32, DType.i32, DType.i8
_BYTES = op("bitwise_and", op("cast", var("q", dtype=I8, rank=3), dtype=I32), const(255),
            name="bytes")
_NIBBLES = op(  # low nibble (even column) first
    "concat",
    op("reshape", op("bitwise_and", _BYTES, const(15)), name="low"),
    op("reshape", op("floordiv", var("bytes"), const(16)), name="high"),
    attrs={"dim": lambda d: d in (3, -1)},
)
_CODES = op("reshape", _NIBBLES, name="codes", rank=3)
_M = op("bitwise_and", var("codes"), const(7), name="m")
_EXP = op("floordiv", _M, const(2), name="exp")
_HALF = op("mul", op("cast", op("bitwise_and", var("m"), const(1)), dtype=F32), const(0.5),
           name="half")
_POW2 = op("pow", const(2.0), op("cast", op("sub", var("exp"), const(1)), dtype=F32))
_MAG = op("where", op("eq", _EXP, const(0)), _HALF,
          op("mul", op("add", var("half"), const(1.0)), _POW2), name="mag")
_VALUES = op("where", op("ge", _CODES, const(8)), op("neg", _MAG), var("mag"), name="values")
_UE8M0 = op("pow", const(2.0), op("cast", op("sub", op("bitwise_and", op(
    "cast", var("s", dtype=I8, rank=3), dtype=I32), const(255)), const(127)), dtype=F32),
    name="scale")
DEQ_FP4 = op("mul", _VALUES, var("s_full", rank=3), name="deq")
DEQ_FP8 = op("mul", op("cast", var("q", dtype=DType.f8e4m3, rank=3), dtype=F32),
             var("s_full", rank=3), name="deq")
_EXPERT_FORMATS = (("fp4_e2m1", DEQ_FP4), ("fp8_e4m3", DEQ_FP8))


def _match(pat: Pat, v: Value, m: Match) -> Match | Fail:
    node = m.producer(v)
    if node is None:
        return Fail(0, "root", f"%{v.name} is a graph input (a dense weight)", None, v)
    return match_node(pat, node, m.env)


def _peel_slices(m: Match, v: Value, dims: tuple[int, ...]) -> tuple[Value, Node | None] | Fail:
    """v without [:end] slices along `dims` (cutting padded blocks), and its producer."""
    node = m.producer(v)
    while node is not None and node.name == "slice":
        a = node.attrs
        if a["start"] != 0 or a["step"] != 1 or a["dim"] % 3 not in dims:
            return Fail(5, "scale.slice", f"the scale slice {a} is not a [:end] prefix", node)
        v, node = node.operands[0], m.producer(node.operands[0])
    return v, node


def _fp4_scale(m: Match, dm: Match, shape: tuple) -> Value | Fail:
    """s [E, R, G] (ue8m0 int8) when the scale operand of the dequant is s decoded, expanded
    to 1×32 blocks and cut to [E, R, C]."""
    e, r, c = shape
    found = _peel_slices(m, dm["s_full"], (2,))
    if isinstance(found, Fail):
        return found
    v, node = found
    if node is None or node.name != "reshape" or node.operands[0].type.rank != 4:
        return Fail(5, "scale.blocks", "the scale is not a [E, R, G·32] reshape of block scales",
                    node)
    expand = m.producer(node.operands[0])
    if expand is None or expand.name != "expand":
        return Fail(6, "scale.expand", "the block scales are not expanded to [E, R, G, 32]", node)
    g = -(-c // 32)
    if tuple(expand.results[0].type.shape) != (e, r, g, 32):
        return Fail(7, "scale.shape", f"expanded scales {expand.results[0].type} are not "
                    f"[{e}, {r}, {g}, 32] (one per 1x32 block of [{e}, {r}, {c}])", expand)
    src = expand.operands[0]
    while src.type.rank != 3 and m.producer(src) is not None and m.producer(src).name in _VIEWS:
        src = m.producer(src).operands[0]
    sm = _match(_UE8M0, src, m)
    if isinstance(sm, Fail):
        return Fail(8, "scale.ue8m0", f"the block scales are not 2^((u & 255) - 127) of int8 "
                    f"bytes: {sm.reason}", sm.node or expand)
    return sm["s"]


def _fp8_scale(m: Match, dm: Match, shape: tuple) -> Value | Fail:
    """s [E, ceil(R/128), ceil(C/128)] f32 when the scale operand is s expanded to 128×128
    blocks and cut to [E, R, C]."""
    e, r, c = shape
    found = _peel_slices(m, dm["s_full"], (1, 2))
    if isinstance(found, Fail):
        return found
    v, node = found
    if node is None or node.name != "reshape" or node.operands[0].type.rank != 5:
        return Fail(5, "scale.blocks", "the scale is not a reshape of [E, r, b, c, b] blocks", node)
    expand = m.producer(node.operands[0])
    rows, cols = -(-r // 128), -(-c // 128)
    ok = expand is not None and expand.name == "expand"
    if not ok or tuple(expand.results[0].type.shape) != (e, rows, 128, cols, 128):
        return Fail(7, "scale.shape", f"the scales are not expanded to [{e}, {rows}, 128, {cols}, "
                    f"128] (128x128 blocks of [{e}, {r}, {c}])", expand or node)
    src = expand.operands[0]
    while src.type.rank != 3 and m.producer(src) is not None and m.producer(src).name in _VIEWS:
        src = m.producer(src).operands[0]
    if tuple(src.type.shape) != (e, rows, cols) or src.type.dtype != F32:
        return Fail(8, "scale.source",
                    f"the block scales {src.type} are not f32[{e},{rows},{cols}]", expand)
    return src


def _fp4_layout(m: Match, dm: Match) -> str | None:
    """Why the nibbles are not unpacked as [E, R, C/2] bytes -> [E, R, C] codes, low first."""
    q, codes = dm["q"], dm["codes"]
    e, r, half = q.type.shape
    if tuple(codes.type.shape) != (e, r, 2 * half):
        return f"codes {codes.type} are not [{e}, {r}, {2 * half}] (two a byte of {q.type})"
    for name in ("low", "high"):
        if tuple(dm[name].type.shape) != (e, r, half, 1):
            return f"the {name} nibbles {dm[name].type} are not [{e}, {r}, {half}, 1]"
    return None


def _dequantised(m: Match, w: Value, x: Value) -> tuple[str, Value, Value] | Fail:
    """(format, stored weight, scale) when expert weight `w` (possibly rounded to x's dtype) is
    dequantised in the graph in a spelling of the module docstring, else why not."""
    node = m.producer(w)
    if node is not None and node.name == "cast" and node.operands[0].dtype == F32:
        w = node.operands[0]  # the f32 weights rounded to x's dtype (the op's semantics)
    best: Fail | None = None
    for fmt, pat in _EXPERT_FORMATS:
        dm = _match(pat, w, m)
        if isinstance(dm, Fail):
            best = dm if best is None or dm.score > best.score else best
            continue
        if fmt == "fp4_e2m1":
            why = _fp4_layout(m, dm)
            if why is not None:
                return Fail(4, "codes", why, m.producer(dm["codes"]))
            scale = _fp4_scale(m, dm, tuple(w.type.shape))
        else:
            scale = _fp8_scale(m, dm, tuple(w.type.shape))
        return scale if isinstance(scale, Fail) else (fmt, dm["q"], scale)
    assert best is not None
    return best


def _experts_quant(m: Match, rw: Rewriter) -> Any:
    """moe.experts(.., deq(q1, s1), deq(q3, s3), deq(q2, s2), ..) = moe.experts(.., q1, q3, q2,
    .., s1, s3, s2, weight_format=fmt)."""
    node = m.root
    if node.op.weight_format != "dense":
        return Fail(0, "weight_format", f"the weights are already {node.op.weight_format}", node)
    x = node.operands[0]
    found = []
    for name, w in zip(("w1", "w3", "w2"), node.operands[3:6]):
        got = _dequantised(m, w, x)
        if isinstance(got, Fail):
            got.path = f"{name}: {got.path}"
            got.reason = f"{name} (%{w.name}) is not a dequantised FP4/FP8 weight: {got.reason}"
            got.score += 10 * len(found)
            return got
        found.append(got)
    formats = {f for f, _, _ in found}
    if len(formats) != 1:
        return Fail(40, "weight_format", f"w1/w3/w2 are in different formats {sorted(formats)}; "
                    "moe.experts takes one", node)
    operands = list(node.operands)
    operands[3:6] = [q for _, q, _ in found]
    operands += [s for _, _, s in found]
    attrs = dict(node.op.attrs, weight_format=found[0][0])
    return [rw.op("moe.experts", operands, **attrs)]


RULES = [
    # x @ (f32(w) · expand(s))ᵀ = linalg.matmul_fp8(x, w, s)
    Rule("fuse_quant.matmul_fp8", _ROOT, _matmul_fp8, near=6,
         summary="a matmul of x by a block-scaled FP8 weight dequantised in the graph"),
    # moe.experts(.., deq(w1), deq(w3), deq(w2)) = moe.experts(.., w1, w3, w2, scales, format)
    Rule("fuse_quant.experts", op("moe.experts"), _experts_quant, near=5,
         summary="routed experts whose w1/w3/w2 are FP4 or FP8 weights dequantised in the graph"),
]


def fuse_quant(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Form `linalg.matmul_fp8` from dequantise-then-matmul (module docstring)."""
    return rewrite(g, RULES, ctx=ctx)
