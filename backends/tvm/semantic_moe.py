"""te lowerings of the MoE ops (ir/ops/moe.py), `moe.route` and `moe.experts`, one kernel per
node, and the experts' BLAS path. Shared helpers (fp32 casts, top-k) are in `semantic.py`.

`moe.experts` runs on the CPU as the grouped kernel of `moe_grouped.py` (pairs sorted by expert
in the kernel, each touched expert's weights read once per call); its te lowering here, the
gather form (each (token, slot) pair reads its expert's weights by index), is what GPU targets
schedule (`Kernel.gpu_ir`): the grouped kernel is the CPU "schedule" of the same node. Both read
quantised weights (`weight_format`) through `backends.tvm.dequant`.

`moe.experts` also has a BLAS path, chosen per call like a large `matmul` (the executable's `blas`
policy; the report counts it) when the experts get `BLAS_MIN_ROWS` rows each on average (a
prefill): pairs sorted by expert, then each GEMM as one `torch._grouped_mm` over all experts
(per-expert row offsets computed by torch, no host loop), as the eager model's grouped GEMM does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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
from backends.tvm.kernel import Kernel, make_kernel
from backends.tvm.lower import Lowering, Unsupported, convert, lowers, static, tvm_dtype
from backends.tvm.moe_grouped import experts_func, experts_spec, gated
from backends.tvm.schedule_cpu import VECTOR, schedule_cpu
from backends.tvm.semantic import F32, f32, i32, topk


@lowers("moe.route")
def lower_route(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    from tvm import te, tirx

    op = node.op
    x, gate, *rest = args
    logit_bias = rest.pop() if op.logit_bias else None
    logits = _logits(lw, x, gate)
    if logit_bias is not None:  # the router's own bias moves the scores (GPT-OSS)
        lg = logits
        logits = te.compute(
            lg.shape, lambda n, e: lg(n, e) + f32(logit_bias(e)), name=lw.tag("biased_logits")
        )
    n_exp = gate.shape[0]
    if op.score == "softmax":
        ke = te.reduce_axis((0, n_exp), name="ke")
        mx = te.compute((x.shape[0],), lambda n: te.max(logits(n, ke), axis=ke), name="mx")
        ke2 = te.reduce_axis((0, n_exp), name="ke2")
        den = te.compute(
            (x.shape[0],), lambda n: te.sum(te.exp(logits(n, ke2) - mx(n)), axis=ke2), name="den"
        )
        s = te.compute(logits.shape, lambda n, e: te.exp(logits(n, e) - mx(n)) / den(n), name="s")
    elif op.score == "sigmoid":
        s = te.compute(logits.shape, lambda n, e: te.sigmoid(logits(n, e)), name="s")
    else:
        lg = logits
        soft = lambda n, e: tirx.Select(lg(n, e) > 20.0, lg(n, e), tirx.log1p(te.exp(lg(n, e))))
        s = te.compute(logits.shape, lambda n, e: te.sqrt(soft(n, e)), name="s")
    if op.hash:
        table, ids = rest
        experts = te.compute(
            (x.shape[0], op.k), lambda n, j: table(ids(n), j), name=lw.tag("experts")
        )
    else:
        chooser = s
        if op.bias:
            (bias,) = rest
            chooser = te.compute(s.shape, lambda n, e: s(n, e) + f32(bias(e)), name="chooser")
        if op.n_group > 1:
            chooser = _grouped(lw, op, chooser)
        _, experts = topk(lw, chooser, op.k)
    picked = te.compute(experts.shape, lambda n, j: s(n, i32(experts(n, j))), name="picked")
    kj = te.reduce_axis((0, op.k), name="kj")
    total = te.compute((x.shape[0],), lambda n: te.sum(picked(n, kj), axis=kj), name="total")
    scale, eps = tirx.const(op.route_scale, F32), tirx.const(op.eps, F32)
    weights = te.compute(
        experts.shape,
        lambda n, j: (picked(n, j) / (total(n) + eps) if op.renorm else picked(n, j)) * scale,
        name=lw.tag("weights"),
    )
    return [weights, experts]


def _logits(lw: Lowering, x: Any, gate: Any) -> Any:
    """x·gateᵀ [N, E], fp32. On the CPU, over a static width that is a multiple of `VECTOR`
    (at least two), as `VECTOR` lane sums (`logit_lanes`: lane l adds the columns l, l + 16,
    ...) then their sum, which `schedule_route` tiles: the sums rfactor would give, written
    out (TVM's rfactor fails on some route kernels). GPU schedules get one dot per entry."""
    from tvm import te

    n_tok, n_exp, width = x.shape[0], gate.shape[0], static(x.shape[1])
    if lw.gpu or width is None or width % VECTOR or width < 2 * VECTOR:
        kd = te.reduce_axis((0, x.shape[1]), name="kd")
        return te.compute(
            (n_tok, n_exp),
            lambda n, e: te.sum(f32(x(n, kd)) * f32(gate(e, kd)), axis=kd),
            name=lw.tag("logits"),
        )
    kd = te.reduce_axis((0, width // VECTOR), name="kd")
    at = lambda t, r, kk, lane: f32(t(r, kk * VECTOR + lane))  # noqa: E731
    lanes = te.compute(
        (n_tok, n_exp, VECTOR),
        lambda n, e, lane: te.sum(at(x, n, kd, lane) * at(gate, e, kd, lane), axis=kd),
        name=LANES,
    )
    return te.compute(  # the lanes added in order, spatially: `schedule_route` vectorises it
        (n_tok, n_exp),
        lambda n, e: sum((lanes(n, e, lane) for lane in range(1, VECTOR)), lanes(n, e, 0)),
        name=LOGITS,
    )


def _grouped(lw: Lowering, op: Any, chooser: Any) -> Any:
    """Grouped top-k (DeepSeek-V3): the chooser with `group_fill` outside the `topk_group` groups
    whose two best entries sum highest (ir/ops/moe.py `Route`)."""
    from tvm import te, tirx

    n, e = chooser.shape
    size = e // op.n_group
    groups = te.compute(
        (n, op.n_group, size), lambda t, g, i: chooser(t, g * size + i), name="groups"
    )
    best2, _ = topk(lw, groups, 2)
    kb = te.reduce_axis((0, 2), name="kb")
    score = te.compute(
        (n, op.n_group), lambda t, g: te.sum(best2(t, g, kb), axis=kb), name="group_score"
    )
    _, keep = topk(lw, score, op.topk_group)
    kg = te.reduce_axis((0, op.topk_group), name="kg")
    one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")
    kept = te.compute(
        (n, e),
        lambda t, i: te.sum(tirx.Select(i32(keep(t, kg)) == i // size, one, zero), axis=kg),
        name="kept",
    )
    fill = tirx.const(op.group_fill, F32)
    return te.compute(
        (n, e), lambda t, i: tirx.Select(kept(t, i) > 0, chooser(t, i), fill), name="grouped"
    )


@lowers("moe.experts")
def lower_experts(lw: Lowering, node: ir.Node, args: list[Any]) -> list[Any]:
    """The gather form (the GPU's; the CPU runs `moe_grouped`): every (token, slot) pair reads
    its expert's weights by index."""
    from tvm import te

    op = node.op
    x, weights, experts, w1, w3, w2, *rest = args
    scales, rest = (rest[-3:], rest[:-3]) if op.quantised else ([None] * 3, rest)
    shared = rest[:3] if op.shared else []
    b1, b3, b2 = rest[-3:] if op.expert_bias else (None, None, None)
    out = tvm_dtype(node.result.dtype)
    n_tok, k, inter, width = x.shape[0], weights.shape[1], w1.shape[1], x.shape[1]
    r1, r3, r2 = _readers(op, (w1, w3, w2), scales, (width, width, inter), out)
    kd = te.reduce_axis((0, width), name="kd")
    kd3 = te.reduce_axis((0, width), name="kd3")
    eid = lambda n, j: i32(experts(n, j))
    up1 = te.compute(
        (n_tok, k, inter),
        lambda n, j, i: te.sum(f32(x(n, kd)) * r1(eid(n, j), i, kd), axis=kd),
        name=lw.tag("gate_proj"),
    )
    up3 = te.compute(
        (n_tok, k, inter),
        lambda n, j, i: te.sum(f32(x(n, kd3)) * r3(eid(n, j), i, kd3), axis=kd3),
        name=lw.tag("up_proj"),
    )

    def biased(v: Any, b: Any, n: Any, j: Any, i: Any) -> Any:
        v = convert(convert(v, out), F32)  # the GEMM's result in x's dtype
        return v if b is None else v + f32(b(eid(n, j), i))

    h = te.compute(
        up1.shape,
        lambda n, j, i: convert(
            gated(op, biased(up1(n, j, i), b1, n, j, i), biased(up3(n, j, i), b3, n, j, i))
            * f32(weights(n, j)),
            out,
        ),
        name=lw.tag("keep_h"),  # once per hidden unit, not once per output channel
    )
    ki = te.reduce_axis((0, inter), name="ki")
    down = te.compute(  # one reduction axis per stage: the dot over ki is vectorised (rfactor)
        (n_tok, k, width),
        lambda n, j, c: te.sum(f32(h(n, j, ki)) * r2(eid(n, j), c, ki), axis=ki),
        name=lw.tag("down_proj"),
    )
    kj = te.reduce_axis((0, k), name="kj")
    if op.expert_bias or out != F32:  # each slot's GEMM result in x's dtype, + weight · b2[e]
        dn = down

        def slot(n: Any, j: Any, c: Any) -> Any:
            v = convert(convert(dn(n, j, c), out), F32)
            return v if b2 is None else v + f32(weights(n, j)) * f32(b2(eid(n, j), c))

        down = te.compute(dn.shape, slot, name=lw.tag("down_slot"))
    y = te.compute(
        (n_tok, width), lambda n, c: te.sum(down(n, kj, c), axis=kj), name=lw.tag("routed")
    )
    if not op.shared:
        return [te.compute(y.shape, lambda n, c: convert(y(n, c), out), name=lw.tag("y"))]
    ys = _shared_expert(op, x, shared, out)
    return [
        te.compute(
            y.shape,
            lambda n, c: convert(convert(y(n, c), out) + convert(ys(n, c), out), out),
            name=lw.tag("y"),
        )
    ]


def _readers(op: Any, ws: tuple, scales: list, cols: tuple, out: str) -> list[Any]:
    """w1, w3, w2 as fp32 readers (e, i, k) of te tensors: as stored, or decoded from the op's
    `weight_format` (`backends.tvm.dequant`, rounded to x's dtype as the op says)."""
    if not op.quantised:
        return [lambda e, i, k, w=w: f32(w(e, i, k)) for w in ws]
    from backends.tvm.dequant import expert_weight

    reads = [expert_weight(w, s, op.weight_format, c, out) for w, s, c in zip(ws, scales, cols)]
    return [lambda e, i, k, read=read: f32(read(e, i, k)) for read in reads]


def _shared_expert(op: Any, x: Any, shared: list[Any], out: str) -> Any:
    """[N, d] fp32: the shared expert's FFN of every token (same activation, no biases), its
    hidden rows rounded to `out` before s2."""
    from tvm import te

    s1, s3, s2 = shared
    n_tok, width = x.shape
    ks, ks3 = (te.reduce_axis((0, width), name=nm) for nm in ("ks", "ks3"))
    g1 = te.compute(
        (n_tok, s1.shape[0]),
        lambda n, i: te.sum(f32(x(n, ks)) * f32(s1(i, ks)), axis=ks),
        name="sg",
    )
    g3 = te.compute(
        g1.shape, lambda n, i: te.sum(f32(x(n, ks3)) * f32(s3(i, ks3)), axis=ks3), name="su"
    )
    rounded = lambda v: convert(convert(v, out), F32)  # noqa: E731  (a GEMM in x's dtype)
    hs = te.compute(
        g1.shape,
        lambda n, i: convert(gated(op, rounded(g1(n, i)), rounded(g3(n, i))), out),
        name="hs",
    )
    kss = te.reduce_axis((0, s1.shape[0]), name="kss")
    return te.compute(
        (n_tok, width),
        lambda n, c: te.sum(f32(hs(n, kss)) * f32(s2(c, kss)), axis=kss),
        name="ys",
    )


ROUTE_EXPERTS = 8  # experts per register tile of the routing logits
LANES = "logit_lanes"
LOGITS = "keep_logits"  # kept (not inlined into the scores): 16 adds per entry


def schedule_route(func: Any) -> Any:
    """`schedule_cpu` after a register tile for the logits' lane sums (`_logits`): loops
    (token, expert / 8, d / 16, 8 experts unrolled, 16 lanes), so one vector of x feeds 8
    independent vector accumulators, then per 8 experts their 16 lane sums added as 8-wide
    vectors. The generic recipe left each (token, expert) one scalar chain of d dependent FMAs
    (small at T=4096: 128 ms per call in the model, 1.1 GFLOP/s). The other stages (scores,
    top-k over E) keep the generic schedule; so does the whole kernel where TVM refuses the tile
    (e.g. 8 experts, one tile: a loop of extent 1)."""
    from tvm import s_tir

    symbol = func.attrs["global_symbol"]
    sch = s_tir.Schedule(func)
    block = _try_get(sch, LANES)
    if block is not None:
        try:
            _tile_lanes(sch, block)
        except Exception:  # noqa: BLE001  (a primitive TVM refuses: the generic schedule)
            sch = s_tir.Schedule(func)
    return schedule_cpu(sch.mod["main"].with_attr("global_symbol", symbol))


def _tile_lanes(sch: Any, block: Any) -> None:
    total = sch.get_consumers(block)[0]
    sch.compute_at(block, sch.get_loops(total)[0])  # per token: its lanes stay in L1
    n, e, lane, k = sch.get_loops(block)
    if static(sch.get(e).extent) % ROUTE_EXPERTS:
        return
    e0, e1 = sch.split(e, [None, ROUTE_EXPERTS])
    sch.reorder(e0, k, e1, lane)
    sch.unroll(e1)
    sch.vectorize(lane)


def _try_get(sch: Any, name: str) -> Any:
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001  (no such block: the logits were one dot per entry)
        return None


@TVM_EMITTERS.register("moe.route")
def emit_route(node: ir.Node, target: Any, options: dict) -> KernelLaunch:
    """`emit_single` with the route's own schedule (`schedule_route`)."""
    body, index = body_of_one_op(node)
    variant = "" if len(index) == len(node.operands) else "operands" + ",".join(map(str, index))
    kernel = make_kernel(
        body, kernel_name(node), signature(node, variant), schedule_route, loc=node.loc
    )
    return KernelLaunch(node, [kernel], index)


BLAS_MIN_ROWS = 4


@dataclass
class ExpertsLaunch(KernelLaunch):
    """`moe.experts`: the kernel, or grouped GEMMs through BLAS when the policy says so and
    ("auto") the experts get `BLAS_MIN_ROWS` (token, slot) rows each on average: with fewer
    (a decode step), every per-expert GEMM is a GEMV, which the grouped kernel does with each
    touched expert's weights read once and no torch call."""

    blas: str = "auto"

    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Call:
        experts, w1 = (shape_of(self.node.operands[i], env) for i in (2, 3))
        pairs = experts[0] * experts[1]
        few = self.blas == "auto" and pairs < BLAS_MIN_ROWS * w1[0]
        if not few and uses_blas(self.blas, 6 * pairs * w1[1] * shape_of(self.node.result, env)[1]):
            op = self.node.op
            return self.counted("blas", lambda inputs: (grouped_experts(op, *inputs),))
        return super().bind(env, fns, reuse)


@TVM_EMITTERS.register("moe.experts")
def emit_experts(node: ir.Node, target: Any, options: dict) -> ExpertsLaunch:
    """The grouped kernel (`moe_grouped`, every operand passed as is), or the gather kernel
    when a size other than N is symbolic."""
    blas = options.get("blas", "auto")
    try:
        spec = experts_spec(node)
    except Unsupported:
        single = emit_single(node, target, options)
        return ExpertsLaunch(node, single.kernels, single.operands, blas=blas)
    body, _ = body_of_one_op(node)
    schedule = lambda f: experts_func(spec, str(f.attrs["global_symbol"]))  # noqa: E731
    kernel = make_kernel(
        body, kernel_name(node), signature(node, "grouped"), schedule, loc=node.loc
    )
    if kernel.func is not None:  # not loaded from a built library
        kernel = GroupedKernel(**{f.name: getattr(kernel, f.name) for f in fields(Kernel)})
    return ExpertsLaunch(node, [kernel], tuple(range(len(node.operands))), blas=blas)


@dataclass
class GroupedKernel(Kernel):
    """The grouped experts kernel: `func` is hand-written TensorIR, its own unscheduled form
    (`tensor_ir`: CPU tuning has nothing to reschedule); GPU targets schedule the gather form
    the te lowering gives (`gpu_ir`), which `make_kernel` lowered before the CPU "schedule"
    replaced it."""

    def __post_init__(self) -> None:
        self.gather_ir, self.tensor_ir = self.tensor_ir, self.func

    def gpu_ir(self) -> Any:
        return self.gather_ir


def grouped_experts(
    op: Any, x: Any, weights: Any, experts: Any, w1: Any, w3: Any, w2: Any, *rest: Any
) -> Any:
    """`moe.experts` (ir/ops/moe.py) as grouped GEMMs over the (token, slot) pairs sorted by
    expert: one `torch._grouped_mm` per projection (`_grouped_mm` below), quantised weights
    dequantised first. Same numerics as the op: GEMMs in x's dtype, biases, activation and
    routing weight in fp32, hidden rows cast to x's dtype before w2, fp32 sum; pairs naming no
    expert contribute nothing.
    """
    import torch

    from ir.ops.moe import gated_inplace

    def act(gate: Any, up: Any) -> Any:  # gate, up: fresh fp32 GEMM results, overwritten
        return gated_inplace(gate, up, op.activation, op.clamp, op.alpha)

    if op.quantised:
        w1, w3, w2 = op.dense_weights(x, w1, w3, w2, *rest[-3:])
        rest = rest[:-3]
    n_exp, k = w1.shape[0], experts.shape[1]
    flat = experts.reshape(-1)
    pairs = torch.nonzero((flat >= 0) & (flat < n_exp)).squeeze(1)
    order = pairs[torch.argsort(flat[pairs], stable=True)]
    ids, token = flat[order], order // k
    offs = torch.bincount(ids, minlength=n_exp).cumsum(0).to(torch.int32)
    scale = weights.reshape(-1)[order].float().unsqueeze(-1)
    rows = torch.index_select(x, 0, token)  # x[token]'s rows (advanced indexing: 2-3x slower)
    gate, up = (_fresh_f32(_grouped_mm(rows, w, offs)) for w in (w1, w3))
    if op.expert_bias:
        gate, up = gate + rest[-3][ids].float(), up + rest[-2][ids].float()
    down = _grouped_mm(act(gate, up).mul_(scale).to(x.dtype), w2, offs).float()
    if op.expert_bias:
        down = down + scale * rest[-1][ids].float()
    y = torch.zeros(x.shape, dtype=torch.float32).index_add_(0, token, down).to(x.dtype)
    if not op.shared:
        return y
    s1, s3, s2 = rest[:3]
    h = act(_fresh_f32(x @ s1.T), _fresh_f32(x @ s3.T))
    return y + h.to(x.dtype) @ s2.T


def _fresh_f32(t: Any) -> Any:
    """A GEMM's result as fp32, a tensor of its own either way (`act` writes into it)."""
    import torch

    return t if t.dtype == torch.float32 else t.float()


def _grouped_mm(rows: Any, w: Any, offs: Any) -> Any:
    """rows [R, K] grouped by expert (group g: rows offs[g-1]:offs[g]) times w[g]ᵀ, w [G, M, K]
    -> [R, M] in rows' dtype: one `torch._grouped_mm` call (each group's product as torch.matmul
    gives it), or, when its strides are not multiples of 16 bytes as it requires, one matmul
    per group."""
    import torch

    wt = w.transpose(1, 2)
    if _aligned(rows) and _aligned(wt):
        return torch._grouped_mm(rows, wt, offs=offs)
    out = rows.new_empty(rows.shape[0], w.shape[1])
    lo = 0
    for g, hi in enumerate(offs.tolist()):
        out[lo:hi] = rows[lo:hi] @ w[g].T
        lo = hi
    return out


def _aligned(t: Any) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        (s * size) % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n != 1
    )
