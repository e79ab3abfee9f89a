"""Graph views: `to_networkx(g)` and `to_dot(g)` (Graphviz text; `render_svg` only if `dot` is
installed — no Python dependency), and `region_view(g, module)`: one module's ops as a small
layered DAG (JSON-able, drawn by the report)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable

from ir.core import Graph, Node
from ir.printer import type_text

__all__ = ["region_view", "render_svg", "to_dot", "to_networkx"]


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


def _in_module(module: str, prefix: str) -> bool:
    return not prefix or module == prefix or module.startswith(prefix + ".")


def region_view(
    g: Graph, module: str = "", *, by_line: bool = False, keep: Callable[[Node], bool] | None = None
) -> dict:
    """The ops whose module path is `module` or below it, as a layered DAG for a picture.

    Nodes are single ops, or with `by_line` the ops of one source line (a captured layer has
    hundreds of ops but a few dozen lines). Ops failing `keep` (say, views that launch nothing)
    are left out and their operands' producers wired through. Groups that feed each other (a
    line used twice) are merged so the picture stays acyclic. Returns JSON: `{"module", "ops",
    "nodes": [{"label", "detail", "ops", "category", "rank"}], "edges": [[i, j], ...]}` with
    `rank` the longest path from a source (the row to draw the node in).
    """
    import networkx as nx

    members = [n for n in g.ops if _in_module(n.loc.module if n.loc else "", module)]
    G = nx.DiGraph()
    ops_of: dict[object, list[Node]] = {}
    sources: dict[str, set] = {}  # value name -> the picture nodes it comes from
    for i, n in enumerate(members):
        srcs = set().union(*(sources.get(v.name, ()) for v in n.operands))
        if keep is not None and not keep(n):
            for r in n.results:
                sources[r.name] = srcs
            continue
        k = (n.loc.module, n.loc.source) if by_line and n.loc else i
        ops_of.setdefault(k, []).append(n)
        G.add_node(k)
        G.add_edges_from((src, k) for src in srcs if src != k)
        for r in n.results:
            sources[r.name] = {k}
    dag = nx.condensation(G)  # merges groups on a cycle
    rank: dict[int, int] = {}
    for c in nx.topological_sort(dag):
        rank[c] = max((rank[p] + 1 for p in dag.predecessors(c)), default=0)
    order = {id(n): i for i, n in enumerate(members)}
    ops_in = {  # each picture node's ops in program order
        c: sorted(
            (n for k in dag.nodes[c]["members"] for n in ops_of[k]), key=lambda n: order[id(n)]
        )
        for c in dag.nodes
    }
    nodes = []  # by row, then by program order within the row
    for c in sorted(dag.nodes, key=lambda c: (rank[c], order[id(ops_in[c][0])])):
        nodes.append({"id": c, "rank": rank[c], **_describe(ops_in[c], by_line)})
    index = {node.pop("id"): i for i, node in enumerate(nodes)}
    edges = sorted([index[a], index[b]] for a, b in dag.edges)
    return {"module": module, "ops": len(members), "nodes": nodes, "edges": edges}


def _category(name: str) -> str:
    if name.startswith(("attn.", "moe.", "hc.")):
        return "semantic"
    if name == "fused.kernel":
        return "fused"
    if name in ("matmul", "grouped_mm"):
        return "gemm"
    return "other"


def _describe(ops: list, by_line: bool) -> dict:
    """Label, detail line, op count and category of one picture node."""
    names = Counter(n.name for n in ops)
    cats = {_category(n) for n in names}
    category = next(c for c in ("semantic", "fused", "gemm", "other") if c in cats)
    if by_line or len(ops) > 1:
        loc = ops[0].loc
        where = f"{loc.module.rsplit('.', 1)[-1] or '·'} @ {loc.source}" if loc else "?"
        detail = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in names.most_common(4))
        return {"label": where, "detail": detail, "ops": len(ops), "category": category}
    n = ops[0]
    detail = f"{len(n.attrs['body'].ops)} ops" if n.name == "fused.kernel" else ""
    if n.name == "attn.sparse_mqa":
        detail = n.attrs.get("variant", "")
    return {"label": n.name, "detail": detail, "ops": 1, "category": category}
