"""Triton kernel of `hc.head`, the mHC final contraction (v4-architecture.md §3.1, §5 K19).

Read as text by `hc.py` (a `KernelSource`); never imported. One program owns BLOCK_T tokens:

1. mix = X·fnᵀ over the flattened streams (n·d columns, n fn rows), with the sum of squares
   alongside, scaled by rsqrt(mean(X²) + NORM_EPS) — one fp32 `tl.dot`, rows padded to BLOCK_P;
2. pre = sigmoid(α·mix + base) + EPS;
3. y = Σ_j pre_j·X_j, streaming X a second time in BLOCK_D chunks.
"""

import triton
import triton.language as tl


@triton.jit
def hc_head(
    x_ptr,  # [tokens, N_HC, D] contiguous
    fn_ptr,  # [N_HC, N_HC·D]
    scale_ptr,  # [1]: α
    base_ptr,  # [N_HC]
    y_ptr,  # [tokens, D], x's dtype
    n_tokens,
    D,
    N_HC: tl.constexpr,
    EPS: tl.constexpr,
    NORM_EPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_P >= 16, "tl.dot needs at least 16 columns")
    tl.static_assert(BLOCK_P % N_HC == 0, "BLOCK_P is a whole number of groups of N_HC")
    pid = tl.program_id(0)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    row = tokens.to(tl.int64)
    K = N_HC * D
    hc = tl.arange(0, N_HC)
    fn_rows = tl.arange(0, BLOCK_P)
    ks = tl.arange(0, BLOCK_K)

    # 1. projection of the flattened streams onto the fn rows, and their sum of squares
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        x = tl.load(
            x_ptr + row[:, None] * K + k[None, :],
            mask=token_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        fn = tl.load(
            fn_ptr + fn_rows[None, :] * K + k[:, None],
            mask=k_mask[:, None] & (fn_rows < N_HC)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(x, fn, acc, input_precision="ieee")
        sum_sq += tl.sum(x * x, axis=1)
    inv_rms = tl.rsqrt(sum_sq / K + NORM_EPS)

    # 2. pre gates: the first N_HC columns, taken as group 0 of a [BLOCK_T, group, N_HC] view
    alpha = tl.load(scale_ptr).to(tl.float32)
    base = tl.load(base_ptr + fn_rows, mask=fn_rows < N_HC, other=0.0).to(tl.float32)
    gates = tl.sigmoid(acc * inv_rms[:, None] * alpha + base[None, :])
    gates = tl.reshape(gates, (BLOCK_T, BLOCK_P // N_HC, N_HC))
    group = tl.arange(0, BLOCK_P // N_HC)[None, :, None]
    pre = tl.sum(tl.where(group == 0, gates, 0.0), axis=1) + EPS  # [BLOCK_T, N_HC]

    # 3. y = Σ_j pre_j·X_j, BLOCK_D channels of all N_HC streams at a time
    ds = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + ds
        d_mask = d < D
        streams = tl.load(
            x_ptr + row[:, None, None] * K + hc[None, :, None] * D + d[None, None, :],
            mask=token_mask[:, None, None] & d_mask[None, None, :],
            other=0.0,
        ).to(tl.float32)
        y = tl.sum(pre[:, :, None] * streams, axis=1)
        tl.store(
            y_ptr + row[:, None] * D + d[None, :],
            y.to(y_ptr.dtype.element_ty),
            mask=token_mask[:, None] & d_mask[None, :],
        )
