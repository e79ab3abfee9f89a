"""The TVM backend's op -> emitter table and the host side of each kernel (a `Launch`).

An emitter turns one graph node into a `Launch`: the unbuilt `Kernel`s it may call and how to
call them on the node's input tensors (outputs allocated by torch and written in place through
DLPack, zero copy). Families:

- `fused.kernel` whose body ops all have te lowerings -> one kernel for the whole body;
- a lone elementwise, broadcast, reduction or softmax op -> a kernel of a one-op body;
- `matmul` -> a tiled kernel in the layout the weight arrives in, or BLAS (`torch.matmul`) for
  large GEMMs when the executable's `blas` policy says so; a `fused.kernel` GEMM with an
  elementwise epilogue the same way (BLAS, then the epilogue by the reference interpreter);
- the semantic attention / MoE / mHC ops -> `backends.tvm.semantic`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ir
from backends.base import EmitterTable
from backends.targets import Target
from backends.tvm.kernel import Kernel, make_kernel
from backends.tvm.lower import TE_OPS, Unsupported, lowerable
from backends.tvm.lower_shape import SHAPE_OPS
from backends.tvm.matmul import lower_matmul_nt, schedule_matmul_cpu, transposed_layout
from backends.tvm.schedule_cpu import schedule_cpu
from ir.symbolic import subs_dim

__all__ = ["TVM_EMITTERS", "KernelLaunch", "Launch", "MatmulLaunch", "emit_node"]

BLAS_MIN_FLOPS = 1 << 22  # "auto": GEMMs of at least 4 MFLOP call torch.matmul (MKL/OpenBLAS)


def shape_of(v: ir.Value, env: dict) -> list[int]:
    return [int(subs_dim(d, env)) for d in v.shape]


ALIGN = 64  # bytes: TVM kernels assume buffers aligned like its own allocations


def aligned(t: Any) -> Any:
    """`t` as a contiguous tensor whose data is ALIGN-byte aligned (vector loads assume it);
    a view at an odd offset (a slice of a fused weight, a column of a row) is copied."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _alloc(results: tuple[ir.Value, ...], env: dict, device: Any) -> list[Any]:
    import torch

    return [torch.empty(shape_of(v, env), dtype=v.dtype.to_torch(), device=device) for v in results]


@dataclass
class Launch:
    """Host side of one node: `kernels` to build, then `__call__(inputs, env, fns)`."""

    node: ir.Node
    kernels: list[Kernel]
    operands: tuple[int, ...]  # node operand index of each kernel input
    calls: dict[str, int] = field(default_factory=dict)  # impl ("tvm", "blas") -> calls

    def count(self, impl: str) -> None:
        self.calls[impl] = self.calls.get(impl, 0) + 1

    def __call__(self, inputs: list[Any], env: dict, fns: dict[str, Any]) -> tuple[Any, ...]:
        raise NotImplementedError


@dataclass
class KernelLaunch(Launch):
    def __call__(self, inputs: list[Any], env: dict, fns: dict[str, Any]) -> tuple[Any, ...]:
        args = [aligned(inputs[i]) for i in self.operands]
        device = args[0].device if args else None
        outs = _alloc(self.node.results, env, device)
        if any(o.numel() for o in outs):
            fns[self.kernels[0].key](*args, *outs)
        self.count("tvm")
        return tuple(outs)


@dataclass
class MatmulLaunch(Launch):
    """`kernels[0]` reads B as stored (nn), `kernels[1]` reads Bᵀ row-major (nt)."""

    blas: str = "auto"

    def __call__(self, inputs: list[Any], env: dict, fns: dict[str, Any]) -> tuple[Any, ...]:
        import torch

        a, b = inputs
        out_shape = shape_of(self.node.result, env)
        flops = 2 * a.shape[-1] * _numel(out_shape)
        if self.blas == "always" or (self.blas == "auto" and flops >= BLAS_MIN_FLOPS):
            self.count("blas")
            return (torch.matmul(a, b),)
        (out,) = _alloc(self.node.results, env, a.device)
        if out.numel():
            if transposed_layout(b):
                fns[self.kernels[1].key](aligned(a), aligned(b.mT), out)
            else:
                fns[self.kernels[0].key](aligned(a), aligned(b), out)
        self.count("tvm")
        return (out,)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


TVM_EMITTERS: EmitterTable = EmitterTable("tvm")


def kernel_name(node: ir.Node, key: str, variant: str = "") -> str:
    base = node.name.replace(".", "_")
    if node.name == "fused.kernel":
        ops = [n.name.replace(".", "_") for n in node.attrs["body"].ops]
        base = "fused_" + "_".join(dict.fromkeys(ops))[:40]
    return f"{base}{'_' + variant if variant else ''}_{key[:10]}"


