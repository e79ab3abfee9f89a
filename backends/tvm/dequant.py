"""Weight accessors for `moe.experts`' weight formats (ir/ops/moe.py `Experts.weight_format`).

`expert_weight(w, scale, fmt, k_extent)` returns `read(e, i, k) -> f32 PrimExpr`, the dequantised
element [e, i, k] of a routed-expert weight whose *logical* shape is [E, rows, k_extent], read
straight from the stored tensors so a kernel dequantises in its GEMM loop and the weight stays
compressed in memory:

    "dense"     w [E, rows, k] (x's dtype)                         f32(w[e, i, k])
    "fp4_e2m1"  w int8 [E, rows, k/2], scale int8 [E, rows, ⌈k/32⌉]  e2m1(nibble) · 2^(u - 127)
                (byte k//2: low nibble = even k, high nibble = odd k; u = the scale byte
                read unsigned, ue8m0)
    "fp8_e4m3"  w f8e4m3 [E, rows, k], scale f32 [E, ⌈rows/128⌉, ⌈k/128⌉]
                                                                   f32(w) · scale

Every decode is exact and equals `ir.ops.quant.dequant_fp4` / `dequant_fp8` bit for bit:
e2m1 magnitudes come from integer arithmetic on the code bits (no table in memory), the ue8m0
scale is built ldexp-style by writing u into an f32's exponent field (u = 0, 2^-127, is the
one subnormal and is a constant; u = 255 is NaN), and e4m3 reuses `backends.tvm.quant.decode_e4m3`.
The op's semantics round the dequantised weight to x's dtype before the GEMM: pass
`dtype=` to get that rounding (exact for f32 and bf16, whose exponent range holds every value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backends.tvm.quant import decode_e4m3

__all__ = ["FORMATS", "decode_e2m1", "decode_ue8m0", "expert_weight"]

FORMATS = ("dense", "fp4_e2m1", "fp8_e4m3")
FP4_BLOCK = 32  # ir.ops.quant.FP4_BLOCK
FP8_BLOCK = 128  # ir.ops.quant.FP8_BLOCK
F32 = "float32"


def decode_e2m1(byte: Any, shift: Any) -> Any:
    """The f32 value of the e2m1 code in bits shift..shift+3 of an int8 byte expression (shift
    an int32 expression, 0: the low nibble, 4: the high one): sign bit 3, magnitude
    (0, .5, 1, 1.5, 2, 3, 4, 6)[bits 0-2].

    Integer arithmetic, one select for the magnitude and one for the sign: twice the magnitude
    is the integer m for m < 4, else (2 + M) << (E - 1) with m = 2·E + M, so it converts to f32
    exactly and halves exactly. (A select tree over the eight magnitudes took 4.7x the bf16
    kernel's time in benchmarks/moe_quant_decode.py at N = 1, this 2.0-2.3x; a select-free
    variant was no faster there. Separate runs on a loaded machine.)"""
    from tvm import tirx

    b = byte.astype("int32") & 0xFF
    code = (b >> shift) & 0xF
    m = code & 7
    twice = tirx.Select(m < 4, m, (2 + (m & 1)) << ((m >> 1) - 1))
    mag = twice.astype(F32) * tirx.const(0.5, F32)
    return tirx.Select(code >= 8, -mag, mag)


def decode_ue8m0(byte: Any) -> Any:
    """2^(u - 127) in f32 for the int8 expression `byte` read unsigned as u (ldexp-style: u goes
    into the exponent field); u = 0 gives the subnormal 2^-127, u = 255 NaN."""
    from tvm import tirx

    u = byte.astype("int32") & 0xFF
    normal = tirx.reinterpret(F32, u << 23)
    tiny = tirx.Select(u == 0, tirx.const(2.0**-127, F32), normal)
    return tirx.Select(u == 255, tirx.const(float("nan"), F32), tiny)


def expert_weight(
    w: Any, scale: Any | None, fmt: str, k_extent: int, dtype: str | None = None
) -> Callable[[Any, Any, Any], Any]:
    """`read(e, i, k)`: element [e, i, k] of the logical weight [E, rows, k_extent] in f32 (or
    rounded to `dtype`), decoded from te tensors `w` and `scale` stored in format `fmt` (module
    docstring). Raises ValueError naming the format, or the shapes that do not fit it."""
    from tvm import tirx

    if fmt not in FORMATS:
        raise ValueError(f"expert_weight: format must be one of {FORMATS}, got {fmt!r}")
    shape = [int(d) for d in w.shape]
    if fmt == "dense":
        read = lambda e, i, k: w[e, i, k].astype(F32)  # noqa: E731
    elif fmt == "fp4_e2m1":
        _check(fmt, shape, scale, [shape[0], shape[1], k_extent // 2],
               [shape[0], shape[1], -(-k_extent // FP4_BLOCK)])

        def read(e: Any, i: Any, k: Any) -> Any:
            value = decode_e2m1(w[e, i, tirx.floordiv(k, 2)], tirx.floormod(k, 2) * 4)
            return value * decode_ue8m0(scale[e, i, tirx.floordiv(k, FP4_BLOCK)])
    else:
        _check(fmt, shape, scale, [shape[0], shape[1], k_extent],
               [shape[0], -(-shape[1] // FP8_BLOCK), -(-k_extent // FP8_BLOCK)])

        def read(e: Any, i: Any, k: Any) -> Any:
            s = scale[e, tirx.floordiv(i, FP8_BLOCK), tirx.floordiv(k, FP8_BLOCK)]
            return decode_e4m3(w[e, i, k]) * s
    if dtype is None or dtype == F32:
        return read
    return lambda e, i, k: read(e, i, k).astype(dtype)


def _check(fmt: str, shape: list[int], scale: Any, want_w: list[int], want_s: list[int]) -> None:
    if shape != want_w:
        raise ValueError(f"expert_weight({fmt}): weight is {shape}, expected {want_w}")
    got_s = None if scale is None else [int(d) for d in scale.shape]
    if got_s != want_s:
        raise ValueError(f"expert_weight({fmt}): scale is {got_s}, expected {want_s}")
