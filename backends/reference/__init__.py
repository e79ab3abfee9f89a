"""The reference backend: runs a graph op by op with each op's torch reference semantics.

It is the oracle every other backend is checked against, and the fallback the Triton runtime
uses for ops it has no kernel for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ir
from backends.base import KernelRecord, Support, feed_inputs
from backends.targets import Target, get_target

__all__ = ["ReferenceBackend", "ReferenceExecutable", "run_node"]


def run_node(node: ir.Node, inputs: list[Any], env: dict, device: Any = None) -> tuple[Any, ...]:
    """Run one node with its torch reference, symbols in attributes bound from `env`."""
    op = node.op.bind(env)
    return op.reference(*inputs) if inputs else op.reference(device=device)


class ReferenceExecutable:
    def __init__(self, graph: ir.Graph, target: Target) -> None:
        self.graph = graph
        self.target = target

    def __call__(self, *args: Any, params: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
        feed, env = feed_inputs(self.graph, args, params)
        values = {v.name: t for v, t in zip(self.graph.inputs, feed)}
        device = next((t.device for t in feed if hasattr(t, "device")), None)
        for node in self.graph.ops:
            outs = run_node(node, [values[v.name] for v in node.operands], env, device)
            values.update({r.name: t for r, t in zip(node.results, outs)})
        return tuple(values[v.name] for v in self.graph.outputs)

    def kernel_records(self) -> list[KernelRecord]:
        """None: every op runs its torch reference."""
        return []

    def report(self) -> dict[str, Any]:
        return {
            "backend": "reference",
            "target": self.target.name,
            "ops": len(self.graph.ops),
            "fallbacks": {},
        }


class ReferenceBackend:
    """Every registered op is supported: its `reference` is the definition."""

    name = "reference"

    def supports(self, node: ir.Node) -> Support:
        return True if node.name in ir.OPS else f"{node.name} is not a registered op"

    def compile(self, graph: ir.Graph, target: str | Target = "cpu") -> ReferenceExecutable:
        return ReferenceExecutable(graph, get_target(target))
