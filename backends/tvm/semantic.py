"""te lowerings of the semantic ops (ir/ops/attn.py, moe.py, hc.py), one kernel per node.

Data-dependent indices stay tensors inside the kernel: top-k runs in the kernel
(`tvm.contrib.sort.topk`, as `topi.topk` emits it on the CPU; `topk`, `_topk_or_pad` here are
shared with the other semantic modules), MoE experts gather each token's k expert weights by index
(no per-expert row counts on the host; an expert no token chose is never read). All math in fp32,
results in the op's dtype.

- `attn.compress`, `attn.compress_step`, `hc.pre`, `hc.post`, `hc.head`; the shared helpers
  `f32`, `i32`, `_rope`, `_rms_rows`, `topk`, `_topk_or_pad`, `_emit_scheduled`.

Kernel-specific CPU schedules run around the generic `schedule_cpu`: the compressor step's
projections read each weight row once per step and its pooling runs only when a block completes
(`schedule_compress_step`); mHC's mixing projection gets a register tile of 8 fn rows
(`schedule_hc_mix`); `hc.post` with a few streams (n <= 8) is one elementwise stage, its sum
over the streams unrolled (`_post_unrolled`). A prefill's `attn.compress` runs its reference
(two torch GEMMs, then the pooling in torch) when the executable's `blas` policy says so for its
FLOPs (`CompressLaunch`).

The sparse attention ops (`attn.sparse_mqa`, `attn.indexer_topk`) are in `semantic_sparse.py`;
the MoE ops (`moe.route`, `moe.experts` and its BLAS path) in `semantic_moe.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ir
from backends.base import body_of_one_op
from backends.tvm.emitters import (
    TVM_EMITTERS,
    Call,
    KernelLaunch,
    emit_single,
    kernel_name,
    shape_of,
    signature,
    uses_blas,
)
from backends.tvm.kernel import make_kernel
from backends.tvm.lower import Lowering, Unsupported, convert, guarded, lowers, static, tvm_dtype
from backends.tvm.schedule_cpu import VECTOR, schedule_cpu

F32 = "float32"
NEG_INF = float("-inf")


def f32(x: Any) -> Any:
    return convert(x, F32)


def i32(x: Any) -> Any:
    return convert(x, "int32")


def _rope(lw: Lowering, x: Any, cos: Any, sin: Any, row: Any, inverse: bool, out: str) -> Any:
    """Rotate interleaved pairs of the last 2·half channels of x [..., c]; `row(*i)` picks the
    cos/sin row for output index i."""
    from tvm import te, tirx

    half = cos.shape[1]
    width = x.shape[-1]
    off = width - 2 * half
    sign = -1.0 if inverse else 1.0

    def f(*i: Any) -> Any:
        c = i[-1]
        p = tirx.floordiv(tirx.max(c - off, 0), 2)
        even = tirx.floormod(c - off, 2) == 0
        a = f32(x(*i[:-1], tirx.min(off + 2 * p, width - 1)))
        b = f32(x(*i[:-1], tirx.min(off + 2 * p + 1, width - 1)))
        r = row(*i)
        cs, sn = f32(cos(r, p)), f32(sin(r, p)) * sign
        rotated = tirx.Select(even, a * cs - b * sn, a * sn + b * cs)
        return convert(guarded(c < off, f32(x(*i)), rotated), out)

    return te.compute(x.shape, f, name=lw.tag("rope"))


def _rms_rows(lw: Lowering, x: Any, eps: float, out: str, weight: Any = None) -> Any:
    """x · rsqrt(mean(x²) + eps) over the last dim (· weight), rounded to `out`."""
    from tvm import te, tirx

    width = x.shape[-1]
    k = te.reduce_axis((0, width), name="k")
    ss = te.compute(
        x.shape[:-1], lambda *i: te.sum(f32(x(*i, k)) * f32(x(*i, k)), axis=k), name=lw.tag("ss")
    )

    def f(*i: Any) -> Any:
        y = f32(x(*i)) * te.rsqrt(ss(*i[:-1]) / tirx.Cast(F32, width) + tirx.const(eps, F32))
        y = convert(convert(y, out), F32) if weight is None else y * f32(weight(i[-1]))
        return convert(y, out)

    return te.compute(x.shape, f, name=lw.tag("rms"))


# --- top-k (shared with semantic_sparse, semantic_moe, semantic_select) ----------------------


def topk(lw: Lowering, x: Any, k: int) -> tuple[Any, Any]:
    """(values, int64 indices) of the k largest entries of x [..., n] along the last dim, best
    first. CPU: `topi.topk` (an extern call to TVM's sort). GPU (`lw.gpu`): in the kernel, by
    rank: entry s has rank #{entries that beat it} (larger, or equal at a lower index), and
    output j is the entry of rank j; n² comparisons per row, no sort, no extern call."""
    from tvm import te, tirx, topi

    if not lw.gpu:
        return topi.topk(x, k=k, axis=-1, ret_type="both", is_ascend=False, dtype="int64")
    *lead, n = x.shape
    r = te.reduce_axis((0, n), name="r")

    def beats(i: tuple, other: Any) -> Any:
        mine, theirs = x(*i), x(*i[:-1], other)
        return tirx.Or(theirs > mine, tirx.And(theirs == mine, other < i[-1]))

    one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")
    rank = te.compute(
        x.shape,
        lambda *i: te.sum(tirx.Select(beats(i, r), one, zero), axis=r),
        name=lw.tag("keep_rank"),
    )
    s = te.reduce_axis((0, n), name="s")
    found = te.compute(  # 1 + the index of the entry of rank j (every j < n has one)
        (*lead, k),
        lambda *i: te.sum(tirx.Select(rank(*i[:-1], s) == i[-1], s + 1, zero), axis=s),
        name=lw.tag("keep_pick"),
    )
    index = te.compute(found.shape, lambda *i: convert(found(*i) - 1, "int64"), name=lw.tag("pick"))
    values = te.compute(
        found.shape,
        lambda *i: x(*i[:-1], tirx.max(found(*i) - 1, 0)),
        name=lw.tag("picked_value"),
    )
    return values, index


def _topk_or_pad(lw: Lowering, score: Any, n: Any, k: int) -> Any:
    """Indices (i64) of the k best columns of score [..., n] (-inf = invisible), -1 past the
    visible ones; k may exceed n."""
    from tvm import te, tirx

    lead = score.shape[:-1]
    padded = te.compute(
        (*lead, n + k),
        lambda *i: tirx.Select(
            i[-1] < n, score(*i[:-1], tirx.min(i[-1], n - 1)), tirx.const(NEG_INF, F32)
        ),
        name=lw.tag("padded"),
    )
    values, picks = topk(lw, padded, k)
    return te.compute(
        picks.shape,
        lambda *i: tirx.Select(
            tirx.Or(tirx.isinf(values(*i)), picks(*i) >= convert(n, "int64")),
            tirx.const(-1, "int64"),
            picks(*i),
        ),
        name=lw.tag("idx"),
    )


# --- attention: the compressor (sparse_mqa and indexer_topk are in semantic_sparse.py) ------


@lowers("attn.compress")
def lower_compress(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    x, wkv, wgate, ape, norm, cos, sin = args
    out = tvm_dtype(node.result.dtype)
    m, c = op.ratio, norm.shape[0]
    blocks = tirx.floordiv(x.shape[1], m)
    kd = te.reduce_axis((0, x.shape[2]), name="kd")
    kv = te.compute(
        (x.shape[0], x.shape[1], wkv.shape[0]),
        lambda b, t, ch: te.sum(f32(x(b, t, kd)) * f32(wkv(ch, kd)), axis=kd),
        name=lw.tag("kv"),
    )
    kd2 = te.reduce_axis((0, x.shape[2]), name="kd2")
    proj = te.compute(
        kv.shape,
        lambda b, t, ch: te.sum(f32(x(b, t, kd2)) * f32(wgate(ch, kd2)), axis=kd2),
        name=lw.tag("gate_proj"),
    )
    gate = te.compute(
        kv.shape,
        lambda b, t, ch: proj(b, t, ch) + f32(ape(tirx.floormod(t, m), ch)),
        name=lw.tag("gate"),
    )
    rows = 2 * m if op.overlap else m

    def cand(b: Any, i: Any, r: Any, ch: Any) -> tuple[Any, Any]:
        """(kv, score) of candidate row r of entry i, output channel ch."""
        if not op.overlap:
            return kv(b, i * m + r, ch), gate(b, i * m + r, ch)
        prev = r < m
        t = tirx.Select(prev, (i - 1) * m + r, i * m + r - m)
        t = tirx.max(t, 0)
        col = tirx.Select(prev, ch, ch + c)
        ok = tirx.Or(tirx.Not(prev), i >= 1)
        zero = tirx.const(0.0, F32)
        return guarded(ok, kv(b, t, col), zero), guarded(ok, gate(b, t, col), NEG_INF)

    shape = (x.shape[0], blocks, c)
    kr = te.reduce_axis((0, rows), name="kr")
    mx = te.compute(shape, lambda b, i, ch: te.max(cand(b, i, kr, ch)[1], axis=kr), name="mx")
    kr2 = te.reduce_axis((0, rows), name="kr2")
    den = te.compute(
        shape,
        lambda b, i, ch: te.sum(te.exp(cand(b, i, kr2, ch)[1] - mx(b, i, ch)), axis=kr2),
        name=lw.tag("den"),
    )
    kr3 = te.reduce_axis((0, rows), name="kr3")
    num = te.compute(
        shape,
        lambda b, i, ch: te.sum(
            cand(b, i, kr3, ch)[0] * te.exp(cand(b, i, kr3, ch)[1] - mx(b, i, ch)), axis=kr3
        ),
        name=lw.tag("num"),
    )
    pooled = te.compute(shape, lambda *i: convert(num(*i) / den(*i), out), name=lw.tag("pooled"))
    entry = _rms_rows(lw, pooled, op.eps, out, weight=norm)
    return [_rope(lw, entry, cos, sin, lambda b, i, ch: i, False, out)]


@lowers("attn.compress_step")
def lower_compress_step(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    """One decode token into the compressor state; when the block completes, the block pooled and
    written to its cache row.

    Outputs: the cache and the two states, whole (functional update), or in the *row form* the
    in-place writer emits (`backends.tvm.inplace`: cache and state results `[B, 1, ·]`) the one
    cache row and the one new state row (the writer stores the row and rolls the states itself).

    The projections x·wkv, x·wgate are computed once into [B, W] buffers, the weight rows in the
    outer loop (`schedule_compress_step`: each row is read once for the whole batch). The pooling
    over the R state rows runs only when the block completes (the entry is discarded otherwise,
    so a step inside a block reads no state row); it accumulates whole contiguous rows
    (`rows_*`) with the weights `exp(score - max)` kept once. Small's ratio-128 step, B=8,
    1 thread: ~4 ms before, most of it 64K `exp` per token and the whole-state rewrite.""" 
    from tvm import te, tirx

    op = node.op
    x, pos, kv_state, score_state, wkv, wgate, ape, norm, cos, sin, cache = args
    m, c = op.ratio, norm.shape[0]
    p = i32(pos())
    st_dt, out = tvm_dtype(node.results[1].dtype), tvm_dtype(node.operands[0].dtype)
    row_form = node.results[1].shape[1] != node.operands[2].shape[1]
    kd, kd2 = (
        te.reduce_axis((0, x.shape[2]), name="kd"),
        te.reduce_axis((0, x.shape[2]), name="kd2"),
    )
    shape = (x.shape[0], wkv.shape[0])
    kv = te.compute(
        shape, lambda b, w: te.sum(f32(x(b, 0, kd)) * f32(wkv(w, kd)), axis=kd), name="kv"
    )
    proj = te.compute(
        shape, lambda b, w: te.sum(f32(x(b, 0, kd2)) * f32(wgate(w, kd2)), axis=kd2), name="zp"
    )
    slot = tirx.floormod(p, m) + (m if op.overlap else 0)
    ape_row = tirx.floormod(p, m)
    emit = block_completes(p, m)

    def put(state: Any, value: Any) -> Any:
        return lambda b, r, w: tirx.Select(
            tirx.EQ(r, slot), convert(value(b, w), st_dt), state(b, r, w)
        )

    score = lambda b, w: proj(b, w) + f32(ape(ape_row, w))
    kv_new = te.compute(kv_state.shape, put(kv_state, kv), name=lw.tag("kv_state"))
    sc_new = te.compute(score_state.shape, put(score_state, score), name=lw.tag("score_state"))
    rows = 2 * m if op.overlap else m

    def cand(b: Any, r: Any, ch: Any) -> tuple[Any, Any]:
        # overlap: rows < m pool the first c channels of W = 2c, rows >= m the last c (an
        # affine column, so a vector of channels is one contiguous load)
        col = ch + c * tirx.floordiv(r, m) if op.overlap else ch
        return f32(kv_new(b, r, col)), f32(sc_new(b, r, col))

    pshape = (x.shape[0], 1, c)
    kr, kr2, kr3 = (te.reduce_axis((0, rows), name=n) for n in ("kr", "kr2", "kr3"))
    # `rows_`: each reduction accumulates whole contiguous state rows (channels vectorised),
    # not a strided column per channel; the weights `exp(score - max)` are computed once.
    # `_pool` stages run only when the block completes (`when_block_completes`)
    mx = te.compute(
        pshape, lambda b, _, ch: te.max(cand(b, kr, ch)[1], axis=kr), name="rows_pool_max"
    )
    wts = te.compute(
        (x.shape[0], rows, c),
        lambda b, r, ch: te.exp(cand(b, r, ch)[1] - mx(b, 0, ch)),
        name="keep_pool_weights",
    )
    den = te.compute(
        pshape, lambda b, _, ch: te.sum(wts(b, kr2, ch), axis=kr2), name="rows_pool_den"
    )
    num = te.compute(
        pshape,
        lambda b, _, ch: te.sum(cand(b, kr3, ch)[0] * wts(b, kr3, ch), axis=kr3),
        name="rows_pool_num",
    )
    pooled = te.compute(pshape, lambda *i: convert(num(*i) / den(*i), out), name="pooled")
    entry = _rope(
        lw,
        _rms_rows(lw, pooled, op.eps, out, weight=norm),
        cos,
        sin,
        lambda b, t, ch: 0,
        False,
        out,
    )
    # computed once, and only when the block completes (the cache row is kept otherwise)
    entry = te.compute(
        entry.shape,
        lambda *i: tirx.if_then_else(emit, entry(*i), tirx.const(0.0, entry.dtype)),
        name="keep_entry",
    )
    row = tirx.min(tirx.floordiv(p, m), cache.shape[1] - 1)
    cache_dt = tvm_dtype(node.results[0].dtype)
    cache_new = te.compute(
        cache.shape,
        lambda b, r, ch: tirx.Select(
            tirx.And(emit, tirx.EQ(r, row)), convert(entry(b, 0, ch), cache_dt), cache(b, r, ch)
        ),
        name=lw.tag("cache"),
    )
    if row_form:
        row_shape = (x.shape[0], 1, kv_state.shape[2])
        return [
            cache_new,
            te.compute(row_shape, lambda b, _, w: convert(kv(b, w), st_dt), name="kv_row"),
            te.compute(row_shape, lambda b, _, w: convert(score(b, w), st_dt), name="score_row"),
        ]
    if not op.overlap:
        return [cache_new, kv_new, sc_new]

    def roll(state: Any) -> Any:
        return lambda b, r, w: tirx.Select(
            emit, state(b, m + tirx.floormod(r, m), w), state(b, r, w)
        )

    return [
        cache_new,
        te.compute(kv_state.shape, roll(kv_new), name=lw.tag("kv_state_out")),
        te.compute(score_state.shape, roll(sc_new), name=lw.tag("score_state_out")),
    ]


def block_completes(p: Any, m: int) -> Any:
    """Whether the token at position p completes its block of m (its entry is emitted)."""
    from tvm import tirx

    return tirx.EQ(tirx.floormod(p + 1, m), 0)


POOL = "_pool_"  # compress_step stages that only the completed block's entry needs


def schedule_compress_step(func: Any, ratio: int) -> Any:
    """`schedule_cpu` with three kernel-specific steps.

    Before it, the projections `kv`, `zp` ([B, W], a dot over d each) get a register tile
    (`_weight_rows_outer`). After it, their two parallel loops over the weight-row tiles become
    one (`_projections_together`: one parallel region a step, not two), and the root loop nests
    made only of pooling stages (names holding `_pool_`, and the entry's RMS statistic `ss_*`)
    run under `if (pos + 1) % ratio == 0`: te drops a reduction's `where=` in
    `create_prim_func` (this TVM), so the guard goes on the scheduled loops. (`keep_entry`,
    computed with the cache row it feeds, has the same condition in its expression.)"""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name in ("kv", "zp"):
        _weight_rows_outer(sch, sch.get_sblock(name))
    func = schedule_cpu(sch.mod["main"].with_attr("global_symbol", func.attrs["global_symbol"]))
    return _when_block_completes(_projections_together(func), ratio)


PROJ_ROWS = 8  # weight rows per register tile of a compress_step projection


def _weight_rows_outer(sch: Any, block: Any) -> None:
    """y[b, w] = Σ_k x[b, k]·W[w, k] as loops (w / 8, b, k / 16, 8 rows unrolled, 16 lanes):
    each weight row is read once per step for the whole batch (not once per token), and one
    vector of x feeds 8 independent accumulators (a lone dot is one dependent FMA chain).
    Small's ratio-4 projection (1024 x 512) at B=8, 1 thread: 0.48 -> 0.14-0.24 ms."""
    b, w, k = sch.get_loops(block)
    rows, depth = (static(sch.get(lp).extent) for lp in (w, k))
    if rows is None or depth is None or rows % PROJ_ROWS or depth % VECTOR:
        sch.reorder(w, b)  # at least the weight rows outside the batch
        return
    w0, w1 = sch.split(w, [None, PROJ_ROWS])
    k0, k1 = sch.split(k, [None, VECTOR])
    rf = sch.rfactor(k1, 2)
    loops = sch.get_loops(rf)  # b, w0, w1, k0, k1
    sch.reorder(loops[1], loops[0], loops[3], loops[2], loops[4])
    loops = sch.get_loops(rf)  # w0, b, k0, w1, k1
    sch.unroll(loops[3])
    sch.vectorize(loops[4])
    sch.reverse_compute_at(block, loops[1])


def _projections_together(func: Any) -> Any:
    """The two projections' root loops (parallel over the same weight-row tiles) as one loop:
    one parallel region a step instead of two (each wakes the pool and waits for it). Unchanged
    unless both are parallel loops of the same static extent."""
    from tvm import s_tir, tirx

    realize = func.body
    root = realize.block
    if not isinstance(root.body, tirx.SeqStmt):
        return func
    stmts = list(root.body)
    at = {}
    for i, st in enumerate(stmts):
        names = [b.name_hint for b in _blocks(st)]
        for name in ("kv_rf", "zp_rf"):
            if name in names:
                at[name] = i
    if len(at) != 2 or at["zp_rf"] != at["kv_rf"] + 1:
        return func
    first, second = stmts[at["kv_rf"]], stmts[at["zp_rf"]]
    parallel = tirx.ForKind.PARALLEL
    if not all(isinstance(st, tirx.For) and st.kind == parallel for st in (first, second)):
        return func
    if static(first.extent) is None or static(first.extent) != static(second.extent):
        return func
    bind = tirx.Bind(second.loop_var, first.loop_var)  # the second body's loop variable
    body = tirx.SeqStmt([first.body, bind, second.body])
    both = tirx.For(first.loop_var, first.min, first.extent, parallel, body)
    stmts[at["kv_rf"] : at["zp_rf"] + 1] = [both]
    block = s_tir.SBlock(
        root.iter_vars,
        root.reads,
        root.writes,
        root.name_hint,
        tirx.SeqStmt(stmts),
        root.init,
        root.alloc_buffers,
        root.match_buffers,
        root.annotations,
    )
    return func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, block))


