"""Scheduling: the graph of kernel ops, one launch each, in a topological order.

After fusion every op of the graph is one of:
- `template`  a semantic op with a hand-written kernel (attn.*, moe.*, hc.*);
- `fused`     a `fused.kernel` of elementwise/reduction ops (generated code);
- `gemm`      `matmul`/`grouped_mm`, or a `fused.kernel` whose body starts with a matmul (epilogue);
- `primitive` any other op left alone (slice, concat, topk, a lone add, ...): one launch;
- `free`      views and 0-d constants: no launch (the runtime aliases or passes a scalar); also
              permutes read only as a GEMM's B operand (read through strides, `x @ w.T`).

The pass chooses between the given order and a *sunk* order — every op moved to just before its
first reader, so weight transposes and RoPE tables are made when needed instead of at the top —
whichever needs fewer activation bytes at the planning bindings (`memory_plan.plan`). Both are
topological. The `Schedule` (launches in order, each with its symbolic cost) goes to
`ctx.products["schedule"]`; counters: `schedule.launches`, `schedule.<category>`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from ir import Cost, Graph, Node
from passes.context import PassContext
from passes.cost import evaluate, gemm_operand_views, is_free, kernel_cost
from passes.memory_plan import plan

__all__ = ["Launch", "Schedule", "build_schedule", "category", "schedule", "sunk_order"]


def category(node: Node) -> str:
    """template | fused | gemm | primitive | free (see the module docstring)."""
    if is_free(node):
        return "free"
    if node.name.startswith(("attn.", "moe.", "hc.")):
        return "template"
    if node.name in ("matmul", "grouped_mm"):
        return "gemm"
    if node.name == "fused.kernel":
        body = node.attrs["body"]
        return "gemm" if body.ops and body.ops[0].name == "matmul" else "fused"
    return "primitive"


@dataclass(frozen=True)
class Launch:
    index: int  # position of the op in the scheduled graph
    node: Node
    category: str

    @property
    def cost(self) -> Cost:
        """Flops and bytes moved (symbolic; `passes.cost.evaluate` binds them)."""
        return kernel_cost(self.node)


@dataclass(frozen=True)
class Schedule:
    """The launches of a scheduled graph, in order (free ops are not launches)."""

    launches: tuple[Launch, ...]
    free_ops: int

    @property
    def count(self) -> int:
        return len(self.launches)

    def by_category(self) -> Counter[str]:
        return Counter(launch.category for launch in self.launches)

    def totals(self, env: Mapping[str, int]) -> tuple[int, int]:
        """Flops and bytes moved by all launches at the given symbol values."""
        costs = [launch.cost for launch in self.launches]
        return sum(evaluate(c.flops, env) for c in costs), sum(
            evaluate(c.bytes, env) for c in costs
        )

    def summary(self) -> str:
        cats = ", ".join(f"{k} {v}" for k, v in sorted(self.by_category().items()))
        return f"{self.count} launches ({cats}); {self.free_ops} free ops"


def build_schedule(g: Graph) -> Schedule:
    """The launches of `g` in its current order."""
    launches = []
    free = 0
    views = gemm_operand_views(g)
    for i, n in enumerate(g.ops):
        cat = "free" if n.results and n.results[0].name in views else category(n)
        if cat == "free":
            free += 1
            continue
        launches.append(Launch(i, n, cat))
    return Schedule(tuple(launches), free)


def sunk_order(g: Graph) -> list[Node]:
    """Every op just before its first reader's position. Topological: a producer's key (its
    first reader's position) is below that reader's own key; ops sharing a key are independent,
    and the one that came first goes last (closest to the reader)."""
    first_use: dict[str, int] = {}
    for i, n in enumerate(g.ops):
        for v in n.operands:
            first_use.setdefault(v.name, i)
    keys = []
    for i, n in enumerate(g.ops):
        uses = [first_use[r.name] for r in n.results if r.name in first_use]
        keys.append((min(uses), 0, -i) if uses else (i, 1, -i))  # unread ops after their inputs
    return [g.ops[-key[2]] for key in sorted(keys)]


def schedule(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Pass: pick the order with the smaller activation plan; record the launches."""
    bindings = ctx.options.get("bindings") if ctx is not None else None
    sunk = Graph(g.inputs, sunk_order(g), g.outputs, name=g.name, roles=dict(g.roles))
    if plan(sunk, bindings).peak_bytes < plan(g, bindings).peak_bytes:
        g = sunk
        if ctx is not None:
            ctx.count("schedule.sunk")
    result = build_schedule(g)
    if ctx is not None:
        ctx.products["schedule"] = result
        ctx.count("schedule.launches", result.count)
        for cat, n in result.by_category().items():
            ctx.count(f"schedule.{cat}", n)
        if ctx.stats:
            ctx.log(f"schedule: {len(g.ops)} ops -> {result.summary()}")
    return g
