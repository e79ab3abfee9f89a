"""The TVM backend's op -> emitter table and the host side of each kernel (a `Launch`).

An emitter turns one graph node into a `Launch`: the unbuilt `Kernel`s it may call, and
`bind(env, fns)`, which resolves for one binding of the symbols what a call does (output shapes,
kernel or BLAS, the packed function) and returns it as a `Call` on the node's input tensors
(outputs allocated by torch and written in place through DLPack, zero copy). Families:

- `fused.kernel` whose body ops all have te lowerings -> one kernel for the whole body;
- a lone elementwise, broadcast, reduction or softmax op -> a kernel of a one-op body;
- `matmul` -> a tiled kernel in the layout the weight arrives in, or BLAS (`torch.matmul`) when
  the executable's `blas` policy says so ("auto": GEMMs from 4 MFLOP, and from 256 KFLOP except
  a one-row GEMV on a row-major weight; never a matmul of at most 16 rows on a row-major weight
  with a K the dot kernel takes); a `fused.kernel` GEMM with an elementwise epilogue from
  4 MFLOP (BLAS, then the epilogue ops by their references);
- the semantic attention / mHC ops -> `backends.tvm.semantic`, MoE -> `semantic_moe`.
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import is_
from typing import Any

import ir
from backends import naming
from backends.base import EmitterTable, body_of_one_op
from backends.targets import Target
from backends.tvm.kernel import Kernel, make_kernel, mark_unsupported
from backends.tvm.lower import TE_OPS, Unsupported, lowerable
from backends.tvm.lower_shape import SHAPE_OPS
from backends.tvm.matmul import lower_matmul_nt, schedule_matmul_cpu, transposed_layout
from backends.tvm.schedule_cpu import VECTOR, schedule_cpu
from ir.symbolic import subs_dim

__all__ = [
    "TVM_EMITTERS",
    "Call",
    "GemmEpilogueLaunch",
    "KernelLaunch",
    "Launch",
    "MatmulLaunch",
    "body_call",
    "emit_node",
    "reference_call",
]

BLAS_MIN_FLOPS = 1 << 22  # "auto": GEMMs of at least 4 MFLOP call torch.matmul (MKL/OpenBLAS)
# "auto", smaller GEMMs of at least 256 KFLOP: torch.matmul too, except a one-row GEMM on a
# transposed (row-major weight, "nt") operand. The TVM dot kernels do not reuse a weight row
# across rows, so their time grows with M where MKL's barely moves; 1 thread, thread CPU time,
# TVM / torch.matmul f32: nt 512x512 M = 1 0.85, M = 2 2.50, M = 8 3.09; 256x512 M = 1 0.70,
# M = 2 1.80; 128x512 M = 2 1.38; nn 512x512 M = 1 1.52, 128x512 M = 1 1.11 (32x512 M = 4 1.07).
BLAS_SMALL_FLOPS = 1 << 18
# "auto", whatever the size: a matmul of at most this many rows per matrix on a row-major weight
# (nt: decode's projections, the LM head, the grouped o-projection) runs the TVM dot kernel on
# TVM's threads. 2 threads vs torch.matmul (f32, weight in L3), TVM / torch 1 thread, 2 threads:
# 8192x512 M = 1 0.52, 0.91; M = 8 0.34, 0.64; M = 16 0.57, 0.78; M = 32 0.72, 1.05;
# 4096x256 M = 8 0.31, 0.80; M = 32 0.80, 1.35. Inside a TVM call torch runs on 1 thread
# (runtime.torch_heavy), where MKL streamed the decode b8 weights at 5-7 GB/s.
DOT_MAX_ROWS = 16


def shape_of(v: ir.Value, env: dict) -> tuple[int, ...]:
    return tuple(int(subs_dim(d, env)) for d in v.shape)


ALIGN = 64  # bytes: TVM kernels assume buffers aligned like its own allocations


def aligned(t: Any) -> Any:
    """`t` as a compact row-major tensor whose data is ALIGN-byte aligned (vector loads assume
    it); a view at an odd offset (a slice of a fused weight, a column of a row) is copied.

    Torch calls a tensor contiguous whatever the stride of a dim of size 0 or 1 (a slice of 0 or
    1 compressed rows at odd T, B = 1), but TVM checks every stride of a symbolic shape: such a
    view is re-strided in place (same elements, no copy)."""
    if not t.is_contiguous():
        t = t.contiguous()
    if t.data_ptr() % ALIGN:
        t = t.clone()
    shape = t.shape
    if 0 in shape or 1 in shape:
        compact = _compact_strides(tuple(shape))
        if t.stride() != compact:
            t = t.as_strided(shape, compact)
    return t


@functools.lru_cache(maxsize=4096)
def _compact_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# One node's work for one binding of the symbols: its input tensors -> its result tensors.
Call = Callable[[Sequence[Any]], tuple[Any, ...]]


def result_specs(node: ir.Node, env: dict) -> list[tuple[tuple[int, ...], Any]]:
    """(shape, torch dtype) of each result of `node` with the symbols bound by `env`."""
    return [(shape_of(v, env), v.dtype.to_torch()) for v in node.results]


def reference_call(node: ir.Node, env: dict) -> Call:
    """The node's torch reference with its attributes bound once (what `run_node` does per call)."""
    op = node.op.bind(env)
    if node.operands:
        return lambda inputs: op.reference(*inputs)
    return lambda inputs: op.reference(device="cpu")


