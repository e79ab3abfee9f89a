"""A TVM executable's inputs for one call: runtime tensors from the arguments, parameters from
`params` by name, checked like `ir.interpret` checks them (count, dtype, rank, dims, symbols
bound consistently; errors name the input).

The parameters are checked once per set of tensor objects: a call passing the same tensors as
the last checked one (a bound state dict, decode step after decode step) checks only the runtime
inputs. That is only sound when no parameter has a symbolic dim (the parameters then bind no
symbol), so a graph with such a parameter checks everything on every call. A parameter tensor
resized in place (`resize_`) between calls is not noticed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import is_
from typing import Any

import ir
from ir.interpreter import InterpretError, SymbolBinder, bind_symbols

__all__ = ["Inputs"]


class Inputs:
    def __init__(self, graph: ir.Graph) -> None:
        role = graph.roles.get
        self.graph = graph
        self.runtime = [v for v in graph.inputs if role(v.name) != "parameter"]
        self.params = [v for v in graph.inputs if role(v.name) == "parameter"]
        # graph input i is runtime input k (True, k) or parameter k (False, k)
        counts = {True: 0, False: 0}
        self.order: list[tuple[bool, int]] = []
        for v in graph.inputs:
            is_runtime = role(v.name) != "parameter"
            self.order.append((is_runtime, counts[is_runtime]))
            counts[is_runtime] += 1
        self.symbolic_params = any(not isinstance(d, int) for v in self.params for d in v.shape)
        self.checked: tuple[Any, ...] | None = None  # the parameter tensors last checked
        self.bind_runtime = SymbolBinder(self.runtime)

    def feed(self, args: Sequence[Any], params: Mapping[str, Any] | None) -> tuple[list[Any], dict]:
        """All graph inputs in graph order and the symbol bindings from their shapes."""
        if len(args) != len(self.runtime):
            want = ", ".join(f"%{v.name}: {v.type}" for v in self.runtime)
            raise InterpretError(
                f"graph {self.graph.name or '<anonymous>'} takes {len(self.runtime)} positional "
                f"input(s) ({want}), got {len(args)}; pass parameters by name in params="
            )
        tensors = self._param_tensors(params or {})
        feed = [args[k] if is_runtime else tensors[k] for is_runtime, k in self.order]
        if self.symbolic_params or not _same(tensors, self.checked):
            env = bind_symbols(self.graph.inputs, feed)
            self.checked = tuple(tensors)
            return feed, env
        return feed, self.bind_runtime(args)

    def _param_tensors(self, params: Mapping[str, Any]) -> list[Any]:
        try:
            tensors = [params[v.name] for v in self.params]
        except KeyError:
            v = next(v for v in self.params if v.name not in params)
            raise InterpretError(
                f"missing parameter %{v.name}: {v.type}; pass it in params="
            ) from None
        if len(params) != len(self.params):
            names = {v.name for v in self.params}
            extra = ", ".join(sorted(k for k in params if k not in names)[:10])
            raise InterpretError(f"params has entries that are not graph parameters: {extra}")
        return tensors


def _same(a: Sequence[Any], b: Sequence[Any] | None) -> bool:
    return b is not None and len(a) == len(b) and all(map(is_, a, b))
