"""Triton kernel of `moe.route` (v4-architecture.md §3.6, K14): the MoE router for one block of
BLOCK_N tokens per program, every expert's score of a token held in registers.

    logits  = x · gateᵀ [+ logit_bias]       (fp32 accumulation; LOGIT_BIAS: GPT-OSS)
    s       = sqrt(softplus(logits)) | softmax(logits) | sigmoid(logits)
    experts = top-K(s + bias)  or  tid2eid[ids]          (bias only selects)
              (N_GROUP > 1: top-K within the TOPK_GROUP groups whose best two sum highest)
    weights = s[experts] (/ (Σ s[experts] + EPS)) · ROUTE_SCALE

Top-K is K rounds of a row max: each round takes the highest remaining score (the lowest expert
index among equal ones) and removes it, so the picks come out in descending order like
`torch.topk`. The host side is `backends/triton/templates/moe.py`.
"""

import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|); log1p by Kahan's trick, exact for tiny e^-|x|
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _grouped(chooser, cols, E, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_FILL):
    # DeepSeek-V3 group-limited choice: a group's score is the sum of its two best choosers; the
    # TOPK_GROUP best groups (lowest index among equal) keep their choosers, the rest GROUP_FILL
    group_of = cols // (E // N_GROUP)
    kept = chooser < float("-inf")  # all False, the chooser's shape
    score = tl.zeros_like(chooser) + float("-inf")  # a group's score in each of its columns
    for g in tl.static_range(N_GROUP):
        in_g = (group_of == g)[None, :]
        c = tl.where(in_g, chooser, float("-inf"))
        best = tl.max(c, axis=1)
        first = tl.min(tl.where(c == best[:, None], cols[None, :], E), axis=1)
        second = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), c), axis=1)
        score = tl.where(in_g, (best + second)[:, None], score)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(score, axis=1)
        pick = tl.min(tl.where(score == best[:, None], group_of[None, :], N_GROUP), axis=1)
        mine = group_of[None, :] == pick[:, None]
        kept = kept | mine
        score = tl.where(mine, float("-inf"), score)
    return tl.where(kept, chooser, GROUP_FILL)


@triton.jit
def moe_route(
    x_ptr,  # [N, d] tokens
    gate_ptr,  # [E, d] router weights
    bias_ptr,  # [E] selection bias (HAS_BIAS)
    tid2eid_ptr,  # [V, K] expert table (HASH)
    ids_ptr,  # [N] token ids (HASH)
    logit_bias_ptr,  # [E] the router's bias on the logits (LOGIT_BIAS)
    weights_ptr,  # [N, K] out: routing weights, fp32
    experts_ptr,  # [N, K] out: expert indices, int64
    N,
    E,
    D,
    stride_xn,
    stride_xd,
    stride_ge,
    stride_gd,
    K: tl.constexpr,  # experts per token
    SCORE: tl.constexpr,  # "sqrtsoftplus" | "softmax" | "sigmoid"
    HAS_BIAS: tl.constexpr,
    HASH: tl.constexpr,
    RENORM: tl.constexpr,
    EPS: tl.constexpr,  # added to the renormalising sum
    N_GROUP: tl.constexpr,  # > 1: grouped top-k over N_GROUP contiguous expert groups
    TOPK_GROUP: tl.constexpr,
    GROUP_FILL: tl.constexpr,  # the chooser outside the kept groups
    ROUTE_SCALE: tl.constexpr,
    LOGIT_BIAS: tl.constexpr,
    DOT_IN_F32: tl.constexpr,  # IEEE fp32 products (fp32 inputs; bf16 on the CPU interpreter)
    BLOCK_N: tl.constexpr,  # tokens per program
    BLOCK_E: tl.constexpr,  # >= E, a power of two: all scores of a token in registers
    BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr,  # >= K, a power of two
):
    tl.static_assert(BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(K <= K_PAD, "K_PAD holds the K picks")
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)  # expert index
    slots = tl.arange(0, K_PAD)
    row_mask = rows < N
    col_mask = cols < E

    # gate GEMM: logits[n, e] = Σ_d x[n, d] · gate[e, d]
    ds = tl.arange(0, BLOCK_D)
    x_rows = tl.minimum(rows, N - 1).to(tl.int64)  # rows past N repeat the last; never stored
    g_cols = tl.minimum(cols, E - 1)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xn + ds[None, :] * stride_xd
    g_ptrs = gate_ptr + ds[:, None] * stride_gd + g_cols[None, :] * stride_ge
    logits = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for d in range(0, D, BLOCK_D):
        d_mask = ds < D - d
        a = tl.load(x_ptrs, mask=d_mask[None, :], other=0.0)
        b = tl.load(g_ptrs, mask=d_mask[:, None], other=0.0)
        if DOT_IN_F32:
            logits = tl.dot(a.to(tl.float32), b.to(tl.float32), logits, input_precision="ieee")
        else:
            logits = tl.dot(a, b, logits)
        x_ptrs += BLOCK_D * stride_xd
        g_ptrs += BLOCK_D * stride_gd

    if LOGIT_BIAS:  # moves the scores (and so the weights), unlike the selection bias
        b = tl.load(logit_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        logits += b[None, :]

    # scores s (fp32); columns past E are never picked
    if SCORE == "sqrtsoftplus":
        scores = tl.sqrt(_softplus(logits))
    elif SCORE == "sigmoid":
        scores = tl.sigmoid(logits)
    else:
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]

    # expert choice: a token-id table, or top-K of the (biased) scores
    if HASH:
        ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        pick_mask = row_mask[:, None] & (slots < K)[None, :]
        experts = tl.load(tid2eid_ptr + ids[:, None] * K + slots[None, :], mask=pick_mask, other=0)
    else:
        chooser = scores
        if HAS_BIAS:
            chooser += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if N_GROUP > 1:
            chooser = _grouped(chooser, cols, E, N_GROUP, TOPK_GROUP, GROUP_FILL)
        chooser = tl.where(col_mask[None, :], chooser, float("-inf"))
        experts = tl.zeros((BLOCK_N, K_PAD), dtype=tl.int64)
        for j in tl.static_range(K):
            best = tl.max(chooser, axis=1)
            pick = tl.min(tl.where(chooser == best[:, None], cols[None, :], BLOCK_E), axis=1)
            chooser = tl.where(cols[None, :] == pick[:, None], float("-inf"), chooser)
            experts = tl.where(slots[None, :] == j, pick.to(tl.int64)[:, None], experts)

    # weights = s[experts], renormalised over the K picks, scaled
    weights = tl.zeros((BLOCK_N, K_PAD), dtype=tl.float32)
    for j in tl.static_range(K):
        expert_j = tl.sum(tl.where(slots[None, :] == j, experts, 0), axis=1)
        picked = cols[None, :] == expert_j[:, None]
        weight_j = tl.sum(tl.where(picked, scores, 0.0), axis=1)
        weights = tl.where(slots[None, :] == j, weight_j[:, None], weights)
    if RENORM:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + EPS)
    weights = weights * ROUTE_SCALE

    out = rows[:, None].to(tl.int64) * K + slots[None, :]
    out_mask = row_mask[:, None] & (slots < K)[None, :]
    tl.store(weights_ptr + out, weights, mask=out_mask)
    tl.store(experts_ptr + out, experts, mask=out_mask)
