"""Triton templates of the manifold-constrained hyper-connection ops (ir/ops/hc.py): `hc.pre`,
`hc.post`, `hc.head`, one kernel each.

The kernels are hand-written modules next to this file (`hc_pre_kernel.py`, `hc_post_kernel.py`,
`hc_head_kernel.py`), read as text into a `KernelSource`; a trailing comment names the pointer
dtypes, so each dtype specialisation has its own content hash. Leading dims of the stream
[..., n, d] are flattened into tokens. The projections run in fp32 (`tl.dot`, IEEE products),
like the reference. `hc.pre`/`hc.head` need n a power of two >= 4 (the n·n comb rows and the
padded gate rows are `tl.dot` widths); `hc.post` any power of two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ir
from backends.targets import Target, get_target
from backends.triton.emitters import TRITON_EMITTERS, AotVariant, OneKernel, cdiv
from backends.triton.kernel import KernelSource, Param, load_jit, next_pow2

__all__ = ["HCLaunch", "hc_config"]

_FLOATS = (ir.DType.f32, ir.DType.bf16, ir.DType.f16)


@functools.cache
def _text(file: str) -> str:
    return Path(__file__).with_name(file).read_text()


def _kernel_source(name: str, params: list[Param], fused: tuple[str, ...]) -> KernelSource:
    pointers = ", ".join(f"{p.name}: {p.dtype.value}" for p in params if p.dtype is not None)
    text = _text(f"{name}_kernel.py") + f"# pointers: {pointers}\n"
    return KernelSource(name, text, tuple(params), fused)


def hc_config(op: str, target: Target, d: int) -> dict[str, int]:
    """Tiles and warps. GPUs: 16 tokens per program (the least `tl.dot` takes), X streamed in
    128-column chunks; the CPU interpreter pays per program and per op, so it takes wide tiles."""
    gpu = target.is_gpu
    if op == "hc.post":
        block_d = min(next_pow2(d), 256 if gpu else 1024)
        return {"BLOCK_T": 1 if gpu else 16, "BLOCK_D": block_d, "num_warps": 4}
    block_d = min(next_pow2(d), 64 if gpu else 1024)
    cfg = {"BLOCK_T": 16, "BLOCK_K": 128 if gpu else 512, "BLOCK_D": block_d}
    return {**cfg, "num_warps": 4, "num_stages": 2}


# --- kernels and their parameters -------------------------------------------------------------


_POINTERS = {  # operands then results, in each kernel's parameter order
    "hc.pre": ("x_ptr", "fn_ptr", "scale_ptr", "base_ptr", "y_ptr", "post_ptr", "comb_ptr"),
    "hc.post": ("f_ptr", "res_ptr", "post_ptr", "comb_ptr", "out_ptr"),
    "hc.head": ("x_ptr", "fn_ptr", "scale_ptr", "base_ptr", "y_ptr"),
}
_CONSTEXPRS = {
    "hc.pre": ("N_HC", "ITERS", "EPS", "NORM_EPS", "BLOCK_T", "BLOCK_PP", "BLOCK_K", "BLOCK_D"),
    "hc.post": ("N_HC", "BLOCK_T", "BLOCK_D"),
    "hc.head": ("N_HC", "EPS", "NORM_EPS", "BLOCK_T", "BLOCK_P", "BLOCK_K", "BLOCK_D"),
}


def _params(node: ir.Node) -> list[Param]:
    values = (*node.operands, *node.results)
    params = [Param(p, "ptr", v.dtype) for p, v in zip(_POINTERS[node.name], values, strict=True)]
    params += [Param("n_tokens", "int"), Param("D", "int")]
    return params + [Param(c, "constexpr") for c in _CONSTEXPRS[node.name]]


def _constexprs(node: ir.Node, n: int) -> dict[str, Any]:
    """The op's attributes and the gate-row padding, as kernel constexprs."""
    if node.name == "hc.post":
        return {"N_HC": n}
    out: dict[str, Any] = {"N_HC": n, "EPS": node.attrs["eps"], "NORM_EPS": node.attrs["norm_eps"]}
    if node.name == "hc.pre":
        return {**out, "ITERS": node.attrs["iters"], "BLOCK_PP": max(16, next_pow2(2 * n))}
    return {**out, "BLOCK_P": max(16, next_pow2(n))}


@dataclass
class HCLaunch(OneKernel):
    source: KernelSource
    op: str
    target: Target
    constexprs: dict[str, Any]  # N_HC, the op's eps/iters, the gate-row padding
    d: int

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        stream = inputs[1] if self.op == "hc.post" else inputs[0]
        *lead, n, d = stream.shape
        tokens = stream.numel() // (n * d)
        outs = self._outputs(stream, lead, n, d)
        if tokens == 0:
            return outs
        args = [t.contiguous() for t in inputs] + list(outs)
        cfg = hc_config(self.op, self.target, d)
        grid: tuple[int, ...] = (cdiv(tokens, cfg["BLOCK_T"]),)
        if self.op == "hc.post":
            grid = (*grid, cdiv(d, cfg["BLOCK_D"]))
        names = [p.name for p in self.source.params if p.kind == "ptr"]
        kwargs = dict(zip(names, args)) | {"n_tokens": tokens, "D": d}
        load_jit(self.source)[grid](**kwargs, **self.constexprs, **cfg)
        return outs

    def _outputs(self, stream: Any, lead: list[int], n: int, d: int) -> tuple[Any, ...]:
        import torch

        dev = stream.device
        if self.op == "hc.post":
            return (torch.empty_like(stream, memory_format=torch.contiguous_format),)
        y = torch.empty((*lead, d), dtype=stream.dtype, device=dev)
        if self.op == "hc.head":
            return (y,)
        post = torch.empty((*lead, n), dtype=torch.float32, device=dev)
        comb = torch.empty((*lead, n, n), dtype=torch.float32, device=dev)
        return (y, post, comb)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        cfg = hc_config(self.op, target, self.d)
        opts = {"num_warps": cfg.pop("num_warps")}
        if "num_stages" in cfg:
            opts["num_stages"] = cfg.pop("num_stages")
        hints = {"D": 16} if self.d % 16 == 0 else {}
        return [AotVariant({**cfg, **self.constexprs}, opts, hints)]


def _check(node: ir.Node) -> bool | str:
    stream = node.operands[1] if node.name == "hc.post" else node.operands[0]
    n, d = stream.shape[-2], stream.shape[-1]
    if not isinstance(n, int) or not isinstance(d, int):
        return f"{node.name}: the stream count and width must be static, got n={n}, d={d}"
    smallest = 1 if node.name == "hc.post" else 4
    if n < smallest or n & (n - 1):
        return f"{node.name}: n={n} streams; the template takes a power of two >= {smallest}"
    dtypes = {v.dtype for v in (*node.operands, *node.results)}
    if not dtypes <= set(_FLOATS):
        bad = sorted(t.value for t in dtypes - set(_FLOATS))
        return f"{node.name}: operand dtypes {bad}; the template loads f32, bf16 or f16"
    return True


@TRITON_EMITTERS.register("hc.pre", "hc.post", "hc.head", check=_check)
def emit_hc(node: ir.Node, target: Target | None) -> HCLaunch:
    stream = node.operands[1] if node.name == "hc.post" else node.operands[0]
    n, d = int(stream.shape[-2]), int(stream.shape[-1])
    name = node.name.replace(".", "_")
    source = _kernel_source(name, _params(node), (node.name,))
    return HCLaunch(source, node.name, target or get_target("cpu"), _constexprs(node, n), d)
