"""Triton kernel of `hc.pre`, the mHC pre-mix (v4-architecture.md §3.1, §5 K1-K3).

Read as text by `hc.py` (a `KernelSource`); never imported. One program owns BLOCK_T tokens:

1. mix = X·fnᵀ over the flattened streams (n·d columns), with the sum of squares alongside,
   scaled by rsqrt(mean(X²) + NORM_EPS): two fp32 `tl.dot`s, one for the pre|post rows and one
   for the n·n comb rows;
2. pre = sigmoid(α_pre·mix + base) + EPS and post = 2·sigmoid(α_post·mix + base);
3. comb: ITERS Sinkhorn steps on the [BLOCK_T, n, n] tile, all in registers;
4. y = Σ_j pre_j·X_j, streaming X a second time in BLOCK_D chunks.
"""

import triton
import triton.language as tl


@triton.jit
def hc_pre(
    x_ptr,  # [tokens, N_HC, D] contiguous
    fn_ptr,  # [(2 + N_HC)·N_HC, N_HC·D] rows: pre | post | comb (row-major j·N_HC + k)
    scale_ptr,  # [3]: α_pre, α_post, α_comb
    base_ptr,  # [(2 + N_HC)·N_HC]
    y_ptr,  # [tokens, D], x's dtype
    post_ptr,  # [tokens, N_HC] fp32
    comb_ptr,  # [tokens, N_HC, N_HC] fp32
    n_tokens,
    D,
    N_HC: tl.constexpr,
    ITERS: tl.constexpr,
    EPS: tl.constexpr,
    NORM_EPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_PP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(N_HC * N_HC >= 16, "tl.dot needs 16 comb columns: n must be at least 4")
    tl.static_assert(BLOCK_PP >= 2 * N_HC, "the pre|post rows fit BLOCK_PP")
    tl.static_assert(BLOCK_PP % N_HC == 0, "BLOCK_PP is a whole number of groups of N_HC")
    pid = tl.program_id(0)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    row = tokens.to(tl.int64)
    K = N_HC * D
    hc = tl.arange(0, N_HC)
    pp_rows = tl.arange(0, BLOCK_PP)  # fn rows of pre and post, padded to a tl.dot width
    comb_rows = 2 * N_HC + tl.arange(0, N_HC * N_HC)
    ks = tl.arange(0, BLOCK_K)

    # 1. projection of the flattened streams onto every fn row, and their sum of squares
    acc_pp = tl.zeros((BLOCK_T, BLOCK_PP), dtype=tl.float32)
    acc_comb = tl.zeros((BLOCK_T, N_HC * N_HC), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        x = tl.load(
            x_ptr + row[:, None] * K + k[None, :],
            mask=token_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        fn_pp = tl.load(
            fn_ptr + pp_rows[None, :] * K + k[:, None],
            mask=k_mask[:, None] & (pp_rows < 2 * N_HC)[None, :],
            other=0.0,
        ).to(tl.float32)
        fn_comb = tl.load(
            fn_ptr + comb_rows[None, :] * K + k[:, None], mask=k_mask[:, None], other=0.0
        ).to(tl.float32)
        acc_pp = tl.dot(x, fn_pp, acc_pp, input_precision="ieee")
        acc_comb = tl.dot(x, fn_comb, acc_comb, input_precision="ieee")
        sum_sq += tl.sum(x * x, axis=1)
    inv_rms = tl.rsqrt(sum_sq / K + NORM_EPS)

    # 2. pre and post gates: view the pre|post columns as [BLOCK_T, group, N_HC]
    alpha_pre = tl.load(scale_ptr).to(tl.float32)
    alpha_post = tl.load(scale_ptr + 1).to(tl.float32)
    alpha_comb = tl.load(scale_ptr + 2).to(tl.float32)
    alpha_pp = tl.where(pp_rows < N_HC, alpha_pre, alpha_post)
    base_pp = tl.load(base_ptr + pp_rows, mask=pp_rows < 2 * N_HC, other=0.0).to(tl.float32)
    z_pp = acc_pp * inv_rms[:, None] * alpha_pp[None, :] + base_pp[None, :]
    gates = tl.reshape(tl.sigmoid(z_pp), (BLOCK_T, BLOCK_PP // N_HC, N_HC))
    group = tl.arange(0, BLOCK_PP // N_HC)[None, :, None]
    pre = tl.sum(tl.where(group == 0, gates, 0.0), axis=1) + EPS  # [BLOCK_T, N_HC]
    post = 2.0 * tl.sum(tl.where(group == 1, gates, 0.0), axis=1)

    # 3. Sinkhorn on comb[t, j, k]: row softmax + EPS, columns, then ITERS-1 × (rows, columns)
    base_comb = tl.load(base_ptr + comb_rows).to(tl.float32)
    logits = acc_comb * inv_rms[:, None] * alpha_comb + base_comb[None, :]
    logits = tl.reshape(logits, (BLOCK_T, N_HC, N_HC))
    comb = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    comb = comb / tl.sum(comb, axis=2)[:, :, None] + EPS
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + EPS)
    for _ in range(ITERS - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + EPS)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + EPS)

    tl.store(post_ptr + row[:, None] * N_HC + hc[None, :], post, mask=token_mask[:, None])
    comb_offs = row[:, None, None] * (N_HC * N_HC) + hc[None, :, None] * N_HC + hc[None, None, :]
    tl.store(comb_ptr + comb_offs, comb, mask=token_mask[:, None, None])

    # 4. y = Σ_j pre_j·X_j, BLOCK_D channels of all N_HC streams at a time
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
