"""Dead-code elimination and common-subexpression elimination (graph-wide, one walk each).

Every IR op is pure (functional updates such as `index_put` return new tensors), so an op none of
whose results is used is dead, and two ops with the same mnemonic, attributes, operands and result
types compute the same values.
"""

from __future__ import annotations

from ir import Graph, Node, Value
from passes.context import PassContext
from passes.structural_hash import op_key

__all__ = ["common_subexpression_elimination", "dead_code_elimination"]


def dead_code_elimination(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Drop ops whose results are unused. Graph outputs count as uses; inputs are kept even if
    unused (they are the graph's interface). Counts removed ops as `dce`."""
    live = {v.name for v in g.outputs}
    kept: list[Node] = []
    for n in reversed(g.ops):
        if not any(r.name in live for r in n.results):
            continue
        kept.append(n)
        live.update(v.name for v in n.operands)
    if len(kept) == len(g.ops):
        return g
    if ctx is not None:
        ctx.count("dce", len(g.ops) - len(kept))
    kept.reverse()
    return Graph(g.inputs, kept, g.outputs, name=g.name, roles=dict(g.roles))


def common_subexpression_elimination(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Merge ops equal in mnemonic, attributes (strictly: `1` vs `1.0` differ), operands and
    result types; the first one (and its location) is kept. Counts merged ops as `cse`."""
    seen: dict[tuple, Node] = {}
    op_keys: dict[int, tuple] = {}  # id(op) -> op_key(op): ops are often shared between nodes
    remap: dict[str, Value] = {}
    out: list[Node] = []
    for n in g.ops:
        if remap and any(v.name in remap for v in n.operands):
            n = Node(n.op, tuple(remap.get(v.name, v) for v in n.operands), n.results, n.loc)
        okey = op_keys.get(id(n.op))
        if okey is None:
            okey = op_keys[id(n.op)] = op_key(n)
        key = (
            okey,
            tuple(v.name for v in n.operands),
            tuple(r.type for r in n.results),
        )
        first = seen.get(key)
        if first is None:
            seen[key] = n
            out.append(n)
            continue
        for r, s in zip(n.results, first.results):
            remap[r.name] = s
    if not remap:
        return g
    if ctx is not None:
        ctx.count("cse", len(g.ops) - len(out))
    outputs = [remap.get(v.name, v) for v in g.outputs]
    return Graph(g.inputs, out, outputs, name=g.name, roles=dict(g.roles))
