"""A TVM kernel (one scheduled TensorIR PrimFunc) and the per-session build cache.

Kernels are keyed by the op's structural signature (`passes.op_signature`: mnemonic, attributes,
operand/result types with their symbolic dims, the fused body) plus a layout variant, so the 24
identical layers of a model share one kernel, and its shapes stay symbolic (B, T are `te.var`s
bound from the tensors on each call). `build(kernels, target)` compiles every kernel not built yet
in one `IRModule` (one LLVM invocation) and caches the packed functions for the session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ir
from backends.targets import host_cores
from backends.tvm.lower import Lowering, Unsupported

__all__ = ["BUILT", "Kernel", "build", "host_target", "make_kernel"]


@dataclass
class Kernel:
    """One distinct kernel: `tensor_ir` is the unscheduled TensorIR PrimFunc (inputs then
    outputs), `func` the same scheduled for the CPU; GPU schedules start from `gpu_ir()`."""

    name: str
    key: str
    fused_ops: tuple[str, ...]
    func: Any = field(repr=False)
    tensor_ir: Any = field(repr=False, default=None)
    body: ir.Graph | None = field(repr=False, default=None)
    overrides: dict[str, Any] | None = field(repr=False, default=None)

    def gpu_ir(self) -> Any:
        """The unscheduled TensorIR for a GPU: `tensor_ir`, or lowered again without the CPU's
        extern calls when the kernel has them (top-k)."""
        if self.body is None or not any(op in EXTERN_ON_CPU for op in self.fused_ops):
            return self.tensor_ir
        return Lowering(self.body, self.name, self.overrides, gpu=True).prim_func()

    def script(self) -> str:
        """The kernel's TensorIR as TVMScript (what gets built)."""
        return self.func.script()


def make_kernel(
    body: ir.Graph,
    name: str,
    key: str,
    schedule: Callable[[Any], Any] | None,
    overrides: dict[str, Any] | None = None,
) -> Kernel:
    """Lower `body` to te (`overrides`: mnemonic -> lowering replacing the table's), pack it as
    a PrimFunc named `name` and apply `schedule` (if any). Cached per session by `key`."""
    if key not in KERNELS:
        KERNELS[key] = _lower_and_schedule(body, name, key, schedule, overrides)
    found = KERNELS[key]
    if isinstance(found, str):
        raise Unsupported(found)
    return found


def _lower_and_schedule(
    body: ir.Graph,
    name: str,
    key: str,
    schedule: Callable[[Any], Any] | None,
    overrides: dict[str, Any] | None,
) -> Kernel | str:
    try:
        func = tensor_ir = Lowering(body, name, overrides).prim_func()
    except Unsupported as e:
        return str(e)
    except Exception as e:  # noqa: BLE001  (any TVM error while lowering: report, run the reference)
        return f"TVM lowering failed: {type(e).__name__}: {_first_line(e)}"
    if schedule is not None:
        try:
            func = schedule(func)
        except Exception as e:  # noqa: BLE001  (a schedule TVM refuses: report, run the reference)
            return f"TVM schedule failed: {type(e).__name__}: {_first_line(e)}"
    return Kernel(name, key, tuple(n.name for n in body.ops), func, tensor_ir, body, overrides)


# ops whose CPU lowering calls an extern function (tvm.contrib.sort top-k) a GPU cannot call
EXTERN_ON_CPU = ("attn.indexer_topk", "moe.route")

KERNELS: dict[str, Kernel | str] = {}  # key -> kernel, or why it cannot be lowered (session)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:200] if text else ""


def host_target() -> Any:
    """LLVM for this machine's CPU (its -mcpu, so AVX2/AVX-512 are used), never "generic"."""
    import tvm

    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": host_cores()})


# (target text, kernel key) -> packed function; modules kept alive alongside
BUILT: dict[tuple[str, str], Any] = {}
_MODULES: list[Any] = []


def build(kernels: list[Kernel], target: Any) -> dict[str, Any]:
    """Packed function per kernel key, compiling the missing ones together in one module."""
    import tvm

    tkey = str(target)
    todo = {k.key: k for k in kernels if (tkey, k.key) not in BUILT}
    if todo:
        mod = tvm.IRModule({k.name: k.func for k in todo.values()})
        ex = tvm.tirx.build(mod, target=target)
        _MODULES.append(ex)
        for k in todo.values():
            BUILT[(tkey, k.key)] = ex[k.name]
    return {k.key: BUILT[(tkey, k.key)] for k in kernels}
