"""Kernel text of `attn.sdpa` with index-selected keys (`indexed=true`): sparse attention over
the key rows each query picked (DSA's top-k tokens, NSA's selected blocks as token rows).

One program owns one query t of one sequence and BLOCK_H query heads of one KV group (the heads
sharing the KV head and therefore the picked rows: MQA/MLA puts every head in the group, so one
gathered key row feeds BLOCK_H dot products, as FlashMLA's sparse kernels do). It walks the
query's n index slots BLOCK_N at a time: loads the slots' row numbers, gathers those rows of k
(and of v, or the first DV channels of the same k rows when VALUE_IN_K) — the head dim in chunks
of BLOCK_D, so MLA's 576-wide latent rows fit — and runs the dense kernel's online softmax
(running max m_i, sum l_i, fp32 accumulator). A slot is a key when its row is in [0, S) and
visible by position (causal, window) and by a bool mask read at [b,h,t,s] through broadcast
strides; an additive mask is gathered the same way. Index slots outside [0, S) load nothing (row
0, masked). A row with no key stores 0.

The index operand is [B, HI, T, N], read through strides: HI = 1 (one set for every KV head,
head stride 0) or HKV.
"""

from __future__ import annotations

SDPA_INDEXED_SOURCE = '''\
# Hand-written template from dsv4c backends/triton/templates/attention_sdpa_indexed_kernel.py.
# kernel:   sdpa_indexed_fwd (attention over index-selected keys; query heads of one KV group
#           share the gathered rows)
# computes: o = sum_j exp(z_j) v_{s_j} / (sum_j exp(z_j) [+ exp(sink)]), s_j = idx[t, j],
#           z_j = SCALE q.k_{s_j} [capped] [+ mask], -inf where s_j is outside [0, S) or not
#           visible
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
    """tanh from exp (portable across Triton versions): sign(x)(1-e)/(1+e), e = exp(-2|x|)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def sdpa_indexed_fwd(
    q_ptr, k_ptr, v_ptr, mask_ptr, idx_ptr, sinks_ptr, out_ptr,
    T, S, N, HQ, GROUP, D, DV, idx_sb, idx_sh, idx_st, mask_sb, mask_sh, mask_st, mask_ss,
    SCALE: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, WINDOW: tl.constexpr,
    MASK: tl.constexpr, SINKS: tl.constexpr, SOFTCAP: tl.constexpr, VALUE_IN_K: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_IN_F32: tl.constexpr, KV_BSHD: tl.constexpr,
):
    tl.static_assert(BLOCK_H >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot tiles >= 16")
    # program: query t of sequence b, query heads [g0, g0 + BLOCK_H) of KV head kh's group
    t = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)
    head_blocks = tl.cdiv(GROUP, BLOCK_H)
    hkv = HQ // GROUP
    b = pid // (hkv * head_blocks)
    kh = (pid // head_blocks) % hkv
    g0 = (pid % head_blocks) * BLOCK_H
    dtype = q_ptr.dtype.element_ty
    heads = kh * GROUP + g0 + tl.arange(0, BLOCK_H)
    live = (g0 + tl.arange(0, BLOCK_H)) < GROUP
    cols_d = tl.arange(0, BLOCK_D)
    cols_dv = tl.arange(0, BLOCK_DV)
    q_rows = (b * HQ + heads) * T + t
    # key s is row kv_row + s * kv_step of k as [rows, D]: [B,S,Hkv,D] (KV_BSHD) rows Hkv apart
    if KV_BSHD:
        kv_row = b * S * hkv + kh
        kv_step = hkv
    else:
        kv_row = (b * hkv + kh) * S
        kv_step = 1
    idx_row = idx_ptr + b * idx_sb + kh * idx_sh + t * idx_st  # idx_sh = 0: one set for all
    # softmax state; with a sink its logit is the first term (max = sink, sum = exp(0))
    if SINKS:
        m_i = tl.load(sinks_ptr + heads, mask=live, other=0.0).to(tl.float32)
        l_i = tl.full((BLOCK_H,), 1.0, dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    pos = t + OFFSET
    for start in range(0, N, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        rows = tl.load(idx_row + slots, mask=slots < N, other=-1).to(tl.int64)
        key = (rows >= 0) & (rows < S)
        if CAUSAL:
            key = key & (rows <= pos)
        if WINDOW > 0:
            key = key & (pos - rows < WINDOW)
        rows = tl.where(key, rows, 0)
        # z = SCALE q.k (+ additive mask), -inf where the slot is no visible key; the head dim
        # in chunks of BLOCK_D (MLA's 576 = 4 x 128 + 64), q re-read per chunk from cache
        z = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + cols_d
            q = tl.load(q_ptr + q_rows[:, None] * D + cols[None, :],
                        mask=live[:, None] & (cols < D)[None, :], other=0.0)
            k = tl.load(k_ptr + (kv_row + rows[:, None] * kv_step) * D + cols[None, :],
                        mask=key[:, None] & (cols < D)[None, :], other=0.0)
            z = _dot(q, tl.trans(k), z, DOT_IN_F32)
        z = z * SCALE
        if SOFTCAP > 0:  # logit soft-capping: SOFTCAP tanh(z / SOFTCAP)
            z = SOFTCAP * _tanh(z / SOFTCAP)
        seen = live[:, None] & key[None, :]
        if MASK > 0:
            at = b * mask_sb + heads[:, None] * mask_sh + t * mask_st + rows[None, :] * mask_ss
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
        if VALUE_IN_K:  # values: the first DV channels of the same key rows
            v = tl.load(k_ptr + (kv_row + rows[:, None] * kv_step) * D + cols_dv[None, :],
                        mask=key[:, None] & (cols_dv < DV)[None, :], other=0.0)
        else:
            v = tl.load(v_ptr + (kv_row + rows[:, None] * kv_step) * DV + cols_dv[None, :],
                        mask=key[:, None] & (cols_dv < DV)[None, :], other=0.0)
        acc = _dot(p.to(dtype), v, acc * alpha[:, None], DOT_IN_F32)
        m_i = m_new
    # o = acc / l; a row that saw nothing (l = 0) stores 0
    o = tl.where((l_i > 0.0)[:, None], acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], 0.0)
    tl.store(out_ptr + q_rows[:, None] * DV + cols_dv[None, :], o.to(dtype),
             mask=live[:, None] & (cols_dv < DV)[None, :])
'''
