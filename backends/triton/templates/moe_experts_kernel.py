"""Triton kernel of `moe.experts` (v4-architecture.md §3.6, K15-K17): dispatch, grouped
gated expert GEMMs (SwiGLU, clamped or not, or GPT-OSS's (up + 1)·g·sigmoid(alpha·g), with
optional per-expert biases), weighted combine, with the shared expert as one more group.

One entry, five launches: PHASE (a constexpr, so each launch compiles to its step alone) picks

    count    per (token, slot) pair: rank = atomic counts[expert]++
    place    its row = (N shared rows) + Σ counts[< expert] + rank; pair <-> row maps
    up       hidden = weight · act(x·w1ᵀ + b1, x·w3ᵀ + b3)  a row tile x BLOCK_N hidden cols
    down     out_rows = hidden · w2ᵀ + weight · b2            a row tile x BLOCK_N of d
    combine  y[n] = Σ_slots out_rows[row of (n, slot)] (+ shared row n), per BLOCK_T tokens

Routed weights are read as stored (`WFMT`, the op's weight_format): 0 dense in x's dtype, 1 FP4
(int8 bytes of two e2m1 codes, low nibble = even column, with ue8m0 int8 scales per 1×32 block
of a row), 2 FP8 (e4m3 with f32 scales per 128×128 block). `_weight_tile` dequantises each tile
in registers right after its load (exactly, then rounded to x's dtype as the op says), so a
decode step reads 0.5 + 1/32 (FP4) or ~1 (FP8) bytes per weight element. The shared expert is
always dense.

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
def _e2m1(code):
    """int32 e2m1 codes (0-15) -> fp32, exact: m = bits 0-2 = 2·E + M is M/2 for E = 0, else
    (1 + M/2)·2^(E-1) (the power of two written into an fp32's exponent field); bit 3 = sign."""
    m = code & 7
    e = m >> 1
    half = (m & 1).to(tl.float32) * 0.5
    power = ((e + 126) << 23).to(tl.float32, bitcast=True)  # 2^(e - 1)
    magnitude = tl.where(e == 0, half, (1.0 + half) * power)
    return tl.where(code >= 8, -magnitude, magnitude)


@triton.jit
def _ue8m0(u):
    """ue8m0 bytes u (int32 0-255) -> fp32 2^(u - 127): u in the exponent field; u = 0 is the
    subnormal 2^-127, u = 255 NaN."""
    power = (u << 23).to(tl.float32, bitcast=True)
    power = tl.where(u == 0, 5.877471754111438e-39, power)
    return tl.where(u == 255, float("nan"), power)


@triton.jit
def _weight_tile(w, ws, rows, k0, n_in, stride_wn, stride_sn, WFMT: tl.constexpr,
                 dtype: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK, len(rows)] tile of one expert's weight [rows, n_in] transposed, element (k, r)
    = w[rows[r], k0 + k] dequantised (WFMT, module docstring) and rounded to `dtype`; 0 past
    n_in. `w`, `ws` point at the expert's stored weight and scales; `stride_wn`, `stride_sn`
    are their row strides (scales: per 128-row block for FP8)."""
    ks = k0 + tl.arange(0, BLOCK)
    k_ok = (ks < n_in)[:, None]
    if WFMT == 1:
        # each byte and each 1x32 scale loaded once: [BLOCK/2] bytes -> low/high codes
        # interleaved to BLOCK rows; [BLOCK/32] scales broadcast over their 32 rows
        tl.static_assert(BLOCK % 32 == 0, "FP4 tiles cover whole 1x32 scale blocks")
        pairs = k0 // 2 + tl.arange(0, BLOCK // 2)  # k0 is a multiple of BLOCK
        byte_ok = (pairs * 2 < n_in)[:, None]
        byte = tl.load(w + rows[None, :] * stride_wn + pairs[:, None], mask=byte_ok, other=0)
        byte = byte.to(tl.int32) & 255
        low, high = _e2m1(byte & 15), _e2m1(byte >> 4)
        values = tl.reshape(tl.permute(tl.join(low, high), (0, 2, 1)), (BLOCK, rows.shape[0]))
        groups = k0 // 32 + tl.arange(0, BLOCK // 32)
        scale_offs = rows[None, :] * stride_sn + groups[:, None]
        u = tl.load(ws + scale_offs, mask=(groups * 32 < n_in)[:, None], other=127)
        scale = _ue8m0(u.to(tl.int32) & 255)
        scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (BLOCK // 32, 32, rows.shape[0])),
                           (BLOCK, rows.shape[0]))
        return _cast(values * scale, dtype)
    elif WFMT == 2:
        q = tl.load(w + rows[None, :] * stride_wn + ks[:, None], mask=k_ok, other=0.0)
        scale_offs = (rows // 128)[None, :] * stride_sn + (ks // 128)[:, None]
        scale = tl.load(ws + scale_offs, mask=k_ok, other=0.0)
        return _cast(q.to(tl.float32) * scale, dtype)
    else:
        return tl.load(w + rows[None, :] * stride_wn + ks[:, None], mask=k_ok, other=0.0)


@triton.jit
def _gate_up(x_rows, w1, w3, w1s, w3s, w_cols, D, stride_wn, stride_sn, WFMT: tl.constexpr,
             DOT_IN_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """(gate, up) = x·w1ᵀ, x·w3ᵀ over d in fp32 for one row tile (x's rows at `x_rows`) and
    the hidden columns `w_cols`, the weights read in format WFMT."""
    ds = tl.arange(0, BLOCK_D)
    dtype = x_rows.dtype.element_ty
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d in range(0, D, BLOCK_D):
        a = tl.load(x_rows + d + ds[None, :], mask=(ds < D - d)[None, :], other=0.0)
        b1 = _weight_tile(w1, w1s, w_cols, d, D, stride_wn, stride_sn, WFMT, dtype, BLOCK_D)
        b3 = _weight_tile(w3, w3s, w_cols, d, D, stride_wn, stride_sn, WFMT, dtype, BLOCK_D)
        if DOT_IN_F32:
            a, b1, b3 = a.to(tl.float32), b1.to(tl.float32), b3.to(tl.float32)
            gate = tl.dot(a, b1, gate, input_precision="ieee")
            up = tl.dot(a, b3, up, input_precision="ieee")
        else:
            gate = tl.dot(a, b1, gate)
            up = tl.dot(a, b3, up)
    return gate, up


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
    w1s_ptr,
    w3s_ptr,
    N,
    D,
    I,
    J,
    stride_xn,
    stride_w1e,
    stride_w1i,
    stride_s1j,
    stride_hm,
    stride_w1se,
    stride_w1si,
    K: tl.constexpr,
    LIMIT: tl.constexpr,
    GPT_OSS: tl.constexpr,
    ALPHA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
    WFMT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = first + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    if group < HAS_SHARED:  # group 0 is the shared expert: every token, unweighted
        tokens = tl.minimum(rows, N - 1)
        weight = tl.full((BLOCK_M,), 1.0, tl.float32)
        n_hidden = J
    else:
        pairs = tl.load(pair_of_row_ptr + rows, mask=row_mask, other=0)
        tokens = pairs // K
        weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
        n_hidden = I
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(1) * BLOCK_N >= n_hidden:
        return  # the shared and routed hidden widths may differ

    # gate = x·w1ᵀ, up = x·w3ᵀ over d (x's rows gathered by token)
    w_cols = tl.minimum(cols, n_hidden - 1)
    x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_xn
    if group < HAS_SHARED:  # dense, x's dtype (the scale pointers are unused)
        gate, up = _gate_up(x_rows, s1_ptr, s3_ptr, s1_ptr, s3_ptr, w_cols, D, stride_s1j, 0,
                            0, DOT_IN_F32, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        expert = (group - HAS_SHARED).to(tl.int64)
        gate, up = _gate_up(x_rows, w1_ptr + expert * stride_w1e, w3_ptr + expert * stride_w1e,
                            w1s_ptr + expert * stride_w1se, w3s_ptr + expert * stride_w1se,
                            w_cols, D, stride_w1i, stride_w1si, WFMT, DOT_IN_F32, BLOCK_M,
                            BLOCK_N, BLOCK_D)

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
def _down_gemm(hidden_ptr, w2, w2s, rows, end, w_rows, n_hidden, stride_hm, stride_wn, stride_sn,
               WFMT: tl.constexpr, DOT_IN_F32: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """hidden·w2ᵀ in fp32 for one row tile and the output channels `w_rows` (rows of w2)."""
    ks = tl.arange(0, BLOCK_D)
    dtype = hidden_ptr.dtype.element_ty
    h_rows = tl.minimum(rows, end - 1).to(tl.int64)  # rows past the group repeat its last
    h_ptrs = hidden_ptr + h_rows[:, None] * stride_hm + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_hidden, BLOCK_D):
        a = tl.load(h_ptrs, mask=(ks < n_hidden - k)[None, :], other=0.0)
        b = _weight_tile(w2, w2s, w_rows, k, n_hidden, stride_wn, stride_sn, WFMT, dtype,
                         BLOCK_D)
        if DOT_IN_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        h_ptrs += BLOCK_D
    return acc


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
    w2s_ptr,
    D,
    I,
    J,
    stride_hm,
    stride_w2e,
    stride_w2d,
    stride_s2d,
    stride_om,
    stride_w2se,
    stride_w2sd,
    HAS_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
    WFMT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = first + tl.arange(0, BLOCK_M)

    # out_rows = hidden·w2ᵀ over the hidden width (rows are contiguous per group)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if group < HAS_SHARED:  # the shared expert: dense, J wide
        acc = _down_gemm(hidden_ptr, s2_ptr, s2_ptr, rows, end, cols % D, J, stride_hm,
                         stride_s2d, 0, 0, DOT_IN_F32, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        expert = (group - HAS_SHARED).to(tl.int64)
        acc = _down_gemm(hidden_ptr, w2_ptr + expert * stride_w2e, w2s_ptr + expert * stride_w2se,
                         rows, end, cols % D, I, stride_hm, stride_w2d, stride_w2sd, WFMT,
                         DOT_IN_F32, BLOCK_M, BLOCK_N, BLOCK_D)

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
    w1_ptr,  # [E, I, d] (WFMT 1: int8 [E, I, d/2])
    w3_ptr,  # [E, I, d]
    w2_ptr,  # [E, d, I] (WFMT 1: int8 [E, d, I/2])
    s1_ptr,  # [J, d] shared expert (HAS_SHARED)
    s3_ptr,  # [J, d]
    s2_ptr,  # [d, J]
    b1_ptr,  # [E, I] expert biases (HAS_BIAS)
    b3_ptr,  # [E, I]
    b2_ptr,  # [E, d]
    w1s_ptr,  # w1's scales (WFMT 1: int8 [E, I, ceil(d/32)]; 2: f32 [E, ceil(I/128), ceil(d/128)])
    w3s_ptr,  # w3's, like w1's
    w2s_ptr,  # w2's (WFMT 1: int8 [E, d, ceil(I/32)]; 2: f32 [E, ceil(d/128), ceil(I/128)])
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
    stride_w1se,
    stride_w1si,
    stride_w2se,
    stride_w2sd,
    PHASE: tl.constexpr,  # "count" | "place" | "up" | "down" | "combine"
    K: tl.constexpr,  # experts per token
    LIMIT: tl.constexpr,  # gate/up clamp (inf: none)
    GPT_OSS: tl.constexpr,  # (up + 1)·g·sigmoid(ALPHA·g), else silu(g)·up
    ALPHA: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # b1, b3, b2 added (routed experts only)
    HAS_SHARED: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
    WFMT: tl.constexpr,  # routed weights: 0 dense, 1 FP4 (MXFP4), 2 FP8 (module docstring)
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
                w1s_ptr,
                w3s_ptr,
                N,
                D,
                I,
                J,
                stride_xn,
                stride_w1e,
                stride_w1i,
                stride_s1j,
                stride_hm,
                stride_w1se,
                stride_w1si,
                K,
                LIMIT,
                GPT_OSS,
                ALPHA,
                HAS_BIAS,
                HAS_SHARED,
                DOT_IN_F32,
                WFMT,
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
                w2s_ptr,
                D,
                I,
                J,
                stride_hm,
                stride_w2e,
                stride_w2d,
                stride_s2d,
                stride_om,
                stride_w2se,
                stride_w2sd,
                HAS_BIAS,
                HAS_SHARED,
                DOT_IN_F32,
                WFMT,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
