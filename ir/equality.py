"""Structural equality of graphs (TVM `assert_structural_equal` style).

Two graphs are equal when they have the same name, inputs (names, types, roles), ops in the same
order (mnemonic, attributes — nested graphs recursively, NaN equal to NaN, `1` unequal to `1.0` —,
operands, results and locations), outputs and aliases. With `names=False`, value names may differ
(alpha-equivalence): values are matched by position of definition; input names still count
because they are the graph's interface (parameter names).
"""

from __future__ import annotations

import math
from typing import Any

import sympy

from ir.core import Graph
from ir.printer import node_text, type_text

__all__ = ["structurally_equal", "assert_structural_equal", "first_difference"]


def structurally_equal(a: Graph, b: Graph, *, names: bool = True, locs: bool = True) -> bool:
    return first_difference(a, b, names=names, locs=locs) is None


def assert_structural_equal(a: Graph, b: Graph, *, names: bool = True, locs: bool = True) -> None:
    """Raise AssertionError describing the first difference, with both sides marked."""
    diff = first_difference(a, b, names=names, locs=locs)
    if diff is not None:
        raise AssertionError(diff)


def first_difference(a: Graph, b: Graph, *, names: bool = True, locs: bool = True) -> str | None:
    where, what = _diff(a, b, {}, names, locs, "")
    if where is None:
        return None
    return f"graphs differ at {where}: {what}\n{_context(a, b, where)}"


def _diff(a: Graph, b: Graph, env: dict, names: bool, locs: bool, path: str):
    if a.name != b.name:
        return f"{path}graph name", f"{a.name!r} != {b.name!r}"
    if len(a.inputs) != len(b.inputs):
        return f"{path}inputs", f"{len(a.inputs)} inputs != {len(b.inputs)}"
    env = dict(env)
    for i, (x, y) in enumerate(zip(a.inputs, b.inputs)):
        if x.name != y.name or x.type != y.type or a.roles.get(x.name) != b.roles.get(y.name):
            left = f"%{x.name}: {type_text(x.type)} {a.roles.get(x.name)}"
            right = f"%{y.name}: {type_text(y.type)} {b.roles.get(y.name)}"
            return f"{path}input {i}", f"{left} != {right}"
        env[x.name] = y.name
    for i, (n, m) in enumerate(zip(a.ops, b.ops)):
        what = _node_diff(n, m, env, names, locs, f"{path}op {i}/")
        if what is not None:
            return f"{path}op {i}", what
        for r, s in zip(n.results, m.results):
            env[r.name] = s.name
    if len(a.ops) != len(b.ops):
        return f"{path}op {min(len(a.ops), len(b.ops))}", f"{len(a.ops)} ops != {len(b.ops)} ops"
    outs_a = [env.get(v.name, "?" + v.name) for v in a.outputs]
    outs_b = [v.name for v in b.outputs]
    if outs_a != outs_b:
        return f"{path}return", f"outputs {[v.name for v in a.outputs]} != {outs_b}"
    if a.aliases != b.aliases:
        return f"{path}return", f"aliases {a.aliases} != {b.aliases}"
    return None, None


def _node_diff(n, m, env: dict, names: bool, locs: bool, path: str) -> str | None:
    if n.op.mnemonic != m.op.mnemonic:
        return f"op {n.op.mnemonic} != {m.op.mnemonic}"
    ops_a = [env.get(v.name, "?" + v.name) for v in n.operands]
    ops_b = [v.name for v in m.operands]
    if ops_a != ops_b:
        return f"operands {['%' + v.name for v in n.operands]} != {['%' + v for v in ops_b]}"
    if len(n.results) != len(m.results):
        return f"{len(n.results)} results != {len(m.results)}"
    for r, s in zip(n.results, m.results):
        if r.type != s.type or (names and r.name != s.name):
            return f"result %{r.name}: {type_text(r.type)} != %{s.name}: {type_text(s.type)}"
    for k, va in n.op.attrs.items():
        vb = m.op.attrs.get(k)
        what = _attr_diff(va, vb, names, locs, path)
        if what is not None:
            return f"attribute {k}: {what}"
    if locs and n.loc != m.loc:
        return f"loc {n.loc} != {m.loc}"
    return None


def _attr_diff(a: Any, b: Any, names: bool, locs: bool, path: str) -> str | None:
    if isinstance(a, Graph) and isinstance(b, Graph):
        where, what = _diff(a, b, {}, names, locs, path)
        return None if where is None else f"nested graph differs at {where}: {what}"
    if _same(a, b):
        return None
    return f"{a!r} != {b!r}"


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b) and not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _context(a: Graph, b: Graph, where: str) -> str:
    """Both sides around the differing top-level op, marked with >>>."""
    head = where.split("/")[0]
    index = int(head.split()[1]) if head.startswith("op ") else None
    out = []
    for label, g in (("left", a), ("right", b)):
        out.append(f"  {label}:")
        if index is None:
            out.append(f"    {where}")
            continue
        for j in range(max(0, index - 3), min(len(g.ops), index + 3)):
            mark = ">>> " if j == index else "    "
            out.append(f"  {mark}{node_text(g.ops[j]).splitlines()[0]}")
        if index >= len(g.ops):
            out.append("  >>> (no op here)")
    return "\n".join(out)
