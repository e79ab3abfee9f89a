"""Translators for Core ATen ops that torch's decomposition table leaves in place.

`frontend.capture` runs torch's core-ATen decompositions when a program holds an op the table
cannot translate, so composite ops (chunk, split, unbind, repeat_interleave, new_zeros, diff, ...)
arrive here as core ops. Each translator below spells one core op with existing IR ops; the
one-line comment above it is the identity it relies on. Registered into `frontend.aten.TABLE`
(this module is imported at the end of `frontend/aten.py`).
"""

from __future__ import annotations

import math

import torch

from frontend.aten import _dim, _scalar, translates
from ir import DType

aten = torch.ops.aten

_FLOATS = (DType.f32, DType.f16, DType.bf16)


# --- splitting -----------------------------------------------------------------------------


@translates(aten.split_with_sizes.default, aten.split_with_sizes_copy.default)
def _split_with_sizes(cx, x, sizes, dim=0):
    # split_with_sizes(x, [a, b], d) = (x[a0:a0+a], x[b0:b0+b]) along d
    d = _dim(dim, cx.type_of(x).rank)
    parts, start = [], 0
    for size in sizes:
        parts.append(cx.op("slice", x, dim=d, start=start, end=start + size, step=1))
        start = start + size
    return tuple(parts)


@translates(aten.split.Tensor, aten.split_copy.Tensor)
def _split(cx, x, split_size, dim=0):
    # split(x, n, d) = split_with_sizes(x, [n, n, ..., rest], d)
    d = _dim(dim, cx.type_of(x).rank)
    sizes = [shape[d] for shape in cx.expected_shapes()]  # torch's split of a symbolic size too
    return _split_with_sizes(cx, x, sizes, d)


@translates(aten.unbind.int, aten.unbind_copy.int)
def _unbind(cx, x, dim=0):
    # unbind(x, d) = (x.select(d, 0), x.select(d, 1), ...)
    d = _dim(dim, cx.type_of(x).rank)
    size = cx.type_of(x).shape[d]
    if not isinstance(size, int):
        raise TypeError(f"unbind over a symbolic dim ({size}) gives a data-dependent tuple")
    return tuple(cx.op("select", x, dim=d, index=i) for i in range(size))


@translates(aten.slice_scatter.default)
def _slice_scatter(cx, x, src, dim=0, start=None, end=None, step=1):
    # slice_scatter(x, src, d, a, b, s) = x with x[a:b:s] along d replaced by src
    t = cx.type_of(x)
    d = _dim(dim, t.rank)
    size = t.shape[d]
    start = 0 if start is None else start
    end = size if end is None or (isinstance(end, int) and end >= 2**62) else end
    if isinstance(start, int) and start < 0:
        start = start + size
    if isinstance(end, int) and end < 0:
        end = end + size
    if isinstance(end, int) and isinstance(size, int):
        end = min(end, size)
    idx = cx.op("iota", start=start, end=end, step=step, dtype=DType.i64)
    return cx.op("index_put", x, idx, src, dim=d, accumulate=False)


@translates(aten.select_scatter.default)
def _select_scatter(cx, x, src, dim, index):
    # select_scatter(x, src, d, i) = x with x.select(d, i) replaced by src
    t = cx.type_of(x)
    d = _dim(dim, t.rank)
    if isinstance(index, int) and index < 0:
        index = index + t.shape[d]
    idx = cx.op("iota", start=index, end=index + 1, step=1, dtype=DType.i64)
    return cx.op("index_put", x, idx, cx.op("unsqueeze", src, dim=d), dim=d, accumulate=False)


# --- copies and fresh tensors ----------------------------------------------------------------


@translates(aten.copy.default)
def _copy_into(cx, dst, src, non_blocking=False):
    # copy(dst, src) = src cast to dst's dtype, broadcast to dst's shape
    t = cx.type_of(dst)
    if cx.type_of(src).dtype != t.dtype:
        src = cx.op("cast", src, dtype=t.dtype)
    if tuple(cx.type_of(src).shape) != tuple(t.shape):
        src = cx.op("expand", src, shape=tuple(t.shape))
    return src


