"""Triton kernel of `attn.compress`, part 1: projection and softmax pooling (§3.4, §5 K6).

Read as text by `compress.py` (a `KernelSource`); never imported. One program owns BLOCK_E
compressed entries (their BLOCK_E·RATIO token rows) and BLOCK_C output channels of batch row b:

1. kv = x·wkvᵀ and z = x·wgateᵀ + ape[token % RATIO] for those rows and channels (`tl.dot`,
   fp32 accumulators);
2. per channel, a softmax over the RATIO rows of each entry, reduced at once to its running max,
   denominator and weighted sum;
3. with OVERLAP the same for the "b" half of the channels on the rows of the previous block
   (none for entry 0), merged with the "a" half like two blocks of an online softmax;
4. pooled = Σ softmax(z)·kv, stored in x's dtype. `compress_norm_rope` finishes the entries.
"""

import triton
import triton.language as tl


@triton.jit
def _pool_half(
    x_ptr,
    wkv_ptr,
    wgate_ptr,
    ape_ptr,
    tokens,  # [BLOCK_E·RATIO] token rows, entry-major
    row_mask,  # rows that exist (a missing predecessor block pools nothing)
    w_rows,  # [BLOCK_C] rows of wkv/wgate (output channels of this half)
    D,
    W,
    BLOCK_E: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """(max, denominator, weighted sum) of the softmax over each entry's rows, [BLOCK_E, BLOCK_C];
    the max is -inf and the sums 0 where an entry has no rows."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens.to(tl.int64)[:, None] * D + ks[None, :]
    w_offs = w_rows.to(tl.int64)[None, :] * D + ks[:, None]
    kv = tl.zeros((BLOCK_E * RATIO, BLOCK_C), dtype=tl.float32)
    z = tl.zeros((BLOCK_E * RATIO, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = ks < D - k0
        x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wkv = tl.load(wkv_ptr + w_offs + k0, mask=k_mask[:, None], other=0.0)
        wgate = tl.load(wgate_ptr + w_offs + k0, mask=k_mask[:, None], other=0.0)
        if DOT_F32:  # f32 operands, mixed dtypes, or the CPU interpreter (it mis-multiplies bf16)
            x = x.to(tl.float32)
            kv = tl.dot(x, wkv.to(tl.float32), kv, input_precision="ieee")
            z = tl.dot(x, wgate.to(tl.float32), z, input_precision="ieee")
        else:
            kv = tl.dot(x, wkv, kv)
            z = tl.dot(x, wgate, z)

    # + ape[slot in block]; rows that do not exist get score -inf (no weight)
    slots = tokens % RATIO
    ape = tl.load(ape_ptr + slots[:, None] * W + w_rows[None, :], mask=row_mask[:, None], other=0.0)
    z = tl.where(row_mask[:, None], z + ape.to(tl.float32), float("-inf"))

    # softmax over the RATIO rows of each entry, per channel
    kv = tl.reshape(kv, (BLOCK_E, RATIO, BLOCK_C))
    z = tl.reshape(z, (BLOCK_E, RATIO, BLOCK_C))
    z_max = tl.max(z, axis=1)
    shift = tl.where(z_max == float("-inf"), 0.0, z_max)  # exp(-inf - 0) = 0, not NaN
    p = tl.exp(z - shift[:, None, :])
    return z_max, tl.sum(p, axis=1), tl.sum(p * kv, axis=1)


@triton.jit
def compress_pool(
    x_ptr,  # [B, T, D]
    wkv_ptr,  # [W, D]
    wgate_ptr,  # [W, D]
    ape_ptr,  # [RATIO, W]
    pooled_ptr,  # [B, n_blocks, C], x's dtype
    T,
    D,
    C,
    W,  # 2·C with OVERLAP, else C
    n_blocks,  # T // RATIO complete blocks
    RATIO: tl.constexpr,
    OVERLAP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    tl.static_assert(BLOCK_E * RATIO >= 16, "tl.dot needs at least 16 rows")
    tl.static_assert(BLOCK_K >= 16, "tl.dot needs K tiles of at least 16")
    entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    batch = tl.program_id(2).to(tl.int64)
    x_ptr += batch * T * D
    # channels past C repeat the last one (no load mask needed); the store drops them
    c_rows = tl.minimum(channels, C - 1)
    rows = tl.arange(0, BLOCK_E * RATIO)
    tokens = tl.program_id(0) * BLOCK_E * RATIO + rows
    in_blocks = tokens < n_blocks * RATIO

    # 1-2. the "a" half: channels [W - C, W) on the entry's own block
    z_max, den, num = _pool_half(
        x_ptr, wkv_ptr, wgate_ptr, ape_ptr, tokens, in_blocks, W - C + c_rows, D, W,
        BLOCK_E, RATIO, BLOCK_C, BLOCK_K, DOT_F32,
    )  # fmt: skip
    if OVERLAP:
        # 3. the "b" half: channels [0, C) on the previous block, merged by rescaling to the
        # common max (an online softmax over the two halves)
        prev = tokens - RATIO
        b_max, b_den, b_num = _pool_half(
            x_ptr, wkv_ptr, wgate_ptr, ape_ptr, prev, in_blocks & (prev >= 0), c_rows, D, W,
            BLOCK_E, RATIO, BLOCK_C, BLOCK_K, DOT_F32,
        )  # fmt: skip
        both = tl.maximum(z_max, b_max)
        a_scale = tl.exp(z_max - both)
        b_scale = tl.exp(b_max - both)
        den = den * a_scale + b_den * b_scale
        num = num * a_scale + b_num * b_scale

    # 4. the pooled entries, rounded to x's dtype as the reference does before its RMSNorm
    pooled = num / den
    offs = (batch * n_blocks + entries[:, None]) * C + channels[None, :]
    mask = (entries < n_blocks)[:, None] & (channels < C)[None, :]
    tl.store(pooled_ptr + offs, pooled.to(pooled_ptr.dtype.element_ty), mask=mask)
