"""The `Backend` protocol, the op -> emitter table, and input binding shared by executables.

A backend answers two questions:

- `supports(node) -> True | str`: can it run this op itself? Anything but `True` is the reason
  it cannot (shown in reports: "fell back: softmax over dim 0 (only the last dim)").
- `compile(graph, target) -> Executable`: something callable like `ir.interpret`,
  `exe(*activations, params={...}) -> tuple of tensors`, with a `report()` saying what ran how.

Each backend keeps one `EmitterTable`: mnemonic -> emitter, with an optional checker that can
refuse a particular node (Thunder's `register_implementation(..., checker=)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import ir
from backends.targets import Target

__all__ = ["Backend", "Executable", "Emitter", "EmitterTable", "feed_inputs", "Support"]

Support = bool | str  # True, or the reason an op is not supported
E = TypeVar("E")


@runtime_checkable
class Executable(Protocol):
    def __call__(self, *args: Any, params: Mapping[str, Any] | None = None) -> tuple[Any, ...]: ...

    def report(self) -> dict[str, Any]: ...


@runtime_checkable
class Backend(Protocol):
    name: str

    def supports(self, node: ir.Node) -> Support: ...

    def compile(self, graph: ir.Graph, target: str | Target) -> Executable: ...


@dataclass(frozen=True)
class Emitter(Generic[E]):
    """One table entry: `fn` emits the op; `check(node)` returns True or why it cannot."""

    mnemonic: str
    fn: E
    check: Callable[[ir.Node], Support] | None = None


class EmitterTable(Generic[E]):
    """mnemonic -> `Emitter`; one per backend.

    table = EmitterTable("triton")

    @table.register("matmul", check=lambda n: n.operands[0].type.rank >= 1 or "needs rank >= 1")
    def emit_matmul(node, ctx): ...
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._entries: dict[str, Emitter[E]] = {}

    def register(
        self, *mnemonics: str, check: Callable[[ir.Node], Support] | None = None
    ) -> Callable[[E], E]:
        def deco(fn: E) -> E:
            for m in mnemonics:
                if m in self._entries:
                    raise ValueError(f"{self.backend}: an emitter for {m!r} is already registered")
                self._entries[m] = Emitter(m, fn, check)
            return fn

        return deco

    def __contains__(self, mnemonic: str) -> bool:
        return mnemonic in self._entries

    def mnemonics(self) -> list[str]:
        return sorted(self._entries)

    def lookup(self, node: ir.Node) -> Emitter[E] | str:
        """The emitter for `node`, or the reason there is none."""
        entry = self._entries.get(node.name)
        if entry is None:
            return f"no {self.backend} emitter for {node.name}"
        if entry.check is None:
            return entry
        ok = entry.check(node)
        return entry if ok is True else str(ok)

    def supports(self, node: ir.Node) -> Support:
        found = self.lookup(node)
        return True if isinstance(found, Emitter) else found


def feed_inputs(
    g: ir.Graph, args: Sequence[Any], params: Mapping[str, Any] | None
) -> tuple[list[Any], dict]:
    """All graph inputs in order (activations from `args`, parameters from `params`) and the
    symbol bindings from their shapes. Errors read like `ir.interpret`'s."""
    from ir.interpreter import InterpretError, bind_symbols

    params = dict(params or {})
    runtime = [v for v in g.inputs if g.roles.get(v.name) != "parameter"]
    if len(args) != len(runtime):
        want = ", ".join(f"%{v.name}: {v.type}" for v in runtime)
        raise InterpretError(
            f"graph {g.name or '<anonymous>'} takes {len(runtime)} positional input(s) "
            f"({want}), got {len(args)}; pass parameters by name in params="
        )
    feed: list[Any] = []
    it = iter(args)
    for v in g.inputs:
        if g.roles.get(v.name) != "parameter":
            feed.append(next(it))
        elif v.name in params:
            feed.append(params.pop(v.name))
        else:
            raise InterpretError(f"missing parameter %{v.name}: {v.type}; pass it in params=")
    if params:
        extra = ", ".join(sorted(params)[:10])
        raise InterpretError(f"params has entries that are not graph parameters: {extra}")
    return feed, bind_symbols(g.inputs, feed)
