"""A TVM kernel (one scheduled TensorIR PrimFunc) and the per-session build cache.

Kernels are keyed by the op's structural signature (`passes.op_signature`: mnemonic, attributes,
operand/result types with their symbolic dims, the fused body) plus a layout variant, so the 24
identical layers of a model share one kernel, and its shapes stay symbolic (B, T are `te.var`s
bound from the tensors on each call). `build(kernels, target)` compiles every kernel not built yet
in one `IRModule` (one LLVM invocation) and caches the packed functions for the session.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
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
    a PrimFunc named `name` and apply `schedule` (if any). Cached per session by `key`. Under
    `PREBUILT` (loading a built library) nothing is lowered: see `Prebuilt`."""
    pre = PREBUILT.get()
    if pre is not None:
        return pre.kernel(body, name, key)
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
MODULE_OF: dict[tuple[str, str], Any] = {}  # (target text, kernel key) -> its built module


def symbol_of(k: Kernel) -> str:
    """The global symbol `build` gives the kernel's PrimFunc (its name in the built module)."""
    return k.name


def module_of(target: str, key: str) -> Any:
    """The built LLVM module holding kernel `key` for `target` (to export it as a library)."""
    return MODULE_OF[(target, key)]


def unsupported_kernels() -> dict[str, str]:
    """Key -> why it cannot be lowered, for every kernel this session failed to lower."""
    return {key: why for key, why in KERNELS.items() if isinstance(why, str)}


class MissingKernel(LookupError):
    """A kernel the op needs is not in the prebuilt library (another code generator made it)."""


@dataclass(frozen=True)
class Prebuilt:
    """The kernels of a built library, by key, for loading it without lowering anything: while
    `PREBUILT` holds one, `make_kernel` returns a `Kernel` without TensorIR (`func` None; the
    caller takes its packed function from the library), raises `Unsupported` for a key whose
    lowering failed when the library was built, and `MissingKernel` for a key it does not know."""

    symbols: Mapping[str, str]  # key -> the function's symbol in the library
    unsupported: Mapping[str, str]  # key -> why it has no kernel

    def kernel(self, body: ir.Graph, name: str, key: str) -> Kernel:
        if key in self.unsupported:
            raise Unsupported(self.unsupported[key])
        if key not in self.symbols:
            raise MissingKernel(key)
        return Kernel(name, key, tuple(n.name for n in body.ops), None, body=body)


PREBUILT: ContextVar[Prebuilt | None] = ContextVar("dsv4c_tvm_prebuilt", default=None)


def build(kernels: list[Kernel], target: Any) -> dict[str, Any]:
    """Packed function per kernel key, compiling the missing ones together in one module."""
    import tvm

    tkey = str(target)
    todo = {k.key: k for k in kernels if (tkey, k.key) not in BUILT}
    if todo:
        mod = tvm.IRModule({k.name: k.func for k in todo.values()})
        ex = tvm.tirx.build(mod, target=target)
        _MODULES.append(ex)
        MODULE_OF.update({(tkey, k.key): ex for k in todo.values()})
        for k in todo.values():
            BUILT[(tkey, k.key)] = ex[k.name]
    return {k.key: BUILT[(tkey, k.key)] for k in kernels}
