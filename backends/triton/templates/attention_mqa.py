"""Kernel text of `attn.sparse_mqa`: shared-KV sparse MQA with sink (v4-architecture.md §3.3,
§5 K10 + K11), as one module holding a prefill kernel and a split-KV decode kernel.

One program owns one query token and BLOCK_H of its heads: the heads are the M dimension of
both dots, because every head of a token attends to the same entries (MQA). Its entries are
the window rows, then the compressed rows (all visible ones for HCA, the picked ones for CSA,
-1 = none), walked BLOCK_N at a time with an online softmax whose running max starts at the
sink logit (so it is never -inf, and the sink joins the denominator once).

Head channels are held as two halves, even and odd channels: the interleaved RoPE pairs
(2i, 2i+1) then rotate elementwise, on the query in front and on the output behind. Entry rows
are loaded contiguous and split in registers; every dot runs on the halves.

Decode (one query row per sequence) splits the entries over SPLITS programs per head block,
each leaving an unnormalised partial (acc, max, sum) in fp32; `STAGE=1` combines them with the
sink and finishes like prefill. Both stages are one jit function (the `Launch` protocol holds
one kernel source) selected by the constexpr STAGE.

Loop bounds depend on the program (window start, visible entries, split range): Triton 3.6
and 3.9 compile that, and both interpreters run it (3.6's only with numpy < 2.4, whose `int()`
of a 1-element array it relies on; see backends/README.md).
"""

from __future__ import annotations

