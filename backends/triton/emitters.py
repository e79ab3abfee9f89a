"""The Triton backend's op -> emitter table, and the host side of each kernel (a `Launch`).

An emitter turns one graph node into a `Launch`: the generated `KernelSource`, how to call it on
the node's input tensors (allocating outputs, choosing tiles, computing the grid), and the
constexpr/option variants to compile ahead of time. Families:

- `fused.kernel` with an elementwise/reduction body -> `fused.py`;
  with a body `matmul` followed by elementwise ops -> `matmul.py` with that epilogue;
- a lone elementwise, broadcast or last-dim reduction op -> a one-op fused body;
- `matmul`, `grouped_mm` -> `matmul.py` templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import ir
from backends.base import EmitterTable, body_of_one_op
from backends.targets import Target
from backends.triton.body import ELEMENTWISE, REDUCTIONS, Unsupported
from backends.triton.fused import MAX_ROW, FusedKernel, emit_fused, fused_config
from backends.triton.kernel import KernelSource, load_jit
from ir.symbolic import subs_dim

__all__ = ["Launch", "OneKernel", "AotVariant", "TRITON_EMITTERS", "emit_node", "cdiv"]


@dataclass(frozen=True)
class AotVariant:
    """One compilation of a kernel: its constexpr values, compile options, and the integer
    specialisations the JIT would see at run time on typical tensors (`hints`: 1 = the value is
    1, e.g. a unit stride; 16 = divisible by 16). Pointers are taken as 16-byte aligned."""

    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    hints: dict[str, int] = field(default_factory=dict)
    source: KernelSource | None = None  # the kernel compiled, when not the launch's `source`


class Launch(Protocol):
    """A launch of one kernel (`source`), or of several: `sources` lists them all, first
    `source`, and each `AotVariant` of another kernel names it."""

    source: KernelSource

    @property
    def sources(self) -> tuple[KernelSource, ...]: ...

    @property
    def launches(self) -> int:
        """Device launches one call makes, every kernel and phase counted (cost model)."""
        ...

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]: ...

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]: ...


class OneKernel:
    """Mixin for launches of a single kernel: `sources` is `(source,)`."""

    source: KernelSource

    @property
    def sources(self) -> tuple[KernelSource, ...]:
        return (self.source,)

    @property
    def launches(self) -> int:
        """One launch; a template that runs its kernel in phases says how many."""
        return 1


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def shape_of(v: ir.Value, env: dict) -> list[int]:
    return [int(subs_dim(d, env)) for d in v.shape]


@dataclass
class FusedLaunch(OneKernel):
    kernel: FusedKernel
    operands: tuple[int, ...]  # node operand index for each body input
    target: Target

    @property
    def source(self) -> KernelSource:
        return self.kernel.source

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        plan, body = self.kernel.plan, self.kernel.body
        domain, n_rows, n_cols, n_inner = plan.sizes(env)
        args: dict[str, Any] = {}
        params = self.source.params
        # a GPU kernel may be handed a host 0-d tensor (a position, a count): move it over
        device = next((t.device for t in inputs if t.device.type != "cpu"), inputs[0].device)
        for i, (p, layout) in enumerate(zip(params, plan.inputs)):
            t = inputs[self.operands[i]].to(device)
            args[p.name] = t.expand(domain).contiguous() if layout == "bcast" else t.contiguous()
        outs = [
            torch.empty(shape_of(v, env), dtype=v.dtype.to_torch(), device=device)
            for v in body.outputs
        ]
        for p, t in zip(params[len(body.inputs) :], outs):
            args[p.name] = t
        if n_rows == 0 or (n_cols == 0 and not plan.reduction):
            return tuple(outs)  # nothing to write (a reduction over an empty row still runs)
        if plan.reduction and n_cols > MAX_ROW and device.type != "cpu":
            raise Unsupported(f"a reduced row of {n_cols} exceeds one block ({MAX_ROW})")
        cfg = fused_config(plan, n_cols, gpu=device.type != "cpu")
        grid = (cdiv(n_rows, cfg["BLOCK_M"]), 1 if plan.reduction else cdiv(n_cols, cfg["BLOCK_N"]))
        if plan.inner:
            args["n_inner"] = n_inner
        load_jit(self.source)[grid](**args, n_rows=n_rows, n_cols=n_cols, **cfg)
        return tuple(outs)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        _, _, n_cols, _ = self.kernel.plan.sizes(env)
        cfg = fused_config(self.kernel.plan, n_cols, gpu=target.is_gpu)
        warps = cfg.pop("num_warps")
        hints = {"n_cols": 16} if n_cols % 16 == 0 else {}
        return [AotVariant(cfg, {"num_warps": warps}, hints)]


TRITON_EMITTERS: EmitterTable = EmitterTable("triton")


def _try(fn: Any, node: ir.Node, target: Target | None = None) -> Any:
    try:
        return fn(node, target)
    except Unsupported as e:
        return str(e)


def _fused_check(node: ir.Node) -> bool | str:
    out = _try(emit_fused_kernel, node)
    return out if isinstance(out, str) else True


@TRITON_EMITTERS.register("fused.kernel", check=_fused_check)
def emit_fused_kernel(node: ir.Node, target: Target | None) -> Launch:
    body: ir.Graph = node.attrs["body"]
    if any(n.name in ("matmul",) for n in body.ops):
        from backends.triton.matmul import emit_matmul_epilogue

        return emit_matmul_epilogue(node, target)
    kernel = emit_fused(body, loc=node.loc)
    return FusedLaunch(kernel, tuple(range(len(body.inputs))), target)  # type: ignore[arg-type]


def _single_check(node: ir.Node) -> bool | str:
    if not node.operands:
        return f"{node.name} has no operands (computed on the host)"
    out = _try(emit_single, node)
    return out if isinstance(out, str) else True


@TRITON_EMITTERS.register(
    *sorted((ELEMENTWISE | REDUCTIONS) - {"constant", "full"}), check=_single_check
)
def emit_single(node: ir.Node, target: Target | None) -> Launch:
    body, index = body_of_one_op(node)
    return FusedLaunch(emit_fused(body, loc=node.loc), index, target)  # type: ignore[arg-type]


def emit_node(node: ir.Node, target: Target) -> Launch | str:
    """The `Launch` for `node`, or the reason it falls back to the reference."""
    entry = TRITON_EMITTERS.lookup(node)
    if isinstance(entry, str):
        return entry
    return _try(entry.fn, node, target)


from backends.triton import matmul as _matmul  # noqa: E402,F401  (registers matmul, grouped_mm)
from backends.triton import templates as _templates  # noqa: E402,F401  (semantic-op templates)
