"""Text form of graphs. `parse(to_text(g))` is structurally equal to `g`.

    graph prefill(%tokens: i64[B,T] activation, %w: f32[64,6] parameter) {
      %x: f32[B,T,64] = embedding(%emb, %tokens)  # embed @ model.py:88
      %7: f32[B,T,6], %8: i64[B,T,6] = topk(%5, k=6, dim=-1, largest=true, sorted=true)  # gate
      return %7, %8
    }

- Header: `graph NAME(` inputs `)` — each input `%name: type role`; one per line when the header
  would pass 100 columns. The name is optional (`graph (...)`).
- Ops: one per line, `%r: type[, %r2: type] = mnemonic(%operand, ..., attr=value, ...)`.
  Every attribute is printed, in field order.
- Types: `dtype[d0,d1,...]`, `f32[]` for 0-d; dims are ints or expressions (`T//4`, `Max(4, T)`).
- Attribute values: ints `-1`; floats always with a `.`/exponent or `inf`, `-inf`, `nan`;
  `true`/`false`; `none`; strings JSON-quoted `"sqrtsoftplus"`; dtypes by name `bf16`; lists
  `[0, 2, 1]` (tuples); dims as expressions `T - 1`; graphs inline as `graph NAME(...) { ... }`
  indented one level deeper; a nested graph has its own value scope (it sees only its inputs).
- Aliases: an output written into an input's buffer (`Graph.aliases`) is returned as
  `%new into %cache` (`return %logits, %283 into %cache.layers.0.attn.window_kv`).
- Provenance: trailing `# module.path @ file.py:line` (either part may be absent; parts containing
  `@`, `"` or surrounding spaces are JSON-quoted). Comments on their own line are ignored.
"""

from __future__ import annotations

import json
import math
from typing import Any

import sympy

from ir.core import Graph, Loc, Node, Value
from ir.symbolic import dim_str
from ir.types import DType, TensorType

__all__ = ["to_text", "node_text", "type_text", "attr_text", "loc_text"]

_WIDTH = 100


def to_text(g: Graph) -> str:
    """The graph as text (ends with a newline)."""
    return graph_text(g, "") + "\n"


def type_text(t: TensorType) -> str:
    return f"{t.dtype.value}[{','.join(dim_str(d) for d in t.shape)}]"


def graph_text(g: Graph, indent: str) -> str:
    name = f" {g.name}" if g.name is not None else ""
    ins = [f"%{v.name}: {type_text(v.type)} {g.roles.get(v.name, 'activation')}" for v in g.inputs]
    header = f"graph{name}({', '.join(ins)}) {{"
    if len(indent) + len(header) > _WIDTH:
        inner = indent + "    "
        header = f"graph{name}(\n" + "".join(f"{inner}{s},\n" for s in ins) + f"{indent}) {{"
    lines = [header]
    for n in g.ops:
        lines.append(node_text(n, indent + "  "))
    outs = ", ".join(_output_text(g, i, v) for i, v in enumerate(g.outputs))
    lines.append(f"{indent}  return {outs}".rstrip())
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _output_text(g: Graph, i: int, v: Value) -> str:
    into = g.aliases.get(i)
    return f"%{v.name}" if into is None else f"%{v.name} into %{into}"


def node_text(n: Node, indent: str = "") -> str:
    results = ", ".join(f"%{r.name}: {type_text(r.type)}" for r in n.results)
    args = [f"%{v.name}" for v in n.operands]
    args += [f"{k}={attr_text(v, indent)}" for k, v in n.op.attrs.items()]
    line = f"{indent}{results} = {n.op.mnemonic}({', '.join(args)})"
    if n.loc is not None:
        line += f"  {loc_text(n.loc)}"
    return line


def attr_text(v: Any, indent: str = "") -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, DType):
        return v.value
    if isinstance(v, sympy.Expr):
        return dim_str(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(attr_text(x, indent) for x in v) + "]"
    if isinstance(v, Graph):
        return graph_text(v, indent)
    raise TypeError(f"cannot print attribute value {v!r} of type {type(v).__name__}")


def _loc_part(s: str) -> str:
    plain = "@" not in s and '"' not in s and s == s.strip() and s.isprintable()
    return s if plain else json.dumps(s)


def loc_text(loc: Loc) -> str:
    text = "#"
    if loc.module:
        text += " " + _loc_part(loc.module)
    if loc.source or not loc.module:
        text += " @ " + _loc_part(loc.source) if loc.source else " @"
    return text


def value_text(v: Value) -> str:
    return f"%{v.name}: {type_text(v.type)}"
