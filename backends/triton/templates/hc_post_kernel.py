"""Triton kernel of `hc.post`, the mHC post-mix (v4-architecture.md §3.1, §5 K13).

Read as text by `hc.py` (a `KernelSource`); never imported. One program owns BLOCK_T tokens and
BLOCK_D channels of every stream:

    out[t, k, :] = post[t, k]·f[t, :] + Σ_j comb[t, j, k]·residual[t, j, :]      (fp32)

Output stream k reads column k of comb; the sum over the N_HC input streams is unrolled.
"""

import triton
import triton.language as tl


@triton.jit
def hc_post(
    f_ptr,  # [tokens, D]
    res_ptr,  # [tokens, N_HC, D]
    post_ptr,  # [tokens, N_HC]
    comb_ptr,  # [tokens, N_HC, N_HC]
    out_ptr,  # [tokens, N_HC, D], residual's dtype
    n_tokens,
    D,
    N_HC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < n_tokens
    mask = token_mask[:, None] & (d < D)[None, :]
    row = tokens.to(tl.int64)
    hc = tl.arange(0, N_HC)

    # post ⊗ f: every output stream k starts from post[t, k]·f[t, :]
    f = tl.load(f_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    post = tl.load(
        post_ptr + row[:, None] * N_HC + hc[None, :], mask=token_mask[:, None], other=0.0
    ).to(tl.float32)
    out = post[:, :, None] * f[:, None, :]  # [BLOCK_T, N_HC (k), BLOCK_D]

    # + combᵀ·residual: input stream j adds comb[t, j, k]·residual[t, j, :] to each stream k
    for j in tl.static_range(N_HC):
        res_j = tl.load(
            res_ptr + (row[:, None] * N_HC + j) * D + d[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        comb_j = tl.load(
            comb_ptr + (row[:, None] * N_HC + j) * N_HC + hc[None, :],
            mask=token_mask[:, None],
            other=0.0,
        ).to(tl.float32)
        out += comb_j[:, :, None] * res_j[:, None, :]

    out_offs = (row[:, None, None] * N_HC + hc[None, :, None]) * D + d[None, None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask[:, None, :])