def _when_block_completes(func: Any, ratio: int) -> Any:
    from tvm import s_tir, tirx

    realize = func.body
    root = realize.block
    stmts = list(root.body) if isinstance(root.body, tirx.SeqStmt) else [root.body]
    blocks = [_blocks(st) for st in stmts]
    pos = func.params[1]  # the position operand: a 0-d buffer
    emit = block_completes(tirx.Cast("int32", tirx.BufferLoad(pos, [])), ratio)

    def pooling(bs: list[Any]) -> bool:
        return bool(bs) and all(POOL in b.name_hint or b.name_hint.startswith("ss_") for b in bs)

    body = [tirx.IfThenElse(emit, st, None) if pooling(bs) else st for st, bs in zip(stmts, blocks)]
    block = s_tir.SBlock(
        root.iter_vars,
        root.reads,
        root.writes,
        root.name_hint,
        tirx.SeqStmt(body),
        root.init,
        root.alloc_buffers,
        root.match_buffers,
        root.annotations,
    )
    return func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, block))


def _blocks(stmt: Any) -> list[Any]:
    """The blocks inside `stmt` (loops, sequences, both branches of an if, blocks)."""
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.SeqStmt):
        return [b for st in stmt for b in _blocks(st)]
    if isinstance(stmt, tirx.For):
        return _blocks(stmt.body)
    if isinstance(stmt, tirx.IfThenElse):
        rest = _blocks(stmt.else_case) if stmt.else_case is not None else []
        return _blocks(stmt.then_case) + rest
    if isinstance(stmt, s_tir.SBlockRealize):
        return [stmt.block, *_blocks(stmt.block.body)]
    return []


