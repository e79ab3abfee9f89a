"""GPU code from the TVM backend: CUDA (then cubin with nvcc), OpenCL and WebGPU source.

    from backends.tvm.codegen import device_source, nvcc_cubin
    src = device_source(graph, "sm_90")            # every distinct kernel of the graph, CUDA
    nvcc_cubin(src, out_dir)                       # -> out_dir/<graph>.sm_90.cubin
    device_source(graph, "opencl")                 # or "webgpu" (WGSL); or kind="opencl"

The kernels are the CPU backend's (same emitters, same TensorIR, symbolic shapes); only the
schedule differs: GEMMs get a hand schedule (`MATMUL_TILE` = 16×16 output tiles, one thread
per element; DLight's Matmul rule is not used: its fp16 tensor-core path crashes in TVM 0.27);
kernels with `keep_*` stages (the semantic attention, compressor and mHC kernels) a plain
one-thread-per-output-element binding of each stage, because DLight inlines every stage it can
(for hc.pre's unrolled Sinkhorn chain that grows the expression exponentially: DLight did not
finish in minutes); everything else the DLight rules (Reduction, GeneralReduction, Fallback),
and when a rule refuses, the plain binding. `stage_costs` reads from a scheduled kernel what the
cost model needs (launches, intermediates in device memory, the GEMM tile).
"""

from __future__ import annotations

import functools
import operator
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ir
from backends.base import CostHints
from backends.targets import Target, get_target
from backends.tvm.emitters import emit_node
from backends.tvm.kernel import Kernel
from backends.tvm.schedule_cpu import KEEP, _ok
from ir.symbolic import Dim, canon_dim, sym

__all__ = [
    "DeviceSource",
    "device_source",
    "device_target",
    "nvcc_cubin",
    "schedule_gpu",
    "stage_costs",
    "unsupported_on",
]

KINDS = ("cuda", "opencl", "webgpu")
THREADS = 256
MATMUL_TILE = 16  # output rows and cols per block of the GEMM hand schedule


@dataclass
class DeviceSource:
    """The source of one module holding every kernel of a graph for one GPU target."""

    kind: str
    target: str
    kernels: list[str]
    source: str
    skipped: dict[str, str] = field(default_factory=dict)  # kernel -> why it has no GPU code


def device_target(target: str | Target, kind: str | None = None) -> Any:
    """TVM's target for `target`; `kind` (default: the target's own, CUDA for sm_*) picks the
    language of the source."""
    import tvm

    t = get_target(target)
    kind = kind or (t.backend if t.source_only else "cuda")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "cuda":
        if t.backend != "cuda":
            raise ValueError(f"CUDA source needs an NVIDIA target (sm_*), got {t.name}")
        return tvm.target.Target({"kind": "cuda", "arch": f"sm_{t.arch}"})
    return tvm.target.Target({"kind": kind})