SPARSE_MQA_SOURCE = '''\
# Hand-written template from dsv4c backends/triton/templates/attention_mqa.py.
# kernels:  sparse_mqa_prefill, sparse_mqa_decode (STAGE 0: partials over KV splits, 1: combine)
# computes: o = inv_rope(sum_j exp(z_j) e_j / (sum_j exp(z_j) + exp(sink))), z_j = scale q'.e_j
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype, ROUND_BITS: tl.constexpr):
    """fp32 x rounded to dtype (to nearest even), back in fp32. ROUND_BITS rounds bf16 by its
    bits first: the CPU interpreter's fp32 -> bf16 cast truncates (compiled casts round)."""
    if ROUND_BITS:
        bits = x.to(tl.int32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        x = (bits & -65536).to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rope_factors(cos_ptr, sin_ptr, t, HALF_C, HALF_ROPE, BLOCK_C: tl.constexpr):
    """cos/sin per channel pair of query row t: the rotary table on the last HALF_ROPE pairs,
    (1, 0) on the others, so one elementwise rotation covers the whole head."""
    pairs = tl.arange(0, BLOCK_C)
    first = HALF_C - HALF_ROPE
    rotated = (pairs >= first) & (pairs < HALF_C)
    table = t * HALF_ROPE + pairs - first
    cos = tl.load(cos_ptr + table, mask=rotated, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + table, mask=rotated, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _load_query(q_ptr, cos_ptr, sin_ptr, row, t, head0, H, C, HALF_ROPE,
                Q_NORM: tl.constexpr, EPS: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, ROUND_BITS: tl.constexpr):
    """q' = rope(rms_norm(q)) of BLOCK_H heads of one token, as even/odd channel halves in q's
    dtype (the reference rounds after the norm and after the rotation)."""
    dtype = q_ptr.dtype.element_ty
    heads = head0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, 2 * BLOCK_C)
    mask = (heads < H)[:, None] & (cols < C)[None, :]
    q = tl.load(q_ptr + (row * H + heads[:, None]) * C + cols[None, :], mask=mask, other=0.0)
    q_even, q_odd = tl.split(tl.reshape(q.to(tl.float32), (BLOCK_H, BLOCK_C, 2)))
    # per-head RMS norm without weight: q * rsqrt(mean(q^2) + eps)
    if Q_NORM:
        mean_sq = tl.sum(q_even * q_even + q_odd * q_odd, axis=1) / C
        inv_rms = 1.0 / tl.sqrt(mean_sq + EPS)
        q_even = _round(q_even * inv_rms[:, None], dtype, ROUND_BITS)
        q_odd = _round(q_odd * inv_rms[:, None], dtype, ROUND_BITS)
    # RoPE on the interleaved pairs (even, odd) of the last channels
    cos, sin = _rope_factors(cos_ptr, sin_ptr, t, C // 2, HALF_ROPE, BLOCK_C)
    rot_even = q_even * cos[None, :] - q_odd * sin[None, :]
    rot_odd = q_even * sin[None, :] + q_odd * cos[None, :]
    rot_even = _round(rot_even, dtype, ROUND_BITS)
    rot_odd = _round(rot_odd, dtype, ROUND_BITS)
    return rot_even.to(dtype), rot_odd.to(dtype)


@triton.jit
def _dot(a, b, acc, DOT_IN_F32: tl.constexpr):
    """acc + a @ b with fp32 accumulation (IEEE products for fp32 operands)."""
    if DOT_IN_F32:  # the CPU interpreter mis-multiplies bf16 tiles, and for fp32 exactness
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _attend(q_even, q_odd, acc_even, acc_odd, m_i, l_i, entry_ptr, rows, valid, C,
            SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
            DOT_IN_F32: tl.constexpr, ROUND_BITS: tl.constexpr):
    """One block of BLOCK_N entries (rows of entry_ptr, masked by `valid`) into the running
    softmax state: acc (unnormalised output halves), m_i (running max), l_i (running sum)."""
    dtype = q_even.dtype
    cols = tl.arange(0, 2 * BLOCK_C)
    # gather the entry rows (each is key and value), split into even/odd channel halves
    e_ptrs = entry_ptr + rows[:, None] * C + cols[None, :]
    e = tl.load(e_ptrs, mask=valid[:, None] & (cols < C)[None, :], other=0.0)
    e_even, e_odd = tl.split(tl.reshape(e, (BLOCK_N, BLOCK_C, 2)))
    # z = scale * q'.e, the product rounded to q's dtype like the reference's einsum
    qk = tl.zeros((q_even.shape[0], BLOCK_N), dtype=tl.float32)
    qk = _dot(q_even, tl.trans(e_even), qk, DOT_IN_F32)
    qk = _dot(q_odd, tl.trans(e_odd), qk, DOT_IN_F32)
    z = _round(qk, dtype, ROUND_BITS) * SCALE
    z = tl.where(valid[None, :], z, float("-inf"))
    # online softmax: rescale the state to the new running max
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(z - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # acc = acc * alpha + p @ e, with p rounded to q's dtype
    p = _round(p, dtype, ROUND_BITS).to(dtype)
    acc_even = _dot(p, e_even, acc_even * alpha[:, None], DOT_IN_F32)
    acc_odd = _dot(p, e_odd, acc_odd * alpha[:, None], DOT_IN_F32)
    return acc_even, acc_odd, m_new, l_i


@triton.jit
def _attend_entries(q_even, q_odd, acc_even, acc_odd, m_i, l_i,
                    kv_ptr, comp_ptr, picks_ptr, b, row, p, lo, hi, R, S, K, C,
                    DECODE: tl.constexpr, WINDOW: tl.constexpr, RATIO: tl.constexpr,
                    COMP: tl.constexpr, SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, DOT_IN_F32: tl.constexpr, ROUND_BITS: tl.constexpr):
    """Entries [lo, hi) of the query at position p, in the order: window rows, compressed rows.
    COMP: 0 none (window only), 1 every visible compressed row (HCA), 2 picks (CSA)."""
    # window: prefill rows p-WINDOW+1 .. p of kv (those >= 0); decode ring slots 0 .. p
    if DECODE:
        win_first = 0
        n_win = tl.minimum(p + 1, WINDOW)
    else:
        win_first = tl.maximum(p - WINDOW + 1, 0)
        n_win = p + 1 - win_first
    if COMP == 1:
        n_comp = tl.minimum((p + 1) // RATIO, S)
    elif COMP == 2:
        n_comp = K
    else:
        n_comp = 0
    hi = tl.minimum(hi, n_win + n_comp)
    offs = tl.arange(0, BLOCK_N)
    kv_base = kv_ptr + b * R * C
    for start in range(lo, tl.minimum(hi, n_win), BLOCK_N):
        j = start + offs
        valid = j < tl.minimum(hi, n_win)
        acc_even, acc_odd, m_i, l_i = _attend(
            q_even, q_odd, acc_even, acc_odd, m_i, l_i, kv_base, win_first + j, valid, C,
            SCALE, BLOCK_N, BLOCK_C, DOT_IN_F32, ROUND_BITS)
    if COMP > 0:
        comp_base = comp_ptr + b * S * C
        for start in range(tl.maximum(lo, n_win) - n_win, hi - n_win, BLOCK_N):
            j = start + offs
            in_range = j < hi - n_win
            if COMP == 2:
                rows = tl.load(picks_ptr + row * K + j, mask=in_range, other=-1).to(tl.int64)
                valid = rows >= 0
            else:
                rows = j.to(tl.int64)
                valid = in_range
            acc_even, acc_odd, m_i, l_i = _attend(
                q_even, q_odd, acc_even, acc_odd, m_i, l_i, comp_base, rows, valid, C,
                SCALE, BLOCK_N, BLOCK_C, DOT_IN_F32, ROUND_BITS)
    return acc_even, acc_odd, m_i, l_i


@triton.jit
def _finish(acc_even, acc_odd, l_i, out_ptr, cos_ptr, sin_ptr, row, t, head0, H, C, HALF_ROPE,
            BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, ROUND_BITS: tl.constexpr):
    """o = acc / l rounded to the output dtype, rotated back by -angle, stored."""
    dtype = out_ptr.dtype.element_ty
    o_even = _round(acc_even / l_i[:, None], dtype, ROUND_BITS)
    o_odd = _round(acc_odd / l_i[:, None], dtype, ROUND_BITS)
    # inverse RoPE: rotate the pairs by -angle
    cos, sin = _rope_factors(cos_ptr, sin_ptr, t, C // 2, HALF_ROPE, BLOCK_C)
    out_even = o_even * cos[None, :] + o_odd * sin[None, :]
    out_odd = o_odd * cos[None, :] - o_even * sin[None, :]
    out = tl.reshape(tl.join(out_even, out_odd), (BLOCK_H, 2 * BLOCK_C))
    heads = head0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, 2 * BLOCK_C)
    mask = (heads < H)[:, None] & (cols < C)[None, :]
    out = _round(out, dtype, ROUND_BITS).to(dtype)
    tl.store(out_ptr + (row * H + heads[:, None]) * C + cols[None, :], out, mask=mask)


@triton.jit
def sparse_mqa_prefill(
    q_ptr, kv_ptr, sink_ptr, cos_ptr, sin_ptr, comp_ptr, picks_ptr, out_ptr,
    T, H, C, HALF_ROPE, S, K,
    WINDOW: tl.constexpr, RATIO: tl.constexpr, COMP: tl.constexpr,
    Q_NORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_IN_F32: tl.constexpr, ROUND_BITS: tl.constexpr,
):
    tl.static_assert(BLOCK_H >= 16 and BLOCK_N >= 16 and BLOCK_C >= 16, "tl.dot tiles >= 16")
    # program: one query token (row = b*T + t, at position t) and BLOCK_H of its heads
    row = tl.program_id(0).to(tl.int64)
    head0 = tl.program_id(1) * BLOCK_H
    b = row // T
    t = row % T
    q_even, q_odd = _load_query(q_ptr, cos_ptr, sin_ptr, row, t, head0, H, C, HALF_ROPE,
                                Q_NORM, EPS, BLOCK_H, BLOCK_C, ROUND_BITS)
    # softmax state: the running max starts at the sink logit, whose term exp(0) = 1 is in l
    heads = head0 + tl.arange(0, BLOCK_H)
    m_i = tl.load(sink_ptr + heads, mask=heads < H, other=0.0).to(tl.float32)
    l_i = tl.full((BLOCK_H,), 1.0, dtype=tl.float32)
    acc_even = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    # all entries of the token: raw kv rows are the sequence itself (T per sequence)
    acc_even, acc_odd, m_i, l_i = _attend_entries(
        q_even, q_odd, acc_even, acc_odd, m_i, l_i, kv_ptr, comp_ptr, picks_ptr,
        b, row, t, 0, WINDOW + tl.maximum(S, K), T, S, K, C,
        False, WINDOW, RATIO, COMP, SCALE, BLOCK_N, BLOCK_C, DOT_IN_F32, ROUND_BITS)
    _finish(acc_even, acc_odd, l_i, out_ptr, cos_ptr, sin_ptr, row, t, head0, H, C, HALF_ROPE,
            BLOCK_H, BLOCK_C, ROUND_BITS)


@triton.jit
def sparse_mqa_decode(
    q_ptr, kv_ptr, sink_ptr, cos_ptr, sin_ptr, comp_ptr, picks_ptr, pos_ptr, out_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    H, C, HALF_ROPE, S, K, SPLITS, SPLIT_LEN,
    WINDOW: tl.constexpr, RATIO: tl.constexpr, COMP: tl.constexpr,
    Q_NORM: tl.constexpr, EPS: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_IN_F32: tl.constexpr, ROUND_BITS: tl.constexpr, STAGE: tl.constexpr,
):
    tl.static_assert(BLOCK_H >= 16 and BLOCK_N >= 16 and BLOCK_C >= 16, "tl.dot tiles >= 16")
    # program: the one query of sequence b, BLOCK_H heads, (stage 0) one split of its entries
    b = tl.program_id(0).to(tl.int64)
    head0 = tl.program_id(1) * BLOCK_H
    heads = head0 + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_C)
    sink = tl.load(sink_ptr + heads, mask=heads < H, other=0.0).to(tl.float32)
    # partials of (b, split, head): acc as [even half | odd half] of C, max and sum
    part = (b * SPLITS * H + heads) * C
    part_mask = (heads < H)[:, None] & (pairs < C // 2)[None, :]
    if STAGE == 0:
        split = tl.program_id(2)
        p = tl.load(pos_ptr).to(tl.int64)
        q_even, q_odd = _load_query(q_ptr, cos_ptr, sin_ptr, b, 0, head0, H, C, HALF_ROPE,
                                    Q_NORM, EPS, BLOCK_H, BLOCK_C, ROUND_BITS)
        # the running max starts at the sink; its exp term is added once, by the combine
        m_i = sink
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc_even = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        lo = split * SPLIT_LEN
        acc_even, acc_odd, m_i, l_i = _attend_entries(
            q_even, q_odd, acc_even, acc_odd, m_i, l_i, kv_ptr, comp_ptr, picks_ptr,
            b, b, p, lo, lo + SPLIT_LEN, WINDOW, S, K, C,
            True, WINDOW, RATIO, COMP, SCALE, BLOCK_N, BLOCK_C, DOT_IN_F32, ROUND_BITS)
        at = part + split * H * C
        tl.store(part_acc_ptr + at[:, None] + pairs[None, :], acc_even, mask=part_mask)
        tl.store(part_acc_ptr + at[:, None] + C // 2 + pairs[None, :], acc_odd, mask=part_mask)
        stat = (b * SPLITS + split) * H + heads
        tl.store(part_m_ptr + stat, m_i, mask=heads < H)
        tl.store(part_l_ptr + stat, l_i, mask=heads < H)
    else:
        # combine the splits into one softmax state, starting from the sink's own term
        m_i = sink
        l_i = tl.full((BLOCK_H,), 1.0, dtype=tl.float32)
        acc_even = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        for split in range(0, SPLITS):
            stat = (b * SPLITS + split) * H + heads
            m_s = tl.load(part_m_ptr + stat, mask=heads < H, other=0.0)
            l_s = tl.load(part_l_ptr + stat, mask=heads < H, other=0.0)
            at = part + split * H * C
            acc_e = tl.load(part_acc_ptr + at[:, None] + pairs[None, :], mask=part_mask,
                            other=0.0)
            acc_o = tl.load(part_acc_ptr + at[:, None] + C // 2 + pairs[None, :],
                            mask=part_mask, other=0.0)
            m_new = tl.maximum(m_i, m_s)
            alpha = tl.exp(m_i - m_new)
            beta = tl.exp(m_s - m_new)
            l_i = l_i * alpha + l_s * beta
            acc_even = acc_even * alpha[:, None] + acc_e * beta[:, None]
            acc_odd = acc_odd * alpha[:, None] + acc_o * beta[:, None]
            m_i = m_new
        _finish(acc_even, acc_odd, l_i, out_ptr, cos_ptr, sin_ptr, b, 0, head0, H, C,
                HALF_ROPE, BLOCK_H, BLOCK_C, ROUND_BITS)
'''
