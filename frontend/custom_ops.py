"""Custom ops (`torch.library`) the ATen table does not know.

In order of preference, a custom op found in an exported program
1. has a translator: `frontend.translates("ns::op")` registers one (a user hook; the table already
   knows `transformers::grouped_mm_fallback`);
2. has a decomposition: a `CompositeImplicitAutograd` kernel (torch's decompositions inline it) or
   an entry in `torch._decomp.decomposition_table` (`decompositions_for` adds it to the table
   `capture` runs);
3. otherwise stays whole as one `custom.call` op that runs the op's own implementation, its
   result types taken from the op's fake kernel. It is not compiled: `STATS=1` prints it at
   capture and the artifact's report lists it under `not_compiled`.

A custom op that mutates its inputs, or whose results are not tensors, cannot be kept whole and
raises `UnsupportedOpError` naming the op, the module path and the user's source line.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

import sympy
import torch

import ir

__all__ = ["decompositions_for", "is_custom", "opaque_call", "opaque_calls", "report_opaque"]

# torch's own op namespaces: their ops are translated, decomposed or unsupported, never kept whole
# (a collective kept whole would run outside dsv4c's own mesh handling)
_TORCH_NAMESPACES = {
    "aten", "prims", "prim", "quantized", "_quantized", "higher_order", "_c10d_functional",
    "c10d_functional", "_c10d_functional_autograd", "c10d", "_dtensor",
}  # fmt: skip


def is_custom(target: Any) -> bool:
    """An op registered through `torch.library` outside torch's own namespaces."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace not in _TORCH_NAMESPACES


def decompositions_for(targets: Iterable[Any]) -> dict[Any, Any]:
    """The registered decompositions (`torch._decomp.decomposition_table`) of these custom ops."""
    from torch._decomp import decomposition_table

    return {t: decomposition_table[t] for t in targets if is_custom(t) and t in decomposition_table}


def opaque_call(cx: Any, target: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    """One `custom.call` for `target(*args, **kwargs)`; args are already translated (IR values,
    sympy sizes). Raises TypeError (the caller names op, module and line) when it cannot."""
    if target._schema.is_mutable:
        raise TypeError(
            f"custom op {target.name()} mutates its inputs; dsv4c keeps only pure custom ops "
            "whole — declare it with mutates_args=() and return new tensors"
        )
    shapes, dtypes = _result_types(cx, target)
    encoder = _Encoder()
    call = {
        "args": [encoder.encode(a) for a in args],
        "kwargs": {k: encoder.encode(v) for k, v in kwargs.items()},
    }
    out = cx.op(
        "custom.call", *encoder.operands,
        target=_qualified(target), args=json.dumps(call, sort_keys=True), dims=tuple(encoder.dims),
        shapes=tuple(shapes), dtypes=tuple(dtypes),
    )  # fmt: skip
    results = out if isinstance(out, tuple) else (out,)
    val = cx.node.meta.get("val")
    return results if isinstance(val, (tuple, list)) else results[0]


def _result_types(cx: Any, target: Any) -> tuple[list, list]:
    val = cx.node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        raise TypeError(
            f"custom op {target.name()} returns {type(val).__name__}, not tensors (or it has no "
            "fake kernel); register one with @torch.library.register_fake returning tensors"
        )
    types = [cx.fake_type(v) for v in vals]
    return [t.shape for t in types], [t.dtype for t in types]


def _qualified(target: torch._ops.OpOverload) -> str:
    return f"{target.name()}.{target._overloadname}"


class _Encoder:
    """A call's arguments as JSON: tensors become operand slots, symbolic sizes dim slots."""

    def __init__(self) -> None:
        self.operands: list[ir.Value] = []
        self.dims: list[Any] = []

    def encode(self, v: Any) -> Any:
        if isinstance(v, ir.Value):
            self.operands.append(v)
            return {"operand": len(self.operands) - 1}
        if isinstance(v, sympy.Basic):
            self.dims.append(v)
            return {"dim": len(self.dims) - 1}
        if isinstance(v, (list, tuple)):
            return [self.encode(x) for x in v]
        if isinstance(v, torch.dtype):
            return {"dtype": ir.DType.from_torch(v).value}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(
            f"a custom op argument of type {type(v).__name__} ({v!r}) cannot be kept in the "
            "graph; pass tensors, numbers, strings, dtypes or lists of them"
        )


def opaque_calls(graph: ir.Graph) -> dict[str, dict[str, Any]]:
    """The `custom.call` ops of `graph`: {op: {"count": n, "locations": ["module (file:line)"]}}."""
    found: dict[str, dict[str, Any]] = {}
    for node in graph.ops:
        if node.name != "custom.call":
            continue
        row = found.setdefault(node.attrs["target"], {"count": 0, "locations": []})
        row["count"] += 1
        loc = node.loc
        where = f"{loc.module or '<root>'} ({loc.source})" if loc else "<unknown>"
        if where not in row["locations"]:
            row["locations"].append(where)
    return found


def report_opaque(graph: ir.Graph) -> dict[str, dict[str, Any]]:
    """`opaque_calls(graph)`, printed to stderr with `STATS=1`: these run eagerly, not compiled."""
    found = opaque_calls(graph)
    if found and os.environ.get("STATS", "") not in ("", "0"):
        counts = Counter({k: v["count"] for k, v in found.items()})
        print(
            f"capture {graph.name}: {sum(counts.values())} custom op call(s) kept whole, run "
            "eagerly by their own implementation (not compiled):",
            file=sys.stderr,
        )
        for op, row in found.items():
            print(f"  {op} x{row['count']} at {', '.join(row['locations'][:3])}", file=sys.stderr)
    return found
