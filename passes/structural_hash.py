"""Structural hashing: signatures of ops and graphs that ignore value names and locations.

`op_signature(node)` hashes what a kernel compiled for the op depends on: the mnemonic, the
attributes (strictly typed: `1` differs from `1.0`, `-0.0` from `0.0`), the operand and result
types, and for ops with a nested body (`fused.kernel`) the body's structure. Two layers built from
the same code therefore give equal signatures, whatever their values are called or where they
came from. `graph_signature(g)` does the same for a whole graph (inputs by position, operands by
definition index; input roles count, names do not).

`kernel_signatures(g)` returns the distinct signatures of a graph's ops with their counts, in order
of first appearance: the number of distinct kernels a backend has to compile.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sympy

from ir import Graph, Node, TensorType
from ir.printer import node_text

__all__ = [
    "KernelSignature",
    "attr_key",
    "graph_signature",
    "kernel_signatures",
    "op_key",
    "op_signature",
]


def attr_key(v: Any) -> Any:
    """A hashable key of an attribute value, equal exactly when the values are interchangeable."""
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, int):
        return ("i", v)
    if isinstance(v, float):
        return ("f", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, (tuple, list)):
        return ("t",) + tuple(attr_key(x) for x in v)
    if isinstance(v, Graph):
        return ("g", graph_signature(v))
    if isinstance(v, sympy.Expr):
        return ("s", v)  # dims are canonical (ir.symbolic.canon_dim): equal means ==
    return (type(v).__name__, v)


def _type_key(t: TensorType) -> tuple:
    return (t.dtype.value,) + tuple(attr_key(d) for d in t.shape)


def op_key(node: Node) -> tuple:
    """Everything about the op itself except its operand/result identities and location."""
    attrs = tuple((k, attr_key(v)) for k, v in node.op.attrs.items())
    return (node.name, attrs)


def _digest(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def op_signature(node: Node) -> str:
    """16 hex digits identifying the op up to value names and locations."""
    ins = tuple(_type_key(v.type) for v in node.operands)
    outs = tuple(_type_key(v.type) for v in node.results)
    return _digest((op_key(node), ins, outs))


def graph_signature(g: Graph) -> str:
    """16 hex digits identifying the graph up to value names, graph name and locations."""
    index: dict[str, int] = {}
    parts: list[Any] = []
    for i, v in enumerate(g.inputs):
        index[v.name] = i
        parts.append(("in", _type_key(v.type), g.roles.get(v.name)))
    for n in g.ops:
        ops = tuple(index.get(v.name, -1) for v in n.operands)
        outs = tuple(_type_key(v.type) for v in n.results)
        parts.append((op_key(n), ops, outs))
        for r in n.results:
            index[r.name] = len(index)
    parts.append(("out", tuple(index.get(v.name, -1) for v in g.outputs)))
    return _digest(tuple(parts))


@dataclass(frozen=True)
class KernelSignature:
    """One distinct op signature: how often it occurs and the first op that has it."""

    signature: str
    count: int
    example: str  # the first op's text, location included


def kernel_signatures(g: Graph, *, mnemonics: Iterable[str] | None = None) -> list[KernelSignature]:
    """Distinct op signatures of `g` (optionally only of some mnemonics) with their counts."""
    keep = None if mnemonics is None else set(mnemonics)
    counts: dict[str, int] = {}
    first: dict[str, Node] = {}
    for n in g.ops:
        if keep is not None and n.name not in keep:
            continue
        sig = op_signature(n)
        counts[sig] = counts.get(sig, 0) + 1
        first.setdefault(sig, n)
    return [
        KernelSignature(s, c, node_text(first[s]).split("\n")[0].strip()) for s, c in counts.items()
    ]
