"""`dsv4c ir`: the IR of a captured method after any pipeline pass, and `--explain RULE`.

The pipeline runs once with a recording `PassContext` that keeps the graph after each pass;
`--after capture` is the graph as captured, `--after pipeline` the final one.
"""

from __future__ import annotations

from typing import Any

import ir
from dsv4c.errors import DsvError
from passes.context import Pass, PassContext

__all__ = ["RecordingContext", "graphs_by_pass", "show_ir"]


class RecordingContext(PassContext):
    """A `PassContext` that also keeps the graph after each pass, by pass name."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.after: dict[str, ir.Graph] = {}

    def run(self, name: str, fn: Pass, graph: ir.Graph) -> ir.Graph:
        out = super().run(name, fn, graph)
        self.after[name] = out
        return out


def graphs_by_pass(module: Any, method: str, spec: Any) -> tuple[dict[str, ir.Graph], PassContext]:
    """{"capture": g0, <pass>: graph after it, ..., "pipeline": final} and the context."""
    import frontend
    import passes

    g0 = frontend.capture(module, spec.inputs, dynamic=spec.dynamic, method=method)
    ctx = RecordingContext(options={"bindings": dict(spec.bindings or {})})
    final = passes.pipeline(g0, ctx=ctx)
    return {"capture": g0, **ctx.after, "pipeline": final}, ctx


def show_ir(module: Any, method: str, spec: Any, *, after: str, explain: str | None) -> str:
    """The IR text after pass `after`, or, with `explain`, why that rule does or does not fire
    on the graph after `after` (default: the captured graph after canonicalisation)."""
    graphs, ctx = graphs_by_pass(module, method, spec)
    if explain is None:
        return ir.to_text(_pick(graphs, after))
    import passes

    if explain not in ctx.rules:
        known = ", ".join(sorted(ctx.rules)) or "(none)"
        raise DsvError(f"unknown rule {explain!r}; rules the pipeline ran: {known}")
    where = "canonicalize" if after == "pipeline" else after
    return str(passes.explain(ctx.rules[explain], _pick(graphs, where)))


def _pick(graphs: dict[str, ir.Graph], after: str) -> ir.Graph:
    if after not in graphs:
        raise DsvError(f"unknown pass {after!r}; passes: {', '.join(graphs)}")
    return graphs[after]
