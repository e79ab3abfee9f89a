"""te lowering of `linalg.matmul_fp8` (ir/ops/quant.py): the FP8 weight is decoded in the GEMV/GEMM
loop, so it stays 1 byte per element in memory.

    y[m, n] = Σ_k f32(x[m, k]) · (f32(w[n, k]) · scale[n // b, k // b])

The weight placeholder is `float8_e4m3fn` (torch's float8_e4m3fn tensors cross by DLPack as is).
TVM 0.27's own e4m3 -> f32 cast on llvm flushes the subnormal codes (0x01-0x07, 0x81-0x87) to
zero, so the kernel decodes the byte itself, bit-exactly (`decode_e4m3`): the bits are
reinterpreted as uint8, moved into an f32's exponent/mantissa fields and rescaled by 2^120.
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
    """The exact f32 value of one float8_e4m3fn TIR expression (torch's `.float()`).

    s eeee mmm -> f32 bits s 0000eeee mmm0...0 (exponent field e, mantissa at its top), times
    2^120 (= 2^(127 - 7), the bias difference): exact for normal codes, and for subnormal ones
    too (the f32 is then subnormal, m·2^-129, and m·2^-129·2^120 = 0.mmm·2^-6). The NaN codes
    get f32 exponent 0xff by integer arithmetic: no branch or select, so the loop vectorises (a
    select cost 20 % of a 4096² GEMV)."""
    from tvm import tirx

    f32 = "float32"
    b = tirx.reinterpret("uint8", v).astype("int32")
    nan = ((b & 0x7F) + 1) >> 7  # 1 for 0x7f/0xff: all exponent bits set (mantissa is not 0)
    bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20) | (nan * 0x7F800000)
    return tirx.reinterpret(f32, bits) * tirx.const(2.0**120, f32)


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
