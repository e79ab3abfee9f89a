"""Triton kernel of `moe.experts` (v4-architecture.md §3.6, K15-K17): dispatch, grouped
gated expert GEMMs (SwiGLU, clamped or not, or GPT-OSS's (up + 1)·g·sigmoid(alpha·g), with
optional per-expert biases), weighted combine, with the shared expert as one more group.

One entry, five launches: PHASE (a constexpr, so each launch compiles to its step alone) picks

    count    per (token, slot) pair: rank = atomic counts[expert]++
    place    its row = (N shared rows) + Σ counts[< expert] + rank; pair <-> row maps
    up       hidden = weight · act(x·w1ᵀ + b1, x·w3ᵀ + b3)  a row tile x BLOCK_N hidden cols
    down     out_rows = hidden · w2ᵀ + weight · b2            a row tile x BLOCK_N of d
    combine  y[n] = Σ_slots out_rows[row of (n, slot)] (+ shared row n), per BLOCK_T tokens

Rows are grouped: the shared expert's N rows first (group 0, token n at row n), then each
routed expert's rows in expert order. Every program of UP/DOWN derives its group from the
counts (a cumulative sum of tiles per group) so nothing returns to the host: TILES is the
static upper bound cdiv(P, BLOCK_M) + E (+ cdiv(N, BLOCK_M)) and tiles past the last group
exit at once; an expert with no rows owns no tile. Ranks from the atomics may order an
expert's rows differently between runs, but every row is computed on its own and COMBINE sums
a token's slots in slot order, so the result is the same bit for bit. Pairs whose expert is
outside [0, E) are dropped (row -1), as the reference's `experts == e` never matches them.
"""

import triton
import triton.language as tl


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x (fp32) rounded to `dtype`, to nearest even. For bf16 the rounding is done by hand: the
    CPU interpreter's fp32 -> bf16 cast truncates; on GPUs this equals the native cast."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _count(experts_ptr, counts_ptr, row_of_pair_ptr, P, E, BLOCK_P: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    expert = tl.load(experts_ptr + pairs, mask=pairs < P, other=-1)
    valid = (expert >= 0) & (expert < E)
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=valid)  # the old count: this pair's rank
    tl.store(row_of_pair_ptr + pairs, rank, mask=valid)


@triton.jit
def _place(
    experts_ptr,
    counts_ptr,
    row_of_pair_ptr,
    pair_of_row_ptr,
    P,
    E,
    first_row,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = pairs < P
    expert = tl.load(experts_ptr + pairs, mask=in_range, other=-1)
    valid = (expert >= 0) & (expert < E)
    groups = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + groups, mask=groups < E, other=0)
    # rows of the experts before this pair's: Σ counts[e] for e < expert
    before = tl.sum(tl.where(groups[None, :] < expert[:, None], counts[None, :], 0), axis=1)
    rank = tl.load(row_of_pair_ptr + pairs, mask=valid, other=0)
    row = first_row + before + rank
    tl.store(pair_of_row_ptr + row, pairs, mask=valid)
    tl.store(row_of_pair_ptr + pairs, tl.where(valid, row, -1), mask=in_range)


