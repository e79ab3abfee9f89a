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
from passes.pattern import Fail, Match, Rule, match_node, node_line
from passes.rewrite import GraphView, Namer, Rewriter

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
    declined: int = 0  # ops where the pattern matched but the rewrite returned None

    def __str__(self) -> str:
        name = self.rule.name
        ops = _ops_text(self.rule)
        if self.fires:
            return f"rule {name} fires on {self.matches} op(s); first: {node_line(self.node)}"
        head = f"rule {name} does not fire ({self.candidates} candidate {ops} ops)"
        if self.candidates == 0:
            return f"{head}: the graph has no {ops} op\n  pattern: {self.rule.pattern.describe()}"
        lines = [head]
        if self.node is not None:
            lines.append(f"  nearest: {node_line(self.node)}")
        if self.declined and self.fail is None:
            lines.append(f"  the pattern matches {self.declined} op(s) but the rewrite declines")
        if self.fail is not None:
            f = self.fail
            lines.append(f"  failed at {f.path} after {f.score} checks: {f.reason}")
            if f.node is not None and f.node is not self.node:
                lines.append(f"  there: {node_line(f.node)}")
            elif f.node is None and f.value is not None:
                lines.append(f"  there: graph input %{f.value.name}: {f.value.type}")
            if f.parent is not None and f.parent is not self.node:
                lines.append(f"  operand of: {node_line(f.parent)}")
        lines.append(f"  pattern: {self.rule.pattern.describe()}")
        return "\n".join(lines)


def explain(rule: Rule, graph: Graph) -> Explanation:
    """Say whether `rule` fires on `graph`, and if not, why not for the nearest candidate."""
    view = GraphView(graph)
    names = rule.pattern.mnemonics()
    candidates = [n for n in graph.ops if names is None or n.name in names]
    best: Fail | None = None
    best_node: Node | None = None
    fires: list[Node] = []
    declined: list[Node] = []
    for n in candidates:
        m = match_node(rule.pattern, n, view)
        if isinstance(m, Match):
            (fires if _accepts(rule, m, view, graph) else declined).append(n)
        elif best is None or m.score > best.score:
            best, best_node = m, n
    if fires:
        return Explanation(rule, True, len(candidates), len(fires), fires[0], None, len(declined))
    if declined:
        return Explanation(rule, False, len(candidates), 0, declined[0], None, len(declined))
    return Explanation(rule, False, len(candidates), 0, best_node, best)


def _accepts(rule: Rule, m: Match, view: GraphView, graph: Graph) -> bool:
    """Run the rewrite on a scratch rewriter (nothing is committed); True unless it declines."""
    rw = Rewriter(view, m.root, Namer(graph), PassContext())
    out = rule.rewrite(m, rw)
    if out is None:
        return False
    values = out if isinstance(out, tuple) else (out,)
    return not any(v in m.root.results for v in values)


def _ops_text(rule: Rule) -> str:
    names = rule.pattern.mnemonics()
    if names is None:
        return "(any)"
    return "|".join(sorted(names)) if len(names) <= 4 else f"{{{len(names)} mnemonics}}"
