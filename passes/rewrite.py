"""The rewrite driver: apply a list of rules to a graph until nothing changes.

`rewrite(graph, rules, ctx=ctx)` sweeps the ops in order. Each op first has its operands replaced
by their current values, then the rules indexed under its mnemonic (plus rules whose root matches
any op) are tried in list order; the first that matches and does not decline replaces the op's
results with the values its rewrite function returns. New ops are placed where the old op was,
so every op still comes after its operands. Sweeps repeat (with dead-code elimination between
them) until one changes nothing, or `max_iters` sweeps have run.

Invariants the driver checks, so a faulty rule fails loudly and names itself:
- a replacement value has exactly the type of the result it replaces;
- new ops get their types from `infer_type` and, unless given, the matched op's `Loc`;
- operands of new ops are values already defined at that point.

Cost: one sweep is O(ops) dictionary work plus the matching of rules whose root mnemonic fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ir
from ir import DType, Graph, Loc, Node, Op, TensorType, Value
from passes.cleanup import dead_code_elimination
from passes.context import PassContext
from passes.pattern import Fail, Match, MatchEnv, Rule, match_node
from passes.structural_hash import attr_key

__all__ = ["GraphView", "Namer", "RewriteError", "Rewriter", "rewrite"]


class RewriteError(RuntimeError):
    """A rule produced something invalid (wrong type, undefined operand, ...)."""


class Namer:
    """Fresh decimal value names, never reusing a name the graph (or this namer) has used; also
    caches `infer_type` answers for one `rewrite` call (layers repeat the same ops and types)."""

    def __init__(self, g: Graph) -> None:
        self.types: dict[tuple, tuple[TensorType, ...]] = {}
        self.ops: dict[tuple, Op] = {}
        self.used: set[str] = {v.name for v in g.inputs}
        self.used.update(r.name for n in g.ops for r in n.results)
        nums = [int(s) for s in self.used if s.isdigit()]
        self.next = max(nums, default=-1) + 1

    def fresh(self) -> str:
        while str(self.next) in self.used:
            self.next += 1
        name = str(self.next)
        self.used.add(name)
        self.next += 1
        return name


class GraphView(MatchEnv):
    """Producers and use counts of a graph, by value name (for matching outside the driver)."""

    def __init__(self, g: Graph) -> None:
        self.defs: dict[str, Node] = {r.name: n for n in g.ops for r in n.results}
        self.inputs: set[str] = {v.name for v in g.inputs}
        self.use_count: dict[str, int] = {}
        for n in g.ops:
            for v in n.operands:
                self.use_count[v.name] = self.use_count.get(v.name, 0) + 1
        for v in g.outputs:
            self.use_count[v.name] = self.use_count.get(v.name, 0) + 1

    def producer(self, v: Value) -> Node | None:
        return self.defs.get(v.name)

    def uses(self, v: Value) -> int:
        return self.use_count.get(v.name, 0)


class _Sweep(GraphView):
    """One pass over the ops, building the new op list."""

    def __init__(self, g: Graph) -> None:
        super().__init__(g)
        self.defs = {}
        self.out: list[Node] = []
        self.remap: dict[str, Value] = {}

    def resolve(self, v: Value) -> Value:
        while v.name in self.remap:
            v = self.remap[v.name]
        return v

    def refresh(self, n: Node) -> Node:
        """`n` with operands replaced by their current values."""
        if not self.remap or not any(v.name in self.remap for v in n.operands):
            return n
        return Node(n.op, tuple(self.resolve(v) for v in n.operands), n.results, n.loc)

    def append(self, n: Node) -> None:
        self.out.append(n)
        for r in n.results:
            self.defs[r.name] = n

    def commit(self, root: Node, new: list[Node], values: tuple[Value, ...]) -> None:
        for v in root.operands:
            self.use_count[v.name] -= 1
        for n in new:
            self.append(n)
            for v in n.operands:
                self.use_count[v.name] = self.use_count.get(v.name, 0) + 1
        for r, v in zip(root.results, values):
            self.remap[r.name] = v
            self.use_count[v.name] = self.use_count.get(v.name, 0) + self.use_count.pop(r.name, 0)


class Rewriter:
    """Handed to rewrite functions: builds new ops in front of the matched op (`root`)."""

    def __init__(self, sweep: GraphView, root: Node, namer: Namer, ctx: PassContext) -> None:
        self._sweep = sweep
        self.root = root
        self.ctx = ctx
        self._namer = namer
        self.new: list[Node] = []
        self._new_defs: dict[str, Node] = {}

    def op(
        self, op: str | Op, operands: Sequence[Value] = (), *, loc: Loc | None = None, **attrs: Any
    ) -> Any:
        """Add `op(operands, **attrs)` with inferred types; returns a Value (or a tuple)."""
        if isinstance(op, str):
            op = self._make(op, attrs)
        operands = tuple(operands)
        for v in operands:
            known = v.name in self._sweep.defs or v.name in self._sweep.inputs
            if not (known or v.name in self._new_defs):
                raise RewriteError(
                    f"rewrite of {self.root.name}: operand %{v.name} of new {op.mnemonic} is "
                    "not defined before the matched op; use captured values or new ops"
                )
        types = self._infer(op, tuple(v.type for v in operands))
        results = tuple(Value(self._namer.fresh(), t) for t in types)
        node = Node(op, operands, results, self.root.loc if loc is None else loc)
        self.new.append(node)
        for r in results:
            self._new_defs[r.name] = node
        return results[0] if len(results) == 1 else results

    def _make(self, mnemonic: str, attrs: dict[str, Any]) -> Op:
        """The op instance (shared between equal ops: constructing one validates its attributes)."""
        key = (mnemonic, tuple((k, attr_key(v)) for k, v in attrs.items()))
        out = self._namer.ops.get(key)
        if out is None:
            cls = ir.OPS.get(mnemonic)
            if cls is None:
                raise RewriteError(f"unknown op {mnemonic!r} in a rewrite of {self.root.name}")
            out = self._namer.ops[key] = cls(**attrs)
        return out

    def _infer(self, op: Op, types: tuple[TensorType, ...]) -> tuple[TensorType, ...]:
        key = (type(op), tuple(attr_key(a) for a in op.attrs.values()), types)
        out = self._namer.types.get(key)
        if out is None:
            out = self._namer.types[key] = op.infer_type(*types)
        return out

    def constant(self, value: bool | float, dtype: DType) -> Value:
        return self.op("constant", [], value=value, dtype=dtype)

    def producer(self, v: Value) -> Node | None:
        return self._new_defs.get(v.name) or self._sweep.producer(v)

    def uses(self, v: Value) -> int:
        return self._sweep.uses(v)


def rewrite(
    graph: Graph,
    rules: Sequence[Rule],
    *,
    ctx: PassContext | None = None,
    max_iters: int = 32,
) -> Graph:
    """Apply `rules` to a fixed point (at most `max_iters` sweeps); counts hits in `ctx`."""
    ctx = ctx or PassContext()
    ctx.rules.update((r.name, r) for r in rules)
    index, anywhere = _index(rules)
    namer = Namer(graph)
    g = graph
    for _ in range(max_iters):
        g, hits = _sweep(g, index, anywhere, namer, ctx)
        if not hits:
            return g
        g = dead_code_elimination(g)
    ctx.log(f"rewrite: no fixed point after {max_iters} sweeps (rules: {_names(rules)})")
    ctx.count("rewrite.iteration_cap")
    return g


def _index(rules: Sequence[Rule]) -> tuple[dict[str, list[Rule]], list[Rule]]:
    """Mnemonic -> the rules that can match an op of that mnemonic, in list order."""
    anywhere = [r for r in rules if r.pattern.mnemonics() is None]
    names = {m for r in rules for m in (r.pattern.mnemonics() or ())}
    index = {
        name: [r for r in rules if r.pattern.mnemonics() is None or name in r.pattern.mnemonics()]
        for name in names
    }
    return index, anywhere


def _sweep(g: Graph, index, anywhere, namer: Namer, ctx: PassContext) -> tuple[Graph, int]:
    sweep = _Sweep(g)
    hits = 0
    for node in g.ops:
        node = sweep.refresh(node)
        rules = index.get(node.name, anywhere)
        if rules and _try_rules(sweep, node, rules, namer, ctx):
            hits += 1
            continue
        sweep.append(node)
    if not hits:
        return g, 0  # unchanged: callers may test `out is graph`
    outputs = [sweep.resolve(v) for v in g.outputs]
    return Graph(g.inputs, sweep.out, outputs, name=g.name, roles=dict(g.roles)), hits


def _try_rules(sweep: _Sweep, node: Node, rules: list[Rule], namer: Namer, ctx) -> bool:
    for rule in rules:
        m = match_node(rule.pattern, node, sweep)
        if isinstance(m, Fail):
            continue
        rw = Rewriter(sweep, node, namer, ctx)
        values = _replacement(rule, m, rw)
        if values is None:
            continue
        sweep.commit(node, rw.new, values)
        ctx.count(rule.name)
        return True
    return False


def _replacement(rule: Rule, m: Match, rw: Rewriter) -> tuple[Value, ...] | None:
    out = rule.rewrite(m, rw)
    if out is None:
        return None
    values = (out,) if isinstance(out, Value) else tuple(out)
    root = m.root
    if len(values) != len(root.results):
        raise RewriteError(
            f"rule {rule.name}: {root.name} has {len(root.results)} result(s) but the rewrite "
            f"returned {len(values)}"
        )
    if any(v in root.results for v in values):
        return None  # the op itself: nothing to do
    for r, v in zip(root.results, values):
        if r.type != v.type:
            raise RewriteError(
                f"rule {rule.name}: replaces %{r.name}: {r.type} with %{v.name}: {v.type} "
                f"(types must be equal); at {_where(root)}"
            )
    return values


def _where(n: Node) -> str:
    from passes.pattern import node_line

    return node_line(n)


def _names(rules: Sequence[Rule]) -> str:
    return ", ".join(r.name for r in rules[:8]) + (" ..." if len(rules) > 8 else "")
