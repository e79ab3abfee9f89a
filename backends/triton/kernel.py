"""Generated kernel sources and how they become Triton JIT functions.

A `KernelSource` is the complete text of one Python module holding one `@triton.jit` kernel, plus
its parameter list (for `ASTSource` signatures and launches). Equal sources are the same kernel:
`key` is a content hash, so identical layers share one kernel. `load_jit` writes the module into
the kernel cache folder (env `DSV4C_CACHE_DIR`, default `~/.cache/dsv4c/triton`) and imports it:
Triton reads kernel source from files, so generated kernels must live in one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ir
from backends.targets import GPU_TARGETS, Target, get_target

__all__ = [
    "Param",
    "KernelSource",
    "triton_target",
    "load_jit",
    "cache_dir",
    "pointer_type",
    "next_pow2",
    "call_lines",
]


@dataclass(frozen=True)
class Param:
    """One kernel parameter: a pointer (with its element dtype), a runtime int, or a constexpr."""

    name: str
    kind: str  # "ptr" | "int" | "constexpr"
    dtype: ir.DType | None = None


@dataclass(frozen=True)
class KernelSource:
    """One kernel module. `key` hashes the kernel's name, parameters and code (comment lines
    left out: the same code generated at two source lines is one kernel, whose file carries the
    comments of its first use); two kernels in one module (prefill and decode of sparse MQA)
    therefore have two keys."""

    name: str  # the @triton.jit function's name
    source: str  # the whole module
    params: tuple[Param, ...]
    fused_ops: tuple[str, ...]  # source op mnemonics, for reports

    @property
    def key(self) -> str:
        code = [ln for ln in self.source.splitlines() if not ln.lstrip().startswith("#")]
        params = [f"{p.name}:{p.kind}:{p.dtype}" for p in self.params]
        blob = "\n".join([self.name, ",".join(params), *code])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def signature(self, constexprs: dict[str, Any]) -> dict[str, str]:
        """The `ASTSource` signature: `*bf16` pointers, `i32` ints, `constexpr` tiles."""
        out = {}
        for p in self.params:
            if p.kind == "ptr":
                out[p.name] = pointer_type(p.dtype)
            elif p.kind == "int":
                out[p.name] = "i32"
            else:
                if p.name not in constexprs:
                    raise KeyError(f"kernel {self.name}: no value for constexpr {p.name}")
                out[p.name] = "constexpr"
        return out


_PTR = {
    ir.DType.f32: "*fp32",
    ir.DType.bf16: "*bf16",
    ir.DType.f16: "*fp16",
    ir.DType.f8e4m3: "*fp8e4nv",
    ir.DType.f8e5m2: "*fp8e5",
    ir.DType.i64: "*i64",
    ir.DType.i32: "*i32",
    ir.DType.i8: "*i8",
    ir.DType.bool: "*i1",
}


def pointer_type(dtype: ir.DType | None) -> str:
    if dtype is None:
        raise ValueError("pointer parameter without a dtype")
    return _PTR[dtype]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def call_lines(head: str, args: list[str], tail: str = "", indent: int = 4) -> list[str]:
    """`head(args)tail` as source lines that fit 100 columns at `indent` (black's layout)."""
    one = f"{head}({', '.join(args)}){tail}"
    if indent + len(one) <= 100:
        return [one]
    inner = ", ".join(args)
    if indent + 4 + len(inner) <= 100:
        return [f"{head}(", f"    {inner}", f"){tail}"]
    return [f"{head}(", *(f"    {a}," for a in args), f"){tail}"]


def triton_target(target: str | Target) -> Target:
    """`target` as a `Target` that Triton compiles for: the CPU (the interpreter) or a GPU
    architecture (`GPU_TARGETS`). A ValueError names the others (OpenCL C, WGSL: source that
    only the TVM backend writes) and the targets Triton serves."""
    tgt = get_target(target)
    if not tgt.source_only:
        return tgt
    raise ValueError(
        f"the Triton backend cannot compile for target {tgt.name} ({tgt.description}): Triton "
        f"emits no {tgt.backend} code; use the TVM backend (--backend tvm) for it, or a target "
        f"Triton serves: cpu, {', '.join(GPU_TARGETS)}"
    )


def cache_dir() -> Path:
    root = os.environ.get("DSV4C_CACHE_DIR") or Path.home() / ".cache" / "dsv4c"
    return Path(root) / "triton"


_LOADED: dict[str, Any] = {}


def load_jit(kernel: KernelSource) -> Any:
    """The `triton.jit` function of `kernel`, imported from its file in the cache folder."""
    mod_name = f"dsv4c_kernel_{kernel.name}_{kernel.key}"
    if mod_name in _LOADED:
        return _LOADED[mod_name]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{mod_name}.py"
    if not path.exists() or path.read_text() != kernel.source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(kernel.source)
        tmp.replace(path)  # atomic: concurrent processes see a whole file
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    _LOADED[mod_name] = getattr(module, kernel.name)
    return _LOADED[mod_name]
