"""The rewrite driver: apply a list of rules to a graph until nothing changes.

`rewrite(graph, rules, ctx=ctx)` sweeps the ops in order. Each op first has its operands replaced
by their current values, then the rules indexed under its mnemonic (plus rules whose root matches
any op) are tried in list order; the first that matches and does not decline replaces the op's
results with the values its rewrite function returns. New ops are placed where the old op was,
so every op still comes after its operands. Sweeps repeat (with dead-code elimination between
them) until one changes nothing, or `max_iters` sweeps have run.

A rule may replace more than the matched op's results (`Replace`): a semantic fusion such as
`hc.pre` stands for three values of a subgraph. Uses of those values are redirected too; when a
use came before the matched op, the sweep ends with a stable topological sort (original order
wherever possible). A rule with a `view` matches that view of the graph (built once per sweep;
the fusions look through widening casts) instead of the graph itself.

A rule that matches but declines returns a `Fail` (which sub-pattern, why); failures that got
close count as near misses (`ctx.near_misses`, printed by STATS=1).

Invariants the driver checks, so a faulty rule fails loudly and names itself:
- a replacement value has exactly the type of the result it replaces;
- new ops get their types from `infer_type` and, unless given, the matched op's `Loc`;
- operands of new ops are values already defined at that point.

Cost: one sweep is O(ops) dictionary work plus the matching of rules whose root mnemonic fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import heapq
from collections import Counter
from dataclasses import dataclass

import ir
from ir import DType, Graph, Loc, Node, Op, TensorType, Value
from passes.cleanup import dead_code_elimination
from passes.context import PassContext
from passes.pattern import Fail, Match, MatchEnv, Rule, match_node
from passes.structural_hash import attr_key

__all__ = ["GraphView", "Namer", "Replace", "RewriteError", "Rewriter", "rewrite", "stable_topo"]


class RewriteError(RuntimeError):
    """A rule produced something invalid (wrong type, undefined operand, ...)."""


@dataclass(frozen=True)
class Replace:
    """What a rewrite stands for: each `(old, new)` pair redirects every use of `old` to `new`
    (equal types). The matched op's results may be among the olds or not (then it stays until
    dead-code elimination finds it unused)."""

    pairs: tuple[tuple[Value, Value], ...]


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
        self.late = False  # a value used before the op that replaced it: reorder at the end
        self.views: dict[Any, MatchEnv] = {}  # view factory -> the view of this sweep's graph

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

    def commit(self, root: Node, new: list[Node], pairs: tuple[tuple[Value, Value], ...]) -> None:
        """Place `new` where `root` was and redirect each old value to its new one; `root`
        itself stays unless all its results are replaced."""
        replaced = {old.name for old, _ in pairs}
        keep = not all(r.name in replaced for r in root.results)
        if not keep:
            for v in root.operands:
                self.use_count[v.name] -= 1
        for n in new:
            self.append(n)
            for v in n.operands:
                self.use_count[v.name] = self.use_count.get(v.name, 0) + 1
        if keep:
            self.append(root)
        mine = {r.name for r in root.results}
        for old, v in pairs:
            self.remap[old.name] = v
            self.use_count[v.name] = self.use_count.get(v.name, 0) + self.use_count.pop(old.name, 0)
            self.late = self.late or (old.name not in mine and old.name in self.defs)

    def settled(self, n: Node) -> bool:
        """Whether every result of `n` has been replaced already (nothing left to rewrite)."""
        return all(r.name in self.remap for r in n.results)

    def view(self, g: Graph, factory: Any) -> MatchEnv:
        if factory not in self.views:
            self.views[factory] = factory(g)
        return self.views[factory]


class Rewriter:
    """Handed to rewrite functions: builds new ops in front of the matched op (`root`)."""

    def __init__(
        self,
        sweep: GraphView,
        root: Node,
        namer: Namer,
        ctx: PassContext,
        env: MatchEnv | None = None,
    ) -> None:
        self._sweep = sweep
        self.env = sweep if env is None else env  # what the rule matched: producers, uses
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
        resolve = getattr(self._sweep, "resolve", None)  # values replaced earlier in this sweep
        operands = tuple(operands if resolve is None else map(resolve, operands))
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

    def defined(self, v: Value) -> bool:
        """Whether `v` may be an operand of a new op here: a graph input, a value defined before
        the matched op, or a result of a new op (`op` raises RewriteError for any other)."""
        resolve = getattr(self._sweep, "resolve", None)
        v = v if resolve is None else resolve(v)
        known = v.name in self._sweep.defs or v.name in self._sweep.inputs
        return known or v.name in self._new_defs

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
        return self._new_defs.get(v.name) or self.env.producer(v)

    def uses(self, v: Value) -> int:
        return self.env.uses(v)


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
        misses: Counter[str] = Counter()  # near misses of this sweep (the last one's count)
        g, hits = _sweep(g, index, anywhere, namer, ctx, misses)
        if not hits:
            ctx.near_misses.update(misses)
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


def _sweep(g: Graph, index, anywhere, namer: Namer, ctx, misses) -> tuple[Graph, int]:
    sweep = _Sweep(g)
    hits = 0
    for node in g.ops:
        node = sweep.refresh(node)
        rules = index.get(node.name, anywhere)
        if rules and not sweep.settled(node) and _try_rules(sweep, g, node, rules, namer, ctx, misses):
            hits += 1
            continue
        sweep.append(node)
    if not hits:
        return g, 0  # unchanged: callers may test `out is graph`
    ops = sweep.out
    if sweep.late:  # uses that came before the op replacing their value
        ops = stable_topo([sweep.refresh(n) for n in ops], g.inputs)
    outputs = [sweep.resolve(v) for v in g.outputs]
    return Graph(g.inputs, ops, outputs, name=g.name, roles=dict(g.roles)), hits


def _try_rules(sweep: _Sweep, g: Graph, node: Node, rules: list[Rule], namer, ctx, misses) -> bool:
    for rule in rules:
        env, root = sweep, node
        if rule.view is not None:
            env = sweep.view(g, rule.view)
            root = env.producer(node.results[0])  # the op as the view sees it
            if root is None or root.results != node.results:
                continue  # the view hides this op (e.g. a widening cast)
        m = match_node(rule.pattern, root, env)
        if isinstance(m, Match):
            rw = Rewriter(sweep, root, namer, ctx, env)
            m = _replacement(rule, m, rw)
            if m is not None and not isinstance(m, Fail):
                sweep.commit(node, rw.new, m)
                ctx.count(rule.name)
                return True
        if isinstance(m, Fail) and rule.near_miss(m):
            misses[rule.name] += 1
    return False


Pairs = tuple[tuple[Value, Value], ...]


def _replacement(rule: Rule, m: Match, rw: Rewriter) -> Pairs | Fail | None:
    """The rewrite's (old, new) pairs, checked; a Fail or None when it declines."""
    out = rule.rewrite(m, rw)
    if out is None or isinstance(out, Fail):
        return out
    root = m.root
    if isinstance(out, Replace):
        pairs = out.pairs
    else:
        values = (out,) if isinstance(out, Value) else tuple(out)
        if len(values) != len(root.results):
            raise RewriteError(
                f"rule {rule.name}: {root.name} has {len(root.results)} result(s) but the "
                f"rewrite returned {len(values)}"
            )
        pairs = tuple(zip(root.results, values))
    pairs = tuple((old, new) for old, new in pairs if old != new)
    if not pairs:
        return None  # the op itself: nothing to do
    for old, new in pairs:
        if old.type != new.type:
            raise RewriteError(
                f"rule {rule.name}: replaces %{old.name}: {old.type} with %{new.name}: "
                f"{new.type} (types must be equal); at {_where(root)}"
            )
    return pairs


def stable_topo(ops: list[Node], inputs: Sequence[Value]) -> list[Node]:
    """`ops` in an order where each op follows its operands' producers; Kahn's algorithm,
    always emitting the ready op that came first (so an ordered list stays as it is)."""
    defined = {v.name for v in inputs}
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
        raise RewriteError("a rewrite made a cycle: a new op depends on a value it replaces")
    return out


def _where(n: Node) -> str:
    from passes.pattern import node_line

    return node_line(n)


def _names(rules: Sequence[Rule]) -> str:
    return ", ".join(r.name for r in rules[:8]) + (" ..." if len(rules) > 8 else "")
