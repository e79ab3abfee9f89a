"""Kernel text of `attn.sdpa`: dense attention (MHA/GQA/MQA) forward, flash style.

One program owns BLOCK_M queries of one (sequence, query head) and walks the keys of its KV
head (head // GROUP) BLOCK_N at a time with an online softmax: a running max m_i, sum l_i and
unnormalised output acc in fp32. Causal and window visibility come from positions (query t at
t + OFFSET, key s at s), so the key loop runs only over the band [lo, hi) that any of the
block's queries can see; a bool or additive mask is read through strides that are 0 on its
broadcast dims (the host never expands it). With sinks the running max starts at the sink
logit and the sink's exp(0) = 1 starts the sum. A row that sees no key keeps l_i = 0 and
stores 0; the max used for shifting is 0 while the row has seen nothing (-inf - -inf is NaN).

Loop bounds depend on the program (the causal band): Triton 3.6 and 3.9 compile that, and both
interpreters run it.
"""

from __future__ import annotations

SDPA_SOURCE = '''\
# Hand-written template from dsv4c backends/triton/templates/attention_sdpa_kernel.py.
# kernel:   sdpa_fwd (dense attention, GQA head h reads KV head h // GROUP)
# computes: o = sum_s exp(z_s) v_s / (sum_s exp(z_s) [+ exp(sink)]),
#           z_s = SCALE q.k_s [capped: SOFTCAP tanh(z_s / SOFTCAP)] [+ mask], -inf where s is
#           not visible
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_IN_F32: tl.constexpr):
    """acc + a @ b with fp32 accumulation (IEEE products for fp32 operands)."""
    if DOT_IN_F32:  # the CPU interpreter mis-multiplies bf16 tiles, and for fp32 exactness
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tanh(x):
    """tanh from exp (portable across Triton versions and targets): sign(x)(1-e)/(1+e),
    e = exp(-2|x|)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def sdpa_fwd(
    q_ptr, k_ptr, v_ptr, mask_ptr, sinks_ptr, out_ptr,
    T, S, HQ, GROUP, D, DV, mask_sb, mask_sh, mask_st, mask_ss,
    SCALE: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, WINDOW: tl.constexpr,
    MASK: tl.constexpr, SINKS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_IN_F32: tl.constexpr, KV_BSHD: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot tiles >= 16")
    # program: queries [t0, t0 + BLOCK_M) of query head h of sequence b
    t0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HQ
    h = bh % HQ
    # key s of this head is row kv_row + s * kv_step of k viewed as [rows, D] (v: [rows, DV]):
    # [B,Hkv,S,D] rows are consecutive, [B,S,Hkv,D] (KV_BSHD) rows Hkv apart
    hkv = HQ // GROUP
    if KV_BSHD:
        kv_row = b * S * hkv + h // GROUP
        kv_step = hkv
    else:
        kv_row = (b * hkv + h // GROUP) * S
        kv_step = 1
    dtype = q_ptr.dtype.element_ty
    rows = t0 + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + (bh * T + rows[:, None]) * D + cols_d[None, :],
                mask=(rows < T)[:, None] & (cols_d < D)[None, :], other=0.0)
    # softmax state; with a sink its logit is the first term (max = sink, sum = exp(0))
    if SINKS:
        m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(sinks_ptr + h).to(tl.float32)
        l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    # the keys any query of the block may see: the causal band [first - WINDOW + 1, last]
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, t0 + BLOCK_M + OFFSET)
    if WINDOW > 0:
        lo = tl.maximum(0, t0 + OFFSET - WINDOW + 1) // BLOCK_N * BLOCK_N
    pos = rows + OFFSET
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + (kv_row + keys[:, None] * kv_step) * D + cols_d[None, :],
                    mask=(keys < S)[:, None] & (cols_d < D)[None, :], other=0.0)
        # z = SCALE q.k (+ additive mask), -inf where the key is not visible
        z = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_IN_F32)
        z = z * SCALE
        if SOFTCAP > 0:  # logit soft-capping: SOFTCAP tanh(z / SOFTCAP)
            z = SOFTCAP * _tanh(z / SOFTCAP)
        seen = (keys < S)[None, :] & (rows < T)[:, None]
        if CAUSAL:
            seen = seen & (keys[None, :] <= pos[:, None])
        if WINDOW > 0:
            seen = seen & (pos[:, None] - keys[None, :] < WINDOW)
        if MASK > 0:
            at = b * mask_sb + h * mask_sh + rows[:, None] * mask_st + keys[None, :] * mask_ss
            mask = tl.load(mask_ptr + at, mask=seen, other=0)
            if MASK == 1:
                seen = seen & (mask != 0)
            else:
                z = z + mask.to(tl.float32)
        z = tl.where(seen, z, float("-inf"))
        # online softmax; the shift stays 0 while a row has seen nothing
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(z - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (kv_row + keys[:, None] * kv_step) * DV + cols_dv[None, :],
                    mask=(keys < S)[:, None] & (cols_dv < DV)[None, :], other=0.0)
        acc = _dot(p.to(dtype), v, acc * alpha[:, None], DOT_IN_F32)
        m_i = m_new
    # o = acc / l; a row that saw nothing (l = 0) stores 0
    o = tl.where((l_i > 0.0)[:, None], acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], 0.0)
    tl.store(out_ptr + (bh * T + rows[:, None]) * DV + cols_dv[None, :], o.to(dtype),
             mask=(rows < T)[:, None] & (cols_dv < DV)[None, :])
'''