# --- mHC ---------------------------------------------------------------------------------------


def _mix(lw: Lowering, x: Any, fn: Any, norm_eps: float) -> Any:
    """(flatten(X)·fnᵀ)·rsqrt(mean(flatten(X)²) + eps) over the [n, d] stream, fp32."""
    from tvm import te, tirx

    *lead, n, d = x.shape
    km = te.reduce_axis((0, n * d), name="km")
    at = lambda i, m_: f32(x(*i, tirx.floordiv(m_, d), tirx.floormod(m_, d)))
    ss = te.compute(lead, lambda *i: te.sum(at(i, km) * at(i, km), axis=km), name=lw.tag("ss"))
    km2 = te.reduce_axis((0, n * d), name="km2")
    rs = lambda i: te.rsqrt(ss(*i) / tirx.Cast(F32, n * d) + tirx.const(norm_eps, F32))
    raw = te.compute(
        (*lead, fn.shape[0]),
        lambda *i: te.sum(at(i[:-1], km2) * f32(fn(i[-1], km2)), axis=km2),
        name=lw.tag("proj"),
    )
    return te.compute(raw.shape, lambda *i: raw(*i) * rs(i[:-1]), name=lw.tag("mix"))


MIX_ROWS = 8  # rows of fn per register tile of the mHC mixing projection


