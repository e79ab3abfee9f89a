"""Triton kernel of `linalg.matmul_fp8` (ir/ops/quant.py): y = x @ dequant(w)ᵀ, the FP8 weight
decoded in registers after its load, so it crosses memory as 1 byte per element.

Read as text by `quant.py` (a `KernelSource`); never imported. One program owns BLOCK_M rows of
x and BLOCK_N output channels and walks K in BLOCK_K chunks; BLOCK_K divides the scale block
BLOCK, so each chunk meets one scale per output channel:

    y[m, n] = Σ_chunks scale[n // BLOCK, k0 // BLOCK] · Σ_{k in chunk} f32(x[m, k]) · f32(w[n, k])

(fp32 sums, rounded once to y's dtype). BLOCK_M < 16 (decode GEMVs): a broadcast multiply and a
row sum; BLOCK_M >= 16: `tl.dot` on x's dtype (IEEE for fp32), the weight converted exactly.
"""

import triton
import triton.language as tl


@triton.jit
def matmul_fp8(
    x_ptr,  # [M, K] f32/bf16/f16
    w_ptr,  # [N, K] float8_e4m3fn (tl.float8e4nv)
    scale_ptr,  # [ceil(N/BLOCK), SCALE_COLS] f32
    y_ptr,  # [M, N], x's dtype
    M,
    N,
    K,
    SCALE_COLS,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tl.static_assert(BLOCK % BLOCK_K == 0)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
    scale_rows = scale_ptr + (cols // BLOCK) * SCALE_COLS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        # one scale per output channel for this chunk (BLOCK_K divides BLOCK): applied to the
        # chunk's partial sums, Σ_k x·(w·s) = (Σ_k x·w)·s
        scale = tl.load(scale_rows + k0 // BLOCK, mask=col_ok, other=0.0)
        if BLOCK_M >= 16:
            # e4m3 -> x's dtype is exact (bf16/f16/f32 hold every e4m3 value); fp32 accumulate
            w_x = w.to(x.dtype)
            if x.dtype == tl.float32:
                part = tl.dot(x, tl.trans(w_x), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(w_x))
        else:
            part = tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        acc += part * scale[None, :]
    y_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
