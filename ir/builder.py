"""`Builder`: construct graphs op by op with types inferred.

    b = Builder(name="prefill")
    x = b.input("tokens", TensorType((B, T), DType.i64), role="activation")
    w = b.input("embed.weight", TensorType((V, D), DType.f32), role="parameter")
    h = b.op("embedding", [w, x], loc=Loc("embed", "model.py:88"))
    vals, idx = b.op("topk", [h], k=6, dim=-1, name=("vals", "idx"))
    b.output(vals, idx)
    g = b.build()          # verified

`b.op(mnemonic_or_op, operands, *, name=None, loc=None, **attrs)` returns a `Value` for
single-result ops and a tuple of `Value`s otherwise. Fresh names are decimal (`%0`, `%1`, ...),
skipping names already used; `name=` gives a name (a tuple of names for multi-result ops).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ir.core import OPS, ROLES, Graph, Loc, Node, Op, Value
from ir.errors import IRTypeError
from ir.types import DType, TensorType

__all__ = ["Builder"]


class Builder:
    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.roles: dict[str, str] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self._names: set[str] = set()
        self._counter = 0
        self._types: dict = {}  # (op, operand types) -> result types: repeated layers infer once

    def fresh(self) -> str:
        while str(self._counter) in self._names:
            self._counter += 1
        self._counter += 1
        return str(self._counter - 1)

    def _claim(self, name: str | None) -> str:
        name = self.fresh() if name is None else name
        if name in self._names:
            raise IRTypeError(f"value name %{name} is already used in this graph; pick another")
        self._names.add(name)
        return name

    def input(self, name: str, type: TensorType, role: str = "activation") -> Value:
        """Add a graph input; role is "activation", "parameter" or "cache"."""
        if role not in ROLES:
            raise IRTypeError(
                f"input %{name}: role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        v = Value(name, type)
        self._claim(name)
        self.inputs.append(v)
        self.roles[name] = role
        return v

    def op(
        self,
        op: str | Op,
        operands: Sequence[Value] = (),
        *,
        name: str | Sequence[str] | None = None,
        loc: Loc | None = None,
        **attrs: Any,
    ) -> Value | tuple[Value, ...]:
        """Append `op(operands, **attrs)`; returns its result(s) with inferred types."""
        if isinstance(op, str):
            cls = OPS.get(op)
            if cls is None:
                raise IRTypeError(f"unknown op {op!r}; registered ops are the keys of ir.OPS")
            op = cls(**attrs)
        elif attrs:
            raise IRTypeError("pass attributes either on the Op instance or as keywords, not both")
        operands = tuple(operands)
        for v in operands:
            if not isinstance(v, Value):
                raise IRTypeError(f"{op.mnemonic}: operands must be Values, got {v!r}")
        n = type(op).num_operands
        if n is not None and len(operands) != n:
            raise IRTypeError(f"{op.mnemonic} takes {n} operand(s), got {len(operands)}")
        types = self._infer(op, operands)
        names = self._result_names(name, len(types), op.mnemonic)
        results = tuple(Value(self._claim(nm), t) for nm, t in zip(names, types))
        self.nodes.append(Node(op, operands, results, loc))
        return results[0] if len(results) == 1 else results

    def _infer(self, op: Op, operands: tuple[Value, ...]) -> tuple[TensorType, ...]:
        try:
            key = (op, tuple(v.type for v in operands))
            types = self._types.get(key)
        except TypeError:  # an attribute that cannot be hashed
            return tuple(op.infer_type(*(v.type for v in operands)))
        if types is None:
            types = self._types[key] = tuple(op.infer_type(*(v.type for v in operands)))
        return types

    def _result_names(self, name, count: int, mnemonic: str) -> list[str | None]:
        if name is None:
            return [None] * count
        if isinstance(name, str):
            name = (name,)
        if len(name) != count:
            raise IRTypeError(
                f"{mnemonic} has {count} result(s) but {len(name)} name(s) were given"
            )
        return list(name)

    def constant(self, value: bool | int | float, dtype: DType, **kw: Any) -> Value:
        """Shorthand for a 0-d `constant` op."""
        return self.op("constant", [], value=value, dtype=dtype, **kw)  # type: ignore[return-value]

    def output(self, *values: Value) -> None:
        self.outputs.extend(values)

    def build(self, verify: bool = True) -> Graph:
        g = Graph(self.inputs, self.nodes, self.outputs, name=self.name, roles=dict(self.roles))
        if verify:
            from ir.verifier import verify as _verify

            _verify(g)
        return g