@translates(
    aten.empty.memory_format, aten.empty_permuted.default, aten.empty_strided.default,
    aten.new_empty.default, aten.new_empty_strided.default,
)  # fmt: skip
def _empty(cx, *args, **_kw):
    # an empty tensor's contents are unspecified: zeros are one valid choice
    return cx.op("full", shape=cx.expected_shape(), value=0, dtype=cx.expected_dtype())


@translates(aten.empty_like.default)
def _empty_like(cx, x, **_kw):
    return cx.op("full", shape=tuple(cx.type_of(x).shape), value=0, dtype=cx.expected_dtype())


@translates(aten.new_zeros.default, aten.new_ones.default, aten.new_full.default)
def _new_full(cx, x, size, *fill, **_kw):
    # new_zeros/new_ones/new_full(x, size[, v]) = full(size, 0 | 1 | v) in x's dtype
    target = cx.node.target
    value = {aten.new_zeros.default: 0, aten.new_ones.default: 1}.get(target)
    value = fill[0] if value is None else value
    return cx.op("full", shape=tuple(size), value=_scalar(value), dtype=cx.expected_dtype())


# --- reductions with indices ------------------------------------------------------------------


@translates(aten.max.dim, aten.min.dim)
def _max_dim(cx, x, dim, keepdim=False):
    # max(x, d) = (amax(x, d), argmax(x, d)); torch returns the first index of the extreme value
    is_max = cx.node.target is aten.max.dim
    d = _dim(dim, cx.type_of(x).rank)
    values = cx.op("amax" if is_max else "amin", x, dims=(d,), keepdim=bool(keepdim))
    index = cx.op("argmax" if is_max else "argmin", x, dim=d, keepdim=bool(keepdim))
    return values, index


@translates(aten.max.default, aten.min.default)
def _max_all(cx, x):
    mnemonic = "amax" if cx.node.target is aten.max.default else "amin"
    return cx.op(mnemonic, x, dims=tuple(range(cx.type_of(x).rank)), keepdim=False)


@translates(aten.var.correction, aten.var.dim)
def _var(cx, x, dims=None, *args, correction=None, keepdim=False):
    # var(x, d, c) = Σ (x - mean)² / (N - c)
    if cx.node.target is aten.var.dim:  # var(x, dims, unbiased=True, keepdim=False)
        unbiased, keepdim = (list(args) + [True, keepdim])[:2]
        correction = 1 if unbiased else 0
    correction = 1 if correction is None else correction
    rank = cx.type_of(x).rank
    dims = tuple(range(rank)) if not dims else tuple(sorted(_dim(d, rank) for d in dims))
    count = 1
    for d in dims:
        count = count * cx.type_of(x).shape[d]
    centred = cx.op("sub", x, cx.op("mean", x, dims=dims, keepdim=True))
    total = cx.op("sum", cx.op("mul", centred, centred), dims=dims, keepdim=bool(keepdim))
    out = cx.op("div", total, *cx.operands(_as_float(count - correction)))
    return _as_expected(cx, out)


def _as_float(v):
    return float(v) if isinstance(v, int) else v


@translates(aten.histc.default)
def _histc(cx, x, bins=100, min=0, max=0):
    """histc(x, bins, lo, hi): counts of x in `bins` equal bins of [lo, hi] (values at hi fall in
    the last bin, values outside are ignored; lo == hi == 0 uses the data's range) -- a
    scatter_add of ones at pos = floor((x - lo) * bins / (hi - lo)), in x's dtype."""
    dtype = cx.type_of(x).dtype
    flat = cx.op("reshape", x, shape=(-1,))
    if min == 0 and max == 0:
        lo = cx.op("amin", flat, dims=(0,), keepdim=False)
        hi = cx.op("amax", flat, dims=(0,), keepdim=False)
        same = cx.op("eq", lo, hi)  # a constant input: torch widens the range by ±1
        lo = cx.op("where", same, cx.op("sub", lo, cx.const(1.0, dtype)), lo)
        hi = cx.op("where", same, cx.op("add", hi, cx.const(1.0, dtype)), hi)
    else:
        lo, hi = cx.const(float(min), dtype), cx.const(float(max), dtype)
    width = cx.op("sub", hi, lo)
    scaled = cx.op("div", cx.op("mul", cx.op("sub", flat, lo), cx.const(float(bins), dtype)), width)
    pos = cx.op("cast", cx.op("floor", scaled), dtype=DType.i64)
    pos = cx.op("minimum", pos, cx.const(bins - 1))  # x == hi lands in the last bin
    inside = cx.op("logical_and", cx.op("ge", flat, lo), cx.op("le", flat, hi))
    pos = cx.op("where", inside, pos, cx.const(0))
    ones = cx.op("cast", inside, dtype=dtype)
    zeros = cx.op("full", shape=(bins,), value=0, dtype=dtype)
    return cx.op("scatter_add", zeros, pos, ones, dim=0)


