"""TVM lowering of `linalg.matmul_fp8` (ir/ops/quant.py): the FP8 weight is decoded in the
GEMV/GEMM loop, so it stays 1 byte per element in memory.

    y[m, n] = Σ_k f32(x[m, k]) · (f32(w[n, k]) · scale[n // b, k // b])

The weight placeholder is `float8_e4m3fn` (torch's float8_e4m3fn tensors cross by DLPack as is).
TVM 0.27's own e4m3 -> f32 cast on llvm flushes the subnormal codes (0x01-0x07, 0x81-0x87) to
zero, so the kernels decode the byte themselves, bit-exactly.

Two CPU kernels, and BLAS for prefill:

- `fp8_gemv_cpu` (static N and K, K a multiple of the block, the block a multiple of 16): a
  hand-written TensorIR loop nest for decode sizes. Per weight row n and 128-block, 8 vectors of
  16 codes are decoded (sign-extend the byte, shift it into an f32's exponent/mantissa fields,
  mask: 3 integer ops) and multiplied by the block's scale·2^120 (one multiply, which also makes
  the subnormal codes exact): f32(w)·s rounded once, the reference's value. M = 1 feeds them
  straight into 4 partial sums; M > 1 keeps them in registers for up to 8 activation rows. The
  NaN codes (0x7f, 0xff) are found by an OR-scan over the bytes (64 per op), not a select per
  element, checked once per task of 32 rows; only a task holding one looks for its rows and makes
  their outputs NaN, as the reference. Scales >= 128 (s·2^120 would
  overflow) take a second copy of the loops that multiplies by 2^120, then s. The products are
  the reference's; only the summation order differs. Parallel over tasks of 32 weight rows: TVM
  allocates a parallel body's buffers with one workspace call per iteration (~250 ns: 512x512
  took 164 us as 512 tasks, 27 us as 16).
- otherwise the te compute below (`decode_e4m3` per element) with the "nt" matmul schedule.
- `blas="auto"`, at least FP8_BLAS_MIN_ROWS (160) rows and BLAS_MIN_FLOPS: the op's reference
  (weight dequantised to f32, then torch.matmul), as dense prefill GEMMs go to BLAS.

Measured (benchmarks/quant_fp8_gemv.py, bf16 activations, 1 thread, least thread CPU time of 20
interleaved rounds on the shared 2-core box at load ~6), FP8 time / TVM bf16-weight "nt" kernel
time at M = 1 and 8: 4096² 0.61, 0.55; 2048² 0.82, 0.57; 1024² 0.86, 0.60; 512² 1.07, 0.98
(f32 kernel: 0.48, 0.55; 0.59, 0.60; 0.58, 0.67; 1.07, 1.51). At 512² the ~40 us of a call
outside the kernel dominates and the weight sits in L2, where the decode's ~6 vector ops per 16
weights (bf16: ~3) decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ir
from backends.base import body_of_one_op
from backends.targets import Target
from backends.tvm.emitters import TVM_EMITTERS, KernelLaunch, kernel_name, signature, uses_blas
from backends.tvm.kernel import make_kernel
from backends.tvm.lower import Lowering, convert, dtype_of, lowers, static, tvm_dtype
from backends.tvm.matmul import schedule_matmul_cpu

__all__ = ["FP8_BLAS_MIN_ROWS", "decode_e4m3", "e4m3_bits", "fp8_gemv_cpu", "lower_matmul_fp8"]

# "auto" BLAS policy: an FP8 GEMM with at least this many rows (prefill) and BLAS_MIN_FLOPS runs
# the op's reference (the weight dequantised to f32 in torch, then torch.matmul): the GEMV kernel
# decodes the weight again for every 8 rows and streams all of x per weight row. Kernel / BLAS
# time, 1 thread (thread CPU time): 2048² at M = 64, 128, 192, 256: 0.46, 0.80, 1.22, 1.66;
# 4096² at 64, 128, 256: 0.28, 0.80, 2.99. torch's e4m3 -> f32 conversion is most of the BLAS
# side's fixed cost (~25 ms at 2048²); a TVM dequantise kernel would move the crossover down.
FP8_BLAS_MIN_ROWS = 160

LANES = 16  # f32 lanes of one AVX-512 register
ROWS = 8  # activation rows sharing one decoded block of the weight
PARTIALS = 4  # independent partial sums per row (hides the FMA latency at M = 1)
# weight rows per parallel task: TVM allocates a parallel body's buffers by a workspace call per
# iteration (~250 ns each: 512x512 took 164 us in 512 tasks, 35 us serially)
CHUNK = 32
_BITS_MASK = 0x87F00000 - (1 << 32)  # sign bit and the 7 exponent/mantissa bits, as int32
_BIG_SCALE = 128.0  # scale·2^120 stays finite below 2^8; the kernel checks, then picks a path


def decode_e4m3(v: Any) -> Any:
    """The exact f32 value of one float8_e4m3fn TIR expression (torch's `.float()`).

    `e4m3_bits` (s eeee mmm -> f32 bits s 0000eeee mmm0...0) times 2^120 (= 2^(127 - 7), the
    bias difference): exact for normal codes, and for subnormal ones too (the f32 is then
    subnormal, m·2^-129, and m·2^-129·2^120 = 0.mmm·2^-6). The NaN codes (0x7f, 0xff) by one
    select on the byte (a compare and a masked move on AVX-512). Bit-equal to the zero-extend,
    two-field, integer-NaN form it replaced, and as fast in the te GEMV (K not a multiple of the
    block; 2000²: 0.71 / 0.73 ms, 4000²: 6.98 / 6.95 ms, 1 thread)."""
    from tvm import tirx

    f32 = "float32"
    code = tirx.reinterpret("uint8", v)
    value = e4m3_bits(v) * tirx.const(2.0**120, f32)
    is_nan = tirx.EQ(code & tirx.const(0x7F, "uint8"), tirx.const(0x7F, "uint8"))
    return tirx.Select(is_nan, tirx.const(float("nan"), f32), value)


def e4m3_bits(v: Any) -> Any:
    """float8_e4m3fn TIR expression -> the f32 with bits s 0000eeee mmm0..0 (its value·2^-120,
    NaN codes read as ±480·2^-120): sign-extend the byte, shift it left 20 (the 7 bits land in
    the f32's exponent/mantissa fields, the sign's copies above them), keep the sign bit and
    the 7 bits. Three integer ops per 16 codes; times 2^120 (or scale·2^120) is the value."""
    from tvm import tirx

    sx = tirx.reinterpret("uint8", v).astype("int8").astype("int32")
    return tirx.reinterpret("float32", (sx << 20) & tirx.const(_BITS_MASK, "int32"))


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


def fp8_gemv_cpu(n: int, k: int, block: int, dtype: str, symbol: str) -> Any:
    """The decode kernel (module doc) as a PrimFunc `symbol`(x [M, k], w [n, k] e4m3, scale,
    y [M, n]) with M symbolic; x and y in `dtype` (float32, bfloat16 or float16)."""
    from tvm.script import tirx as T

    assert k % block == 0 and block % LANES == 0, (k, block)
    vecs = block // LANES  # vectors per block
    kb_n, nb_n = k // block, -(-n // block)
    two120 = 2.0**120

    code_bits = e4m3_bits
    def weight(code: Any, scale: Any, small_scales: bool) -> Any:
        """f32(code)·scale rounded once: (bits·(scale·2^120)) when scale·2^120 is finite, else
        the exact decode (bits·2^120) times the scale."""
        if small_scales:
            return code_bits(code) * (scale * T.float32(two120))
        return code_bits(code) * T.float32(two120) * scale

    @T.macro
    def reduce_store(acc1, y, row, col):  # noqa: ANN001, ANN202  (TVMScript macro)
        for lane in T.vectorized(LANES):
            acc1[0, lane] = (acc1[0, lane] + acc1[1, lane]) + (acc1[2, lane] + acc1[3, lane])
        for lane in T.vectorized(8):
            acc1[0, lane] = acc1[0, lane] + acc1[0, lane + 8]
        for lane in T.vectorized(4):
            acc1[0, lane] = acc1[0, lane] + acc1[0, lane + 4]
        for lane in T.vectorized(2):
            acc1[0, lane] = acc1[0, lane] + acc1[0, lane + 2]
        y[row, col] = T.Cast(dtype, acc1[0, 0] + acc1[0, 1])

    @T.macro
    def rows_dot(x32, w, s, y, m, small_scales):  # noqa: ANN001, ANN202  (TVMScript macro)
        for n0 in T.parallel((n + CHUNK - 1) // CHUNK):
            acc = T.alloc_buffer((ROWS, PARTIALS, LANES), "float32", scope="local")
            wblk = T.alloc_buffer((vecs, LANES), "float32", scope="local")
            seen = T.alloc_buffer((64,), "uint8", scope="local")
            acc1 = T.alloc_buffer((PARTIALS, LANES), "float32", scope="local")
            for lane in T.vectorized(64):
                seen[lane] = T.uint8(0)
            for nn in range(n0 * CHUNK, T.min(n, n0 * CHUNK + CHUNK)):
                # NaN codes: (b & 0x7f) + 1 has bit 7 set only for 0x7f / 0xff; ORed over the
                # task's rows, checked once per task (below)
                for k0 in range(k // 64):
                    for lane in T.vectorized(64):
                        seen[lane] = seen[lane] | (
                            (T.reinterpret("uint8", w[nn, k0 * 64 + lane]) & T.uint8(0x7F))
                            + T.uint8(1)
                        )
                for tail in range(k // 64 * 64, k):
                    code = T.reinterpret("uint8", w[nn, tail])
                    seen[0] = seen[0] | ((code & T.uint8(0x7F)) + T.uint8(1))
                if m == 1:  # B = 1 decode: the decoded vectors go straight into 4 partial sums
                    for j in T.unroll(PARTIALS):
                        for lane in T.vectorized(LANES):
                            acc1[j, lane] = T.float32(0)
                    for kb in range(kb_n):
                        for j in T.unroll(vecs):
                            for lane in T.vectorized(LANES):
                                # no `col = ...` here: TVM vectorises a Let in a vectorised
                                # loop as one value for all lanes (the codes came out wrong)
                                acc1[j % PARTIALS, lane] = acc1[j % PARTIALS, lane] + x32[
                                    0, kb * block + j * LANES + lane
                                ] * weight(
                                    w[nn, kb * block + j * LANES + lane],
                                    s[nn // block, kb],
                                    small_scales,
                                )
                    reduce_store(acc1, y, 0, nn)
                else:
                    for i0 in range((m + ROWS - 1) // ROWS):
                        for i, j in T.grid(T.min(ROWS, m - i0 * ROWS), PARTIALS):
                            for lane in T.vectorized(LANES):
                                acc[i, j, lane] = T.float32(0)
                        for kb in range(kb_n):
                            for j in T.unroll(vecs):
                                for lane in T.vectorized(LANES):
                                    wblk[j, lane] = weight(
                                        w[nn, kb * block + j * LANES + lane],
                                        s[nn // block, kb],
                                        small_scales,
                                    )
                            for i in range(T.min(ROWS, m - i0 * ROWS)):
                                for j in T.unroll(vecs):
                                    for lane in T.vectorized(LANES):
                                        acc[i, j % PARTIALS, lane] = (
                                            acc[i, j % PARTIALS, lane]
                                            + x32[i0 * ROWS + i, kb * block + j * LANES + lane]
                                            * wblk[j, lane]
                                        )
                        for i in range(T.min(ROWS, m - i0 * ROWS)):
                            for j, lane in T.grid(PARTIALS, LANES):
                                acc1[j, lane] = acc[i, j, lane]
                            reduce_store(acc1, y, i0 * ROWS + i, nn)
            for lane in T.vectorized(32):  # OR the 64 lanes down to seen[0]
                seen[lane] = seen[lane] | seen[lane + 32]
            for lane in T.vectorized(16):
                seen[lane] = seen[lane] | seen[lane + 16]
            for lane in T.vectorized(8):
                seen[lane] = seen[lane] | seen[lane + 8]
            for lane in T.vectorized(4):
                seen[lane] = seen[lane] | seen[lane + 4]
            for lane in T.vectorized(2):
                seen[lane] = seen[lane] | seen[lane + 2]
            if (seen[0] | seen[1]) >= T.uint8(0x80):  # rare: find the rows, NaN their outputs
                for nn in range(n0 * CHUNK, T.min(n, n0 * CHUNK + CHUNK)):
                    for kk in range(k):
                        if (T.reinterpret("uint8", w[nn, kk]) & T.uint8(0x7F)) == T.uint8(0x7F):
                            for i in range(m):
                                y[i, nn] = T.Cast(dtype, T.float32("nan"))

    @T.prim_func(private=True)
    def gemv(
        x_h: T.handle,
        w: T.Buffer((n, k), "float8_e4m3fn"),
        s: T.Buffer((nb_n, kb_n), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        m = T.int32()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        xf = T.alloc_buffer((m, k), "float32")
        big = T.alloc_buffer((1,), "int32", scope="local")
        for i, kk in T.grid(m, k):
            xf[i, kk] = T.Cast("float32", x[i, kk])
        big[0] = 0
        for bi, bj in T.grid(nb_n, kb_n):
            big[0] = big[0] | T.Cast("int32", T.abs(s[bi, bj]) >= T.float32(_BIG_SCALE))
        if big[0] == 0:
            rows_dot(xf, w, s, y, m, True)
        else:
            rows_dot(xf, w, s, y, m, False)

    return gemv.with_attr("global_symbol", symbol)


def _gemv_applies(node: ir.Node) -> bool:
    n, k = (static(d) for d in node.operands[1].type.shape)
    block = node.op.block
    return n is not None and k is not None and block % LANES == 0 and k % block == 0


def _schedule(node: ir.Node) -> Any:
    """The PrimFunc for `node`: the hand-written GEMV when its shapes allow, else the te
    compute with the "nt" matmul schedule."""

    def schedule(func: Any) -> Any:
        if not _gemv_applies(node):
            return schedule_matmul_cpu(func, True)
        n, k = (int(d) for d in node.operands[1].type.shape)
        dtype = tvm_dtype(node.operands[0].dtype)
        symbol = str(func.attrs["global_symbol"])
        return fp8_gemv_cpu(n, k, node.op.block, dtype, symbol)

    return schedule


@dataclass
class MatmulFP8Launch(KernelLaunch):
    """The kernel, or the op's reference (the weight dequantised to f32, then `torch.matmul`)
    under blas="always", and under "auto" for prefill-sized GEMMs (FP8_BLAS_MIN_ROWS rows and
    BLAS_MIN_FLOPS)."""

    blas: str = "auto"

    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Any:
        from backends.tvm.emitters import reference_call, shape_of

        m, k = shape_of(self.node.operands[0], env)
        n = shape_of(self.node.operands[1], env)[0]
        prefill = m >= FP8_BLAS_MIN_ROWS and uses_blas(self.blas, 2 * m * n * k)
        if self.blas == "always" or prefill:
            return self.counted("blas", reference_call(self.node, env))
        return super().bind(env, fns, reuse)


@TVM_EMITTERS.register("linalg.matmul_fp8")
def emit_matmul_fp8(node: ir.Node, target: Target, options: dict) -> KernelLaunch:
    """One kernel (`fp8_gemv_cpu` or the "nt" matmul schedule); BLAS for prefill GEMMs."""
    body, index = body_of_one_op(node)
    kernel = make_kernel(body, kernel_name(node), signature(node), _schedule(node), loc=node.loc)
    return MatmulFP8Launch(node, [kernel], index, blas=options.get("blas", "auto"))