def schedule_hc_mix(func: Any) -> Any:
    """`schedule_cpu` after a register tile for the mixing projection `proj` (flatten(X)·fnᵀ,
    [..., r] over n·d): loops (tokens..., r / 8, n·d / 16, 8 rows unrolled, 16 lanes) with
    16-lane partial sums, so one vector of X feeds 8 independent accumulators (generic: one dot
    per output, a dependent FMA chain reloading X per row: small's hc.pre at T=4096, 11.5
    GFLOP/s). r not a multiple of 8 (hc.head: r = n), or a tile TVM refuses: the generic
    schedule."""
    from tvm import s_tir

    symbol = func.attrs["global_symbol"]
    sch = s_tir.Schedule(func)
    try:
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint.startswith("proj"):
                _rows_tile(sch, block)
    except Exception:  # noqa: BLE001  (a primitive TVM refuses: the generic schedule)
        sch = s_tir.Schedule(func)
    return schedule_cpu(sch.mod["main"].with_attr("global_symbol", symbol))


def _rows_tile(sch: Any, block: Any) -> None:
    *lead, r, k = sch.get_loops(block)
    rows, depth = (static(sch.get(lp).extent) for lp in (r, k))
    if rows is None or depth is None or rows % MIX_ROWS or depth % VECTOR or not lead:
        return
    if len(lead) > 1:  # one token loop: what `schedule_cpu` runs in parallel
        sch.fuse(*lead)
    r0, r1 = sch.split(r, [None, MIX_ROWS])
    k0, k1 = sch.split(k, [None, VECTOR])
    rf = sch.rfactor(k1, len(lead) + 1)
    loops = sch.get_loops(rf)  # tokens, r0, r1, k0, k1
    sch.reorder(loops[-2], loops[-3])
    loops = sch.get_loops(rf)  # tokens, r0, k0, r1, k1
    sch.unroll(loops[-2])
    sch.vectorize(loops[-1])
    sch.reverse_compute_at(block, loops[-4])


