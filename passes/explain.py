"""`explain(rule, graph)`: why a rule does (or does not) fire on a graph.

For a rule that fires, it names how many ops match and the first one. Otherwise it picks the
nearest candidate — among the ops the root pattern could match, the one whose match got furthest
(most checks passed) — and says which sub-pattern, attribute, type, use count or constraint
failed, with the op's text and source location:

    rule mul_one does not fire (295 candidate mul ops)
      nearest: %14: f32[B,T,4] = mul(%12, %13)  # layers.0 @ deepseek_v4.py:102
      failed at root.operands[1] after 2 checks: expected op constant|full, got add
      there: %13: f32[B,T,4] = add(%11, %3)  # layers.0 @ deepseek_v4.py:102
      pattern: mul(x, {constant|full}[value=1])
"""

from __future__ import annotations

from dataclasses import dataclass

from ir import Graph, Node
from passes.context import PassContext
from passes.pattern import Fail, Match, MatchEnv, Rule, match_node, node_line, progress
from passes.rewrite import GraphView, Namer, Replace, Rewriter

__all__ = ["Explanation", "explain"]


@dataclass(frozen=True)
class Explanation:
    """The answer of `explain`; `str()` gives the message shown above."""

    rule: Rule
    fires: bool
    candidates: int
    matches: int  # ops where the rule fires
    node: Node | None  # the first matching op, or the nearest candidate
    fail: Fail | None  # why the nearest candidate failed (None when the rule fires)
    declined: int = 0  # ops where the pattern matched but the rewrite declined
    near_misses: int = 0  # candidates whose failure counts as a near miss

    def __str__(self) -> str:
        name = self.rule.name
        ops = _ops_text(self.rule)
        if self.fires:
            return f"rule {name} fires on {self.matches} op(s); first: {node_line(self.node)}"
        head = f"rule {name} does not fire ({self.candidates} candidate {ops} ops"
        misses = "near miss" if self.near_misses == 1 else "near misses"
        head += f", {self.near_misses} {misses})" if self.near_misses else ")"
        if self.candidates == 0:
            return f"{head}: the graph has no {ops} op\n  pattern: {self.rule.pattern.describe()}"
        lines = [head]
        if self.node is not None:
            lines.append(f"  nearest: {node_line(self.node)}")
        if self.declined and self.fail is None:
            lines.append(f"  the pattern matches {self.declined} op(s) but the rewrite declines")
        if self.fail is not None:
            f = self.fail
            lines.append(f"  failed at {f.path} after {progress(f.score)}: {f.reason}")
            if f.node is not None and f.node is not self.node:
                lines.append(f"  there: {node_line(f.node)}")
            elif f.node is None and f.value is not None:
                lines.append(f"  there: graph input %{f.value.name}: {f.value.type}")
            if f.parent is not None and f.parent is not self.node:
                lines.append(f"  operand of: {node_line(f.parent)}")
        lines.append(f"  pattern: {self.rule.pattern.describe()}")
        if self.rule.summary:
            lines.append(f"  computes: {self.rule.summary}")
        return "\n".join(lines)


def explain(rule: Rule, graph: Graph) -> Explanation:
    """Say whether `rule` fires on `graph`, and if not, why not for the nearest candidate (the
    deepest failure, whether of the pattern or of the rewrite's own checks)."""
    view = GraphView(graph) if rule.view is None else rule.view(graph)
    names = rule.pattern.mnemonics()
    candidates = [n for n in _ops(view, graph) if names is None or n.name in names]
    best: Fail | None = None
    best_node: Node | None = None
    fires: list[Node] = []
    declined: list[Node] = []
    near = 0
    scratch = (GraphView(graph), Namer(graph))  # built once: a rewrite only reads them
    for n in candidates:
        m = match_node(rule.pattern, n, view)
        if isinstance(m, Match):
            m = _accepts(rule, m, view, scratch)
            if m is True:
                fires.append(n)
                continue
            if m is None:
                declined.append(n)
                continue
        near += rule.near_miss(m)
        if best is None or m.score > best.score:
            best, best_node = m, n
    count = len(candidates)
    if fires:
        return Explanation(rule, True, count, len(fires), fires[0], None, len(declined), near)
    if declined and best is None:
        return Explanation(rule, False, count, 0, declined[0], None, len(declined), near)
    return Explanation(rule, False, count, 0, best_node, best, len(declined), near)


def _ops(view: object, graph: Graph) -> list[Node]:
    """The ops the rule's view shows (a view may hide some, e.g. widening casts)."""
    ops = getattr(view, "graph_ops", None)
    return graph.ops if ops is None else ops


def _accepts(rule: Rule, m: Match, view: MatchEnv, scratch) -> bool | Fail | None:
    """Run the rewrite on a scratch rewriter (nothing is committed): True when it fires, its
    Fail (or None) when it declines."""
    rw = Rewriter(scratch[0], m.root, scratch[1], PassContext(), view)
    out = rule.rewrite(m, rw)
    if out is None or isinstance(out, Fail):
        return out
    if isinstance(out, Replace):
        return any(old != new for old, new in out.pairs) or None
    values = out if isinstance(out, tuple) else (out,)
    return not any(v in m.root.results for v in values) or None


def _ops_text(rule: Rule) -> str:
    names = rule.pattern.mnemonics()
    if names is None:
        return "(any)"
    return "|".join(sorted(names)) if len(names) <= 4 else f"{{{len(names)} mnemonics}}"
