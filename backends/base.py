"""The `Backend` protocol, the op -> emitter table, and input binding shared by executables.

A backend answers two questions:

- `supports(node) -> True | str`: can it run this op itself? Anything but `True` is the reason
  it cannot (shown in reports: "fell back: softmax over dim 0 (only the last dim)").
- `compile(graph, target) -> Executable`: something callable like `ir.interpret`,
  `exe(*activations, params={...}) -> tuple of tensors`, with a `report()` saying what ran how
  and `kernel_records()`: one typed `KernelRecord` per distinct kernel (name, key, language,
  source, fused ops and their source locations, launch tiling, binaries per target). The
  manifest, the report, the caches and `dsv4c run` read those records; nothing guesses a
  kernel's details from its attributes.

Each backend keeps one `EmitterTable`: mnemonic -> emitter, with an optional checker that can
refuse a particular node (Thunder's `register_implementation(..., checker=)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import ir
from backends.targets import Target
from ir.symbolic import Dim

__all__ = [
    "Backend",
    "CostHints",
    "Executable",
    "Emitter",
    "EmitterTable",
    "KernelBinary",
    "KernelRecord",
    "body_of_one_op",
    "feed_inputs",
    "Support",
]

Support = bool | str  # True, or the reason an op is not supported
E = TypeVar("E")


@dataclass(frozen=True)
class KernelBinary:
    """One compiled variant of a kernel for one target (a GPU binary and its assembly).

    `variant` tells the variants of one kernel apart (8 hex digits of its constexprs and
    options; a kernel compiled with other tiles, or in two stages, has several); `files` are
    file names inside the artifact's `kernels/<target>/`. Resources are None where the compiler
    does not say (spills: NVIDIA spill-store bytes, AMD spilled registers)."""

    target: str
    variant: str
    files: tuple[str, ...]
    tiles: Mapping[str, Any] = field(default_factory=dict)  # constexprs (BLOCK_*, ...)
    options: Mapping[str, Any] = field(default_factory=dict)  # num_warps, num_stages, ...
    registers: int | None = None
    shared: int | None = None  # bytes per block
    spills: int | None = None
    stack_bytes: int | None = None
    binary_bytes: int | None = None
    error: str | None = None  # why it did not compile (then `files` is empty)

    def row(self) -> dict[str, Any]:
        """The manifest/report form (JSON)."""
        return {
            "target": self.target,
            "variant": self.variant,
            "files": list(self.files),
            "tiles": dict(self.tiles),
            "options": dict(self.options),
            "registers": self.registers,
            "shared": self.shared,
            "spills": self.spills,
            "stack_bytes": self.stack_bytes,
            "binary_bytes": self.binary_bytes,
            "error": self.error,
        }


@dataclass(frozen=True)
class CostHints:
    """How a backend runs one kernel, as far as the cost model (`passes.cost.backend_cost`)
    can use it beyond the kernel op's own inputs and outputs: `launches` device functions per
    call (stages it does not fuse run one after another), `materialised_bytes` of intermediates
    those stages write to device memory and read back (symbolic), and `gemm_tile`, the (rows,
    cols) output tile of its GEMM stage when every tile reads its operand rows and columns
    from device memory (None: not known, the operands are counted once)."""

    launches: int = 1
    materialised_bytes: Dim = 0
    gemm_tile: tuple[int, int] | None = None

    def row(self) -> dict[str, Any]:
        """The manifest/report form (JSON)."""
        tile = list(self.gemm_tile) if self.gemm_tile is not None else None
        nbytes = str(self.materialised_bytes)  # sympy's text: 1540*B*floor(T/4) + 2048*B*T
        return {"launches": self.launches, "materialised_bytes": nbytes, "gemm_tile": tile}


@dataclass(frozen=True)
class KernelRecord:
    """One distinct kernel of an executable, as the artifact, the report and the caches see it.

    `key` is unique among the kernels of one executable (a content hash, 16 hex digits); the
    source file is `<name>_<key>.<ext>` (safe characters only, see `backends.naming`).
    `locations` are the source lines (`file.py:line`) of the fused ops; `sites` the indices in
    `graph.ops` of the ops that launch it (their first kernel); `launch` says how it tiles its
    domain; `binaries` holds the compiled variants (empty until an ahead-of-time compile adds
    them with `with_binaries`); `cost` what the cost model needs of how it runs (`CostHints`;
    a Triton kernel's GEMM tile comes from its binaries' tiles instead)."""

    name: str
    key: str
    language: str  # "triton" | "tvmscript" | "cuda" | "opencl" | "webgpu"
    ext: str  # of the source file: "py", "tir.py", "cu", "cl", "wgsl"
    source: str = field(repr=False)
    fused_ops: tuple[str, ...]
    locations: tuple[str, ...] = ()
    sites: tuple[int, ...] = ()
    launch: Mapping[str, Any] = field(default_factory=dict)
    binaries: tuple[KernelBinary, ...] = ()
    cost: CostHints = field(default_factory=CostHints)

    @property
    def uses(self) -> int:
        return len(self.sites)

    @property
    def stem(self) -> str:
        return f"{self.name}_{self.key}"

    @property
    def source_file(self) -> str:
        return f"{self.stem}.{self.ext}"

    def files(self) -> list[str]:
        """Every file of this kernel, source first, as names inside `kernels/<target>/`."""
        return [self.source_file, *(f for b in self.binaries for f in b.files)]

    def with_binaries(self, binaries: Sequence[KernelBinary]) -> KernelRecord:
        return replace(self, binaries=tuple(binaries))

    def with_cost(self, cost: CostHints) -> KernelRecord:
        return replace(self, cost=cost)

    def row(self, folder: str) -> dict[str, Any]:
        """The manifest row (JSON); file paths are `folder/<file>` (`kernels/<target>`)."""
        return {
            "name": self.name,
            "key": self.key,
            "language": self.language,
            "source": f"{folder}/{self.source_file}",
            "ops": list(self.fused_ops),
            "locations": list(self.locations),
            "uses": self.uses,
            "launch": dict(self.launch),
            "cost": self.cost.row(),
            "binaries": [
                b.row() | {"files": [f"{folder}/{f}" for f in b.files]} for b in self.binaries
            ],
            "files": [f"{folder}/{f}" for f in self.files()],
        }


@runtime_checkable
class Executable(Protocol):
    def __call__(self, *args: Any, params: Mapping[str, Any] | None = None) -> tuple[Any, ...]: ...

    def report(self) -> dict[str, Any]: ...

    def kernel_records(self) -> list[KernelRecord]:
        """One record per distinct kernel, in first-use order (none for the reference)."""
        ...


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


def body_of_one_op(node: ir.Node) -> tuple[ir.Graph, tuple[int, ...]]:
    """A body graph holding just `node` for a kernel of its own, and the operand index of each
    body input: a repeated operand (`mul(x, x)`) becomes one input."""
    unique: list[ir.Value] = []
    index: list[int] = []
    for i, v in enumerate(node.operands):
        if all(v.name != u.name for u in unique):
            unique.append(v)
            index.append(i)
    body = ir.Graph(unique, [node], list(node.results), name=node.name.replace(".", "_"))
    return body, tuple(index)


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
