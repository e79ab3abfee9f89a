"""TVM kernels for a GPU as an executable the driver writes into an artifact.

    exe = TVMBackend().compile(graph, "sm_90")   # a DeviceExecutable ("opencl", "webgpu" too)
    exe.kernel_records()                        # one source file per kernel, with a header
    binaries, files = exe.compile_binaries()    # NVIDIA: nvcc -cubin per kernel, registers

The kernels are the CPU backend's (same emitters, same TensorIR, symbolic shapes) scheduled for
the GPU by `codegen.schedule_gpu`, built in one TVM module and cut into one self-contained file
per kernel, so each `KernelRecord` owns its files:

| target | language | file | what a file holds |
|---|---|---|---|
| sm_* | cuda | `.cu` | the module's preamble (includes, helpers), then the kernel's functions |
| opencl | opencl | `.cl` | the kernel's `__kernel` functions (OpenCL C) |
| webgpu | webgpu | `.wgsl` | one WGSL shader module per `// Function:` section (one per launch) |

A dsv4c kernel is one or more device functions (`<symbol>_kernel`, `<symbol>_kernel_1`, ...):
TVM launches each stage it does not fuse (a GEMM, then its epilogue) as its own function.
`compile_binaries` runs `nvcc -cubin -arch=sm_XX` on each CUDA kernel (in parallel) and reads
registers, shared memory and spills from ptxas; without nvcc the records keep their source and
each binary row says why there is none. OpenCL and WebGPU have no binaries: the device's driver
compiles the source when the program is created (the manifest says so). WebGPU skips kernels
with 64-bit integers (WGSL has none): `skipped` lists them with the reason.

Running the kernels is not part of dsv4c: this executable is compile-only, and calling it raises
`DeviceUnavailable` saying which device it needs and what to use instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ir
from backends.base import KernelBinary, KernelRecord
from backends.targets import Target, get_target, parallel_jobs
from backends.tvm.codegen import device_target, schedule_gpu, stage_costs, unsupported_on
from backends.tvm.emitters import emit_node
from backends.tvm.kernel import Kernel, header, kernel_records, loop_summary

__all__ = [
    "NVCC_FLAGS",
    "DeviceExecutable",
    "DeviceUnavailable",
    "nvcc_version",
    "split_cuda",
    "split_sections",
    "unavailable",
]

_ENTRY = re.compile(r'^extern "C" __global__ .*?(\w+_kernel(?:_\d+)?)\(.*\) \{$')
_SECTION = re.compile(r"^// Function: (\w+)$")
_PROTOTYPE = re.compile(r"^__kernel .*\);$")
NVCC_FLAGS = ("-O3", "-w", "-Xptxas", "-v")  # with -cubin -arch=sm_XX; -v: ptxas resource lines

# target backend -> (record language, file extension, what the header says it is)
_LANGUAGES = {
    "cuda": ("cuda", "cu", "CUDA for {name}"),
    "opencl": ("opencl", "cl", "OpenCL C for any OpenCL 1.2+ device"),
    "webgpu": ("webgpu", "wgsl", "WGSL for WebGPU; one shader module per '// Function:' section"),
}
_DEVICES = {
    "cuda": "an NVIDIA {name} GPU",
    "opencl": "an OpenCL device (load the .cl files with an OpenCL runtime, e.g. TVM's)",
    "webgpu": "a WebGPU device (a browser or wgpu/Dawn; load the .wgsl shader modules)",
}


class DeviceUnavailable(RuntimeError):
    """TVM GPU kernels cannot run here (no such GPU, or no TVM CUDA runtime path)."""


def unavailable(target: Target, folder: str | None = None) -> DeviceUnavailable:
    """The error a TVM GPU executable (or `dsv4c.load`/`dsv4c run` before loading one) raises:
    which device its code needs, where the code is (`folder`, default `kernels/<target>`), and
    how to compile for this machine. dsv4c launches no TVM GPU kernels, so there always is one."""
    import torch

    kind = target.backend
    if kind not in _LANGUAGES:
        raise ValueError(f"target {target.name} has no TVM GPU code (cuda, opencl, webgpu)")
    language, _, what = _LANGUAGES[kind]
    what = what.format(name=target.name).split(";")[0]
    where = f"{folder or f'kernels/{target.name}'}/ ({what})"
    device = _DEVICES[kind].format(name=target.name)
    if target.source_only:
        return DeviceUnavailable(
            f"this holds TVM {language} source for {target.name} in {where}; it needs {device}, "
            f"and dsv4c launches no {language} kernels. Compile for this machine instead: "
            "--backend tvm --target cpu"
        )
    if not torch.cuda.is_available():
        return DeviceUnavailable(
            f"this holds TVM CUDA kernels for {target.name} ({target.description}) in {where}; "
            f"this machine has no CUDA GPU to run them. Run it on {device}, or compile for this "
            "machine: --backend tvm --target cpu"
        )
    return DeviceUnavailable(
        f"dsv4c compiles TVM kernels for {target.name} ({where}) but does not launch them: use "
        "--backend triton to run on this GPU, or --backend tvm --target cpu"
    )


def split_cuda(source: str) -> tuple[str, dict[str, str]]:
    """(preamble, device function -> its definition) of a TVM CUDA module: the preamble is the
    text before the first `extern "C"` (includes, helpers); a definition runs from its
    `extern "C" __global__ ... {` line to the `}` closing it at column 0."""
    lines = source.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.startswith('extern "C"')), len(lines))
    kernels: dict[str, str] = {}
    i = first
    while i < len(lines):
        match = _ENTRY.match(lines[i])
        if match is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "}")
        kernels[match.group(1)] = "\n".join(lines[i : end + 1])
        i = end + 1
    return "\n".join(lines[:first]).rstrip() + "\n", kernels


def split_sections(source: str, kind: str) -> dict[str, str]:
    """Device function -> its text, of a TVM OpenCL or WebGPU module: TVM prints one section
    per function, opened by `// Function: <name>`. An OpenCL section declares every kernel of
    the module before defining its own: those prototypes are dropped (each kernel stands
    alone). A WebGPU section is a whole shader module (its own bindings) and is kept whole."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in source.splitlines():
        found = _SECTION.match(line)
        if found is not None and found.group(1) not in sections:
            current = sections.setdefault(found.group(1), [])
        if current is None or (kind == "opencl" and _PROTOTYPE.match(line)):
            continue
        current.append(line)
    return {name: "\n".join(lines).strip() + "\n" for name, lines in sections.items()}


