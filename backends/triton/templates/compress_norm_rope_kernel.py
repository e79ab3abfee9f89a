"""Triton kernel finishing `attn.compress` and `attn.compress_step` entries (§3.4, §5 K6).

Read as text by `compress.py` (a `KernelSource`); never imported. One program per pooled row:

1. RMSNorm(row; norm, EPS) in fp32, rounded to the activation dtype (the pooled rows' dtype);
2. RoPE (interleaved pairs) of the last 2·HALF channels at the entry's block start: each channel
   reads its pair partner's normalised value, so no shuffle between lanes is needed;
3. store: prefill (STEP=False) writes entry row `row` with cos/sin row `row % n_blocks`; a decode
   step (STEP=True, row = batch) writes cache row min(pos // RATIO, L - 1) with cos/sin row 0,
   and only when position pos completes its block ((pos + 1) % RATIO == 0).
"""

import triton
import triton.language as tl


@triton.jit
def compress_norm_rope(
    pooled_ptr,  # [rows, C], the activation dtype
    norm_ptr,  # [C]
    cos_ptr,  # [n_angles, HALF]
    sin_ptr,  # [n_angles, HALF]
    out_ptr,  # prefill: [rows, C]; step: the cache [B, L, C]
    pos_ptr,  # 0-d position (read only when STEP)
    n_blocks,  # prefill: entries per batch row
    L,  # step: cache rows
    C,
    HALF,
    RATIO: tl.constexpr,
    EPS: tl.constexpr,
    STEP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if STEP:
        pos = tl.load(pos_ptr).to(tl.int64)
        if (pos + 1) % RATIO != 0:
            return  # the block is still open: nothing reaches the cache
        out_row = row * L + tl.minimum(pos // RATIO, L - 1)
        angle_row = 0
    else:
        out_row = row
        angle_row = row % n_blocks
    ch = tl.arange(0, BLOCK_C)
    mask = ch < C

    # 1. RMSNorm in fp32, rounded to the activation dtype
    x = tl.load(pooled_ptr + row * C + ch, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / C + EPS)
    weight = tl.load(norm_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    y = (x * inv_rms * weight).to(pooled_ptr.dtype.element_ty).to(tl.float32)

    # 2. RoPE of pairs (2i, 2i+1) of the last 2·HALF channels: the partner is rel ^ 1
    start = C - 2 * HALF
    rel = ch - start
    rotated = (rel >= 0) & mask
    rel = tl.where(rotated, rel, 0)
    partner = start + (rel ^ 1)
    x_p = tl.load(pooled_ptr + row * C + partner, mask=rotated, other=0.0).to(tl.float32)
    w_p = tl.load(norm_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
    y_p = (x_p * inv_rms * w_p).to(pooled_ptr.dtype.element_ty).to(tl.float32)
    cos = tl.load(cos_ptr + angle_row * HALF + rel // 2, mask=rotated, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + angle_row * HALF + rel // 2, mask=rotated, other=0.0).to(tl.float32)
    even = rel % 2 == 0
    out = tl.where(even, y * cos - y_p * sin, y_p * sin + y * cos)
    out = tl.where(rotated, out.to(pooled_ptr.dtype.element_ty).to(tl.float32), y)

    # 3. store (cast to the destination's dtype: the cache may differ from the activations)
    tl.store(out_ptr + out_row * C + ch, out.to(out_ptr.dtype.element_ty), mask=mask)
