"""`shard`: rewrite a global-view graph into the program every rank of a mesh runs (SPMD).

    g_rank = shard(g, {"tp": 2, "ep": 2})             # default rules for the mesh
    g_rank = shard(g, {"tp": 2}, rules=..., moe="dispatch")

Contract. Input: a verified graph after the semantic fusions (attention, MoE and mHC ops formed;
the rules key on them and on parameter names). Output: a verified graph over *local* shapes that
every rank runs with its own parameter slices (`placement_of(name, rules)`: block `coord[axis]`
of the sharded dim), whose outputs equal the input graph's outputs (replicated on every rank).
Rank-dependent data (the first local expert) comes from `dist.axis_index`, never from different
programs, so collectives run in the same order on every rank.

Steps, fused into one walk over the ops in order (each op sees its operands' placements):
1. annotate: parameters get placements from the rule list (passes/shard_rules.py); activations
   and caches are replicated;
2. propagate: an op's sharding rule (table `RULES`, by mnemonic or kind) picks the placements it
   wants for its operands and what its results get — shapes come from `infer_type` on the local
   operand types, and shape attributes (reshape) are rewritten to the local view;
3. insert: an operand whose placement differs from the wanted one is redistributed by a
   collective (P->R all_reduce, S->R all_gather); graph outputs are made replicated;
4. the default rule for ops no rule knows gathers every operand: always correct, maybe slow —
   the counters (`shard.*`) say how often it fired and for which op.

MoE over an expert axis: `moe="all_reduce"` (every rank runs its local experts on all tokens and
a local slice of the shared expert; the sum is one all_reduce — the reference code's layout) or
`moe="dispatch"` (static-capacity `moe.dispatch` -> local experts -> `moe.combine`; the shared
expert runs whole on each rank; no host sync) or `moe="dispatch_ragged"` (the same ops with
`layout="ragged"`: counts exchanged, only valid rows sent, one host sync per exchange).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ir.core import OPS, Graph, Kind, Loc, Node, Op, Value
from ir.types import DType
from passes.shard_rules import (
    PARTIAL,
    Partial,
    Placement,
    Rule,
    Shard,
    placement_of,
    rules_for_mesh,
)

__all__ = ["shard", "ShardError", "MOE_MODES"]

MOE_MODES = ("all_reduce", "dispatch", "dispatch_ragged")
Pl = dict[str, Placement]  # mesh axis -> placement; a missing axis is replicated


class ShardError(ValueError):
    """The graph cannot be sharded as asked (a dim does not divide, an unknown axis, ...)."""


@dataclass
class _State:
    sizes: dict[str, int]
    moe: str
    batch_axis: str | None = None
    free: set[str] = field(default_factory=set)  # values computed without activations
    nodes: list[Node] = field(default_factory=list)
    local: dict[str, Value] = field(default_factory=dict)  # global name -> local value
    place: dict[str, Pl] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    taken: set[str] = field(default_factory=set)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def emit(
        self, op: Op, operands: list[Value], loc: Loc | None, names: list[str], own: bool = False
    ) -> list[Value]:
        """Append `op`; results keep `names` when `own` (the global node's names), else get
        fresh names derived from them."""
        types = op.infer_type(*(v.type for v in operands))
        names = names if own else [self.fresh(n) for n in names]
        results = [Value(n, t) for n, t in zip(names, types)]
        self.nodes.append(Node(op, tuple(operands), tuple(results), loc))
        return results

    def bind(self, globals_: tuple[Value, ...], locals_: list[Value], pls: list[Pl]) -> None:
        for g, v, p in zip(globals_, locals_, pls):
            self.local[g.name], self.place[g.name] = v, p

    def fetch(self, v: Value, want: Pl, loc: Loc | None = None) -> Value:
        """The local value of `v` redistributed to placement `want`."""
        have, cur = self.place[v.name], self.local[v.name]
        for axis in sorted(set(have) | set(want)):
            src, dst = have.get(axis), want.get(axis)
            if src == dst:
                continue
            if dst is not None:
                raise ShardError(f"shard: cannot move %{v.name} from {src} to {dst} on {axis!r}")
            cur = self._to_replicated(cur, src, axis, loc)
        return cur

    def _to_replicated(self, v: Value, src: Placement, axis: str, loc: Loc | None) -> Value:
        size = self.sizes[axis]
        if isinstance(src, Partial):
            op: Op = OPS["dist.all_reduce"](group=axis, size=size)
        else:
            op = OPS["dist.all_gather"](group=axis, size=size, dim=src.dim)
        self.counters[f"{op.mnemonic}.{axis}"] += 1
        return self.emit(op, [v], loc, [f"{v.name}.{axis}"])[0]


def shard(
    graph: Graph,
    sizes: dict[str, int],
    *,
    rules: list[Rule] | None = None,
    moe: str = "all_reduce",
    batch_axis: str | None = None,
    counters: Counter | None = None,
) -> Graph:
    """The per-rank program of `graph` on a mesh of `sizes` (see module docstring).

    `batch_axis` (data-parallel attention): activations and caches are split along their batch
    dim over that axis; ops whose other operands are activation-free keep the split."""
    if moe not in MOE_MODES:
        raise ShardError(f"shard: moe={moe!r}; expected one of {MOE_MODES}")
    sizes = {a: s for a, s in sizes.items() if s > 1}
    if batch_axis is not None and batch_axis not in sizes:
        batch_axis = None  # an axis of size 1 splits nothing
    rules = rules_for_mesh(sizes, moe=moe) if rules is None else rules
    for r in rules:
        if r.axis not in sizes:
            raise ShardError(f"shard: rule {r.pattern!r} uses axis {r.axis!r}, not in {sizes}")
    st = _State(sizes, moe, batch_axis)
    st.taken = {v.name for v in graph.inputs} | {r.name for n in graph.ops for r in n.results}
    inputs = [_annotate(st, v, graph.role(v), rules) for v in graph.inputs]
    for node in graph.ops:
        pls = [st.place[v.name] for v in node.operands]
        _rule_for(node)(st, node, pls)
        if all(v.name in st.free for v in node.operands):
            st.free.update(r.name for r in node.results)
    outputs = [st.fetch(v, {}) for v in graph.outputs]
    if counters is not None:
        counters.update({f"shard.{k}": n for k, n in st.counters.items()})
    return Graph(inputs, st.nodes, outputs, name=graph.name, roles=dict(graph.roles))


def _annotate(st: _State, v: Value, role: str, rules: list[Rule]) -> Value:
    pl = placement_of(v.name, rules) if role == "parameter" else {}
    if role == "parameter" or v.type.rank == 0:
        st.free.add(v.name)  # weights and scalars (a decode position) carry no batch
    elif st.batch_axis is not None:
        pl = {st.batch_axis: Shard(0)}
    shape = list(v.type.shape)
    for axis, p in pl.items():
        if not isinstance(p, Shard):
            raise ShardError(f"shard: parameter %{v.name} may only be Shard or Replicate")
        d, size = p.dim % len(shape), st.sizes[axis]
        if not isinstance(shape[d], int) or shape[d] % size:
            raise ShardError(
                f"shard: {role} %{v.name} dim {d} ({shape[d]}) does not divide by "
                f"{axis}={size}; pick a mesh size that divides it or replicate it"
            )
        shape[d] //= size
        pl[axis] = Shard(d)
    local = Value(v.name, v.type.with_shape(tuple(shape)))
    st.local[v.name], st.place[v.name] = local, pl
    return local


# --- rules ------------------------------------------------------------------------------------

RuleFn = Callable[[_State, Node, list[Pl]], None]


def _replicated(st: _State, node: Node, pls: list[Pl]) -> None:
    """Default: keep a batch split when `_batch_ok`, else gather every operand, run the op
    whole, results replicated."""
    if _batch_ok(st, node, pls):
        out = {st.batch_axis: Shard(0)}
        _apply(st, node, pls, [dict(out) for _ in node.results], node.op)
        return
    if any(pls):
        st.counters[f"gathered_for.{node.name}"] += 1
    _apply(st, node, [{} for _ in pls], [{} for _ in node.results], node.op)


def _apply(st: _State, node: Node, want: list[Pl], out: list[Pl], op: Op) -> list[Value]:
    ins = [st.fetch(v, w, node.loc) for v, w in zip(node.operands, want)]
    res = st.emit(op, ins, node.loc, [r.name for r in node.results], own=True)
    st.bind(node.results, res, out)
    return res


def _batch_ok(st: _State, node: Node, pls: list[Pl]) -> bool:
    """Data-parallel: every operand is batch-split (only that) or activation-free, the op does
    not address dim 0, and every result keeps the batch size as its dim 0."""
    axis = st.batch_axis
    if axis is None or not any(p == {axis: Shard(0)} for p in pls):
        return False
    batch = None
    for v, p in zip(node.operands, pls):
        if p == {axis: Shard(0)}:
            batch = v.type.shape[0] if batch is None else batch
            if v.type.shape[0] != batch:
                return False
        elif p or v.name not in st.free:
            return False
    if any(_addresses_dim0(node.op, v.type.rank) for v in node.operands[:1]):
        return False
    return all(r.type.rank and r.type.shape[0] == batch for r in node.results)


def _addresses_dim0(op: Op, rank: int) -> bool:
    attrs = op.attrs
    dims = list(attrs.get("dims", ()) or ()) + ([attrs["dim"]] if "dim" in attrs else [])
    return any(isinstance(d, int) and d % max(rank, 1) == 0 for d in dims)


_LINEAR_ALL = {"add", "sub"}  # P op P = P
_LINEAR_ONE = {"mul", "div", "neg", "cast"}  # P in operand 0 (mul: either), R elsewhere


def _elementwise(st: _State, node: Node, pls: list[Pl]) -> None:
    """Broadcasting elementwise: a shard survives when every operand agrees on it (operands
    without that dim, or with size 1 there, broadcast); partial sums survive linear ops."""
    rank = node.results[0].type.rank
    want = [dict(p) for p in pls]
    out: Pl = {}
    for axis in {a for p in pls for a in p}:
        kept = _elementwise_axis(node, pls, axis, rank)
        if kept is None:
            for w in want:
                w.pop(axis, None)
        else:
            out[axis] = kept
    _apply(st, node, want, [out for _ in node.results], node.op)


def _elementwise_axis(node: Node, pls: list[Pl], axis: str, rank: int) -> Placement | None:
    got = [p.get(axis) for p in pls]
    if any(isinstance(g, Partial) for g in got):
        parts = [isinstance(g, Partial) for g in got]
        if node.name in _LINEAR_ALL and all(parts):
            return PARTIAL
        one = node.name in _LINEAR_ONE and sum(parts) == 1 and all(g is None or p for g, p in
                                                                     zip(got, parts))
        ok_pos = parts[0] or node.name == "mul"
        return PARTIAL if one and ok_pos else None
    dims = set()
    for v, g in zip(node.operands, got):
        off = rank - v.type.rank
        if g is not None:
            dims.add(g.dim + off)
    if len(dims) != 1:
        return None
    d = dims.pop()
    for v, g in zip(node.operands, got):
        i = d - (rank - v.type.rank)
        if g is None and i >= 0 and v.type.shape[i] != 1:
            return None  # a replicated operand spans the sharded dim: cannot slice it here
    for v, g in zip(node.operands, got):
        if g is not None and g.dim + rank - v.type.rank != d:
            return None
    return Shard(d)


def _permute(st: _State, node: Node, pls: list[Pl]) -> None:
    perm = [d % max(len(node.op.dims), 1) for d in node.op.dims]
    out = {a: (Shard(perm.index(p.dim)) if isinstance(p, Shard) else p) for a, p in pls[0].items()}
    _apply(st, node, pls, [out], node.op)


def _reshape(st: _State, node: Node, pls: list[Pl]) -> None:
    """A shard on dim d maps to the output dim that starts at the same flat offset and divides;
    the shape attribute becomes the local shape."""
    src, dst = node.operands[0].type.shape, node.results[0].type.shape
    want, out = dict(pls[0]), {}
    for axis, p in pls[0].items():
        if isinstance(p, Partial):
            out[axis] = p
            continue
        d2 = _reshape_dim(src, dst, p.dim, st.sizes[axis])
        if d2 is None:
            want.pop(axis)
        else:
            out[axis] = Shard(d2)
    local = list(dst)
    for axis, p in out.items():
        if isinstance(p, Shard):
            local[p.dim] //= st.sizes[axis]
    _apply(st, node, [want], [out], dataclasses.replace(node.op, shape=tuple(local)))


def _reshape_dim(src, dst, d: int, size: int) -> int | None:
    if not all(isinstance(x, int) for x in (*src, *dst)):
        return None
    prefix = math.prod(src[:d])
    for d2 in range(len(dst)):
        if math.prod(dst[:d2]) == prefix and dst[d2] % size == 0 and dst[d2] > 1:
            return d2 if src[d] % size == 0 else None
    return None


def _matmul(st: _State, node: Node, pls: list[Pl]) -> None:
    """a [...,M,K] @ b [...,K,N]: column-parallel (b S(N)) -> S(N); row-parallel (a S(K), b S(K))
    -> P; batch or row shards pass through; a partial operand times a replicated one stays P."""
    a, b = node.operands
    ra, rb, ro = a.type.rank, b.type.rank, node.results[0].type.rank
    want = [dict(pls[0]), dict(pls[1])]
    out: Pl = {}
    for axis in {x for p in pls for x in p}:
        pa, pb = pls[0].get(axis), pls[1].get(axis)
        res = _matmul_axis(pa, pb, ra, rb, ro, b.type.shape)
        if res is None:
            want[0].pop(axis, None)
            want[1].pop(axis, None)
        else:
            out[axis] = res
    _apply(st, node, want, [out], node.op)


def _matmul_axis(pa, pb, ra: int, rb: int, ro: int, b_shape) -> Placement | None:
    sa = pa.dim if isinstance(pa, Shard) else None
    sb = pb.dim if isinstance(pb, Shard) else None
    if isinstance(pa, Partial) and pb is None or isinstance(pb, Partial) and pa is None:
        return PARTIAL
    if sa == ra - 1 and sb == rb - 2:
        return PARTIAL  # contraction dim split: partial sums
    if pa is None and sb == rb - 1:
        return Shard(ro - 1)  # column-parallel
    if sa == ra - 2 and pb is None:
        return Shard(ro - 2)  # rows split
    if sa is not None and sa < ra - 2:  # batch dim
        o = sa + ro - ra
        if sb is not None and sb < rb - 2 and sb + ro - rb == o:
            return Shard(o)
        j = o - (ro - rb)
        if pb is None and (j < 0 or j >= rb - 2 or b_shape[j] == 1):
            return Shard(o)
    return None


def _heads(st: _State, node: Node, pls: list[Pl]) -> None:
    """attn.sparse_mqa: query heads split (q S(2), sink S(0)) -> o S(2); the shared K=V head,
    compressed entries, picks and rope tables replicated."""
    q, sink = pls[0], pls[2]
    axes = [a for a, p in q.items() if p == Shard(2) and sink.get(a) == Shard(0)]
    if not axes:
        return _replicated(st, node, pls)
    want: list[Pl] = [{} for _ in pls]
    want[0] = {a: Shard(2) for a in axes}
    want[2] = {a: Shard(0) for a in axes}
    _apply(st, node, want, [dict(want[0])], node.op)


def _experts(st: _State, node: Node, pls: list[Pl]) -> None:
    """moe.experts with routed experts split along dim 0 on an axis (module docstring)."""
    axes = [a for a, p in pls[3].items() if p == Shard(0)]
    if not axes:
        return _replicated(st, node, pls)
    if len(axes) > 1 or pls[4].get(axes[0]) != Shard(0) or pls[5].get(axes[0]) != Shard(0):
        raise ShardError(f"shard: w1/w3/w2 of {node.name} must share one expert axis, got {pls}")
    axis = axes[0]
    if st.moe in ("dispatch", "dispatch_ragged"):
        return _experts_dispatch(st, node, pls, axis)
    shared = node.op.shared
    if shared and (pls[6].get(axis) != Shard(0) or pls[8].get(axis) != Shard(1)):
        raise ShardError(
            "shard: moe='all_reduce' needs the shared expert split (s1/s3 Shard(0), s2 Shard(1)) "
            "so its partial sums add up once; use expert_parallel(axis, split_shared=True)"
        )
    x, w, e = (st.fetch(v, {}, node.loc) for v in node.operands[:3])
    w, e_local = _local_routing(st, node, w, e, axis)
    rest = [st.fetch(v, {axis: p} if p else {}, node.loc) for v, p in
            zip(node.operands[3:], [pl.get(axis) for pl in pls[3:]])]
    res = st.emit(node.op, [x, w, e_local, *rest], node.loc, [node.results[0].name], own=True)
    st.bind(node.results, res, [{axis: PARTIAL}])


def _local_routing(st: _State, node: Node, w: Value, e: Value, axis: str) -> tuple[Value, Value]:
    """Local ids e - axis_index·E_local, clamped into [0, E_local), and routing weights zeroed
    for other ranks' experts: they contribute exactly 0, and every kernel sees in-range ids."""
    loc, n_local = node.loc, st.local[node.operands[3].name].type.shape[0]
    clamped, mine = _local_ids(st, e, n_local, axis, loc)
    zero = _op(st, "constant", [], loc, value=0.0, dtype=w.type.dtype)
    return _op(st, "where", [mine, w, zero], loc), clamped


def _local_ids(st: _State, ids: Value, n_local: int, axis: str, loc: Loc | None
               ) -> tuple[Value, Value]:
    """Rank-local ids of a table split in blocks of `n_local` rows over `axis`: the ids minus
    axis_index·n_local clamped into [0, n_local) (always in range for a kernel), and whether
    each id is this rank's."""
    idx = st.emit(OPS["dist.axis_index"](group=axis, size=st.sizes[axis]), [], loc,
                  [f"{axis}_index"])[0]
    per = _op(st, "constant", [], loc, value=n_local, dtype=DType.i64)
    first = _op(st, "mul", [idx, per], loc)
    local = _op(st, "sub", [ids, first], loc)
    clamped = _op(st, "clamp", [local], loc, min=0, max=n_local - 1)
    return clamped, _op(st, "eq", [local, clamped], loc)


def _embedding(st: _State, node: Node, pls: list[Pl]) -> None:
    """Vocabulary-parallel lookup: table rows split over an axis -> each rank reads the rows of
    the ids in its block and zeroes the others -> a partial sum (one all_reduce when needed).
    The ids keep their own placement (a batch split passes through)."""
    axes = [a for a, p in pls[0].items() if p == Shard(0)]
    ids_i64 = node.operands[1].type.dtype == DType.i64
    if len(axes) != 1 or axes[0] in pls[1] or len(pls[0]) != 1 or not ids_i64:
        return _replicated(st, node, pls)
    axis, loc = axes[0], node.loc
    table, ids = st.local[node.operands[0].name], st.local[node.operands[1].name]
    clamped, mine = _local_ids(st, ids, table.type.shape[0], axis, loc)
    rows = _op(st, "embedding", [table, clamped], loc)
    mask = _op(st, "unsqueeze", [mine], loc, dim=-1)
    zero = _op(st, "constant", [], loc, value=0.0, dtype=table.type.dtype)
    out = st.emit(OPS["where"](), [mask, rows, zero], loc, [node.results[0].name], own=True)
    st.counters[f"vocab_parallel_embedding.{axis}"] += 1
    st.bind(node.results, out, [{**pls[1], axis: PARTIAL}])


def _experts_dispatch(st: _State, node: Node, pls: list[Pl], axis: str) -> None:
    size, loc = st.sizes[axis], node.loc
    # tokens split over the expert axis (data-parallel attention) stay local: dispatch moves them
    split = all(p == {axis: Shard(0)} for p in pls[:3])
    tokens: Pl = {axis: Shard(0)} if split else {}
    x, w, e = (st.fetch(v, tokens, loc) for v in node.operands[:3])
    w1, w3, w2 = (st.fetch(v, {axis: Shard(0)}, loc) for v in node.operands[3:6])
    n, d = x.type.shape
    n_local, n_experts = w1.type.shape[0], w1.type.shape[0] * size
    layout = "ragged" if st.moe == "dispatch_ragged" else "padded"
    dispatch = OPS["moe.dispatch"](
        group=axis, size=size, n_experts=n_experts, capacity=n, layout=layout
    )
    rx, rw, slots = st.emit(dispatch, [x, w, e], loc, ["recv_x", "recv_w", "slots"])
    rows = n_local * size * n
    flat_x = _op(st, "reshape", [rx], loc, shape=(rows, d))
    flat_w = _op(st, "reshape", [rw], loc, shape=(rows, 1))
    ids = _op(st, "iota", [], loc, start=0, end=n_local, dtype=DType.i64)
    ids = _op(st, "reshape", [ids], loc, shape=(n_local, 1))
    ids = _op(st, "expand", [ids], loc, shape=(n_local, size * n))
    ids = _op(st, "reshape", [ids], loc, shape=(rows, 1))
    routed_op = dataclasses.replace(node.op, shared=False)
    y = st.emit(routed_op, [flat_x, flat_w, ids, w1, w3, w2], loc, ["expert_out"])[0]
    y = _op(st, "reshape", [y], loc, shape=(n_local, size * n, d))
    combine = OPS["moe.combine"](group=axis, size=size, n_experts=n_experts, layout=layout)
    out = st.emit(combine, [y, e, slots], loc, ["routed"])[0]
    if node.op.shared:
        out = _op(st, "add", [out, _shared_expert(st, node, x)], loc)
    st.counters[f"moe.dispatch.{axis}"] += 1
    st.bind(node.results, [out], [tokens])


def _shared_expert(st: _State, node: Node, x: Value) -> Value:
    """The shared expert as a one-expert moe.experts with weight 1 (same math, same kernel)."""
    loc = node.loc
    s1, s3, s2 = (st.fetch(v, {}, loc) for v in node.operands[6:9])
    n = x.type.shape[0]
    ones = _op(st, "full", [], loc, shape=(n, 1), value=1.0, dtype=DType.f32)
    zero = _op(st, "full", [], loc, shape=(n, 1), value=0, dtype=DType.i64)
    w1, w3, w2 = (_op(st, "reshape", [s], loc, shape=(1, *s.type.shape)) for s in (s1, s3, s2))
    op = dataclasses.replace(node.op, shared=False)
    return st.emit(op, [x, ones, zero, w1, w3, w2], loc, ["shared_out"])[0]


def _op(st: _State, name: str, operands: list[Value], loc: Loc | None, **attrs) -> Value:
    return st.emit(OPS[name](**attrs), operands, loc, [name])[0]


RULES: dict[str, RuleFn] = {
    "reshape": _reshape,
    "permute": _permute,
    "matmul": _matmul,
    "attn.sparse_mqa": _heads,
    "moe.experts": _experts,
    "embedding": _embedding,
}


def _rule_for(node: Node) -> RuleFn:
    if node.name in RULES:
        return RULES[node.name]
    if node.kind in (Kind.ELEMENTWISE, Kind.BROADCAST) and node.operands:
        return _elementwise
    return _replicated