# --- elementwise ops the first table did not name ----------------------------------------------


@translates(aten.fmod.Tensor, aten.fmod.Scalar)
def _fmod(cx, a, b):
    # fmod(a, b) = a - trunc(a / b) * b (the sign of a), remainder's sign follows b
    a, b = cx.operands(a, b)
    if cx.type_of(a).dtype in _FLOATS:
        q = cx.op("div", a, b)
        trunc = cx.op("where", cx.op("lt", q, cx.const(0.0)), cx.op("ceil", q), cx.op("floor", q))
        return cx.op("sub", a, cx.op("mul", trunc, b))
    rem = cx.op("remainder", a, b)  # integers: fix remainder's sign where a and rem differ
    fix = cx.op(
        "logical_and", cx.op("ne", rem, cx.const(0)),
        cx.op("ne", cx.op("lt", rem, cx.const(0)), cx.op("lt", a, cx.const(0))),
    )  # fmt: skip
    return cx.op("where", fix, cx.op("sub", rem, b), rem)


@translates(aten.trunc.default)
def _trunc(cx, x):
    return cx.op("where", cx.op("lt", x, cx.const(0.0)), cx.op("ceil", x), cx.op("floor", x))


@translates(aten.round.default)
def _round(cx, x):
    # round half to even: r = floor(x + 0.5), minus 1 where x + 0.5 was an odd integer tie
    up = cx.op("floor", cx.op("add", x, cx.const(0.5)))
    tie = cx.op("eq", cx.op("sub", up, x), cx.const(0.5))
    odd = cx.op("eq", cx.op("remainder", up, cx.const(2.0)), cx.const(1.0))
    return cx.op("where", cx.op("logical_and", tie, odd), cx.op("sub", up, cx.const(1.0)), up)


@translates(aten.expm1.default)
def _expm1(cx, x):
    return cx.op("sub", cx.op("exp", x), cx.const(1.0))


@translates(aten.log2.default, aten.log10.default)
def _log_base(cx, x):
    base = 2.0 if cx.node.target is aten.log2.default else 10.0
    return cx.op("mul", cx.op("log", x), cx.const(1.0 / math.log(base)))


@translates(aten.exp2.default)
def _exp2(cx, x):
    return cx.op("exp", cx.op("mul", x, cx.const(math.log(2.0))))


@translates(aten.sinh.default, aten.cosh.default)
def _sinh_cosh(cx, x):
    # sinh = (eˣ - e⁻ˣ) / 2, cosh = (eˣ + e⁻ˣ) / 2
    a, b = cx.op("exp", x), cx.op("exp", cx.op("neg", x))
    both = cx.op("sub" if cx.node.target is aten.sinh.default else "add", a, b)
    return cx.op("mul", both, cx.const(0.5))


@translates(aten.asinh.default)
def _asinh(cx, x):
    # asinh(x) = sign(x) · log(|x| + √(x² + 1)) (odd, so no cancellation for x < 0)
    ax = cx.op("abs", x)
    root = cx.op("sqrt", cx.op("add", cx.op("mul", ax, ax), cx.const(1.0)))
    return cx.op("mul", cx.op("sign", x), cx.op("log", cx.op("add", ax, root)))


