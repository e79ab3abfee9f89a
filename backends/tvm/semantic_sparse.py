"""te lowerings of the sparse attention ops (ir/ops/attn.py): `attn.sparse_mqa` and
`attn.indexer_topk`, prefill and decode, one kernel per node, and their prefill BLAS paths.

Data-dependent indices stay tensors inside the kernel: sparse attention gathers its entries by
index (-1 masked), the indexer's top-k runs in the kernel (`semantic.topk`). All math in fp32,
results in the op's dtype.

- `attn.sparse_mqa`: q RMS norm + RoPE, entries = window ∪ (every visible compressed entry |
  indexer picks), scores, softmax with the sink, weighted sum, inverse RoPE (prefill and decode).
- `attn.indexer_topk`: relu(q·k) · w summed over heads, causal mask, top-k.

CPU schedules: a register tile over the keys for the indexer's scores, its key tiles in parallel
(`schedule_indexer_topk`).
A decode step's sparse attention (`schedule_sparse_mqa_decode`): its scores in register tiles of
8 entries (8 independent dot products sharing each load of q), its weighted sum of the entries in
register tiles of 8 heads (each gathered row piece loaded once for 8 heads); and `exp(z - m)` is
computed once (`keep_e`: LLVM makes a 16-lane exp 16 libm calls). Small b1 in a step (loaded
2-core box, A/B in one process against the generic schedule): csa 223 -> 175 us a call, hca
131 -> 112. A tile of 8 heads on the scores measured slower (215 -> 250 us; an earlier one too,
~8%).

Prefill BLAS paths, chosen per call like a large `matmul` (the executable's `blas` policy on the
op's FLOPs; a decode step always runs the kernel): `indexer_topk_blas` scores each block of 128
queries x 16 heads as one GEMM against the causally visible keys only, then relu·w summed over
the heads and `torch.topk` (no [T, S, H] buffer); `sparse_mqa_blas` runs each block of 64
queries with the heads as GEMM rows (an entry row read once for all heads): the window and
hca's compressed entries as GEMMs over consecutive rows, csa's picks gathered per query or read
from a GEMM over the block's distinct picked rows. One-op thread CPU time at small's 4K prefill
shapes, 1 thread: 1.6-2.0x faster than the kernels. Both loops run their blocks on torch's
threads as Python threads, one torch thread each (`host_parallel.parallel_blocks`): the blocks'
GEMMs are too small to share well. Small's 4096-token prefill, captured inputs, 2 threads, min
of 5 on the loaded 2-core box (serial with the old blocks -> blocks as now on threads): indexer
71.7 -> 55.1 ms a call, sparse MQA csa 290-312 -> 223-243 ms, hca 171-178 -> 124-129 ms;
bit-equal outputs.
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
from backends.tvm.host_parallel import parallel_blocks
from backends.tvm.kernel import make_kernel
from backends.tvm.lower import Lowering, convert, guarded, lowers, static, tvm_dtype
from backends.tvm.schedule_cpu import VECTOR, schedule_cpu
from backends.tvm.semantic import (
    F32,
    NEG_INF,
    _rms_rows,
    _rope,
    _topk_or_pad,
    f32,
    i32,
)


@lowers("attn.sparse_mqa")
def lower_sparse_mqa(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    q, kv, sink, cos, sin, *rest = args
    out = tvm_dtype(node.result.dtype)
    pos = i32(rest.pop()()) if op.decode else None
    comp = rest[0] if op.variant != "window" else None
    picks = rest[1] if op.variant == "csa" else None
    if op.q_norm_eps is not None:
        q = _rms_rows(lw, q, op.q_norm_eps, out)
    q = _rope(lw, q, cos, sin, lambda b, t, h, c: t, False, out)
    q = te.compute(q.shape, lambda *i: q(*i), name=lw.tag("keep_q"))  # once, not once per entry
    win = op.window
    rows = kv.shape[1]
    extra = 0 if comp is None else (picks.shape[2] if picks is not None else comp.shape[1])
    n_entries = win + extra

    def where(b: Any, t: Any, j: Any) -> tuple[Any, Any, Any]:
        """(valid, is_raw, row) of entry j of query t."""
        p_t = pos + t if pos is not None else t
        raw_row = j if pos is not None else t - win + 1 + j
        raw_ok = j <= pos if pos is not None else raw_row >= 0
        if comp is None:
            return raw_ok, tirx.const(True, "bool"), raw_row
        s = j - win
        s_safe = tirx.min(tirx.max(s, 0), extra - 1)
        if picks is not None:
            crow = i32(picks(b, t, s_safe))
            comp_ok = crow >= 0
        else:
            crow = s
            comp_ok = s < tirx.floordiv(p_t + 1, op.ratio)
        is_raw = j < win
        return guarded(is_raw, raw_ok, comp_ok), is_raw, guarded(is_raw, raw_row, crow)

    # per (query, entry), the row it reads in the table raw ++ compressed. Prefill builds that
    # table once (the channel loops then load one contiguous row instead of selecting between
    # two gathers); a decode step selects between the two rows instead: copying the whole cache
    # for one query would cost more than all its entries
    n_comp = comp.shape[1] if comp is not None else 0
    if comp is None:
        table = kv
    elif pos is None:
        table = te.compute(
            (kv.shape[0], rows + n_comp, kv.shape[2]),
            lambda b, r, c: guarded(
                r < rows,
                kv(b, tirx.min(r, rows - 1), c),
                comp(b, tirx.min(tirx.max(r - rows, 0), n_comp - 1), c),
            ),
            name=lw.tag("keep_table"),
        )

    def table_row(b: Any, t: Any, j: Any) -> Any:
        _, is_raw, row = where(b, t, j)
        raw = tirx.min(tirx.max(row, 0), rows - 1)
        if comp is None:
            return raw
        return guarded(is_raw, raw, rows + tirx.min(tirx.max(row, 0), n_comp - 1))

    row_of = te.compute((*q.shape[:2], n_entries), table_row, name=lw.tag("keep_row"))

    def entry(b: Any, t: Any, j: Any, c: Any) -> Any:
        r = row_of(b, t, j)
        if comp is None or pos is None:
            return f32(table(b, r, c))
        raw = kv(b, tirx.min(r, rows - 1), c)
        return f32(guarded(r < rows, raw, comp(b, tirx.max(r - rows, 0), c)))

    width = q.shape[3]
    kc = te.reduce_axis((0, width), name="kc")
    scale = tirx.const(op.scale, F32)

    def score(b: Any, t: Any, h: Any, j: Any) -> Any:
        dot = te.sum(f32(q(b, t, h, kc)) * entry(b, t, j, kc), axis=kc)
        return dot

    z = te.compute((*q.shape[:3], n_entries), score, name=lw.tag("dot"))
    zm = te.compute(
        z.shape,
        lambda b, t, h, j: tirx.Select(where(b, t, j)[0], z(b, t, h, j) * scale, NEG_INF),
        name=lw.tag("z"),
    )
    kj = te.reduce_axis((0, n_entries), name="kj")
    zmax = te.compute(q.shape[:3], lambda b, t, h: te.max(zm(b, t, h, kj), axis=kj), name="zmax")
    m = te.compute(
        q.shape[:3], lambda b, t, h: tirx.max(zmax(b, t, h), f32(sink(h))), name=lw.tag("m")
    )
    # exp(z - m) once per (query, head, entry): summed, then normalised (the CPU's vector exp is
    # one libm call per lane)
    e = te.compute(
        z.shape, lambda b, t, h, j: te.exp(zm(b, t, h, j) - m(b, t, h)), name=lw.tag("keep_e")
    )
    kj2 = te.reduce_axis((0, n_entries), name="kj2")
    zsum = te.compute(
        q.shape[:3], lambda b, t, h: te.sum(e(b, t, h, kj2), axis=kj2), name=lw.tag("zsum")
    )
    den = te.compute(
        q.shape[:3],
        lambda b, t, h: zsum(b, t, h) + te.exp(f32(sink(h)) - m(b, t, h)),
        name=lw.tag("den"),
    )
    kj3 = te.reduce_axis((0, n_entries), name="kj3")

    p = te.compute(  # once per (query, head, entry), not once per output channel
        z.shape,
        lambda b, t, h, j: f32(convert(e(b, t, h, j) / den(b, t, h), out)),
        name=lw.tag("keep_p"),
    )

    def weighted(b: Any, t: Any, h: Any, c: Any) -> Any:
        return te.sum(p(b, t, h, kj3) * entry(b, t, kj3, c), axis=kj3)

    o = te.compute(q.shape, weighted, name=lw.tag("rows_o"))
    o = te.compute(q.shape, lambda *i: convert(o(*i), out), name=lw.tag("o_cast"))
    return [_rope(lw, o, cos, sin, lambda b, t, h, c: t, True, out)]


KEYS_TILE = 8  # keys per register tile of the indexer's scores


def schedule_indexer_topk(func: Any) -> Any:
    """`schedule_cpu` after a register tile for the scores `heads_dot_*` [B, T, S, H]:
    loops (b·t·s / 8 fused and parallel, c, 8 keys unrolled, heads vectorised), then the tile's
    `score` (relu·w summed over the heads) while its dots are in L1. A key row is read once for
    all heads (was: once per head, 16 x 512 KB per query at small's 4K context) and 8 keys give
    8 independent accumulators; the zeroing sits before the channel loop (which also keeps the
    generic schedule from fusing the loops around it). The key tiles are parallel so a decode
    step (one query per sequence) uses both threads: small b1, in a step, 167 -> 110 us a call
    (its 525 KB of keys come from memory; hot in cache it is compute bound, 69 -> 65 us)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint.startswith("heads_dot"):
            _keys_tile(sch, block)
    return schedule_cpu(sch.mod["main"].with_attr("global_symbol", func.attrs["global_symbol"]))


def _keys_tile(sch: Any, block: Any) -> None:
    b, t, s, h, c = sch.get_loops(block)
    heads = static(sch.get(h).extent)
    if heads is None or heads > 4 * VECTOR:
        return
    s0, s1 = sch.split(s, [None, _tile_of(static(sch.get(s).extent), KEYS_TILE)])
    sch.reorder(s0, c, s1, h)
    sch.unroll(s1)
    sch.vectorize(h)
    # each tile's scores (Σ over heads) right after its dots, while they are in L1
    for consumer in sch.get_consumers(block):
        if sch.get(consumer).name_hint.startswith("score"):
            sch.reverse_compute_at(consumer, s0)
    # the key tiles too: a decode step has one query per sequence (b·t = B), and its keys are
    # all the work
    sch.parallel(sch.fuse(b, t, s0))
    init = sch.decompose_reduction(block, c)
    sch.vectorize(sch.get_loops(init)[-1])


def _tile_of(n: int | None, most: int) -> int:
    """A tile for a loop of n: the largest divisor of n in most/2..most (no tail), else `most`
    (the split's tail is a predicate: a symbolic n, or small's 1026 keys -> 6)."""
    if n is None:
        return most
    return next((f for f in range(most, most // 2 - 1, -1) if n % f == 0), most)


@lowers("attn.indexer_topk")
def lower_indexer_topk(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    q, keys, w, *pos = args
    p0 = i32(pos[0]()) if pos else 0
    n_keys = keys.shape[1]
    # q·k per (key, head) with the heads last: `schedule_indexer_topk` runs 8 keys x the heads
    # (one vector) per channel step, so each key row is read once for all heads
    q_t = te.compute(
        (q.shape[0], q.shape[1], q.shape[3], q.shape[2]),
        lambda b, t, c, h: f32(q(b, t, h, c)),
        name=lw.tag("keep_q_t"),
    )
    kc = te.reduce_axis((0, q.shape[3]), name="kc")
    dot = te.compute(
        (q.shape[0], q.shape[1], n_keys, q.shape[2]),
        lambda b, t, s, h: te.sum(q_t(b, t, kc, h) * f32(keys(b, s, kc)), axis=kc),
        name=lw.tag("heads_dot"),
    )
    kh = te.reduce_axis((0, q.shape[2]), name="kh")
    scale = tirx.const(op.scale, F32)
    score = te.compute(
        (q.shape[0], q.shape[1], n_keys),
        lambda b, t, s: te.sum(
            f32(w(b, t, kh)) * scale * tirx.max(dot(b, t, s, kh), tirx.const(0.0, F32)), axis=kh
        ),
        name=lw.tag("score"),
    )
    masked = te.compute(
        score.shape,
        lambda b, t, s: tirx.Select(
            s < tirx.floordiv(p0 + t + 1, op.ratio), score(b, t, s), tirx.const(NEG_INF, F32)
        ),
        name=lw.tag("masked"),
    )
    return [_topk_or_pad(lw, masked, n_keys, op.k)]



QUERY_BLOCK = 128  # queries per GEMM of the indexer's BLAS path (128 x 16 heads = 2048 rows)


@dataclass
class IndexerLaunch(KernelLaunch):
    """`attn.indexer_topk`: the kernel, or for a prefill the BLAS path (`indexer_topk_blas`) when
    the executable's `blas` policy says so for its causal FLOPs (as a `matmul`'s)."""

    blas: str = "auto"

    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Call:
        op = self.node.op
        if not op.decode:
            b, t, h, c = shape_of(self.node.operands[0], env)
            n_keys = shape_of(self.node.operands[1], env)[1]
            # 2·B·T·H·c·S over the causal half
            if uses_blas(self.blas, b * t * h * c * n_keys):
                return self.counted("blas", lambda inputs: (indexer_topk_blas(op, *inputs),))
        return super().bind(env, fns, reuse)


@TVM_EMITTERS.register("attn.indexer_topk")
def emit_indexer_topk(node: ir.Node, target: Any, options: dict) -> IndexerLaunch:
    body, index = body_of_one_op(node)
    variant = "" if len(index) == len(node.operands) else "operands" + ",".join(map(str, index))
    key = signature(node, variant)
    kernel = make_kernel(body, kernel_name(node), key, schedule_indexer_topk, loc=node.loc)
    return IndexerLaunch(node, [kernel], index, blas=options.get("blas", "auto"))


def indexer_topk_blas(op: Any, q: Any, keys: Any, w: Any) -> Any:
    """A prefill's `attn.indexer_topk` through torch: per block of `QUERY_BLOCK` queries one
    GEMM [block·H, c] x [c, S_block] over the keys visible to the block's last query only (the
    causally masked keys of later queries are never scored), relu, summed over the heads
    weighted by w·scale (one [1, H] x [H, S_block] product per query; [block, H, S_block] at a
    time, no [T, S, H] buffer), masked, then `torch.topk` as the op's reference does, over
    max(S_block, k) columns (-inf pads; a pick of -inf or past the visible keys is -1)."""
    import torch

    batch, t, heads, width = q.shape
    n_keys, k = keys.shape[1], op.k
    out = torch.empty(batch, t, k, dtype=torch.int64, device=q.device)
    kf_t = keys.float().mT  # [B, c, S]
    cols = torch.arange(n_keys, device=q.device)
    def block(t0: int) -> None:
        t1 = min(t, t0 + QUERY_BLOCK)
        seen = min(n_keys, t1 // op.ratio)  # keys visible to query t1 - 1
        # -inf past the visible keys; a row needs pads only while it has fewer than k entries
        score = torch.full((batch, t1 - t0, max(seen, k)), float("-inf"), device=q.device)
        if seen:
            qb = q[:, t0:t1].float().reshape(batch, (t1 - t0) * heads, width)
            logits = torch.matmul(qb, kf_t[:, :, :seen])
            logits = logits.view(batch * (t1 - t0), heads, seen).relu_()
            weights = (w[:, t0:t1].float() * op.scale).reshape(batch * (t1 - t0), 1, heads)
            summed = torch.bmm(weights, logits).view(batch, t1 - t0, seen)  # Σ_h w_h·relu
            rows = torch.arange(t0, t1, device=q.device)
            visible = cols[:seen] < ((rows + 1) // op.ratio).unsqueeze(1)
            score[..., :seen] = summed.masked_fill(~visible, float("-inf"))
        values, picks = score.topk(k, dim=-1)
        out[:, t0:t1] = torch.where(torch.isinf(values) | (picks >= seen), -1, picks)

    parallel_blocks(range(0, t, QUERY_BLOCK), block)
    return out



# queries per GEMM of sparse_mqa's BLAS path (window part: 64 + 127 key rows); csa's picks of 64
# queries stay within DENSE_PICKS·k distinct rows at small's 4K (96 did not: 5x slower)
MQA_BLOCK = 64


@dataclass
class SparseMQALaunch(KernelLaunch):
    """`attn.sparse_mqa`: the kernel, or for a prefill the BLAS path (`sparse_mqa_blas`) when the
    executable's `blas` policy says so for its FLOPs (as a `matmul`'s). A decode step always runs
    the kernel (its generic schedule: rows gathered from memory, see the module docstring)."""

    blas: str = "auto"

    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Call:
        op = self.node.op
        if not op.decode:
            b, t, h, c = shape_of(self.node.operands[0], env)
            n = op.window
            if op.variant == "hca":
                n += shape_of(self.node.operands[5], env)[1]
            elif op.variant == "csa":
                n += shape_of(self.node.operands[6], env)[2]
            if uses_blas(self.blas, 4 * b * t * h * c * n):
                return self.counted("blas", lambda inputs: (sparse_mqa_blas(op, *inputs),))
        return super().bind(env, fns, reuse)


@TVM_EMITTERS.register("attn.sparse_mqa")
def emit_sparse_mqa(node: ir.Node, target: Any, options: dict) -> SparseMQALaunch:
    if not node.op.decode:
        single = emit_single(node, target, options)
        return SparseMQALaunch(
            node, single.kernels, single.operands, blas=options.get("blas", "auto")
        )
    body, index = body_of_one_op(node)
    variant = "" if len(index) == len(node.operands) else "operands" + ",".join(map(str, index))
    key = signature(node, variant)
    kernel = make_kernel(body, kernel_name(node), key, schedule_sparse_mqa_decode, loc=node.loc)
    return SparseMQALaunch(node, [kernel], index, blas=options.get("blas", "auto"))


HEADS_TILE = 8  # heads per register tile of a decode step's weighted sum of entries


def schedule_sparse_mqa_decode(func: Any) -> Any:
    """`schedule_cpu` after register tiles for a decode step's scores and weighted sum.

    Scores `dot_*` (q·entry, [B, 1, H, E]): loops (b·t·h·entries / 8 fused and parallel,
    c / 16, 8 entries unrolled, 16 lanes), the lanes summed right after each tile: 8
    independent dot products share each load of q (generic: one dependent FMA chain per
    (head, entry)). Weighted sum `rows_o_*` (Σ_j p[h, j]·entry[j, c], [B, 1, H, c]): loops
    (b·t·c / 16 fused and parallel, heads / 8, entries, 8 heads unrolled, 16 lanes of c), so
    each gathered entry row piece is loaded (and its row chosen) once for 8 heads (generic:
    once per head). The output's (b, t, h) loops are fused first, which keeps the generic
    schedule from computing the sum again under them. H not a multiple of 8 (nor at most 8),
    c not a multiple of 16, or a tile TVM refuses: the generic schedule."""
    from tvm import s_tir

    symbol = func.attrs["global_symbol"]
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
        (out,) = sch.get_output_blocks(root)
        for block in sch.get_child_blocks(root):
            if sch.get(block).name_hint.startswith("rows_o"):
                _heads_tile(sch, block, out)
            elif sch.get(block).name_hint.startswith("dot"):
                _entries_tile(sch, block)
    except Exception:  # noqa: BLE001  (a primitive TVM refuses: the generic schedule)
        sch = s_tir.Schedule(func)
    return schedule_cpu(sch.mod["main"].with_attr("global_symbol", symbol))


ENTRIES_TILE = 8  # entries per register tile of a decode step's q·entry dots


def _entries_tile(sch: Any, block: Any) -> None:
    b, t, h, j, kc = sch.get_loops(block)
    entries, width = static(sch.get(j).extent), static(sch.get(kc).extent)
    if entries is None or width is None or width % VECTOR:
        return
    kc0, kc1 = sch.split(kc, [None, VECTOR])
    rf = sch.rfactor(kc1, 4)  # [b, t, h, entry, lane] partial sums
    b, t, h, j, kc0, kc1 = sch.get_loops(rf)
    j0, j1 = sch.split(j, [None, _tile_of(entries, ENTRIES_TILE)])
    sch.reorder(j0, kc0, j1, kc1)
    outer = sch.fuse(b, t, h, j0)
    sch.parallel(outer)  # before the lanes' sum moves in (TVM refuses it after)
    sch.unroll(j1)
    sch.vectorize(kc1)
    sch.reverse_compute_at(block, outer)  # the tile's lanes summed right after it
    sch.decompose_reduction(rf, kc0)


def _heads_tile(sch: Any, block: Any, out: Any) -> None:
    b, t, h, c, j = sch.get_loops(block)
    heads, width = static(sch.get(h).extent), static(sch.get(c).extent)
    if heads is None or width is None or width % VECTOR:
        return
    tile = heads if heads <= HEADS_TILE else HEADS_TILE
    if heads % tile:
        return
    c0, c1 = sch.split(c, [None, VECTOR])
    h0, h1 = sch.split(h, [None, tile])
    sch.reorder(c0, h0, j, h1, c1)
    sch.parallel(sch.fuse(b, t, c0))
    sch.unroll(h1)
    sch.vectorize(c1)
    sch.decompose_reduction(block, j)
    ob, ot, oh, _ = sch.get_loops(out)
    sch.fuse(ob, ot, oh)


def sparse_mqa_blas(op: Any, q: Any, kv: Any, sink: Any, cos: Any, sin: Any, *rest: Any) -> Any:
    """A prefill's `attn.sparse_mqa` through torch, per block of `MQA_BLOCK` queries: the heads
    are the GEMM's rows, so each entry row is read once for all of them. The window part is one
    GEMM over the block's window rows (block + window - 1 consecutive rows, masked to each
    query's own window); hca's compressed part one GEMM over the entries visible to the block's
    last query (masked per query). csa (`_picked`): while the block's distinct picked rows are
    few, a GEMM over them and each pick's score taken from it (its p scattered back for p·e);
    else the picked rows gathered per query and multiplied as a batch of [H, c] x [c, k].
    Softmax with the sink column as the reference; p in q's dtype before p·e; fp32 math."""
    import torch

    batch, t, heads, width = q.shape
    dtype = q.dtype
    comp = rest[0] if op.variant != "window" else None
    picks = rest[1] if op.variant == "csa" else None
    win, ninf = op.window, float("-inf")
    kvf = kv.float()
    compf = comp.float() if comp is not None else None
    sink_col = sink.float().view(1, 1, heads, 1)
    out = torch.empty(batch, t, heads, width, dtype=dtype, device=q.device)
    def block(t0: int) -> None:  # q's norm and RoPE too, on the cache-resident block
        t1 = min(t, t0 + MQA_BLOCK)
        n_q = t1 - t0
        qb = q[:, t0:t1].float()  # [B, n_q, H, c]
        if op.q_norm_eps is not None:
            qb = qb * torch.rsqrt(qb.square().mean(-1, keepdim=True) + op.q_norm_eps)
            qb = qb.to(dtype).float()
        elif q.dtype == torch.float32:
            qb = qb.clone()  # `float()` kept q's memory: rotated in place below
        qb = _rotate(qb, cos[t0:t1], sin[t0:t1], False).to(dtype).float()
        rows_q = qb.reshape(batch, n_q * heads, width)
        rows = torch.arange(t0, t1, device=q.device).view(n_q, 1)
        r0 = max(0, t0 - win + 1)
        kw = kvf[:, r0:t1]  # [B, R, c]
        zw = torch.matmul(rows_q, kw.mT).view(batch, n_q, heads, t1 - r0) * op.scale
        r = torch.arange(r0, t1, device=q.device).view(1, -1)
        zw = zw.masked_fill(~((r <= rows) & (r > rows - win)).view(1, n_q, 1, -1), ninf)
        parts = [zw]
        pv = None
        if op.variant == "hca":
            seen = min(compf.shape[1], t1 // op.ratio)
            kc = compf[:, :seen]
            zc = torch.matmul(rows_q, kc.mT).view(batch, n_q, heads, seen) * op.scale
            s = torch.arange(seen, device=q.device).view(1, -1)
            parts.append(zc.masked_fill(~(s < (rows + 1) // op.ratio).view(1, n_q, 1, -1), ninf))
            pv = lambda pc: torch.matmul(pc.reshape(batch, n_q * heads, -1), kc)  # noqa: E731
        elif op.variant == "csa":
            zc, pv = _picked(op, qb, rows_q, compf, picks[:, t0:t1])
            parts.append(zc)
        parts.append(sink_col.expand(batch, n_q, heads, 1))
        p = torch.softmax(torch.cat(parts, dim=-1), dim=-1).to(dtype).float()
        o = torch.matmul(p[..., : t1 - r0].reshape(batch, n_q * heads, -1), kw)
        if pv is not None:
            o += pv(p[..., t1 - r0 : -1]).reshape(o.shape)
        o = o.view(batch, n_q, heads, width).to(dtype).float()
        out[:, t0:t1] = _rotate(o, cos[t0:t1], sin[t0:t1], True)

    parallel_blocks(range(0, t, MQA_BLOCK), block)
    return out


DENSE_PICKS = 3  # csa: one GEMM over the block's distinct picked rows while <= 3·k of them


def _picked(op: Any, qb: Any, rows_q: Any, compf: Any, pick: Any) -> tuple[Any, Any]:
    """csa's compressed part for one query block: (scores [B, n_q, H, k] with -inf for -1
    picks, p [B, n_q, H, k] -> Σ p·row). Neighbouring queries pick many of the same rows: while
    the block's distinct picked rows (over the batch) are few, one GEMM of its queries' heads
    against them (while the picks lie in the first 3·k rows, those rows as they are, no gather),
    each pick's score taken from it and its p scattered back (repeated picks add) for one p·e
    GEMM; else every query's rows gathered and multiplied as [H, c] x [c, k]."""
    import torch

    batch, n_q, heads, width = qb.shape
    n_comp, k = compf.shape[1], pick.shape[-1]
    if n_comp == 0:  # nothing to pick: every pick is -1
        return torch.full((batch, n_q, heads, k), float("-inf"), device=qb.device), None
    invalid = (pick < 0).unsqueeze(2)
    flat = pick.clamp(min=0) + (torch.arange(batch, device=qb.device) * n_comp).view(batch, 1, 1)
    table = compf.reshape(-1, width)
    seen = max(int(pick.max()) + 1, 1)  # the first `seen` compressed rows hold every pick
    if batch == 1 and seen <= DENSE_PICKS * k:
        kc, at = table[:seen], flat  # no gather: consecutive rows
    else:
        rows, at = torch.unique(flat, return_inverse=True)
        kc = torch.index_select(table, 0, rows) if rows.numel() <= DENSE_PICKS * k else None
    if kc is not None:
        at_h = at.unsqueeze(2).expand(batch, n_q, heads, k)
        dense = torch.matmul(rows_q, kc.T).view(batch, n_q, heads, -1)
        zc = dense.gather(-1, at_h) * op.scale

        def pv(pc: Any) -> Any:
            scattered = torch.zeros_like(dense).scatter_add_(-1, at_h, pc)
            return torch.matmul(scattered.view(batch, n_q * heads, -1), kc)

        return zc.masked_fill(invalid, float("-inf")), pv
    kc = torch.index_select(table, 0, flat.flatten()).view(batch, n_q, k, width)
    zc = torch.matmul(qb, kc.mT) * op.scale  # [B, n_q, H, k]
    return zc.masked_fill(invalid, float("-inf")), lambda pc: torch.matmul(pc, kc)


def _rotate(x: Any, cos: Any, sin: Any, inverse: bool) -> Any:
    """x [B, T, H, c] fp32 with its last 2·half channels' interleaved pairs rotated in place by
    the angles of cos/sin [T, half] (negated when `inverse`), as `rope_reference` computes."""
    half = cos.shape[-1]
    pairs = x[..., x.shape[-1] - 2 * half :].unflatten(-1, (half, 2))
    a, b = pairs[..., 0].clone(), pairs[..., 1].clone()
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)
    if inverse:
        s = -s
    pairs[..., 0] = a * c - b * s
    pairs[..., 1] = a * s + b * c
    return x
