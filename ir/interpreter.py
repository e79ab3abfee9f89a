"""Reference interpreter: run a graph op by op with each op's torch `reference`.

`interpret(g, *args, params=None, check=False)`:
- `args` are the non-parameter inputs ("activation" and "cache") in graph order;
- `params` maps parameter input names to tensors, exactly as `module.state_dict()` names them
  (entries that are not parameter inputs of the graph are an error unless `strict=False`);
- symbols are bound from input shapes: a dim that is a bare symbol binds it, a dim with exactly one
  unbound symbol is solved for it, every other dim is checked once all symbols are bound;
- symbols in attributes are replaced by their ints before `reference` runs;
- with `check=True` (or env `DSV4C_CHECK=1`) each op's outputs are checked against the recorded
  types (shape and dtype);
- runs on whatever device the input tensors are on (creation ops use the first input's device).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import sympy

from ir.core import Graph, Value
from ir.printer import type_text
from ir.symbolic import subs_dim

__all__ = ["interpret", "run_graph", "bind_symbols", "InterpretError", "SymbolBinder"]


class InterpretError(ValueError):
    """Inputs do not fit the graph, or an op produced something other than its recorded type."""


def interpret(
    g: Graph,
    *args: Any,
    params: Mapping[str, Any] | None = None,
    check: bool | None = None,
    strict: bool = True,
) -> tuple[Any, ...]:
    """Run `g`; returns its outputs as a tuple of tensors."""
    params = dict(params or {})
    runtime = [v for v in g.inputs if g.roles.get(v.name) != "parameter"]
    if len(args) != len(runtime):
        want = ", ".join(f"%{v.name}: {type_text(v.type)}" for v in runtime)
        raise InterpretError(
            f"graph {g.name or '<anonymous>'} takes {len(runtime)} positional input(s) "
            f"({want}), got {len(args)}; pass parameters by name in params="
        )
    feed: list[Any] = []
    it = iter(args)
    for v in g.inputs:
        if g.roles.get(v.name) != "parameter":
            feed.append(next(it))
            continue
        if v.name not in params:
            raise InterpretError(
                f"missing parameter %{v.name}: {type_text(v.type)}; "
                f"pass params={{'{v.name}': tensor}} (the module's state_dict() key)"
            )
        feed.append(params.pop(v.name))
    if params and strict:
        extra = ", ".join(sorted(params)[:10])
        raise InterpretError(
            f"params has {len(params)} entr(y/ies) that are not parameter inputs of the graph: "
            f"{extra}; remove them or pass strict=False"
        )
    if check is None:
        check = os.environ.get("DSV4C_CHECK", "") not in ("", "0")
    return run_graph(g, feed, check=check)


def run_graph(g: Graph, tensors: Sequence[Any], check: bool = False) -> tuple[Any, ...]:
    """Run `g` on tensors for all its inputs (in order)."""
    if len(tensors) != len(g.inputs):
        raise InterpretError(f"graph {g.name} takes {len(g.inputs)} inputs, got {len(tensors)}")
    env = bind_symbols(g.inputs, tensors)
    values: dict[str, Any] = {v.name: t for v, t in zip(g.inputs, tensors)}
    device = next((t.device for t in tensors if hasattr(t, "device")), None)
    for i, n in enumerate(g.ops):
        op = n.op.bind(env)
        ins = [values[v.name] for v in n.operands]
        outs = op.reference(*ins) if ins else op.reference(device=device)
        if len(outs) != len(n.results):
            raise InterpretError(
                f"op {i} ({n.name}) returned {len(outs)} tensors, expected {len(n.results)}"
            )
        if check:
            for r, t in zip(n.results, outs):
                _check(r, t, env, f"op {i} ({n.name}) result")
        for r, t in zip(n.results, outs):
            values[r.name] = t
    return tuple(values[v.name] for v in g.outputs)


def bind_symbols(inputs: Sequence[Value], tensors: Sequence[Any]) -> dict:
    """Bind shape symbols from tensors; check every input's dtype, rank and dims."""
    from ir.types import DType

    env: dict[sympy.Symbol, int] = {}
    pending: list[tuple[Value, int, sympy.Expr, int]] = []
    for v, t in zip(inputs, tensors):
        if not hasattr(t, "shape") or not hasattr(t, "dtype"):
            raise InterpretError(
                f"input %{v.name}: expected a tensor of type {type_text(v.type)}, "
                f"got {type(t).__name__}"
            )
        dtype = DType.from_torch(t.dtype)
        if dtype != v.type.dtype or t.dim() != v.type.rank:
            raise InterpretError(f"input %{v.name}: expected {type_text(v.type)}, got {_got(t)}")
        for axis, (d, size) in enumerate(zip(v.type.shape, t.shape)):
            size = int(size)
            if isinstance(d, int):
                if d != size:
                    raise InterpretError(
                        f"input %{v.name}: expected {type_text(v.type)}, got {_got(t)} (dim {axis})"
                    )
            elif d.is_Symbol and d not in env:
                env[d] = size
            else:
                pending.append((v, axis, d, size))
    _solve(pending, env)
    for v, axis, d, size in pending:
        if subs_dim(d, env) != size:
            raise InterpretError(
                f"input %{v.name} dim {axis}: expected {d} = {subs_dim(d, env)} (with "
                f"{_env_text(env)}), got {size}"
            )
    return env


