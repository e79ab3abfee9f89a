"""Cache updates written into the caller's buffers (`Graph.aliases`), shared by the runtimes.

An aliased output is a result of an update op (`passes.memory_plan.UPDATES`: `index_put`,
`index_put_multi`, `attn.compress_step`) that is a copy of one of its operands with some elements
rewritten, and that operand is a graph input read by this op alone (verifier rule 9). The runtimes
run such a *writer* through `update_call`:

- in place (`inplace=True`): the op writes into the operand's own tensor — the caller's — and
  returns it as the result. `index_put` copies (or adds) its rows with torch's in-place
  `index_copy_` / `index_add_`; backends pass their own writer for other ops (the compressor step
  writes its new state and, on a block boundary, one cache row); an op without one computes its
  result as usual and copies it into the caller's tensor;
- functional (`inplace=False`, the default of `dsv4c.compile`): the same writer runs on a copy of
  the operand, so the caller's tensor is left as it was (what eager PyTorch does).

An updated operand whose result is not aliased (a state of a compressor step whose cache is
aliased but not its state, say) is always copied first: only aliased outputs touch the caller's
memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ir
from passes.memory_plan import UPDATES

__all__ = ["Writer", "aliased_results", "index_put_writer", "update_call"]

# Writes a node's updated results into the buffers of their operands (inputs[k] for each
# updated operand k, tensors it may overwrite) and returns all of the node's results.
Writer = Callable[[list[Any]], tuple[Any, ...]]
Call = Callable[[Sequence[Any]], tuple[Any, ...]]


def aliased_results(graph: ir.Graph) -> dict[int, tuple[int, ...]]:
    """Op index -> indices of its results that graph outputs written in place (`aliases`)."""
    if not graph.aliases:
        return {}
    where = {r.name: (i, j) for i, n in enumerate(graph.ops) for j, r in enumerate(n.results)}
    out: dict[int, list[int]] = {}
    for k in sorted(graph.aliases):
        name = graph.outputs[k].name
        if name in where:  # an input returned as it is needs no writer
            i, j = where[name]
            out.setdefault(i, []).append(j)
    return {i: tuple(sorted(js)) for i, js in out.items()}


def update_call(
    node: ir.Node, aliased: tuple[int, ...], call: Call, writer: Writer | None, inplace: bool
) -> Call:
    """`call` (the node's functional implementation) as a writer of its updated operands (see
    the module docstring): in place for the `aliased` results when `inplace`, else on copies."""
    updates = UPDATES[node.name]
    fresh = tuple(k for r, k in updates.items() if not inplace or r not in aliased)
    if writer is None:
        if not inplace:
            return call  # the functional result is already a new tensor
        return _copy_back(call, tuple((r, updates[r]) for r in aliased))

    def run(inputs: Sequence[Any]) -> tuple[Any, ...]:
        ins = list(inputs)
        for k in fresh:
            ins[k] = ins[k].clone()
        return writer(ins)

    return run


def _copy_back(call: Call, pairs: tuple[tuple[int, int], ...]) -> Call:
    """The result computed as usual, then copied into the operand's buffer (ops with no writer)."""

    def run(inputs: Sequence[Any]) -> tuple[Any, ...]:
        outs = list(call(inputs))
        for r, k in pairs:
            inputs[k].copy_(outs[r])
            outs[r] = inputs[k]
        return tuple(outs)

    return run


def index_put_writer(node: ir.Node) -> Writer | None:
    """`index_put` into x's own buffer: only the indexed rows are written. None for fp8 (torch
    has no in-place index_copy for it; the copy-back path runs instead)."""
    if node.name != "index_put" or node.operands[0].dtype.value.startswith("f8"):
        return None
    dim, accumulate = node.op.dim, node.op.accumulate

    def write(ins: list[Any]) -> tuple[Any, ...]:
        x, idx, values = ins
        if accumulate:
            return (x.index_add_(dim, idx.long(), values),)
        return (x.index_copy_(dim, idx.long(), values),)

    return write
