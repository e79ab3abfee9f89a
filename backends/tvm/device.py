"""TVM kernels for an NVIDIA GPU as an executable the driver writes into an artifact.

    exe = TVMBackend().compile(graph, "sm_90")   # a DeviceExecutable
    exe.kernel_records()                        # one CUDA source per kernel, with a header
    binaries, files = exe.compile_binaries()    # nvcc -cubin per kernel, registers and spills

The kernels are the CPU backend's (same emitters, same TensorIR, symbolic shapes) scheduled for
the GPU by `codegen.schedule_gpu`, built to CUDA in one TVM module and cut into one
self-contained `.cu` per kernel (the module's preamble of helpers, then that kernel), so each
`KernelRecord` owns its files. `compile_binaries` runs `nvcc -cubin -arch=sm_XX` on each kernel
(in parallel) and reads registers, shared memory and spills from ptxas; without nvcc the records
keep their source and each binary row says why there is none.

Running the kernels is not part of dsv4c: this executable is compile-only, and calling it raises
`DeviceUnavailable` saying why (no GPU here, or no TVM CUDA runtime path) and what to use.
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
from backends.tvm.codegen import device_target, schedule_gpu
from backends.tvm.emitters import emit_node
from backends.tvm.kernel import Kernel, header, kernel_records, loop_summary

__all__ = ["DeviceExecutable", "DeviceUnavailable", "nvcc_version", "split_cuda"]

_ENTRY = re.compile(r'^extern "C" __global__ .*?(\w+)_kernel\(.*\) \{$')


class DeviceUnavailable(RuntimeError):
    """TVM GPU kernels cannot run here (no such GPU, or no TVM CUDA runtime path)."""


def split_cuda(source: str) -> tuple[str, dict[str, str]]:
    """(preamble, kernel symbol -> its definition) of a TVM CUDA module: the preamble is the
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
        if target.backend != "cuda":
            raise ValueError(
                f"the TVM backend emits GPU code for NVIDIA targets (sm_*), not {target.name}; "
                "use --backend triton for AMD GPUs"
            )
        self.graph = graph
        self.target = target
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
        import torch

        where = f"kernels/{self.target.name}/ (CUDA source and cubins)"
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"this holds TVM CUDA kernels for {self.target.name} ({self.target.description}) "
                f"in {where}; this machine has no CUDA GPU to run them. Run it on an "
                f"{self.target.name} GPU, or compile for this machine: --backend tvm --target cpu"
            )
        raise DeviceUnavailable(
            f"dsv4c compiles TVM kernels for {self.target.name} ({where}) but does not launch "
            "them: use --backend triton to run on this GPU, or --backend tvm --target cpu"
        )

    def kernel_records(self) -> list[KernelRecord]:
        """One record per kernel with GPU code: CUDA source (`.cu`) under a `//` header."""
        if self._records is None:
            self._records = self._generate()
        return list(self._records)

    def _generate(self) -> list[KernelRecord]:
        import tvm

        tgt = device_target(self.target, "cuda")
        funcs: dict[str, Any] = {}
        for node, kernels in self.uses:
            for k in kernels:
                if k.symbol in funcs or k.symbol in self.skipped:
                    continue
                try:
                    funcs[k.symbol] = schedule_gpu(k.gpu_ir(), tgt)
                except Exception as e:  # noqa: BLE001  (listed in `skipped` with the reason)
                    last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
                    self.skipped[k.symbol] = f"{type(e).__name__}: {last}"
        if not funcs:
            return []
        built = tvm.tirx.build(tvm.IRModule(funcs), target=tgt)
        cuda = [m for m in built.imports if m.kind == "cuda"]
        preamble, parts = split_cuda(cuda[0].inspect_source() if cuda else "")
        what = f"CUDA for {self.target.name}"

        def render(k: Kernel) -> str:
            lines = header(k, what, funcs[k.symbol], comment="//")
            return "\n".join([*lines, preamble, parts[k.symbol], ""])

        def launch(k: Kernel) -> dict[str, Any]:
            threads = _threads(parts[k.symbol])
            return {"kind": "generated", "loops": loop_summary(funcs[k.symbol]), "threads": threads}

        uses = [(n, [k for k in ks if k.symbol in parts]) for n, ks in self.uses]
        return kernel_records(uses, render, language="cuda", ext="cu", launch=launch)

    def compile_binaries(self) -> tuple[dict[str, list[KernelBinary]], dict[str, bytes]]:
        """nvcc each kernel's source to a cubin. Returns (binaries by kernel key, file bytes by
        name inside `kernels/<target>/`); without nvcc, each binary's `error` says so."""
        records = self.kernel_records()
        version = nvcc_version()
        if version is None:
            why = "nvcc not found on PATH: CUDA source only (install the CUDA toolkit for cubins)"
            return {r.key: [KernelBinary(self.target.name, "nvcc", (), error=why)] for r in records}, {}
        with tempfile.TemporaryDirectory(prefix="dsv4c-nvcc-") as tmp:
            with ThreadPoolExecutor(max(1, parallel_jobs())) as pool:
                done = list(pool.map(lambda r: self._nvcc(r, Path(tmp)), records))
        binaries = {r.key: [b] for r, (b, _) in zip(records, done)}
        files = {name: data for _, blobs in done for name, data in blobs.items()}
        return binaries, files

    def _nvcc(self, record: KernelRecord, tmp: Path) -> tuple[KernelBinary, dict[str, bytes]]:
        cu = tmp / record.source_file
        cu.write_text(record.source)
        cubin = tmp / f"{record.stem}.cubin"
        arch = f"sm_{self.target.arch}"
        cmd = ["nvcc", "-cubin", f"-arch={arch}", "-O3", "-w", "-Xptxas", "-v"]
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
            "device_code": "cuda",
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