def body_call(body: ir.Graph, env: dict) -> Call:
    """A body graph run op by op by the references (bound once), like `ir.interpret` without its
    per-call input checks (the executable checked the graph's inputs)."""
    names = {v.name: i for i, v in enumerate(body.inputs)}
    steps = []
    for node in body.ops:
        slots = [names[v.name] for v in node.operands]
        for r in node.results:
            names[r.name] = len(names)
        steps.append((reference_call(node, env), slots))
    outs = [names[v.name] for v in body.outputs]

    def run(inputs: Sequence[Any]) -> tuple[Any, ...]:
        values = list(inputs)
        for call, slots in steps:
            values.extend(call([values[i] for i in slots]))
        return tuple(values[i] for i in outs)

    return run


@dataclass
class Launch(ABC):
    """Host side of one node: `kernels` to build, then `bind(env, fns)` -> the `Call` for one
    binding of the symbols (shapes, the implementation and the packed function resolved once)."""

    node: ir.Node
    kernels: list[Kernel]
    operands: tuple[int, ...]  # node operand index of each kernel input
    calls: Counter = field(default_factory=Counter)  # impl ("tvm", "blas") -> calls

    @abstractmethod
    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Call:
        """`reuse`: the results may live in buffers allocated here, once, and written again on
        every call (`kernel_call`); the executable says so only for results no later call and
        no caller can still read."""

    def counted(self, impl: str, call: Call) -> Call:
        """`call`, counting its uses under `impl` (the report's kernel/BLAS call counts); the
        result's `impl` attribute names it (the runtime gives a "blas" call torch's threads)."""
        calls = self.calls

        def run(inputs: Sequence[Any]) -> tuple[Any, ...]:
            calls[impl] += 1
            return call(inputs)

        run.impl = impl  # type: ignore[attr-defined]
        return run

    def __call__(self, inputs: list[Any], env: dict, fns: dict[str, Any]) -> tuple[Any, ...]:
        """One call with `env` (binds on every call: for tests; the executable binds once)."""
        return self.bind(env, fns)(inputs)


@dataclass
class KernelLaunch(Launch):
    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Call:
        fn = fns[self.kernels[0].key]
        return self.counted("tvm", kernel_call(fn, self.node, env, self.operands, reuse))


def kernel_call(
    fn: Any, node: ir.Node, env: dict, operands: Sequence[int], reuse: bool = False
) -> Call:
    """Run packed function `fn` on the chosen operands, writing fresh result tensors (torch
    allocates them; TVM writes through DLPack); with `reuse`, the same result tensors on every
    call (`_reusing_call`)."""
    import torch

    specs = result_specs(node, env)
    if all(0 in shape for shape, _ in specs):  # nothing to compute
        return lambda inputs: tuple(torch.empty(s, dtype=d) for s, d in specs)
    if reuse:
        outs = tuple(torch.empty_strided(s, _compact_strides(s), dtype=d) for s, d in specs)
        return _reusing_call(fn, tuple(operands), outs)
    empty = torch.empty
    if len(specs) == 1:
        ((shape, dtype),) = specs

        def run_one(inputs: Sequence[Any]) -> tuple[Any, ...]:
            out = empty(shape, dtype=dtype)
            fn(*[aligned(inputs[i]) for i in operands], out)
            return (out,)

        return run_one

    # compact strides: some results may be empty (a body with a concat), and torch strides an
    # empty dim as if it had size 1 where TVM checks compact strides
    strided = [(s, _compact_strides(s), d) for s, d in specs]
    empty_strided = torch.empty_strided

    def run(inputs: Sequence[Any]) -> tuple[Any, ...]:
        outs = [empty_strided(s, st, dtype=d) for s, st, d in strided]
        fn(*[aligned(inputs[i]) for i in operands], *outs)
        return tuple(outs)

    return run