@triton.jit
def _tile_group(
    tile, counts_ptr, E, N, HAS_SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr
):
    """(group, first row of this tile, end of the group's rows); group is past the last one
    (>= E + HAS_SHARED) when the tile is beyond every group's rows."""
    groups = tl.arange(0, BLOCK_E)
    expert = groups - HAS_SHARED
    counts = tl.load(counts_ptr + expert, mask=(expert >= 0) & (expert < E), other=0)
    if HAS_SHARED:
        counts = tl.where(groups == 0, N, counts)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    group = tl.sum((tile_end <= tile).to(tl.int32), 0)
    this = groups == group
    tile_start = tl.sum(tl.where(this, tile_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(groups < group, counts, 0), 0)
    row_end = row_start + tl.sum(tl.where(this, counts, 0), 0)
    return group, row_start + (tile - tile_start) * BLOCK_M, row_end


@triton.jit
def _up(
    group,
    first,
    end,
    x_ptr,
    weights_ptr,
    w1_ptr,
    w3_ptr,
    s1_ptr,
    s3_ptr,
    pair_of_row_ptr,
    hidden_ptr,
    b1_ptr,
    b3_ptr,
    N,
    D,
    I,
    J,
    stride_xn,
    stride_w1e,
    stride_w1i,
    stride_s1j,
    stride_hm,
    K: tl.constexpr,
    LIMIT: tl.constexpr,
    GPT_OSS: tl.constexpr,
    ALPHA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = first + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    if group < HAS_SHARED:  # group 0 is the shared expert: every token, unweighted
        tokens = tl.minimum(rows, N - 1)
        weight = tl.full((BLOCK_M,), 1.0, tl.float32)
        w1, w3, stride_wn, n_hidden = s1_ptr, s3_ptr, stride_s1j, J
    else:
        pairs = tl.load(pair_of_row_ptr + rows, mask=row_mask, other=0)
        tokens = pairs // K
        weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
        expert = (group - HAS_SHARED).to(tl.int64)
        w1 = w1_ptr + expert * stride_w1e
        w3 = w3_ptr + expert * stride_w1e
        stride_wn, n_hidden = stride_w1i, I
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(1) * BLOCK_N >= n_hidden:
        return  # the shared and routed hidden widths may differ

    # gate = x·w1ᵀ, up = x·w3ᵀ over d (x's rows gathered by token)
    ds = tl.arange(0, BLOCK_D)
    w_cols = tl.minimum(cols, n_hidden - 1)
    x_ptrs = x_ptr + tokens.to(tl.int64)[:, None] * stride_xn + ds[None, :]
    w1_ptrs = w1 + w_cols[None, :] * stride_wn + ds[:, None]
    w3_ptrs = w3 + w_cols[None, :] * stride_wn + ds[:, None]
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d in range(0, D, BLOCK_D):
        d_mask = ds < D - d
        a = tl.load(x_ptrs, mask=d_mask[None, :], other=0.0)
        b1 = tl.load(w1_ptrs, mask=d_mask[:, None], other=0.0)
        b3 = tl.load(w3_ptrs, mask=d_mask[:, None], other=0.0)
        if DOT_IN_F32:
            a, b1, b3 = a.to(tl.float32), b1.to(tl.float32), b3.to(tl.float32)
            gate = tl.dot(a, b1, gate, input_precision="ieee")
            up = tl.dot(a, b3, up, input_precision="ieee")
        else:
            gate = tl.dot(a, b1, gate)
            up = tl.dot(a, b3, up)
        x_ptrs += BLOCK_D
        w1_ptrs += BLOCK_D
        w3_ptrs += BLOCK_D

    # the activation in fp32 on the GEMM outputs rounded to x's dtype (+ the expert's bias row:
    # routed groups only), times the routing weight
    dtype = hidden_ptr.dtype.element_ty
    gate = _cast(gate, dtype).to(tl.float32)
    up = _cast(up, dtype).to(tl.float32)
    if HAS_BIAS:
        # routed groups only (a vector compare: a scalar one may be a Python bool here)
        b_mask = (cols < n_hidden) & (tl.zeros_like(cols) + group >= HAS_SHARED)
        b_off = tl.maximum(group - HAS_SHARED, 0).to(tl.int64) * I + w_cols
        gate += tl.load(b1_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        up += tl.load(b3_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    gate = tl.minimum(gate, LIMIT)
    up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
    if GPT_OSS:
        h = gate * tl.sigmoid(gate * ALPHA) * (up + 1.0) * weight[:, None]
    else:
        h = gate * tl.sigmoid(gate) * up * weight[:, None]
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptrs, _cast(h, dtype), mask=row_mask[:, None] & (cols < n_hidden)[None, :])


@triton.jit
def _down(
    group,
    first,
    end,
    hidden_ptr,
    w2_ptr,
    s2_ptr,
    out_rows_ptr,
    weights_ptr,
    pair_of_row_ptr,
    b2_ptr,
    D,
    I,
    J,
    stride_hm,
    stride_w2e,
    stride_w2d,
    stride_s2d,
    stride_om,
    HAS_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = first + tl.arange(0, BLOCK_M)
    if group < HAS_SHARED:  # the shared expert
        w2, stride_wn, n_hidden = s2_ptr, stride_s2d, J
    else:
        w2 = w2_ptr + (group - HAS_SHARED).to(tl.int64) * stride_w2e
        stride_wn, n_hidden = stride_w2d, I

    # out_rows = hidden·w2ᵀ over the hidden width (rows are contiguous per group)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_D)
    h_rows = tl.minimum(rows, end - 1).to(tl.int64)  # rows past the group repeat its last
    h_ptrs = hidden_ptr + h_rows[:, None] * stride_hm + ks[None, :]
    w_ptrs = w2 + (cols % D)[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_hidden, BLOCK_D):
        k_mask = ks < n_hidden - k
        a = tl.load(h_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if DOT_IN_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D

    dtype = out_rows_ptr.dtype.element_ty
    if HAS_BIAS:  # + weight · b2[expert] on routed rows, after the GEMM's rounding to x's dtype
        row_ok = (rows < end) & (tl.zeros_like(rows) + group >= HAS_SHARED)
        pairs = tl.load(pair_of_row_ptr + rows, mask=row_ok, other=0)
        weight = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        b_off = tl.maximum(group - HAS_SHARED, 0).to(tl.int64) * D + (cols % D)
        b_mask = (cols < D) & (tl.zeros_like(cols) + group >= HAS_SHARED)
        b2 = tl.load(b2_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
        acc = _cast(acc, dtype).to(tl.float32) + weight[:, None] * b2[None, :]
    o_ptrs = out_rows_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    mask = (rows < end)[:, None] & (cols < D)[None, :]
    tl.store(o_ptrs, _cast(acc, dtype), mask=mask)


@triton.jit
def _combine(
    out_rows_ptr,
    row_of_pair_ptr,
    y_ptr,
    N,
    D,
    stride_om,
    stride_yn,
    K: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (tokens < N)[:, None] & (cols < D)[None, :]
    # the routed sum in fp32, slot by slot (a fixed order: deterministic)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(row_of_pair_ptr + tokens * K + j, mask=tokens < N, other=-1).to(tl.int64)
        ptrs = out_rows_ptr + row[:, None] * stride_om + cols[None, :]
        acc += tl.load(ptrs, mask=mask & (row >= 0)[:, None], other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    y = _cast(acc, dtype)
    if HAS_SHARED:  # shared rows come first: token n's is row n; added in x's dtype
        shared = tl.load(
            out_rows_ptr + tokens.to(tl.int64)[:, None] * stride_om + cols[None, :],
            mask=mask,
            other=0.0,
        )
        y = _cast(y.to(tl.float32) + shared.to(tl.float32), dtype)
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * stride_yn + cols[None, :], y, mask=mask)


@triton.jit
def moe_experts(
    x_ptr,  # [N, d] tokens
    weights_ptr,  # [N, K] routing weights
    experts_ptr,  # [N, K] expert indices
    w1_ptr,  # [E, I, d]
    w3_ptr,  # [E, I, d]
    w2_ptr,  # [E, d, I]
    s1_ptr,  # [J, d] shared expert (HAS_SHARED)
    s3_ptr,  # [J, d]
    s2_ptr,  # [d, J]
    b1_ptr,  # [E, I] expert biases (HAS_BIAS)
    b3_ptr,  # [E, I]
    b2_ptr,  # [E, d]
    counts_ptr,  # [E] int32, zeroed: rows per expert
    row_of_pair_ptr,  # [N*K] int32: each pair's row (its rank after COUNT)
    pair_of_row_ptr,  # [rows] int32: each routed row's pair
    hidden_ptr,  # [rows, max(I, J)] x's dtype
    out_rows_ptr,  # [rows, d] x's dtype
    y_ptr,  # [N, d] out
    N,
    E,
    D,
    I,
    J,
    stride_xn,
    stride_w1e,
    stride_w1i,
    stride_w2e,
    stride_w2d,
    stride_s1j,
    stride_s2d,
    stride_hm,
    stride_om,
    stride_yn,
    PHASE: tl.constexpr,  # "count" | "place" | "up" | "down" | "combine"
    K: tl.constexpr,  # experts per token
    LIMIT: tl.constexpr,  # gate/up clamp (inf: none)
    GPT_OSS: tl.constexpr,  # (up + 1)·g·sigmoid(ALPHA·g), else silu(g)·up
    ALPHA: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # b1, b3, b2 added (routed experts only)
    HAS_SHARED: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pairs per program (count, place)
    BLOCK_E: tl.constexpr,  # >= E + HAS_SHARED, a power of two: all groups' counts at once
    BLOCK_M: tl.constexpr,  # rows per tile (up, down)
    BLOCK_N: tl.constexpr,  # output columns per tile (up: of I; down: of d)
    BLOCK_D: tl.constexpr,  # reduction step (up: over d; down: over I)
    BLOCK_T: tl.constexpr,  # tokens per program (combine)
    BLOCK_C: tl.constexpr,  # channels per program (combine)
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot tiles >= 16")
    if PHASE == "count":
        _count(experts_ptr, counts_ptr, row_of_pair_ptr, N * K, E, BLOCK_P)
    elif PHASE == "place":
        _place(
            experts_ptr,
            counts_ptr,
            row_of_pair_ptr,
            pair_of_row_ptr,
            N * K,
            E,
            N * HAS_SHARED,
            BLOCK_P,
            BLOCK_E,
        )
    elif PHASE == "combine":
        _combine(
            out_rows_ptr,
            row_of_pair_ptr,
            y_ptr,
            N,
            D,
            stride_om,
            stride_yn,
            K,
            HAS_SHARED,
            BLOCK_T,
            BLOCK_C,
        )
    else:
        tl.static_assert(PHASE == "up" or PHASE == "down", "PHASE: count, place, up, down, combine")
        # one row tile of one group; the grid is a static upper bound on the tiles
        group, first, end = _tile_group(
            tl.program_id(0), counts_ptr, E, N, HAS_SHARED, BLOCK_M, BLOCK_E
        )
        if group >= E + HAS_SHARED:
            return  # a tile past the last group's rows
        if PHASE == "up":
            _up(
                group,
                first,
                end,
                x_ptr,
                weights_ptr,
                w1_ptr,
                w3_ptr,
                s1_ptr,
                s3_ptr,
                pair_of_row_ptr,
                hidden_ptr,
                b1_ptr,
                b3_ptr,
                N,
                D,
                I,
                J,
                stride_xn,
                stride_w1e,
                stride_w1i,
                stride_s1j,
                stride_hm,
                K,
                LIMIT,
                GPT_OSS,
                ALPHA,
                HAS_BIAS,
                HAS_SHARED,
                DOT_IN_F32,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
        else:
            _down(
                group,
                first,
                end,
                hidden_ptr,
                w2_ptr,
                s2_ptr,
                out_rows_ptr,
                weights_ptr,
                pair_of_row_ptr,
                b2_ptr,
                D,
                I,
                J,
                stride_hm,
                stride_w2e,
                stride_w2d,
                stride_s2d,
                stride_om,
                HAS_BIAS,
                HAS_SHARED,
                DOT_IN_F32,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