@translates(aten.acosh.default)
def _acosh(cx, x):
    # acosh(x) = log(x + √(x² - 1)), NaN below 1 as in torch
    root = cx.op("sqrt", cx.op("sub", cx.op("mul", x, x), cx.const(1.0)))
    return cx.op("log", cx.op("add", x, root))


@translates(aten.atanh.default)
def _atanh(cx, x):
    # atanh(x) = (log1p(x) - log1p(-x)) / 2
    diff = cx.op("sub", cx.op("log1p", x), cx.op("log1p", cx.op("neg", x)))
    return cx.op("mul", diff, cx.const(0.5))


def _atan(cx, x):
    """atan by range reduction and a series: |x| > 1 uses π/2 - atan(1/|x|); two half-angle
    steps t -> t / (1 + √(1 + t²)) bring |t| <= 0.199, where 12 odd Taylor terms reach 1e-9."""
    ax = cx.op("abs", x)
    big = cx.op("gt", ax, cx.const(1.0))
    t = cx.op("where", big, cx.op("reciprocal", ax), ax)
    for _ in range(2):
        hyp = cx.op("sqrt", cx.op("add", cx.op("mul", t, t), cx.const(1.0)))
        t = cx.op("div", t, cx.op("add", hyp, cx.const(1.0)))
    t2, term, total = cx.op("mul", t, t), t, t
    for n in range(1, 12):
        term = cx.op("mul", term, t2)
        total = cx.op("add", total, cx.op("mul", term, cx.const((-1.0) ** n / (2 * n + 1))))
    total = cx.op("mul", total, cx.const(4.0))
    total = cx.op("where", big, cx.op("sub", cx.const(math.pi / 2), total), total)
    return cx.op("mul", cx.op("sign", x), total)


@translates(aten.atan.default)
def _atan_op(cx, x):
    return _atan(cx, x)


@translates(aten.asin.default, aten.acos.default)
def _asin_acos(cx, x):
    # asin(x) = atan(x / √(1 - x²)); acos(x) = π/2 - asin(x)
    cos = cx.op("sqrt", cx.op("sub", cx.const(1.0), cx.op("mul", x, x)))
    asin = _atan(cx, cx.op("div", x, cos))
    if cx.node.target is aten.asin.default:
        return asin
    return cx.op("sub", cx.const(math.pi / 2), asin)


@translates(aten.atan2.default)
def _atan2(cx, y, x):
    # atan2(y, x) = atan(y / x), + π·sign(y) (π at y = 0) in the left half-plane
    base = _atan(cx, cx.op("div", y, x))
    turn = cx.op("where", cx.op("lt", y, cx.const(0.0)), cx.const(-math.pi), cx.const(math.pi))
    out = cx.op("where", cx.op("lt", x, cx.const(0.0)), cx.op("add", base, turn), base)
    both_zero = cx.op("logical_and", cx.op("eq", x, cx.const(0.0)), cx.op("eq", y, cx.const(0.0)))
    out = cx.op("where", both_zero, cx.op("mul", y, cx.const(0.0)), out)
    return _as_expected(cx, out)


def _as_expected(cx, v):
    """0-d operands promote like tensors in the IR: cast back to torch's dtype where they won."""
    want = cx.expected_dtype()
    return v if cx.type_of(v).dtype == want else cx.op("cast", v, dtype=want)


@translates(aten.round.decimals)
def _round_decimals(cx, x, *, decimals=0):
    scale = cx.const(10.0**decimals)
    return cx.op("div", _round(cx, cx.op("mul", x, scale)), scale)


@translates(aten.tan.default)
def _tan(cx, x):
    return cx.op("div", cx.op("sin", x), cx.op("cos", x))


@translates(aten.isnan.default)
def _isnan(cx, x):
    return cx.op("ne", x, x)  # NaN is the one value unequal to itself


@translates(aten.logical_xor.default)
def _logical_xor(cx, a, b):
    return cx.op("ne", cx.op("cast", a, dtype=DType.bool), cx.op("cast", b, dtype=DType.bool))


@translates(aten.hardtanh.default)
def _hardtanh(cx, x, min_val=-1.0, max_val=1.0):
    return cx.op("clamp", x, min=float(min_val), max=float(max_val))


