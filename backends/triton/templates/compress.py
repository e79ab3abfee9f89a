"""Triton templates of the KV compressor (ir/ops/attn.py): `attn.compress` (prefill) and
`attn.compress_step` (one decode token with its rolling state), two kernels each.

| op | kernel 1 (grid) | kernel 2 |
|---|---|---|
| `attn.compress` | `compress_pool`: wkv‖wgate GEMM + APE + softmax pooling of each block (entry tiles × channel tiles × batch) | `compress_norm_rope` per entry |
| `attn.compress_step` | `compress_step`: GEMV + state update + pooling of the open block (batch × channel tiles) | `compress_norm_rope` per batch row, written to the cache on a block boundary |

The RMSNorm needs a whole entry while the projection is split over channel tiles, hence the
second kernel; the pooled rows pass between them in the activation dtype, where the reference
rounds them anyway. Kernels are hand-written modules next to this file, read as text into a
`KernelSource`; a trailing comment names the pointer dtypes, so each dtype specialisation has
its own content hash. The step's position stays on the device (no host sync); it returns a copy
of the cache with at most one row rewritten, as the op is functional — or, through
`CompressStepLaunch.update` (a cache written in place, `backends.inplace`), writes the new
states and that row into the operands' own buffers: each program loads the state rows of its
channels before it stores them, so the kernel may write over what it reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ir
from backends.targets import Target, get_target
from backends.triton.emitters import TRITON_EMITTERS, AotVariant, cdiv
from backends.triton.kernel import KernelSource, Param, load_jit, next_pow2

__all__ = ["CompressLaunch", "CompressStepLaunch", "pool_config", "step_config"]

_FLOATS = (ir.DType.f32, ir.DType.bf16, ir.DType.f16)
_INTS = (ir.DType.i64, ir.DType.i32)


@functools.cache
def _text(file: str) -> str:
    return Path(__file__).with_name(file).read_text()


def _kernel_source(
    name: str, op: str, ptrs: list[tuple[str, ir.DType]], rest: list[Param]
) -> KernelSource:
    params = [Param(p, "ptr", dtype) for p, dtype in ptrs] + rest
    pointers = ", ".join(f"{p}: {dtype.value}" for p, dtype in ptrs)
    text = _text(f"{name}_kernel.py") + f"# pointers: {pointers}\n"
    return KernelSource(name, text, tuple(params), (op,))


def _ints(*names: str) -> list[Param]:
    return [Param(n, "int") for n in names]


def _consts(*names: str) -> list[Param]:
    return [Param(n, "constexpr") for n in names]


def _finish_source(node: ir.Node, pooled: ir.DType, out: ir.DType, pos: ir.DType) -> KernelSource:
    step = node.name == "attn.compress_step"
    norm, cos, sin = node.operands[-4:-1] if step else node.operands[-3:]
    ptrs = [("pooled_ptr", pooled), ("norm_ptr", norm.dtype), ("cos_ptr", cos.dtype)]
    ptrs += [("sin_ptr", sin.dtype)]
    ptrs += [("out_ptr", out), ("pos_ptr", pos)]
    rest = _ints("n_blocks", "L", "C", "HALF") + _consts("RATIO", "EPS", "STEP", "BLOCK_C")
    return _kernel_source("compress_norm_rope", node.name, ptrs, rest)


def _dot_f32(x: ir.DType, w: ir.DType, gate: ir.DType) -> bool:
    """GEMMs in IEEE fp32 unless x and both weights are one 16-bit type (then tensor cores)."""
    return x == ir.DType.f32 or len({x, w, gate}) > 1


def pool_config(target: Target, ratio: int, c: int, d: int, item: int) -> dict[str, int]:
    """`compress_pool` tiles: at least 64 token rows (whole blocks) by BLOCK_C channels; on GPUs
    the pipeline depth fits shared memory (`item`: bytes per GEMM operand element)."""
    block_e = max(1, 64 // ratio)
    if not target.is_gpu:
        block_c = min(max(next_pow2(c), 16), 128)
        return {"BLOCK_E": block_e, "BLOCK_C": block_c, "BLOCK_K": 64, "num_warps": 4,
                "num_stages": 1}  # fmt: skip
    # 32 channels, 8 warps: the two fp32 accumulators, their [entries, rows, channels] view and
    # the pooled softmax fit the registers (64 channels, or 4 warps, spill on sm_80/sm_120);
    # fp32 products (FMA, not tensor cores) also need a narrow K tile
    rows = block_e * ratio
    block_c, block_k = 32, (64 if item == 2 else 16)
    stage = (rows * block_k + 2 * block_k * block_c) * item
    stages = max(1, min(3, int(0.75 * target.smem_per_block) // stage))
    warps = 8
    return {"BLOCK_E": block_e, "BLOCK_C": block_c, "BLOCK_K": block_k, "num_warps": warps,
            "num_stages": stages}  # fmt: skip


def step_config(target: Target, c: int, d: int) -> dict[str, int]:
    """`compress_step` tiles: GPUs split the GEMV over many programs (16 channels of each half
    per program); the interpreter takes wide tiles."""
    if target.is_gpu:
        return {"BLOCK_C": 16, "BLOCK_K": 256, "num_warps": 4}
    return {"BLOCK_C": min(next_pow2(c), 128), "BLOCK_K": min(next_pow2(d), 512), "num_warps": 4}


def _finish_variant(source: KernelSource, op: Any, c: int, step: bool) -> AotVariant:
    consts = {"RATIO": op.ratio, "EPS": op.eps, "STEP": step, "BLOCK_C": next_pow2(c)}
    warps = 4 if c <= 1024 else 8
    return AotVariant(consts, {"num_warps": warps}, {"C": 16} if c % 16 == 0 else {}, source)


def _hints16(**sizes: int) -> dict[str, int]:
    return {name: 16 for name, n in sizes.items() if n % 16 == 0}


# --- attn.compress ----------------------------------------------------------------------------


@dataclass
class CompressLaunch:
    pool: KernelSource
    finish: KernelSource
    op: Any  # the attn.compress node's attributes: ratio, overlap, eps
    target: Target
    dims: tuple[int, int]  # d, c
    item: int  # bytes per GEMM operand element on a GPU

    @property
    def source(self) -> KernelSource:
        return self.pool

    @property
    def sources(self) -> tuple[KernelSource, ...]:
        return (self.pool, self.finish)

    @property
    def launches(self) -> int:
        return 2  # pool, then finish

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        x, wkv, wgate, ape, norm, cos, sin = (t.contiguous() for t in inputs)
        (b, t, d), (width, c), half = x.shape, (wkv.shape[0], norm.shape[0]), cos.shape[1]
        m, blocks = self.op.ratio, t // self.op.ratio
        out = torch.empty((b, blocks, c), dtype=x.dtype, device=x.device)
        if out.numel() == 0:
            return (out,)
        pooled = torch.empty_like(out)
        cfg = pool_config(self.target, m, c, d, self.item)
        tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
        dot_f32 = x.device.type == "cpu" or _dot_f32(*(_dtype(v) for v in (x, wkv, wgate)))
        grid = (cdiv(blocks, cfg["BLOCK_E"]), cdiv(c, cfg["BLOCK_C"]), b)
        load_jit(self.pool)[grid](
            x_ptr=x, wkv_ptr=wkv, wgate_ptr=wgate, ape_ptr=ape, pooled_ptr=pooled, T=t, D=d, C=c,
            W=width, n_blocks=blocks, RATIO=m, OVERLAP=self.op.overlap, **tiles, DOT_F32=dot_f32,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        unused_pos = torch.zeros((), dtype=torch.int64, device=x.device)
        load_jit(self.finish)[(b * blocks,)](
            pooled_ptr=pooled, norm_ptr=norm, cos_ptr=cos, sin_ptr=sin, out_ptr=out,
            pos_ptr=unused_pos, n_blocks=blocks, L=1, C=c, HALF=half, RATIO=m, EPS=self.op.eps,
            STEP=False, BLOCK_C=next_pow2(c),
        )  # fmt: skip
        return (out,)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        d, c = self.dims
        cfg = pool_config(target, self.op.ratio, c, d, self.item)
        opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        consts = {"RATIO": self.op.ratio, "OVERLAP": self.op.overlap, **cfg}
        consts["DOT_F32"] = self.item == 4
        width = 2 * c if self.op.overlap else c
        pool = AotVariant(consts, opts, _hints16(D=d, C=c, W=width))
        return [pool, _finish_variant(self.finish, self.op, c, step=False)]


def _dtype(t: Any) -> ir.DType:
    return ir.DType.from_torch(t.dtype)


def _check_common(node: ir.Node, x: ir.Value, weights: tuple[ir.Value, ...]) -> bool | str:
    m = node.attrs["ratio"]
    if m & (m - 1):
        return f"{node.name}: ratio {m} is not a power of two (blocks are tile rows)"
    norm = node.operands[-4] if node.name == "attn.compress_step" else node.operands[4]
    d, c = x.shape[-1], norm.shape[0]
    if not isinstance(d, int) or not isinstance(c, int):
        return f"{node.name}: model dim and entry width must be static, got d={d}, c={c}"
    bad = sorted({v.dtype.value for v in (x, *weights) if v.dtype not in _FLOATS})
    if bad:
        return f"{node.name}: operand dtypes {bad}; the template loads f32, bf16 or f16"
    return True


def _compress_check(node: ir.Node) -> bool | str:
    return _check_common(node, node.operands[0], tuple(node.operands[1:]))


@TRITON_EMITTERS.register("attn.compress", check=_compress_check)
def emit_compress(node: ir.Node, target: Target | None) -> CompressLaunch:
    x, wkv, wgate, ape, norm, _, _ = node.operands
    ptrs = [("x_ptr", x.dtype), ("wkv_ptr", wkv.dtype), ("wgate_ptr", wgate.dtype)]
    ptrs += [("ape_ptr", ape.dtype), ("pooled_ptr", x.dtype)]
    rest = _ints("T", "D", "C", "W", "n_blocks")
    rest += _consts("RATIO", "OVERLAP", "BLOCK_E", "BLOCK_C", "BLOCK_K", "DOT_F32")
    pool = _kernel_source("compress_pool", node.name, ptrs, rest)
    finish = _finish_source(node, x.dtype, x.dtype, ir.DType.i64)
    dims = (int(x.shape[2]), int(norm.shape[0]))
    op = node.op
    item = 4 if _dot_f32(x.dtype, wkv.dtype, wgate.dtype) else 2
    return CompressLaunch(pool, finish, op, target or get_target("cpu"), dims, item)


# --- attn.compress_step -----------------------------------------------------------------------


@dataclass
class CompressStepLaunch:
    step: KernelSource
    finish: KernelSource
    op: Any  # the attn.compress_step node's attributes: ratio, overlap, eps
    target: Target
    dims: tuple[int, int]  # d, c

    @property
    def source(self) -> KernelSource:
        return self.step

    @property
    def sources(self) -> tuple[KernelSource, ...]:
        return (self.step, self.finish)

    @property
    def launches(self) -> int:
        return 2  # step, then finish

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        kv_state, score_state, cache = inputs[2].contiguous(), inputs[3].contiguous(), inputs[10]
        cache_out = cache.clone(memory_format=torch.contiguous_format)
        kv_out, score_out = torch.empty_like(kv_state), torch.empty_like(score_state)
        return self._run(inputs, (cache_out, kv_out, score_out))

    def update(self, inputs: list[Any]) -> tuple[Any, ...] | None:
        """In place: the new states and the cache row written into the operands' own buffers
        (which must be contiguous: None otherwise, and nothing is written)."""
        outs = (inputs[10], inputs[2], inputs[3])
        if not all(t.is_contiguous() for t in outs):
            return None
        return self._run(inputs, outs)

    def _run(self, inputs: list[Any], outs: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        import torch

        x, pos, kv_state, score_state, wkv, wgate, ape, norm, cos, sin, cache = inputs
        dev = x.device
        pos = pos.to(dev, non_blocking=True)  # a host position is copied over, never read back
        x, kv_state, score_state, wkv, wgate, ape, norm, cos, sin = (
            t.contiguous() for t in (x, kv_state, score_state, wkv, wgate, ape, norm, cos, sin)
        )
        b, _, d = x.shape
        c, width, rows = norm.shape[0], wkv.shape[0], kv_state.shape[1]
        cache_out, kv_out, score_out = outs
        if b == 0:
            return (cache_out, kv_out, score_out)
        pooled = torch.empty((b, c), dtype=x.dtype, device=dev)
        cfg = step_config(self.target, c, d)
        load_jit(self.step)[(b, cdiv(c, cfg["BLOCK_C"]))](
            x_ptr=x, pos_ptr=pos, kv_state_ptr=kv_state, score_state_ptr=score_state, wkv_ptr=wkv,
            wgate_ptr=wgate, ape_ptr=ape, kv_out_ptr=kv_out, score_out_ptr=score_out,
            pooled_ptr=pooled, D=d, C=c, W=width, RATIO=self.op.ratio, R=rows,
            OVERLAP=self.op.overlap, **cfg,
        )  # fmt: skip
        load_jit(self.finish)[(b,)](
            pooled_ptr=pooled, norm_ptr=norm, cos_ptr=cos, sin_ptr=sin, out_ptr=cache_out,
            pos_ptr=pos, n_blocks=1, L=cache.shape[1], C=c, HALF=cos.shape[1],
            RATIO=self.op.ratio, EPS=self.op.eps, STEP=True, BLOCK_C=next_pow2(c),
        )  # fmt: skip
        return (cache_out, kv_out, score_out)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        d, c = self.dims
        cfg = step_config(target, c, d)
        opts = {"num_warps": cfg.pop("num_warps")}
        m, overlap = self.op.ratio, self.op.overlap
        consts = {"RATIO": m, "R": 2 * m if overlap else m, "OVERLAP": overlap, **cfg}
        width = 2 * c if overlap else c
        step = AotVariant(consts, opts, _hints16(D=d, C=c, W=width))
        return [step, _finish_variant(self.finish, self.op, c, step=True)]


def _step_check(node: ir.Node) -> bool | str:
    x, pos, kv_state, score_state, wkv, wgate, ape = node.operands[:7]
    if pos.dtype not in _INTS:
        return f"attn.compress_step: pos is {pos.dtype.value}; the template reads i64 or i32"
    for state in (kv_state, score_state):
        if state.dtype != ir.DType.f32:
            return f"attn.compress_step: state {state.dtype.value}; the template pools f32 states"
    return _check_common(node, x, (wkv, wgate, ape, *node.operands[7:]))


@TRITON_EMITTERS.register("attn.compress_step", check=_step_check)
def emit_compress_step(node: ir.Node, target: Target | None) -> CompressStepLaunch:
    x, pos, kv_state, score_state, wkv, wgate, ape, norm, _, _, cache = node.operands
    ptrs = [("x_ptr", x.dtype), ("pos_ptr", pos.dtype), ("kv_state_ptr", kv_state.dtype)]
    ptrs += [("score_state_ptr", score_state.dtype), ("wkv_ptr", wkv.dtype)]
    ptrs += [("wgate_ptr", wgate.dtype), ("ape_ptr", ape.dtype), ("kv_out_ptr", kv_state.dtype)]
    ptrs += [("score_out_ptr", score_state.dtype), ("pooled_ptr", x.dtype)]
    rest = _ints("D", "C", "W") + _consts("RATIO", "R", "OVERLAP", "BLOCK_C", "BLOCK_K")
    step = _kernel_source("compress_step", node.name, ptrs, rest)
    finish = _finish_source(node, x.dtype, cache.dtype, pos.dtype)
    op = node.op
    dims = (int(x.shape[2]), int(norm.shape[0]))
    return CompressStepLaunch(step, finish, op, target or get_target("cpu"), dims)