class SymbolBinder:
    """`bind_symbols` for one list of inputs, remembered for the dtypes and shapes of the last
    tensors it accepted: what it checks and binds depends on nothing else, so a call with
    tensors like the last ones (decode step after decode step: ~30 cache tensors) costs one
    comparison of their metadata instead of the checks (~60 us)."""

    def __init__(self, inputs: Sequence[Value]) -> None:
        self.inputs = list(inputs)
        self._last: tuple[list, dict] | None = None  # (dtypes and shapes, env), swapped whole

    def __call__(self, tensors: Sequence[Any]) -> dict:
        try:
            key = [(t.dtype, t.shape) for t in tensors]
        except AttributeError:  # not a tensor: bind_symbols names it
            return bind_symbols(self.inputs, tensors)
        last = self._last
        if last is None or last[0] != key:
            last = (key, bind_symbols(self.inputs, tensors))  # raises: nothing remembered
            self._last = last
        return dict(last[1])


def _got(t: Any) -> str:
    """A tensor's type as IR text, for an error (built only when one is raised)."""
    from ir.types import DType

    return f"{DType.from_torch(t.dtype).value}{list(t.shape)}"


def _solve(pending: list, env: dict) -> None:
    """Solve dims with one unbound symbol (e.g. 2*T = 16 -> T = 8), repeating to a fixed point."""
    progress = True
    while progress:
        progress = False
        for v, axis, d, size in pending:
            free = [s for s in d.free_symbols if s not in env]
            if len(free) != 1:
                continue
            sols = [
                s
                for s in sympy.solve(sympy.Eq(d.xreplace(env), size), free[0])
                if s.is_Integer and s > 0
            ]
            if len(sols) != 1:
                raise InterpretError(
                    f"input %{v.name} dim {axis}: cannot solve {d} = {size} for {free[0]}; "
                    "give the graph an input whose dim is the bare symbol"
                )
            env[free[0]] = int(sols[0])
            progress = True


def _env_text(env: dict) -> str:
    return (
        ", ".join(f"{k}={v}" for k, v in sorted(env.items(), key=lambda kv: kv[0].name))
        or "no symbols"
    )


def _check(r: Value, t: Any, env: dict, where: str) -> None:
    from ir.types import DType

    want = tuple(subs_dim(d, env) for d in r.type.shape)
    got_dtype = DType.from_torch(t.dtype)
    if tuple(int(s) for s in t.shape) != want or got_dtype != r.type.dtype:
        raise InterpretError(
            f"{where} %{r.name}: recorded {type_text(r.type)} = {r.type.dtype.value}{list(want)} "
            f"with {_env_text(env)}, but the reference produced {got_dtype.value}{list(t.shape)}"
        )