@translates(aten.leaky_relu.default)
def _leaky_relu(cx, x, slope=0.01):
    return cx.op("where", cx.op("gt", x, cx.const(0.0)), x, cx.op("mul", x, cx.const(float(slope))))


@translates(aten.gelu.default)
def _gelu(cx, x, approximate="none"):
    half = cx.op("mul", x, cx.const(0.5))
    if approximate == "tanh":  # 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
        cube = cx.op("mul", cx.op("mul", x, x), x)
        inner = cx.op("add", x, cx.op("mul", cube, cx.const(0.044715)))
        t = cx.op("tanh", cx.op("mul", inner, cx.const(math.sqrt(2.0 / math.pi))))
        return cx.op("mul", half, cx.op("add", t, cx.const(1.0)))
    erf = cx.op("erf", cx.op("mul", x, cx.const(1.0 / math.sqrt(2.0))))  # 0.5 x (1 + erf(x/√2))
    return cx.op("mul", half, cx.op("add", erf, cx.const(1.0)))


@translates(aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar)
def _bitwise_xor(cx, a, b):
    a, b = cx.operands(a, b)
    if cx.type_of(a).dtype != DType.bool or cx.type_of(b).dtype != DType.bool:
        raise TypeError("bitwise_xor is only supported on bool tensors (as !=)")
    return cx.op("ne", a, b)


# --- custom ops with known semantics ------------------------------------------------------------


# transformers' MoE fallback (integrations/moe.py) is exactly our grouped GEMM: x [S, K] sorted
# by expert, w [E, K, N], offs [E] cumulative row ends -> [S, N].
@translates("transformers::grouped_mm_fallback")
def _hf_grouped_mm(cx, x, w, offs):
    return cx.op("grouped_mm", x, w, offs)


# --- views and masked writes --------------------------------------------------------------------


def _flat_take(cx, x, start, step, count):
    """x's last dim, entries start, start + step, ... (count of them): an index_select."""
    idx = cx.op("iota", start=start, end=start + step * count, step=step, dtype=DType.i64)
    return cx.op("index_select", x, idx, dim=cx.type_of(x).rank - 1)


@translates(aten.diagonal.default, aten.diagonal_copy.default)
def _diagonal(cx, x, offset=0, dim1=0, dim2=1):
    # diagonal(x, o, a, b): move a, b last, flatten them to [.., n·m]; entry i is at i·(m+1) + o
    # (o >= 0) or (i - o)·m + i (o < 0)
    t = cx.type_of(x)
    a, b = _dim(dim1, t.rank), _dim(dim2, t.rank)
    rest = [d for d in range(t.rank) if d not in (a, b)]
    moved = cx.op("permute", x, dims=(*rest, a, b))
    n, m = t.shape[a], t.shape[b]
    flat = cx.op("reshape", moved, shape=(*[t.shape[d] for d in rest], n * m))
    count = cx.expected_shape()[-1]
    start = offset if offset >= 0 else -offset * m
    return _flat_take(cx, flat, start, m + 1, count)


@translates(aten.as_strided.default, aten.as_strided_copy.default)
def _as_strided(cx, x, size, stride, storage_offset=None):
    """as_strided on a contiguous tensor: entry (i, j, ..) is flat[offset + Σ i_d · stride_d]
    (the frontend sees values, not storage: inputs are taken as contiguous)."""
    flat = cx.op("reshape", x, shape=(-1,))
    index = cx.op("full", shape=tuple(size), value=storage_offset or 0, dtype=DType.i64)
    for d, (n, s) in enumerate(zip(size, stride)):
        ramp = cx.op("iota", start=0, end=n * s if s else n, step=s or 1, dtype=DType.i64)
        if not s:
            ramp = cx.op("mul", ramp, cx.const(0))
        shape = [1] * len(size)
        shape[d] = n
        index = cx.op("add", index, cx.op("reshape", ramp, shape=tuple(shape)))
    picked = cx.op("index_select", flat, cx.op("reshape", index, shape=(-1,)), dim=0)
    return cx.op("reshape", picked, shape=tuple(size))


