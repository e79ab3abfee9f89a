"""Triton kernel of `attn.compress_step`, part 1: one decode token into the compressor state
(§3.4, §5 K6). Read as text by `compress.py` (a `KernelSource`); never imported.

One program owns batch row b and BLOCK_C output channels (with OVERLAP: state channels c of
the "b" half and C + c of the "a" half, so the programs of a row cover all W state channels):

1. the token's rows kv = x·wkvᵀ, z = x·wgateᵀ + ape[pos % RATIO] (fp32 GEMV chunks), rounded
   to the state dtype, go to state row pos % RATIO (+ RATIO with OVERLAP);
2. the open block is pooled per channel: softmax over rows [R - RATIO, R) of the "a" channels
   and, with OVERLAP, rows [0, RATIO) of the "b" channels (the previous block), merged like
   two blocks of an online softmax;
3. the new state is written; with OVERLAP, when the token completes its block, rows [0, RATIO)
   take the block just finished (rows [RATIO, 2·RATIO)), the predecessor of the next block;
4. the pooled row is stored in x's dtype; `compress_norm_rope` norms, rotates and, on a block
   boundary, writes it to the cache.
"""

import triton
import triton.language as tl


@triton.jit
def _state_half(
    x_ptr,
    wkv_ptr,
    wgate_ptr,
    ape_ptr,
    kv_state_ptr,
    score_state_ptr,
    kv_out_ptr,
    score_out_ptr,
    w_rows,  # [BLOCK_C] state channels (rows of wkv/wgate) of this half
    w_mask,
    slot,  # state row of the new token
    window,  # first of the RATIO state rows this half pools
    shift,  # the block completes: rows [0, RATIO) take rows [RATIO, 2·RATIO)
    D,
    W,
    R: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Update this half's state channels; (max, denominator, weighted sum) of its window."""
    # 1. GEMV: the token's kv and score on these channels, in fp32
    ks = tl.arange(0, BLOCK_K)
    w_offs = w_rows.to(tl.int64)[:, None] * D + ks[None, :]
    kv_new = tl.zeros((BLOCK_C,), dtype=tl.float32)
    z_new = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = ks < D - k0
        x = tl.load(x_ptr + k0 + ks, mask=k_mask, other=0.0).to(tl.float32)
        w_load = w_mask[:, None] & k_mask[None, :]
        wkv = tl.load(wkv_ptr + w_offs + k0, mask=w_load, other=0.0).to(tl.float32)
        wgate = tl.load(wgate_ptr + w_offs + k0, mask=w_load, other=0.0).to(tl.float32)
        kv_new += tl.sum(wkv * x[None, :], axis=1)
        z_new += tl.sum(wgate * x[None, :], axis=1)
    ape = tl.load(ape_ptr + (slot % RATIO) * W + w_rows, mask=w_mask, other=0.0)
    z_new += ape.to(tl.float32)
    kv_new = kv_new.to(kv_out_ptr.dtype.element_ty).to(tl.float32)
    z_new = z_new.to(score_out_ptr.dtype.element_ty).to(tl.float32)

    # the state with the token written: [R, BLOCK_C]
    rows = tl.arange(0, R)
    offs = rows[:, None] * W + w_rows[None, :]
    mask = w_mask[None, :]
    is_slot = (rows == slot)[:, None]
    kv = tl.where(is_slot, kv_new[None, :], tl.load(kv_state_ptr + offs, mask=mask, other=0.0))
    z = tl.where(is_slot, z_new[None, :], tl.load(score_state_ptr + offs, mask=mask, other=0.0))
    kv = kv.to(tl.float32)
    z = z.to(tl.float32)

    # 3. the next state: row r, or row r + RATIO for r < RATIO when the block completes
    src = tl.where(shift & (rows < RATIO), rows + RATIO, rows)
    src_offs = src[:, None] * W + w_rows[None, :]
    src_slot = (src == slot)[:, None]
    kv_next = tl.where(src_slot, kv_new[None, :], tl.load(kv_state_ptr + src_offs, mask=mask))
    z_next = tl.where(src_slot, z_new[None, :], tl.load(score_state_ptr + src_offs, mask=mask))
    tl.store(kv_out_ptr + offs, kv_next.to(kv_out_ptr.dtype.element_ty), mask=mask)
    tl.store(score_out_ptr + offs, z_next.to(score_out_ptr.dtype.element_ty), mask=mask)

    # 2. softmax over the window rows, per channel
    in_window = ((rows >= window) & (rows < window + RATIO))[:, None]
    z = tl.where(in_window, z, float("-inf"))
    z_max = tl.max(z, axis=0)
    safe = tl.where(z_max == float("-inf"), 0.0, z_max)  # exp(-inf - 0) = 0, not NaN
    p = tl.exp(z - safe[None, :])
    return z_max, tl.sum(p, axis=0), tl.sum(p * kv, axis=0)


@triton.jit
def compress_step(
    x_ptr,  # [B, 1, D]
    pos_ptr,  # 0-d position of the token
    kv_state_ptr,  # [B, R, W]
    score_state_ptr,  # [B, R, W]
    wkv_ptr,  # [W, D]
    wgate_ptr,  # [W, D]
    ape_ptr,  # [RATIO, W]
    kv_out_ptr,  # [B, R, W], the next kv_state
    score_out_ptr,  # [B, R, W], the next score_state
    pooled_ptr,  # [B, C], x's dtype
    D,
    C,
    W,
    RATIO: tl.constexpr,
    R: tl.constexpr,  # state rows: 2·RATIO with OVERLAP, else RATIO
    OVERLAP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    pos = tl.load(pos_ptr).to(tl.int64)
    slot = pos % RATIO + (R - RATIO)
    shift = ((pos + 1) % RATIO == 0) & OVERLAP  # the block completes: shift the state
    x_ptr += batch * D
    state = batch * R * W
    kv_state_ptr += state
    score_state_ptr += state
    kv_out_ptr += state
    score_out_ptr += state

    # 1-3. the "a" half: channels [W - C, W), pooled over the open block (rows [R - RATIO, R))
    z_max, den, num = _state_half(
        x_ptr, wkv_ptr, wgate_ptr, ape_ptr, kv_state_ptr, score_state_ptr, kv_out_ptr,
        score_out_ptr, W - C + channels, c_mask, slot, R - RATIO, shift, D, W,
        R, RATIO, BLOCK_C, BLOCK_K,
    )  # fmt: skip
    if OVERLAP:
        # the "b" half: channels [0, C), pooled over the previous block (rows [0, RATIO))
        b_max, b_den, b_num = _state_half(
            x_ptr, wkv_ptr, wgate_ptr, ape_ptr, kv_state_ptr, score_state_ptr, kv_out_ptr,
            score_out_ptr, channels, c_mask, slot, 0, shift, D, W,
            R, RATIO, BLOCK_C, BLOCK_K,
        )  # fmt: skip
        both = tl.maximum(z_max, b_max)
        a_scale = tl.exp(z_max - both)
        b_scale = tl.exp(b_max - both)
        den = den * a_scale + b_den * b_scale
        num = num * a_scale + b_num * b_scale

    # 4. the pooled row, rounded to x's dtype
    pooled = num / den
    tl.store(pooled_ptr + batch * C + channels, pooled.to(pooled_ptr.dtype.element_ty), mask=c_mask)