def _reusing_call(fn: Any, operands: tuple[int, ...], outs: tuple[Any, ...]) -> Call:
    """`fn` writing `outs` (allocated once by the caller) on every call. While the same operand
    tensor objects come back (parameters, caches, the reused results of earlier kernels) and
    each was usable as it is (`aligned` made no copy), the argument list of the last call is
    used again: no allocation and no checks, one packed call (a decode step's ~90 launches
    took 2-3x their isolated time in Python and torch between the kernels). Tensors pass to
    TVM as torch tensors, so each call reads their data pointer afresh. What `aligned` hands
    the kernel is kept only when it is the operand's own memory (the operand, or a view of it
    re-strided): a copy would not follow the operand's data."""
    held: tuple[Any, ...] | None = None  # the operands of the last call (kept alive: no id reuse)
    args: tuple[Any, ...] = ()

    def run(inputs: Sequence[Any]) -> tuple[Any, ...]:
        nonlocal held, args
        ins = tuple([inputs[i] for i in operands])
        if held is not None and all(map(is_, ins, held)):
            fn(*args)
            return outs
        ready = tuple([aligned(t) for t in ins])
        fn(*ready, *outs)
        same = all(r.data_ptr() == t.data_ptr() for r, t in zip(ready, ins))
        held, args = (ins, (*ready, *outs)) if same else (None, ())
        return outs

    return run


def uses_blas(policy: str, flops: int) -> bool:
    return policy == "always" or (policy == "auto" and flops >= BLAS_MIN_FLOPS)


@dataclass
class MatmulLaunch(Launch):
    """`kernels[0]` reads B as stored (nn), `kernels[1]` reads Bᵀ row-major (nt), chosen per call
    from B's strides; BLAS (`torch.matmul`) instead when the policy says so for these sizes
    ("auto": from BLAS_MIN_FLOPS, or from BLAS_SMALL_FLOPS unless it is a one-row nt GEMV; never
    an nt matmul of at most DOT_MAX_ROWS rows per matrix that the dot kernel computes)."""

    blas: str = "auto"

    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Call:
        import torch

        a = self.node.operands[0]
        out = shape_of(self.node.result, env)
        flops = 2 * int(subs_dim(a.shape[-1], env)) * _numel(out)
        blas = self.counted("blas", lambda inputs: (torch.matmul(*inputs),))
        auto = self.blas == "auto"
        b = self.node.operands[1]
        rows = out[-2] if b.type.rank > 2 else _numel(out[:-1])  # per weight matrix
        skinny = auto and rows <= DOT_MAX_ROWS and _dots(a.shape[-1])  # nt: dots at any size
        if uses_blas(self.blas, flops) and not skinny:
            return blas
        small = auto and flops >= BLAS_SMALL_FLOPS

        def tvm(kernel: Kernel) -> Call:
            return self.counted("tvm", kernel_call(fns[kernel.key], self.node, env, (0, 1), reuse))

        nn = blas if small else tvm(self.kernels[0])
        nt = tvm(self.kernels[1])
        nt_blas = small and not skinny and _numel(out[:-1]) > 1

        last: list[Any] = [None, None]  # with `reuse`: B, and Bᵀ when B is row-major (else None)

        def run(inputs: Sequence[Any]) -> tuple[Any, ...]:
            a, b = inputs
            if b is last[0]:  # a weight: the same tensor, so the same view Bᵀ, every call
                bt = last[1]
            else:
                bt = b.mT if transposed_layout(b) else None
                if reuse:  # else B may be an activation: not kept alive past the call
                    last[:] = b, bt
            if bt is None:
                return nn(inputs)
            return blas(inputs) if nt_blas else nt((a, bt))

        return run


def _dots(k: Any) -> bool:
    """Whether the nt kernel of a reduction over `k` is the dot-product schedule (static K, a
    multiple of the vector width: `backends.tvm.matmul.schedule_matmul_cpu`)."""
    return isinstance(k, int) and k % VECTOR == 0


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


TVM_EMITTERS: EmitterTable = EmitterTable("tvm")


def kernel_name(node: ir.Node, variant: str = "") -> str:
    """What the kernel computes (`backends.naming.kernel_name` for a fused body, the op's
    mnemonic otherwise), then the layout variant; the key is not part of the name."""
    if node.name == "fused.kernel":
        base = naming.kernel_name([n.name for n in node.attrs["body"].ops])
    else:
        base = naming.identifier(node.name.replace(".", "_"))
    return f"{base}_{variant}" if variant else base