def signature(node: ir.Node) -> str:
    from passes import op_signature

    return op_signature(node)


def body_of_one_op(node: ir.Node) -> tuple[ir.Graph, tuple[int, ...]]:
    """A body holding just `node` (a repeated operand becomes one body input)."""
    unique: list[ir.Value] = []
    index: list[int] = []
    for i, v in enumerate(node.operands):
        if all(v.name != u.name for u in unique):
            unique.append(v)
            index.append(i)
    return ir.Graph(unique, [node], list(node.results)), tuple(index)


def _fused_check(node: ir.Node) -> bool | str:
    return lowerable(node.attrs["body"])


@dataclass
class GemmEpilogueLaunch(KernelLaunch):
    """A `fused.kernel` that starts with a matmul: the kernel, or (large GEMMs, `blas` policy as
    for `matmul`) the GEMM through BLAS and the epilogue ops by the reference interpreter."""

    blas: str = "auto"

    def __call__(self, inputs: list[Any], env: dict, fns: dict[str, Any]) -> tuple[Any, ...]:
        body: ir.Graph = self.node.attrs["body"]
        a = inputs[0]
        flops = 2 * a.shape[-1] * _numel(shape_of(body.ops[0].results[0], env))
        big = self.blas == "always" or (self.blas == "auto" and flops >= BLAS_MIN_FLOPS)
        if big and a.device.type == "cpu":
            self.count("blas")
            return tuple(ir.interpret(body, *inputs))
        return super().__call__(inputs, env, fns)


@TVM_EMITTERS.register("fused.kernel", check=_fused_check)
def emit_fused(node: ir.Node, target: Target, options: dict) -> Launch:
    body: ir.Graph = node.attrs["body"]
    key = signature(node)
    kernel = make_kernel(body, kernel_name(node, key), key, schedule_cpu)
    operands = tuple(range(len(body.inputs)))
    if body.ops and body.ops[0].name == "matmul":
        return GemmEpilogueLaunch(node, [kernel], operands, blas=options.get("blas", "auto"))
    return KernelLaunch(node, [kernel], operands)


# standalone creation ops run on the host; standalone data movement stays a torch view
SINGLE = sorted(set(TE_OPS) - {"constant", "full", "iota", "matmul"} - set(SHAPE_OPS))


def _single_check(node: ir.Node) -> bool | str:
    if not node.operands:
        return f"{node.name} has no operands (computed on the host)"
    return True


@TVM_EMITTERS.register(*SINGLE, check=_single_check)
def emit_single(node: ir.Node, target: Target, options: dict) -> Launch:
    body, index = body_of_one_op(node)
    key = signature(node)
    return KernelLaunch(node, [make_kernel(body, kernel_name(node, key), key, schedule_cpu)], index)


def _matmul_check(node: ir.Node) -> bool | str:
    a, b = (v.type for v in node.operands)
    if a.rank < 2 or b.rank < 2:
        return "matmul with a 1-D operand runs the reference"
    if not a.dtype.is_float:
        return f"integer matmul ({a.dtype}) runs the reference"
    return True


@TVM_EMITTERS.register("matmul", check=_matmul_check)
def emit_matmul(node: ir.Node, target: Target, options: dict) -> Launch:
    body = ir.Graph(list(node.operands), [node], list(node.results))
    key = signature(node)
    nn = make_kernel(
        body, kernel_name(node, key, "nn"), key + ":nn", lambda f: schedule_matmul_cpu(f, False)
    )
    a, b = node.operands
    bt = ir.Value(b.name, ir.TensorType((*b.shape[:-2], b.shape[-1], b.shape[-2]), b.dtype))
    nt = make_kernel(
        ir.Graph([a, bt], [node], list(node.results)),
        kernel_name(node, key, "nt"),
        key + ":nt",
        lambda f: schedule_matmul_cpu(f, True),
        overrides={"matmul": lower_matmul_nt},
    )
    return MatmulLaunch(node, [nn, nt], (0, 1), blas=options.get("blas", "auto"))


def emit_node(node: ir.Node, target: Target, options: dict | None = None) -> Launch | str:
    """The `Launch` for `node`, or the reason it runs its reference instead."""
    entry = TVM_EMITTERS.lookup(node)
    if isinstance(entry, str):
        return entry
    try:
        return entry.fn(node, target, options or {})
    except Unsupported as e:
        return str(e)


from backends.tvm import semantic as _semantic  # noqa: F401  (registers attn/moe/hc ops)
