"""Ahead-of-time compilation of a graph's kernels for GPU targets, no GPU needed.

    exe = TritonBackend().compile(graph, "sm_90")
    results = aot_compile(exe, ["sm_90", "gfx942"], bindings={"T": 4096}, keep_dir="out/kernels")
    print(format_table(results))

Every distinct (kernel source, constexprs, options) is compiled once per target with
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...), options=...)`.
Registers and spills come from the compiled binary (`binary.py`), shared memory from the
compiled kernel's metadata. A kernel that fails to compile for a target (say, out of shared
memory) is a row with `error` set, not an exception. With `keep_dir`, the PTX + cubin (NVIDIA)
or AMDGCN + hsaco (AMD) of each kernel are written to `keep_dir/<target>/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ir
from backends.targets import GPU_TARGETS, Target, get_target, parallel_jobs
from backends.triton.binary import cubin_usage, hsaco_usage, ptxas_spills
from backends.triton.emitters import AotVariant
from backends.triton.kernel import KernelSource, Param, load_jit
from backends.triton.runtime import TritonExecutable

__all__ = [
    "DEFAULT_DIM",
    "AotResult",
    "aot_compile",
    "compile_source",
    "distinct_variants",
    "format_table",
]

DEFAULT_DIM = 1024  # value for symbolic dims without a binding (only tile choices depend on it)
_KEEP = {"cuda": ("ptx", "cubin"), "hip": ("amdgcn", "hsaco")}


@dataclass(frozen=True)
class AotResult:
    kernel: str
    key: str  # content hash of the kernel source
    target: str
    constexprs: dict[str, Any]
    options: dict[str, Any]
    registers: int | None = None  # per thread (AMD: VGPRs + AGPRs)
    sgprs: int | None = None  # AMD only
    shared: int | None = None  # bytes of shared memory / LDS per block
    spills: int | None = None  # NVIDIA: spill-store bytes; AMD: spilled registers
    stack_bytes: int | None = None  # NVIDIA: stack frame per thread; AMD: scratch per lane
    binary_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None
    files: tuple[str, ...] = field(default=())


def _jit_function(source: KernelSource) -> Any:
    """A compilable `JITFunction`, also when the interpreter is on (triton.jit then returns an
    `InterpretedFunction` wrapping the plain function)."""
    from triton.runtime.jit import JITFunction

    fn = load_jit(source)
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def compile_source(source: KernelSource, variant: AotVariant, target: Target) -> Any:
    """`triton.compile` one kernel variant for one GPU target; returns the CompiledKernel.
    Needs a process where the Triton interpreter is off (`aot_compile` arranges that)."""
    import triton
    from triton.compiler import ASTSource

    constexprs = dict(variant.constexprs)
    constexprs |= {name: 1 for name, hint in variant.hints.items() if hint == 1}
    signature = source.signature(constexprs)
    signature |= {name: "constexpr" for name, hint in variant.hints.items() if hint == 1}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, p in enumerate(source.params)
        if p.kind == "ptr" or variant.hints.get(p.name) == 16
    }
    src = ASTSource(_jit_function(source), signature, constexprs, attrs)
    # FMA contraction stays on, as the JIT does by default (said explicitly: Triton 3.9 warns
    # that its default changes in 3.10)
    options = {"enable_fp_fusion": True} | dict(variant.options)
    return triton.compile(src, target=target.gpu_target(), options=options)


def _compile_one(
    source: KernelSource, variant: AotVariant, target: Target, keep_dir: Path | None
) -> AotResult:
    base = dict(
        kernel=source.name,
        key=source.key,
        target=target.name,
        constexprs=dict(variant.constexprs),
        options=dict(variant.options),
    )
    start = time.perf_counter()
    try:
        compiled = compile_source(source, variant, target)
    except Exception as e:  # a failed compile is a result row, not a crash
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
        where = f" ({lines[0]})" if len(lines) > 1 else ""
        msg = f"{type(e).__name__}: {lines[-1]}{where}"  # Triton puts the reason last
        return AotResult(**base, seconds=time.perf_counter() - start, error=msg[:300])
    seconds = time.perf_counter() - start
    asm_kind, bin_kind = _KEEP[target.backend]
    binary = compiled.asm[bin_kind]
    usage = cubin_usage(binary) if target.backend == "cuda" else hsaco_usage(binary)
    if usage.spills is None:  # a stack frame: spills, or libdevice's sin/cos scratch?
        fusion = bool(getattr(compiled.metadata, "enable_fp_fusion", True))
        spills = ptxas_spills(compiled.asm["ptx"], int(target.arch), fusion)  # type: ignore[arg-type]
        usage = dataclasses.replace(usage, spills=spills)
    files: list[str] = []
    if keep_dir is not None:
        folder = keep_dir / target.name
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{source.name}_{source.key}"
        for kind in (asm_kind, bin_kind):
            data = compiled.asm[kind]
            path = folder / f"{stem}.{kind}"
            path.write_bytes(data if isinstance(data, bytes) else data.encode())
            files.append(str(path))
    return AotResult(
        **base,
        registers=usage.registers,
        sgprs=usage.sgprs,
        shared=int(compiled.metadata.shared),
        spills=usage.spills,
        stack_bytes=usage.stack_bytes,
        binary_bytes=len(binary),
        seconds=seconds,
        files=tuple(files),
    )


def _env(graph: ir.Graph, bindings: Mapping[str, int] | None) -> dict:
    env = {}
    names = dict(bindings or {})
    for v in graph.inputs:
        for s in v.type.symbols:
            env[s] = int(names.get(s.name, DEFAULT_DIM))
    return env


def distinct_variants(
    exes: Sequence[Any], target: Target, bindings: Mapping[str, int] | None
) -> list[tuple[KernelSource, AotVariant]]:
    """Every distinct (kernel source, variant) the executables launch on `target`, in first-use
    order; symbols without a binding take `DEFAULT_DIM`."""
    seen: dict[tuple, tuple[KernelSource, AotVariant]] = {}
    for exe in exes:
        env = _env(exe.graph, bindings)
        for step in exe.steps:
            if step.launch is None:
                continue
            for variant in step.launch.aot_variants(env, target):
                source = variant.source or step.launch.source
                key = (
                    source.key,
                    tuple(sorted(variant.constexprs.items())),
                    tuple(sorted(variant.options.items())),
                    tuple(sorted(variant.hints.items())),
                )
                seen.setdefault(key, (source, variant))
    return list(seen.values())


def aot_compile(
    exe: TritonExecutable | Sequence[TritonExecutable],
    targets: Iterable[str | Target] = GPU_TARGETS,
    *,
    bindings: Mapping[str, int] | None = None,
    keep_dir: str | Path | None = None,
) -> list[AotResult]:
    """Compile every distinct kernel of `exe` (or of several executables, e.g. a model's prefill
    and decode: a kernel they share compiles once) for each target (see the module docstring)."""
    exes = [exe] if hasattr(exe, "steps") else list(exe)
    keep = Path(keep_dir) if keep_dir is not None else None
    jobs = [
        (source, variant, target)
        for target in map(get_target, targets)
        for source, variant in distinct_variants(exes, target, bindings)
    ]
    # Triton's compile is single-threaded Python + LLVM + ptxas: kernels compile side by side
    workers = min(len(jobs), parallel_jobs())
    if workers > 1 or _interpreting():
        return _compile_in_subprocesses(jobs, keep, max(1, workers))
    return [_compile_one(src, variant, target, keep) for src, variant, target in jobs]


def _interpreting() -> bool:
    """True when this process runs Triton's CPU interpreter: its `triton.jit` and patched
    `triton.language` cannot feed the compiler, so compiling happens in a child process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compile_in_subprocesses(
    jobs: list[tuple[KernelSource, AotVariant, Target]], keep: Path | None, workers: int
) -> list[AotResult]:
    """Compile `jobs` in `workers` child processes at once (`--worker`, JSON on stdin and
    stdout), dealt round-robin so the slow attention kernels spread out; rows in job order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "backends.triton.aot", "--worker", str(keep or "")]
    procs = []
    for w in range(workers):
        payload = json.dumps([_job_json(*job) for job in jobs[w::workers]])
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=root,
        )  # fmt: skip
        procs.append((proc, payload))
    outputs = [proc.communicate(payload) for proc, payload in procs]
    rows: list[AotResult | None] = [None] * len(jobs)
    for w, ((proc, _), (stdout, stderr)) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise RuntimeError(f"AOT worker failed ({proc.returncode}):\n{stderr[-3000:]}")
        done = json.loads(stdout.strip().splitlines()[-1])
        for i, r in zip(range(w, len(jobs), workers), done):
            rows[i] = AotResult(**{**r, "files": tuple(r["files"])})
    return rows  # type: ignore[return-value]


def _job_json(src: KernelSource, variant: AotVariant, target: Target) -> dict[str, Any]:
    return {
        "name": src.name,
        "source": src.source,
        "params": [[p.name, p.kind, p.dtype.value if p.dtype else None] for p in src.params],
        "fused_ops": list(src.fused_ops),
        "constexprs": variant.constexprs,
        "options": variant.options,
        "hints": variant.hints,
        "target": target.name,
    }


def _worker(keep: str) -> None:
    """`python -m backends.triton.aot --worker KEEP_DIR`: compile the JSON jobs on stdin."""
    jobs = json.loads(sys.stdin.read())
    out = []
    for job in jobs:
        params = tuple(Param(n, k, ir.DType(d) if d else None) for n, k, d in job["params"])
        src = KernelSource(job["name"], job["source"], params, tuple(job["fused_ops"]))
        variant = AotVariant(job["constexprs"], job["options"], job["hints"])
        result = _compile_one(src, variant, get_target(job["target"]), Path(keep) if keep else None)
        out.append(dataclasses.asdict(result))
    print(json.dumps(out))


def format_table(results: Sequence[AotResult]) -> str:
    """A fixed-width table: kernel, target, tiles, warps/stages, registers, shared memory, stack
    and spills (NVIDIA: spill-store bytes; AMD: spilled registers)."""
    head = ("kernel", "target", "tiles", "warps", "stages", "regs", "sgprs", "shared", "stack")
    head += ("spills",)
    rows = [head]
    for r in results:
        tiles = "x".join(str(v) for k, v in r.constexprs.items() if k.startswith("BLOCK_"))
        if r.error:
            rows.append((r.kernel, r.target, tiles, "", "", "", "", "", "", f"error: {r.error}"))
            continue
        unit = " B" if get_target(r.target).backend == "cuda" else " regs"
        spills = "0" if not r.spills else f"{r.spills}{unit}"
        rows.append(
            (
                r.kernel,
                r.target,
                tiles,
                str(r.options.get("num_warps", "")),
                str(r.options.get("num_stages", "")),
                str(r.registers),
                "" if r.sgprs is None else str(r.sgprs),
                _kib(r.shared),
                _kib(r.stack_bytes),
                spills,
            )
        )
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(head) - 1)]
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * max(len(ln) for ln in lines))
    return "\n".join(lines)


def _kib(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