def signature(node: ir.Node, variant: str = "") -> str:
    """16 hex digits: the op's structural signature (`passes.op_signature`), with a variant."""
    from passes import op_signature

    sig = op_signature(node)
    return hashlib.sha256(f"{sig}:{variant}".encode()).hexdigest()[:16] if variant else sig


def _fused_check(node: ir.Node) -> bool | str:
    return lowerable(node.attrs["body"])


@dataclass
class GemmEpilogueLaunch(KernelLaunch):
    """A `fused.kernel` that starts with a matmul: the kernel, or (large GEMMs, `blas` policy as
    for `matmul`) the GEMM through BLAS and the epilogue ops by their references."""

    blas: str = "auto"

    def bind(self, env: dict, fns: dict[str, Any], reuse: bool = False) -> Call:
        body: ir.Graph = self.node.attrs["body"]
        gemm = body.ops[0]
        k = int(subs_dim(gemm.operands[0].shape[-1], env))
        if uses_blas(self.blas, 2 * k * _numel(shape_of(gemm.results[0], env))):
            return self.counted("blas", body_call(body, env))
        return super().bind(env, fns, reuse)


@TVM_EMITTERS.register("fused.kernel", check=_fused_check)
def emit_fused(node: ir.Node, target: Target, options: dict) -> Launch:
    body: ir.Graph = node.attrs["body"]
    key = signature(node)
    kernel = make_kernel(body, kernel_name(node), key, schedule_cpu, loc=node.loc)
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
    # x·x takes one input, x·y two: the same op signature, so the operand pattern keys it too
    variant = "" if len(index) == len(node.operands) else "operands" + ",".join(map(str, index))
    key = signature(node, variant)
    kernel = make_kernel(body, kernel_name(node), key, schedule_cpu, loc=node.loc)
    return KernelLaunch(node, [kernel], index)


def _matmul_check(node: ir.Node) -> bool | str:
    a, b = (v.type for v in node.operands)
    if a.rank < 2 or b.rank < 2:
        return "matmul with a 1-D operand runs the reference"
    if not a.dtype.is_float:
        return f"integer matmul ({a.dtype}) runs the reference"
    return True


@TVM_EMITTERS.register("matmul", check=_matmul_check)
def emit_matmul(node: ir.Node, target: Target, options: dict) -> Launch:
    keys = [signature(node, "nn"), signature(node, "nt")]
    try:
        kernels = _matmul_kernels(node, keys)
    except Unsupported as e:  # both or neither: the launch needs the pair
        mark_unsupported(keys, str(e))
        raise
    return MatmulLaunch(node, kernels, (0, 1), blas=options.get("blas", "auto"))


def _matmul_kernels(node: ir.Node, keys: list[str]) -> list[Kernel]:
    """The matmul as a kernel over B as given (nn) and over B's transpose (nt)."""
    body = ir.Graph(list(node.operands), [node], list(node.results))
    nn = make_kernel(
        body,
        kernel_name(node, "nn"),
        keys[0],
        lambda f: schedule_matmul_cpu(f, False),
        loc=node.loc,
    )
    a, b = node.operands
    bt = ir.Value(b.name, ir.TensorType((*b.shape[:-2], b.shape[-1], b.shape[-2]), b.dtype))
    nt = make_kernel(
        ir.Graph([a, bt], [node], list(node.results)),
        kernel_name(node, "nt"),
        keys[1],
        lambda f: schedule_matmul_cpu(f, True),
        overrides={"matmul": lower_matmul_nt},
        loc=node.loc,
    )
    return [nn, nt]


def emit_node(node: ir.Node, target: Target, options: dict | None = None) -> Launch | str:
    """The `Launch` for `node`, or the reason it runs its reference instead."""
    entry = TVM_EMITTERS.lookup(node)
    if isinstance(entry, str):
        return entry
    try:
        return entry.fn(node, target, options or {})
    except Unsupported as e:
        return str(e)


from backends.tvm import semantic as _semantic  # noqa: F401  (registers attn/hc ops)
from backends.tvm import semantic_sparse as _semantic_sparse  # noqa: F401,E402  (sparse_mqa, indexer_topk)
from backends.tvm import semantic_moe as _semantic_moe  # noqa: F401  (registers moe ops)
from backends.tvm import semantic_attn_dense as _semantic_attn_dense  # noqa: F401,E402  (attn.sdpa)
from backends.tvm import semantic_select as _semantic_select  # noqa: F401,E402  (attn.block_select)
from backends.tvm import quant as _quant  # noqa: F401,E402  (linalg.matmul_fp8)