def _pre_mix(lw: Lowering, x: Any, pre: Any, out: str) -> Any:
    from tvm import te

    *lead, n, d = x.shape
    kj = te.reduce_axis((0, n), name="kj")
    acc = te.compute(
        (*lead, d),
        lambda *i: te.sum(pre(*i[:-1], kj) * f32(x(*i[:-1], kj, i[-1])), axis=kj),
        name=lw.tag("rows_mixed"),  # a vector of channels accumulates the n streams' rows
    )
    return te.compute(acc.shape, lambda *i: convert(acc(*i), out), name=lw.tag("y"))


@lowers("hc.pre")
def lower_hc_pre(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    x, fn, scale, base = args
    out = tvm_dtype(node.results[0].dtype)
    n = static(x.shape[-2])
    if n is None:
        raise Unsupported("hc.pre needs a static stream count n")
    lead = list(x.shape[:-2])
    mix = _mix(lw, x, fn, op.norm_eps)
    lin = lambda i, r, sc: mix(*i, r) * f32(scale(sc)) + f32(base(r))
    eps = tirx.const(op.eps, F32)
    pre = te.compute(  # kept: n gates per token, not recomputed per mixed channel
        (*lead, n), lambda *i: te.sigmoid(lin(i[:-1], i[-1], 0)) + eps, name=lw.tag("keep_pre")
    )
    post = te.compute(
        (*lead, n), lambda *i: 2.0 * te.sigmoid(lin(i[:-1], n + i[-1], 1)), name=lw.tag("post")
    )
    logits = te.compute(
        (*lead, n, n), lambda *i: lin(i[:-2], 2 * n + i[-2] * n + i[-1], 2), name="logits"
    )
    comb = _sinkhorn(lw, logits, n, op.iters, eps)
    return [_pre_mix(lw, x, pre, out), post, comb]


def _sinkhorn(lw: Lowering, logits: Any, n: int, iters: int, eps: Any) -> Any:
    """Row softmax + eps, column normalise, then (iters-1) × (rows, columns); sums unrolled."""
    from tvm import te, tirx

    def row_sum(t: Any, i: tuple) -> Any:
        return sum((t(*i[:-1], b) for b in range(1, n)), t(*i[:-1], 0))

    def col_sum(t: Any, i: tuple) -> Any:
        return sum((t(*i[:-2], a, i[-1]) for a in range(1, n)), t(*i[:-2], 0, i[-1]))

    def row_max(t: Any, i: tuple) -> Any:
        out = t(*i[:-1], 0)
        for b in range(1, n):
            out = tirx.max(out, t(*i[:-1], b))
        return out

    shape = logits.shape
    ex = te.compute(shape, lambda *i: te.exp(logits(*i) - row_max(logits, i)), name="keep_sk_exp")
    m = te.compute(shape, lambda *i: ex(*i) / row_sum(ex, i) + eps, name=lw.tag("keep_sk_soft"))
    m = _normalise(lw, m, col_sum, eps, "keep_sk_col")
    for _ in range(iters - 1):
        m = _normalise(lw, m, row_sum, eps, "keep_sk_row")
        m = _normalise(lw, m, col_sum, eps, "keep_sk_col")
    return m


def _normalise(lw: Lowering, m: Any, total: Any, eps: Any, name: str) -> Any:
    from tvm import te

    return te.compute(m.shape, lambda *i: m(*i) / (total(m, i) + eps), name=lw.tag(name))


@lowers("hc.head")
def lower_hc_head(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    x, fn, scale, base = args
    mix = _mix(lw, x, fn, op.norm_eps)
    eps = tirx.const(op.eps, F32)
    pre = te.compute(
        mix.shape,
        lambda *i: te.sigmoid(mix(*i) * f32(scale(0)) + f32(base(i[-1]))) + eps,
        name=lw.tag("keep_pre"),
    )
    return [_pre_mix(lw, x, pre, tvm_dtype(node.result.dtype))]


@lowers("hc.post")
def lower_hc_post(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te

    f, res, post, comb = args
    out = tvm_dtype(node.result.dtype)
    n = static(res.shape[-2])
    if n is not None and n <= POST_UNROLLED:
        return [_post_unrolled(lw, f, res, post, comb, n, out)]
    kj = te.reduce_axis((0, res.shape[-2]), name="kj")

    def g(*i: Any) -> Any:
        lead, k, d = i[:-2], i[-2], i[-1]
        return te.sum(f32(comb(*lead, kj, k)) * f32(res(*lead, kj, d)), axis=kj)

    acc = te.compute(res.shape, g, name=lw.tag("rows_carried"))

    def h(*i: Any) -> Any:
        lead, k, d = i[:-2], i[-2], i[-1]
        return convert(f32(post(*lead, k)) * f32(f(*lead, d)) + acc(*i), out)

    return [te.compute(res.shape, h, name=lw.tag("hc_post"))]


POST_UNROLLED = 8  # hc.post with at most this many streams sums them in one elementwise stage


def _post_unrolled(lw: Lowering, f: Any, res: Any, post: Any, comb: Any, n: int, out: str) -> Any:
    """hc.post as one elementwise stage, Σ_j comb[j, k]·res[j, d] unrolled over the n streams
    (the same order as the reduction): vectorised over d, no [.., n, d] partial-sum buffer."""
    from tvm import te

    def h(*i: Any) -> Any:
        lead, k, d = i[:-2], i[-2], i[-1]
        acc = f32(comb(*lead, 0, k)) * f32(res(*lead, 0, d))
        for j in range(1, n):
            acc = acc + f32(comb(*lead, j, k)) * f32(res(*lead, j, d))
        return convert(f32(post(*lead, k)) * f32(f(*lead, d)) + acc, out)

    return te.compute(res.shape, h, name=lw.tag("hc_post"))


def _emit_scheduled(schedule_of: Any) -> Any:
    """An emitter as `emit_single` whose kernel gets the schedule `schedule_of(node)` (kernel-
    specific steps around the generic `schedule_cpu`)."""

    def emit(node: ir.Node, target: Any, options: dict) -> KernelLaunch:
        body, index = body_of_one_op(node)
        variant = "" if len(index) == len(node.operands) else "operands" + ",".join(map(str, index))
        key = signature(node, variant)
        kernel = make_kernel(body, kernel_name(node), key, schedule_of(node), loc=node.loc)
        return KernelLaunch(node, [kernel], index)

    return emit


TVM_EMITTERS.register("attn.compress_step")(
    _emit_scheduled(lambda node: lambda f: schedule_compress_step(f, node.op.ratio))
)
TVM_EMITTERS.register("hc.pre", "hc.head")(_emit_scheduled(lambda node: schedule_hc_mix))
TVM_EMITTERS.register("hc.post")(emit_single)


@dataclass
class CompressLaunch(KernelLaunch):
    """`attn.compress`: the kernel, or, when the executable's `blas` policy says so for its
    projection FLOPs (as a `matmul`'s; a prefill), the op's own reference (ir/ops/attn.py): the
    projections x·wkvᵀ, x·wgateᵀ one torch GEMM each, the pooling, norm and RoPE after them in
    torch. The kernel does the projections as one dot product per output (small at T=4096, 1
    thread: 15-20 GFLOP/s; MKL's sgemm 105-148)."""

    blas: str = "auto"

    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Call:
        b, t, d = shape_of(self.node.operands[0], env)
        width = shape_of(self.node.operands[1], env)[0]
        if uses_blas(self.blas, 4 * b * t * width * d):  # two GEMMs [B·T, d] x [d, W]
            op = self.node.op
            return self.counted("blas", lambda inputs: (op.reference(*inputs)[0].contiguous(),))
        return super().bind(env, fns, reuse)


@TVM_EMITTERS.register("attn.compress")
def emit_compress(node: ir.Node, target: Any, options: dict) -> CompressLaunch:
    single = emit_single(node, target, options)
    return CompressLaunch(node, single.kernels, single.operands, blas=options.get("blas", "auto"))