def schedule_gpu(func: Any, target: Any) -> Any:
    """A GPU schedule for one lowered kernel (see the module docstring)."""
    import tvm
    from tvm.s_tir import dlight as dl

    if _has_block(func, "matmul"):
        return _schedule_matmul(func)
    if _keeps_stages(func):  # DLight would inline them (the Sinkhorn chain grows exponentially)
        return _bind_all(func)
    mod = tvm.IRModule({"main": func})
    try:
        with target:
            rules = (dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
            mod = dl.ApplyDefaultSchedule(*rules)(mod)
        return mod["main"]
    except Exception:  # noqa: BLE001  (a rule TVM refuses: bind one thread per element)
        return _bind_all(func)


def _has_block(func: Any, name: str) -> bool:
    from tvm import s_tir

    try:
        s_tir.Schedule(func).get_sblock(name)
    except Exception:  # noqa: BLE001
        return False
    return True


def _keeps_stages(func: Any) -> bool:
    """Whether `func` has stages that must not be inlined (named `keep_*`, see schedule_cpu)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return any(sch.get(b).name_hint.startswith(KEEP) for b in blocks)


def _inline_stages(sch: Any) -> None:
    """Inline every non-output elementwise stage (constants, casts) into its consumers."""
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block in reversed(sch.get_child_blocks(root)):
        spatial = all(iv.iter_type == 0 for iv in sch.get(block).iter_vars)
        name = sch.get(block).name_hint
        if spatial and name not in outputs and not name.startswith(KEEP):
            _ok(sch.compute_inline, block)  # a refusal keeps it as its own loop nest


def _bind_spatial(sch: Any, block: Any) -> None:
    loops = sch.get_loops(block)
    spatial = [lp for lp, iv in zip(loops, sch.get(block).iter_vars) if iv.iter_type == 0]
    if not spatial:  # a 0-d result: one thread
        spatial = [sch.add_unit_loop(block)]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _bind_all(func: Any) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    _inline_stages(sch)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        _bind_spatial(sch, block)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_matmul(func: Any) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    _inline_stages(sch)
    block = sch.get_sblock("matmul")
    *batch, i, j, _k = sch.get_loops(block)
    i0, i1 = sch.split(i, [None, MATMUL_TILE])
    j0, j1 = sch.split(j, [None, MATMUL_TILE])
    sch.reorder(*batch, i0, j0, i1, j1)
    bx = sch.fuse(*batch, i0, j0)
    sch.bind(bx, "blockIdx.x")
    sch.bind(sch.fuse(i1, j1), "threadIdx.x")
    for other in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(other).name_hint != "matmul":
            _bind_spatial(sch, other)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def unsupported_on(kernel: Kernel, kind: str) -> str | None:
    """Why `kernel` has no `kind` source, or None when TVM can emit it."""
    if kind == "webgpu" and "int64" in kernel.tensor_ir.script():
        return "WebGPU (WGSL) has no 64-bit integers"
    return None


def stage_costs(func: Any, body: ir.Graph | None) -> CostHints:
    """What the cost model needs of a GPU-scheduled kernel (`CostHints`), read from its
    TensorIR: one launch per root stage bound to `blockIdx`, the global buffers the root block
    allocates (a stage's result written to device memory and read back by the next), and the
    hand-scheduled GEMM's output tile (`MATMUL_TILE`, no shared-memory staging). `body`, the
    kernel's IR, names the TIR shape variables (`floor_T_4_` is the dim floor(T/4))."""
    import tvm

    from backends.tvm.kernel import _top_loops

    launches: list[int] = []

    def visit(loop: Any) -> None:
        tag = loop.thread_binding.thread_tag if loop.thread_binding is not None else ""
        launches.append(1 if tag.startswith("blockIdx") else 0)

    _top_loops(func.body, visit)
    root = func.body.block if hasattr(func.body, "block") else None
    dims = _dim_names(body)
    nbytes: Dim = 0
    for buf in root.alloc_buffers if root is not None else ():
        if buf.scope() == "global":
            elems = functools.reduce(operator.mul, (_dim(e, dims) for e in buf.shape), 1)
            nbytes = nbytes + elems * tvm.DataType(str(buf.dtype)).bits // 8
    tile = (MATMUL_TILE, MATMUL_TILE) if _has_block(func, "matmul") else None
    return CostHints(max(1, sum(launches)), canon_dim(nbytes), tile)


def _dim_names(body: ir.Graph | None) -> dict[str, Dim]:
    """TIR variable name -> the IR dim it stands for: `Lowering` gives each distinct symbolic
    dim of the kernel's inputs a variable named after its text (`_ident`)."""
    from backends.tvm.lower import _ident

    dims = [d for v in (body.inputs if body else ()) for d in v.type.shape]
    return {_ident(str(d), "d"): d for d in dims if not isinstance(d, int)}


def _dim(e: Any, dims: Mapping[str, Dim]) -> Dim:
    """A TIR shape expression as an IR dim (variables through `dims`, else graph symbols)."""
    import sympy
    from tvm import tirx

    if isinstance(e, tirx.IntImm):
        return int(e.value)
    if isinstance(e, tirx.Var):
        return dims.get(e.name, sym(e.name))
    arith = {tirx.Add: operator.add, tirx.Sub: operator.sub, tirx.Mul: operator.mul}
    for cls, fn in arith.items():
        if isinstance(e, cls):
            return fn(_dim(e.a, dims), _dim(e.b, dims))
    if isinstance(e, tirx.FloorDiv):
        return sympy.floor(_dim(e.a, dims) / _dim(e.b, dims))
    raise ValueError(f"no IR dim for the TIR shape expression {e}")


def graph_kernels(graph: ir.Graph) -> list[Kernel]:
    """The distinct TVM kernels of `graph`, in first-use order."""
    seen: dict[str, Kernel] = {}
    for node in graph.ops:
        launch = emit_node(node, get_target("cpu"))
        for k in [] if isinstance(launch, str) else launch.kernels:
            seen.setdefault(k.key, k)
    return list(seen.values())


def device_source(
    graph: ir.Graph, target: str | Target = "sm_90", kind: str | None = None
) -> DeviceSource:
    """Source of one module with every kernel of `graph`, scheduled for `target` (`kind`:
    as `device_target`)."""
    import tvm

    t = get_target(target)
    kind = kind or (t.backend if t.source_only else "cuda")
    tgt = device_target(target, kind)
    funcs, skipped = {}, {}
    for k in graph_kernels(graph):
        why = unsupported_on(k, kind)
        if why is not None:
            skipped[k.symbol] = why
            continue
        try:
            funcs[k.symbol] = schedule_gpu(k.gpu_ir(), tgt)
        except Exception as e:  # noqa: BLE001  (listed in `skipped` with the reason)
            skipped[k.symbol] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    ex = tvm.tirx.build(tvm.IRModule(funcs), target=tgt)
    dev = [m for m in ex.imports if m.kind in ("cuda", "opencl", "webgpu")]
    source = dev[0].inspect_source() if dev else ""
    return DeviceSource(kind, get_target(target).name, sorted(funcs), source, skipped)


def nvcc_cubin(src: DeviceSource, out_dir: str | Path, name: str = "kernels") -> Path:
    """Compile CUDA source to a cubin for its arch with nvcc (-cubin -arch=sm_XX -O3)."""
    if src.kind != "cuda":
        raise ValueError(f"nvcc compiles CUDA source, got {src.kind}")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH; install the CUDA toolkit")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cu = out_dir / f"{name}.{src.target}.cu"
    cu.write_text(src.source)
    cubin = cu.with_suffix(".cubin")
    arch = get_target(src.target).arch
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-o", str(cubin), str(cu)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return cubin
