"""Shared machinery of the semantic fusions (fuse_attention, fuse_moe, fuse_hc).

A semantic fusion recognises a subgraph with *several* results (mHC pre -> input, post, comb;
routing -> weights, experts) and replaces it by one named op. The rewrite driver replaces one
root op's results; these passes instead collect `Fusion`s — a new op plus the old values its
results stand for — and `apply` inserts the ops, redirects every use, restores a topological
order (stable: original order wherever possible) and drops what became dead.

Matching uses the pattern language (`passes.pattern`) for the backward structure of a subgraph
and small forward walks (`users`) where a subgraph fans out. A fusion never changes semantics
beyond reassociation inside the op: interior values still used elsewhere simply stay alive.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ir
from ir import Graph, Loc, Node, Value
from passes.cleanup import dead_code_elimination
from passes.context import PassContext
from passes.pattern import Fail, Match, Pat, match_node
from passes.rewrite import GraphView, Namer

__all__ = [
    "Derived",
    "Fusion",
    "FusionView",
    "apply",
    "const_value",
    "narrow",
    "rounded",
    "scalar",
]


@dataclass(frozen=True)
class Derived:
    """An operand the fusion has to compute first: `mnemonic(source, **attrs)` (e.g. a reshape
    of a value the matched subgraph only used in another shape)."""

    mnemonic: str
    source: Value
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fusion:
    """`mnemonic(operands, **attrs)` replaces `replaces[i]` by its result i (None: unused)."""

    mnemonic: str
    operands: Sequence[Value | Derived]
    attrs: dict[str, Any]
    replaces: Sequence[Value | None]
    loc: Loc | None = None


class FusionView(GraphView):
    """Producers, use counts and users of a graph, by value name — looking through upcasts.

    Matching sees the graph with every widening float cast (bf16/f16 -> f32) removed, its users
    reading the cast's operand: widening is exact, and the semantic ops compute in fp32 anyway,
    so one pattern matches an fp32 model and a bf16 model. Rounding casts stay visible: patterns
    allow them exactly where the reference model rounds (`rounded`), and `apply` moves a
    replacement past a final rounding cast.
    """

    def __init__(self, g: Graph) -> None:
        self.graph = g
        shadow = _cast_blind(g)
        super().__init__(shadow)
        self.users_of: dict[str, list[Node]] = shadow.users()
        self.graph_ops: list[Node] = shadow.ops
        self.outputs = {v.name for v in shadow.outputs}

    def users(self, v: Value) -> list[Node]:
        return self.users_of.get(v.name, [])

    def only_user(self, v: Value, mnemonic: str | None = None) -> Node | None:
        """The single op using `v` (and not a graph output), optionally of one mnemonic."""
        us = self.users(v)
        if len(us) != 1 or v.name in self.outputs:
            return None
        if mnemonic is not None and us[0].name != mnemonic:
            return None
        return us[0]

    def match_first(self, pats: Sequence[Pat], v: Value) -> tuple[int, Match] | None:
        """(index, match) of the first of `pats` (alternative spellings) that matches at `v`."""
        for i, p in enumerate(pats):
            m = self.match(p, v)
            if m is not None:
                return i, m
        return None

    def match(self, pat: Pat, v: Value) -> Match | None:
        """Match `pat` against the producer of `v` (None when `v` is an input or no match)."""
        n = self.producer(v)
        if n is None:
            return None
        m = match_node(pat, n, self)
        return None if isinstance(m, Fail) else m


def _is_upcast(n: Node) -> bool:
    if n.name != "cast":
        return False
    src, dst = n.operands[0].dtype, n.results[0].dtype
    return src.is_float and dst.is_float and dst.itemsize > src.itemsize and not src.is_f8


def narrow(v: Value) -> bool:
    """Whether `v` is a float narrower than fp32 (a model computing in it rounds its fp32
    intermediates back to it)."""
    return v.dtype.is_float and v.dtype.itemsize < 4


def rounded(view: GraphView, v: Value) -> Value:
    """The value before a float rounding cast (`cast` to a narrower float), else `v`."""
    n = view.producer(v)
    if n is None or n.name != "cast" or not n.operands[0].dtype.is_float:
        return v
    return (
        n.operands[0] if v.dtype.is_float and v.dtype.itemsize < n.operands[0].dtype.itemsize else v
    )


def _cast_blind(g: Graph) -> Graph:
    """`g` without widening float casts (types of later values are left as they were)."""
    through: dict[str, Value] = {}
    ops: list[Node] = []
    for n in g.ops:
        n = _redirect(n, through)
        if _is_upcast(n):
            through[n.results[0].name] = n.operands[0]
            continue
        ops.append(n)
    if not through:
        return g
    outputs = [through.get(v.name, v) for v in g.outputs]
    return Graph(g.inputs, ops, outputs, name=g.name, roles=dict(g.roles))


def const_value(view: GraphView, v: Value) -> Any:
    """The value of a uniform tensor (`constant`/`full` with a concrete value), else None."""
    n = view.producer(v)
    if n is None or n.name not in ("constant", "full"):
        return None
    value = n.attrs["value"]
    return value if isinstance(value, (bool, int, float)) else None


def scalar(m: Match, name: str) -> float | None:
    """The numeric value of capture `name` if it is a constant (`const(name=...)`)."""
    n = m.node(name)
    if n is None or n.name not in ("constant", "full"):
        return None
    value = n.attrs["value"]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def apply(g: Graph, fusions: Sequence[Fusion], ctx: PassContext | None, counter: str) -> Graph:
    """Insert the fused ops, redirect uses of the values they replace, reorder, DCE.

    Each fused op is placed right after the last producer of a value it replaces; a stable
    topological sort then moves any op whose operands come later (never needed for the captured
    model, kept for safety). Counts `counter.<mnemonic>` per fusion in `ctx`.
    """
    if not fusions:
        return g
    namer = Namer(g)
    position = {r.name: i for i, n in enumerate(g.ops) for r in n.results}
    users = g.users()
    after: dict[int, list[Node]] = {}
    remap: dict[str, Value] = {}
    for f in fusions:
        nodes: list[Node] = []
        operands = [_materialise(v, namer, f.loc, nodes) for v in f.operands]
        op = ir.OPS[f.mnemonic](**f.attrs)
        types = op.infer_type(*(v.type for v in operands))
        results = tuple(Value(namer.fresh(), t) for t in types)
        try:
            pairs = [
                (v, new)
                for old, new in zip(f.replaces, results)
                if old is not None
                for v in _settle(old, new, users, g)
            ]
        except ir.IRTypeError as e:  # a rule matched something it cannot replace: leave it
            if ctx is not None:
                ctx.count(f"{counter}.skipped")
                ctx.log(f"{counter}: {f.mnemonic} not applied: {e}")
            continue
        remap.update((v.name, new) for v, new in pairs)
        replaced = [v for v, _ in pairs]
        last = max(position[v.name] for v in replaced)
        nodes.append(Node(op, tuple(operands), results, f.loc))
        after.setdefault(last, []).extend(nodes)
        if ctx is not None:
            ctx.count(f"{counter}.{f.mnemonic}")
    ops: list[Node] = []
    for i, n in enumerate(g.ops):
        ops.append(n)
        ops.extend(after.get(i, ()))
    ops = [_redirect(n, remap) for n in ops]
    outputs = [remap.get(v.name, v) for v in g.outputs]
    out = Graph(g.inputs, _stable_topo(ops, g), outputs, name=g.name, roles=dict(g.roles))
    return dead_code_elimination(out, ctx)


def _settle(old: Value, new: Value, users: dict[str, list[Node]], g: Graph) -> list[Value]:
    """The values `new` stands for: `old` itself, or — when the op rounds its result to another
    float dtype, as the reference model does right after `old` — the casts of `old` to it."""
    if old.type == new.type:
        return [old]
    casts = [u.results[0] for u in users.get(old.name, ())]
    ok = (
        old.type.shape == new.type.shape
        and casts
        and old.name not in {v.name for v in g.outputs}
        and all(u.name == "cast" and u.results[0].type == new.type for u in users[old.name])
    )
    if not ok:
        raise ir.IRTypeError(f"fusion would replace %{old.name}: {old.type} by {new.type}")
    return casts


def _materialise(v: Value | Derived, namer: Namer, loc: Loc | None, new: list[Node]) -> Value:
    if isinstance(v, Value):
        return v
    op = ir.OPS[v.mnemonic](**v.attrs)
    (t,) = op.infer_type(v.source.type)
    result = Value(namer.fresh(), t)
    new.append(Node(op, (v.source,), (result,), loc))
    return result


def _redirect(n: Node, remap: dict[str, Value]) -> Node:
    if not any(v.name in remap for v in n.operands):
        return n
    return Node(n.op, tuple(remap.get(v.name, v) for v in n.operands), n.results, n.loc)


def _stable_topo(ops: list[Node], g: Graph) -> list[Node]:
    """Kahn's algorithm, always emitting the ready op that came first."""
    defined = {v.name for v in g.inputs}
    producer_of = {r.name: i for i, n in enumerate(ops) for r in n.results}
    waiting: dict[int, int] = {}
    dependents: dict[int, list[int]] = {}
    ready: list[int] = []
    for i, n in enumerate(ops):
        deps = {producer_of[v.name] for v in n.operands if v.name not in defined}
        waiting[i] = len(deps)
        for d in deps:
            dependents.setdefault(d, []).append(i)
        if not deps:
            ready.append(i)
    heapq.heapify(ready)
    out: list[Node] = []
    while ready:
        i = heapq.heappop(ready)
        out.append(ops[i])
        for j in dependents.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(out) != len(ops):
        raise ir.IRTypeError("fusion produced a cycle; a fused op depends on a value it replaces")
    return out
