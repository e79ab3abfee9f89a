"""Kernel text of `attn.indexer_topk`: lightning-indexer scores fused with top-k selection
(v4-architecture.md §3.5, §5 K8 + K9), two stages of one jit function, no host sync between.

STAGE 0, scores: one program per (query row, BLOCK_S keys). score[s] = Σ_h w_h·scale·relu(q_h·k_s)
with the index heads as the M dimension of the dot (BLOCK_H at a time, channels BLOCK_C at a
time), written in fp32 to a scratch row. Blocks past the query's visible keys
(s >= (p+1) // ratio) exit at once: in prefill about half of them.

STAGE 1, selection: one program per query row keeps the K_PAD best (score, index) pairs as
int64 keys: the score's order-preserving integer in the high 32 bits, the complement of the
index in the low 32 (ties go to the lower index). The first K_PAD visible scores, sorted
descending, are the best so far; each further chunk is sorted ascending and merged by one
bitonic half-cleaner step, max(best[i], chunk[i]), which holds exactly the K_PAD largest of
both; one sort restores the order. Slots that never received a visible key (an empty key)
become -1.

Loop bounds depend on the query's visible keys (see attention_mqa.py on Triton versions).
"""

from __future__ import annotations

INDEXER_SOURCE = '''\
# Hand-written template from dsv4c backends/triton/templates/attention_indexer.py.
# kernel:   indexer_topk (STAGE 0: scores of BLOCK_S keys, 1: top-k of a query row's scores)
# computes: idx[t] = top-k over visible s of sum_h w[t,h] scale relu(q[t,h].keys[s]), -1 pads
import triton
import triton.language as tl

EMPTY = tl.constexpr(-9223372036854775808)  # the key of "no entry": below every real key
LOW_BITS = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _visible(pos_ptr, t, RATIO: tl.constexpr, S, DECODE: tl.constexpr):
    """Number of compressed keys query row t sees: (p+1) // ratio at its position p."""
    if DECODE:
        p = tl.load(pos_ptr).to(tl.int64) + t
    else:
        p = t
    return tl.minimum((p + 1) // RATIO, S)


@triton.jit
def _order_key(score, index):
    """int64 keys whose signed order is (score, -index): the float's bits made monotone (flip
    the magnitude bits of negatives) in the high half, the index's complement in the low."""
    bits = score.to(tl.int32, bitcast=True)
    monotone = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (monotone.to(tl.int64) << 32) | (LOW_BITS - index.to(tl.int64))


@triton.jit
def indexer_topk(
    q_ptr, keys_ptr, w_ptr, pos_ptr, scores_ptr, idx_ptr,
    T, H, C, S, K,
    RATIO: tl.constexpr, SCALE: tl.constexpr, DECODE: tl.constexpr, STAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, K_PAD: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):
    # program: query row (b*T + t); stage 0 also one block of BLOCK_S keys
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    n_visible = _visible(pos_ptr, t, RATIO, S, DECODE)
    if STAGE == 0:
        tl.static_assert(BLOCK_H >= 16 and BLOCK_S >= 16 and BLOCK_C >= 16, "tl.dot tiles")
        key0 = tl.program_id(1) * BLOCK_S
        if key0 >= n_visible:
            return  # a causal program: none of its keys is visible yet
        keys = key0 + tl.arange(0, BLOCK_S)
        heads = tl.arange(0, BLOCK_H)
        chans = tl.arange(0, BLOCK_C)
        score = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for head0 in range(0, H, BLOCK_H):
            # logits[h, s] = q[t, h] . keys[s], channels BLOCK_C at a time
            logits = tl.zeros((BLOCK_H, BLOCK_S), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                q_mask = ((head0 + heads) < H)[:, None] & ((c0 + chans) < C)[None, :]
                q_ptrs = q_ptr + (row * H + head0 + heads[:, None]) * C + c0 + chans[None, :]
                q = tl.load(q_ptrs, mask=q_mask, other=0.0)
                k_mask = ((c0 + chans) < C)[:, None] & (keys < n_visible)[None, :]
                k_ptrs = keys_ptr + (b * S + keys[None, :]) * C + c0 + chans[:, None]
                k = tl.load(k_ptrs, mask=k_mask, other=0.0)
                if DOT_IN_F32:  # fp32 operands (and the interpreter's bf16): IEEE products
                    logits = tl.dot(q.to(tl.float32), k.to(tl.float32), logits,
                                    input_precision="ieee")
                else:
                    logits = tl.dot(q, k, logits)
            # score += sum_h (w[t, h] * scale) * relu(logits[h])
            w = tl.load(w_ptr + row * H + head0 + heads, mask=(head0 + heads) < H, other=0.0)
            weight = w.to(tl.float32) * SCALE
            score += tl.sum(tl.maximum(logits, 0.0) * weight[:, None], axis=0)
        tl.store(scores_ptr + row * S + keys, score, mask=keys < n_visible)
    else:
        slots = tl.arange(0, K_PAD)
        # the first K_PAD visible scores as keys, sorted descending: the best so far
        visible = slots < n_visible
        score = tl.load(scores_ptr + row * S + slots, mask=visible, other=0.0)
        best = tl.sort(tl.where(visible, _order_key(score, slots), EMPTY), descending=True)
        for s0 in range(K_PAD, n_visible, K_PAD):
            # the next K_PAD visible scores as keys, sorted ascending
            s = s0 + slots
            visible = s < n_visible
            score = tl.load(scores_ptr + row * S + s, mask=visible, other=0.0)
            chunk = tl.sort(tl.where(visible, _order_key(score, s), EMPTY))
            # best (descending) against chunk (ascending): the max holds the K_PAD largest
            best = tl.sort(tl.maximum(best, chunk), descending=True)
        idx = tl.where(best == EMPTY, -1, LOW_BITS - (best & LOW_BITS))
        tl.store(idx_ptr + row * K + slots, idx, mask=slots < K)
'''