@translates(aten.masked_scatter.default)
def _masked_scatter(cx, x, mask, source):
    # masked_scatter(x, m, s): the k-th True of m (row-major) takes s.flatten()[k], i.e.
    # s.flatten()[cumsum(m) - 1] where m, else x
    shape = tuple(cx.expected_shape())
    mask = cx.op("expand", mask, shape=shape) if tuple(cx.type_of(mask).shape) != shape else mask
    x = cx.op("expand", x, shape=shape) if tuple(cx.type_of(x).shape) != shape else x
    flat_mask = cx.op("reshape", mask, shape=(-1,))
    rank = cx.op("cumsum", cx.op("cast", flat_mask, dtype=DType.i64), dim=0)
    order = cx.op("sub", rank, cx.const(1))
    order = cx.op("clamp", order, min=0, max=None)
    picked = cx.op("index_select", cx.op("reshape", source, shape=(-1,)), order, dim=0)
    return cx.op("where", mask, cx.op("reshape", picked, shape=shape), x)


@translates(aten.scatter_reduce.two)
def _scatter_reduce(cx, x, dim, index, src, reduce, *, include_self=True):
    """scatter_reduce with reduce 'sum' or 'mean' (scatter_add of values and of counts)."""
    if reduce not in ("sum", "mean"):
        raise TypeError(f"scatter_reduce(reduce={reduce!r}): only 'sum' and 'mean' are supported")
    d = _dim(dim, cx.type_of(x).rank)
    ishape = tuple(cx.type_of(index).shape)
    if tuple(cx.type_of(src).shape) != ishape:  # torch reads src only where index has entries
        for axis, n in enumerate(ishape):
            src = cx.op("slice", src, dim=axis, start=0, end=n, step=1)
    dtype = cx.type_of(x).dtype
    zeros = cx.op("full", shape=tuple(cx.type_of(x).shape), value=0, dtype=dtype)
    sums = cx.op("scatter_add", zeros, index, src, dim=d)
    ones = cx.op("full", shape=ishape, value=1, dtype=dtype)
    counts = cx.op("scatter_add", zeros, index, ones, dim=d)
    touched = cx.op("gt", counts, cx.const(0, dtype))
    if include_self:
        total = cx.op("add", x, sums)
        if reduce == "sum":
            return total
        return _as_expected(cx, cx.op("div", total, cx.op("add", counts, cx.const(1, dtype))))
    if reduce == "sum":
        return cx.op("where", touched, sums, x)
    mean = cx.op("div", sums, cx.op("maximum", counts, cx.const(1, dtype)))
    return cx.op("where", touched, _as_expected(cx, mean), x)


@translates(aten.native_group_norm.default)
def _group_norm(cx, x, weight, bias, n, c, hw, group, eps):
    # per (sample, group): (x - mean) · rsqrt(var + eps), then the channel's weight and bias
    shape, dtype = tuple(cx.type_of(x).shape), cx.type_of(x).dtype
    if dtype != DType.f32:  # statistics in fp32, as torch's kernel accumulates them
        x = cx.op("cast", x, dtype=DType.f32)
    grouped = cx.op("reshape", x, shape=(n, group, -1) if c * hw else (n, group, 0))
    mean = cx.op("mean", grouped, dims=(2,), keepdim=True)
    centred = cx.op("sub", grouped, mean)
    var = cx.op("mean", cx.op("mul", centred, centred), dims=(2,), keepdim=True)
    rstd = cx.op("rsqrt", cx.op("add", var, cx.const(float(eps))))
    out = cx.op("reshape", cx.op("mul", centred, rstd), shape=shape)
    if dtype != DType.f32:
        out, mean, rstd = (cx.op("cast", v, dtype=dtype) for v in (out, mean, rstd))
    per_channel = (c,) + (1,) * (len(shape) - 2)
    if weight is not None:
        out = cx.op("mul", out, cx.op("reshape", weight, shape=per_channel))
    if bias is not None:
        out = cx.op("add", out, cx.op("reshape", bias, shape=per_channel))
    return out, cx.op("reshape", mean, shape=(n, group)), cx.op("reshape", rstd, shape=(n, group))

