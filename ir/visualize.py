"""Graph views: `to_networkx(g)` and `to_dot(g)` (Graphviz text; `render_svg` only if `dot` is
installed — no Python dependency)."""

from __future__ import annotations

import json
import shutil
import subprocess

from ir.core import Graph
from ir.printer import type_text

__all__ = ["to_networkx", "to_dot", "render_svg"]


def to_networkx(g: Graph):
    """A `networkx.MultiDiGraph`: nodes `("input", name)`, `("op", index)`, `("output", i)`;
    one edge per use, with `value` (name), `type` (text) and `port` (operand position)."""
    import networkx as nx

    G = nx.MultiDiGraph(name=g.name or "")
    producer: dict[str, tuple] = {}
    for v in g.inputs:
        key = ("input", v.name)
        G.add_node(
            key, kind="input", label=f"%{v.name}", role=g.roles.get(v.name), type=type_text(v.type)
        )
        producer[v.name] = key
    for i, n in enumerate(g.ops):
        key = ("op", i)
        G.add_node(
            key,
            kind="op",
            label=n.name,
            mnemonic=n.name,
            op_kind=n.kind.value,
            attrs=dict(n.attrs),
            loc=n.loc,
        )
        for port, v in enumerate(n.operands):
            G.add_edge(producer[v.name], key, value=v.name, type=type_text(v.type), port=port)
        for r in n.results:
            producer[r.name] = key
    for i, v in enumerate(g.outputs):
        key = ("output", i)
        G.add_node(key, kind="output", label=f"return {i}")
        G.add_edge(producer[v.name], key, value=v.name, type=type_text(v.type), port=0)
    return G


def _q(s: str) -> str:
    return json.dumps(s)  # a valid DOT quoted string (escapes quotes, backslashes, newlines)


def to_dot(g: Graph) -> str:
    """Graphviz DOT text: inputs as ellipses, ops as boxes labelled with mnemonic and attrs."""
    lines = [f"digraph {_q(g.name or 'graph')} {{", "  rankdir=TB;", "  node [fontname=monospace];"]
    producer: dict[str, str] = {}
    for i, v in enumerate(g.inputs):
        lines.append(f"  in{i} [shape=ellipse, label={_q(f'%{v.name}: {type_text(v.type)}')}];")
        producer[v.name] = f"in{i}"
    for i, n in enumerate(g.ops):
        attrs = ", ".join(f"{k}={v}" for k, v in n.attrs.items() if not isinstance(v, Graph))
        label = n.name + (f"\n{attrs}" if attrs else "")
        lines.append(f"  op{i} [shape=box, label={_q(label)}];")
        for v in n.operands:
            lines.append(
                f"  {producer[v.name]} -> op{i} [label={_q(f'%{v.name}: {type_text(v.type)}')}];"
            )
        for r in n.results:
            producer[r.name] = f"op{i}"
    for i, v in enumerate(g.outputs):
        lines.append(f"  out{i} [shape=doubleoctagon, label={_q(f'return {i}')}];")
        lines.append(f"  {producer[v.name]} -> out{i} [label={_q('%' + v.name)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(g: Graph) -> str | None:
    """SVG text via the `dot` program, or None when Graphviz is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "-Tsvg"], input=to_dot(g), capture_output=True, text=True, check=True
    )
    return out.stdout
