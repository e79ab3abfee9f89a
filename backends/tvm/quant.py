"""te lowering of `linalg.matmul_fp8` (ir/ops/quant.py): the FP8 weight is decoded in the GEMV/GEMM
loop, so it stays 1 byte per element in memory.

    y[m, n] = Σ_k f32(x[m, k]) · (f32(w[n, k]) · scale[n // b, k // b])

The weight placeholder is `float8_e4m3fn` (torch's float8_e4m3fn tensors cross by DLPack as is).
TVM 0.27's own e4m3 -> f32 cast on llvm flushes the subnormal codes (0x01-0x07, 0x81-0x87) to
zero, so the kernel decodes the byte itself, bit-exactly (`decode_e4m3`): the bits are
reinterpreted as uint8 and rebuilt as an f32 (normal codes: exponent rebiased 7 -> 127;
subnormals: mantissa · 2^-9; 0x7f/0xff: NaN).
The block is the "matmul" block of `backends.tvm.matmul`, so its "nt" CPU schedule applies
unchanged: w [N, K] is read along contiguous rows; with a static K that is a multiple of the
vector width, each output is a vectorised dot product (decode GEMVs).
"""

from __future__ import annotations

from typing import Any

import ir
from backends.base import body_of_one_op
from backends.targets import Target
from backends.tvm.emitters import TVM_EMITTERS, KernelLaunch, kernel_name, signature
from backends.tvm.kernel import make_kernel
from backends.tvm.lower import Lowering, convert, dtype_of, lowers
from backends.tvm.matmul import schedule_matmul_cpu

__all__ = ["decode_e4m3", "lower_matmul_fp8"]


def decode_e4m3(v: Any) -> Any:
    """The exact f32 value of one float8_e4m3fn TIR expression (torch's `.float()`)."""
    from tvm import tirx

    f32 = "float32"
    b = tirx.reinterpret("uint8", v).astype("int32")
    # s eeee mmm -> s (e + 120) mmm 0...: rebias 7 -> 127, mantissa to the top of f32's 23 bits
    normal = tirx.reinterpret(f32, ((b & 0x80) << 24) | (((b & 0x7F) + (120 << 3)) << 20))
    sub = (b & 7).astype(f32) * tirx.const(2.0**-9, f32)  # e = 0: 0.mmm · 2^-6
    sub = tirx.Select((b & 0x80) != 0, -sub, sub)
    value = tirx.Select((b & 0x78) == 0, sub, normal)
    return tirx.Select((b & 0x7F) == 0x7F, tirx.const(float("nan"), f32), value)


@lowers("linalg.matmul_fp8")
def lower_matmul_fp8(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    x, w, scale = args
    block = node.op.block
    m_ext, n_ext = lw.shape(node.result.type)
    k = te.reduce_axis((0, w.shape[1]), name="k")
    acc = "float32"

    def dot(m: Any, n: Any) -> Any:
        s = scale[tirx.floordiv(n, block), tirx.floordiv(k, block)]
        return te.sum(convert(x[m, k], acc) * (decode_e4m3(w[n, k]) * s), axis=k)

    y = te.compute((m_ext, n_ext), dot, name="matmul", tag="gemm")
    if dtype_of(x) == acc:
        return [y]
    return [te.compute(y.shape, lambda i, j: convert(y(i, j), dtype_of(x)), name=lw.tag("cast"))]


@TVM_EMITTERS.register("linalg.matmul_fp8")
def emit_matmul_fp8(node: ir.Node, target: Target, options: dict) -> KernelLaunch:
    """One kernel, the "nt" matmul schedule (w is read as stored, [N, K] row-major)."""
    body, index = body_of_one_op(node)
    kernel = make_kernel(
        body,
        kernel_name(node),
        signature(node),
        lambda f: schedule_matmul_cpu(f, True),
        loc=node.loc,
    )
    return KernelLaunch(node, [kernel], index)