def functions_of(symbol: str, functions: Mapping[str, str]) -> list[str]:
    """The device functions of kernel `symbol`, in module order: TVM names them
    `<symbol>_kernel`, `<symbol>_kernel_1`, ... (one per launched stage)."""
    first = f"{symbol}_kernel"
    return [f for f in functions if f == first or f.startswith(first + "_")]


def nvcc_version() -> str | None:
    """`nvcc --version`'s release line, or None when nvcc is not on PATH."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if "release" in ln]
    return lines[0].strip() if lines else out.stdout.strip()[-80:]


class DeviceExecutable:
    """The TVM kernels of `graph` for GPU `target` (module docstring); compile-only."""

    def __init__(self, graph: ir.Graph, target: Target) -> None:
        if target.backend not in _LANGUAGES:
            raise ValueError(
                f"the TVM backend emits GPU code for NVIDIA (sm_*), opencl and webgpu targets, "
                f"not {target.name}; use --backend triton for AMD GPUs"
            )
        self.graph = graph
        self.target = target
        self.kind = target.backend  # "cuda", "opencl" or "webgpu": TVM's target kind
        self.language, self.ext, what = _LANGUAGES[self.kind]
        self.what = what.format(name=target.name)
        cpu = get_target("cpu")
        self.uses: list[tuple[ir.Node, list[Kernel]]] = []
        self.falls: list[tuple[str, str]] = []
        for node in graph.ops:
            launch = emit_node(node, cpu)
            if isinstance(launch, str):
                self.falls.append((node.name, launch))
            self.uses.append((node, [] if isinstance(launch, str) else list(launch.kernels)))
        self.skipped: dict[str, str] = {}  # kernel symbol -> why it has no GPU code
        self._records: list[KernelRecord] | None = None

    def __call__(self, *args: Any, params: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
        raise unavailable(self.target)

    def kernel_records(self) -> list[KernelRecord]:
        """One record per kernel with GPU code: its source file under a `//` header."""
        if self._records is None:
            self._records = self._generate()
        return list(self._records)

    def _generate(self) -> list[KernelRecord]:
        tgt = device_target(self.target, self.kind)
        funcs: dict[str, Any] = {}
        for _, kernels in self.uses:
            for k in kernels:
                if k.symbol in funcs or k.symbol in self.skipped:
                    continue
                why = unsupported_on(k, self.kind)
                if why is None:
                    why = self._schedule(k, tgt, funcs)
                if why is not None:
                    self.skipped[k.symbol] = why
        if not funcs:
            return []
        preamble, functions = self._build(funcs, tgt)

        def render(k: Kernel) -> str:
            lines = header(k, self.what, funcs[k.symbol], comment="//")
            parts = [functions[f] for f in functions_of(k.symbol, functions)]
            return "\n".join([*lines, preamble, "\n\n".join(parts), ""])

        def launch(k: Kernel) -> dict[str, Any]:
            info = {"kind": "generated", "loops": loop_summary(funcs[k.symbol])}
            if self.kind == "cuda":
                info["threads"] = _threads(functions[f"{k.symbol}_kernel"])
            return info | {"functions": len(functions_of(k.symbol, functions))}

        uses = [(n, [k for k in ks if k.symbol in funcs]) for n, ks in self.uses]
        records = kernel_records(uses, render, language=self.language, ext=self.ext, launch=launch)
        kernel = {k.key: k for _, ks in uses for k in ks}
        costs = {key: stage_costs(funcs[k.symbol], k.body) for key, k in kernel.items()}
        return [r.with_cost(costs[r.key]) for r in records]

    @staticmethod
    def _schedule(k: Kernel, tgt: Any, funcs: dict[str, Any]) -> str | None:
        """Schedule `k` into `funcs`; None, or why TVM could not (the kernel is skipped)."""
        try:
            funcs[k.symbol] = schedule_gpu(k.gpu_ir(), tgt)
        except Exception as e:  # noqa: BLE001  (listed in `skipped` with the reason)
            last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
            return f"{type(e).__name__}: {last}"
        return None

    def _build(self, funcs: Mapping[str, Any], tgt: Any) -> tuple[str, dict[str, str]]:
        """(preamble, device function -> source) of one TVM module holding `funcs`."""
        import tvm

        built = tvm.tirx.build(tvm.IRModule(dict(funcs)), target=tgt)
        module = [m for m in built.imports if m.kind == self.kind]
        text = module[0].inspect_source() if module else ""
        if self.kind == "cuda":
            return split_cuda(text)
        return "", split_sections(text, self.kind)

    def compile_binaries(self) -> tuple[dict[str, list[KernelBinary]], dict[str, bytes]]:
        """nvcc each CUDA kernel's source to a cubin. Returns (binaries by kernel key, file
        bytes by name inside `kernels/<target>/`); without nvcc, each binary's `error` says so.
        OpenCL and WebGPU kernels have no binaries (their driver compiles the source)."""
        records = self.kernel_records()
        if self.kind != "cuda":
            return {}, {}
        version = nvcc_version()
        if version is None:
            why = "nvcc not found on PATH: CUDA source only (install the CUDA toolkit for cubins)"
            none = KernelBinary(self.target.name, "nvcc", (), error=why)
            return {r.key: [none] for r in records}, {}
        with tempfile.TemporaryDirectory(prefix="dsv4c-nvcc-") as tmp:
            with ThreadPoolExecutor(max(1, parallel_jobs())) as pool:
                done = list(pool.map(lambda r: self.nvcc(r, Path(tmp)), records))
        binaries = {r.key: [b] for r, (b, _) in zip(records, done)}
        files = {name: data for _, blobs in done for name, data in blobs.items()}
        return binaries, files

    def nvcc(self, record: KernelRecord, tmp: Path) -> tuple[KernelBinary, dict[str, bytes]]:
        """nvcc one kernel's CUDA source (`NVCC_FLAGS`) in folder `tmp`: its `KernelBinary`
        (registers, shared memory, spills from ptxas) and {cubin file name: bytes}."""
        cu = tmp / record.source_file
        cu.write_text(record.source)
        cubin = tmp / f"{record.stem}.cubin"
        arch = f"sm_{self.target.arch}"
        cmd = ["nvcc", "-cubin", f"-arch={arch}", *NVCC_FLAGS]
        done = subprocess.run([*cmd, "-o", str(cubin), str(cu)], capture_output=True, text=True)
        if done.returncode != 0:
            why = f"nvcc failed: {done.stderr.strip().splitlines()[-1][:300]}"
            return KernelBinary(self.target.name, "nvcc", (), error=why), {}
        data = cubin.read_bytes()
        usage = ptxas_usage(done.stderr)
        binary = KernelBinary(
            self.target.name,
            "nvcc",
            (cubin.name,),
            options={"arch": arch, "threads": _threads(record.source)},
            binary_bytes=len(data),
            **usage,
        )
        return binary, {cubin.name: data}

    def report(self) -> dict[str, Any]:
        return {
            "backend": "tvm",
            "target": self.target.name,
            "device_code": self.language,
            "kernels": [
                {"name": r.name, "key": r.key, "ops": list(r.fused_ops), "uses": r.uses}
                for r in self.kernel_records()
            ],
            "skipped": dict(self.skipped),
            "fallbacks": [{"op": op, "reason": r, "count": 1} for op, r in self.falls],
        }


def ptxas_usage(log: str) -> dict[str, int | None]:
    """Registers, shared memory (bytes), spill-store bytes and stack frame of the one kernel
    `nvcc -Xptxas -v` compiled (its `ptxas info` lines)."""

    def grab(pattern: str) -> int | None:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else None

    return {
        "registers": grab(r"Used (\d+) registers"),
        "shared": grab(r"(\d+) bytes smem") or 0,
        "spills": grab(r"(\d+) bytes spill stores"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
    }


def _threads(source: str) -> int | None:
    found = re.search(r"__launch_bounds__\((\d+)\)", source)
    return int(found.group(1)) if found else None
