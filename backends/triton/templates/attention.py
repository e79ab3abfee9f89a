"""Triton templates for the attention ops: `attn.sparse_mqa` (prefill; split-KV decode) and
`attn.indexer_topk` (scores, then top-k), registered in `TRITON_EMITTERS`.

The kernels are hand-written text (`attention_mqa.py`, `attention_indexer.py`) held as
`KernelSource`s; this module is their host side: the checks that say which nodes they take,
tile choices per target, grids and scratch buffers, and the variants compiled ahead of time.
A node's attributes (window, ratio, scale, variant, ...) are constexprs, so one source serves
every layer and a GPU compile specialises it.

Tiles: head dim c is held as two halves of c/2 channels (BLOCK_C, the RoPE pair layout), so
at c = 512 a program holds BLOCK_H x 512 of query and accumulator and streams BLOCK_N x 512
entry tiles. `mqa_config` picks BLOCK_N by the target's shared memory per block and its dot
unit; warps follow from threads per program (256; the decode combine 512, the top-k sort 128),
so wave64 AMD targets get half as many. `benchmarks/aot_table.py` shows what the compiler made
of it: at v4-flash sizes in bf16 no kernel spills on the six targets (triton 3.9); in fp32
the gfx950 indexer score stage spills 2-11 registers (cause not found).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ir
from backends.targets import Target, get_target
from backends.triton.emitters import TRITON_EMITTERS, AotVariant, OneKernel, cdiv
from backends.triton.kernel import KernelSource, Param, load_jit, next_pow2
from backends.triton.templates.attention_indexer import INDEXER_SOURCE
from backends.triton.templates.attention_mqa import SPARSE_MQA_SOURCE
from ir.symbolic import subs_dim

__all__ = ["IndexerTopKLaunch", "SparseMQALaunch", "indexer_config", "mqa_config"]

_FLOATS = (ir.DType.f32, ir.DType.bf16, ir.DType.f16)
_COMP = {"window": 0, "hca": 1, "csa": 2}
MAX_HEAD_DIM = 512  # BLOCK_H x c of query and accumulator stay in registers
THREADS = 256  # per program on GPUs: 8 warps of 32 (NVIDIA), 4 of 64 (AMD)
COMBINE_THREADS = 512  # the decode combine holds two BLOCK_H x c fp32 tiles (AMD spilled)
SELECT_THREADS = 128  # the top-k sort of K_PAD int64 keys (AMD spilled with 256 or 512)


def _dims(v: ir.Value, env: dict) -> list[int]:
    return [int(subs_dim(d, env)) for d in v.shape]


def _ints(*names: str) -> list[Param]:
    return [Param(n, "int") for n in names]


def _consts(*names: str) -> list[Param]:
    return [Param(n, "constexpr") for n in names]


def _dot_in_f32(dtype: ir.DType, target: Target) -> bool:
    """fp32 operands use IEEE products; on the CPU interpreter bf16/f16 tiles are upcast too
    (it mis-multiplies bf16 tiles)."""
    return dtype == ir.DType.f32 or not target.is_gpu


# --- attn.sparse_mqa --------------------------------------------------------------------------


def mqa_config(target: Target, head_dim: int, dtype: ir.DType) -> dict[str, int]:
    """Tiles of one program: BLOCK_H heads x BLOCK_N entries, channels as two halves of BLOCK_C.
    On GPUs: 32 heads on 256 threads (the fp32 accumulator, 32 x 512 at c = 512, is 64
    registers a thread). BLOCK_N: 32 where two stages of entry tiles fit in 3/4 of the
    target's shared memory per block (NVIDIA: the query stays in registers, entries go through
    shared memory); 16 on AMD, whose MFMA dots hold both operands in registers (32 entry rows
    of 512 channels spill on gfx950). fp32 (IEEE products, no tensor cores): 16 x 16."""
    block_c = max(16, next_pow2(head_dim // 2))
    if not target.is_gpu:
        return {"BLOCK_H": 16, "BLOCK_N": 16, "BLOCK_C": block_c, "num_warps": 4,
                "num_stages": 1}  # fmt: skip
    warps = THREADS // target.warp_size
    if dtype == ir.DType.f32:  # IEEE fp32 dots run on FMA units, operands in registers
        return {"BLOCK_H": 16, "BLOCK_N": 16, "BLOCK_C": block_c, "num_warps": warps,
                "num_stages": 1}  # fmt: skip
    entry_row = 2 * block_c * dtype.itemsize
    fits = 2 * 32 * entry_row <= 0.75 * target.smem_per_block
    block_n = 32 if fits and target.backend == "cuda" else 16
    return {"BLOCK_H": 32, "BLOCK_N": block_n, "BLOCK_C": block_c, "num_warps": warps,
            "num_stages": 2}  # fmt: skip


def _decode_splits(target: Target, entries: int, batch: int, head_blocks: int, block_n: int):
    """(SPLITS, SPLIT_LEN): entries per split a multiple of BLOCK_N; on GPUs enough splits to
    give about 128 programs, on the CPU at most 4 (the interpreter pays per program)."""
    blocks = max(1, cdiv(entries, block_n))
    want = cdiv(128, batch * head_blocks) if target.is_gpu else 4
    splits = max(1, min(blocks, want))
    split_len = block_n * cdiv(blocks, splits)
    return cdiv(entries, split_len), split_len


def _mqa_source(node: ir.Node) -> KernelSource:
    """The prefill or decode kernel's `KernelSource`, pointer dtypes from the node's operands
    (q, kv, comp and the output share q's dtype)."""
    decode, variant = bool(node.attrs["decode"]), node.attrs["variant"]
    q, _, sink, cos, sin = node.operands[:5]
    picks = node.operands[6].dtype if variant == "csa" else ir.DType.i64
    params = [Param("q_ptr", "ptr", q.dtype), Param("kv_ptr", "ptr", q.dtype),
              Param("sink_ptr", "ptr", sink.dtype), Param("cos_ptr", "ptr", cos.dtype),
              Param("sin_ptr", "ptr", sin.dtype), Param("comp_ptr", "ptr", q.dtype),
              Param("picks_ptr", "ptr", picks)]  # fmt: skip
    if decode:
        params.append(Param("pos_ptr", "ptr", node.operands[-1].dtype))
    params.append(Param("out_ptr", "ptr", q.dtype))
    if decode:
        parts = ("part_acc_ptr", "part_m_ptr", "part_l_ptr")
        params += [Param(p, "ptr", ir.DType.f32) for p in parts]
        params += _ints("H", "C", "HALF_ROPE", "S", "K", "SPLITS", "SPLIT_LEN")
    else:
        params += _ints("T", "H", "C", "HALF_ROPE", "S", "K")
    params += _consts("WINDOW", "RATIO", "COMP", "Q_NORM", "EPS", "SCALE")
    params += _consts("BLOCK_H", "BLOCK_N", "BLOCK_C", "DOT_IN_F32", "ROUND_BITS")
    if decode:
        params += _consts("STAGE")
    name = "sparse_mqa_decode" if decode else "sparse_mqa_prefill"
    return KernelSource(name, SPARSE_MQA_SOURCE, tuple(params), ("attn.sparse_mqa",))


def _split(cfg: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(tile constexprs, launch options) of a config."""
    opts = {k: v for k, v in cfg.items() if k.startswith("num_")}
    return {k: v for k, v in cfg.items() if k not in opts}, opts


def _combine_options(target: Target) -> dict[str, int]:
    return {"num_warps": COMBINE_THREADS // target.warp_size} if target.is_gpu else {}


@dataclass
class SparseMQALaunch(OneKernel):
    source: KernelSource
    attrs: dict[str, Any]
    dtype: ir.DType  # of q, kv, comp and the output
    target: Target
    operands: tuple[ir.Value, ...]

    @property
    def decode(self) -> bool:
        return bool(self.attrs["decode"])

    @property
    def launches(self) -> int:
        return 2 if self.decode else 1  # split-KV decode: partials (STAGE 0), combine (STAGE 1)

    def _constexprs(self, head_dim: int, target: Target) -> tuple[dict, dict]:
        """The node's attributes and the target's tiles as constexprs; the launch options."""
        a = self.attrs
        eps = a["q_norm_eps"]
        tiles, opts = _split(mqa_config(target, head_dim, self.dtype))
        consts = {
            "WINDOW": a["window"],
            "RATIO": max(1, a["ratio"]),
            "COMP": _COMP[a["variant"]],
            "Q_NORM": eps is not None,
            "EPS": float(eps or 0.0),
            "SCALE": float(a["scale"]),
            **tiles,
            "DOT_IN_F32": _dot_in_f32(self.dtype, target),
            # the interpreter's fp32 -> bf16 cast truncates; GPUs round to nearest even
            "ROUND_BITS": self.dtype == ir.DType.bf16 and not target.is_gpu,
        }
        return consts, opts

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        device = next((t.device for t in inputs if t.device.type != "cpu"), inputs[0].device)
        q, kv, sink, cos, sin, *rest = (t.to(device).contiguous() for t in inputs)
        pos = rest.pop() if self.decode else None
        comp = rest[0] if rest else kv  # window only: never read
        picks = rest[1] if len(rest) > 1 else torch.full((1, 1), -1, device=device)
        batch, tokens, heads, head_dim = q.shape
        out = torch.empty_like(q)
        if out.numel() == 0:
            return (out,)
        consts, opts = self._constexprs(head_dim, self.target)
        head_blocks = cdiv(heads, consts["BLOCK_H"])
        args = {
            "q_ptr": q,
            "kv_ptr": kv,
            "sink_ptr": sink,
            "cos_ptr": cos,
            "sin_ptr": sin,
            "comp_ptr": comp,
            "picks_ptr": picks,
            "out_ptr": out,
            "H": heads,
            "C": head_dim,
            "HALF_ROPE": cos.shape[1],
            "S": comp.shape[1],
            "K": picks.shape[-1],
            **consts,
            **opts,
        }
        kernel = load_jit(self.source)
        if not self.decode:
            kernel[(batch * tokens, head_blocks)](**args, T=tokens)
            return (out,)
        # split-KV decode: partials of every split, then their combine; the split count comes
        # from the entries' upper bound (the host never reads pos)
        comp_entries = {"window": 0, "hca": comp.shape[1], "csa": picks.shape[-1]}
        entries = self.attrs["window"] + comp_entries[self.attrs["variant"]]
        splits, split_len = _decode_splits(
            self.target, entries, batch, head_blocks, consts["BLOCK_N"]
        )
        f32 = {"dtype": torch.float32, "device": device}
        args |= {
            "pos_ptr": pos,
            "part_acc_ptr": torch.empty(batch, splits, heads, head_dim, **f32),
            "part_m_ptr": torch.empty(batch, splits, heads, **f32),
            "part_l_ptr": torch.empty(batch, splits, heads, **f32),
            "SPLITS": splits,
            "SPLIT_LEN": split_len,
        }
        kernel[(batch, head_blocks, splits)](**args, STAGE=0)
        kernel[(batch, head_blocks)](**{**args, **_combine_options(self.target)}, STAGE=1)
        return (out,)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        head_dim = _dims(self.operands[0], env)[3]
        consts, opts = self._constexprs(head_dim, target)
        hints = {"C": 16} if head_dim % 16 == 0 else {}
        if not self.decode:
            return [AotVariant(consts, opts, hints)]
        combine = {**opts, **_combine_options(target)}
        return [AotVariant({**consts, "STAGE": 0}, opts, hints),
                AotVariant({**consts, "STAGE": 1}, combine, hints)]  # fmt: skip


def _mqa_check(node: ir.Node) -> bool | str:
    q = node.operands[0]
    if q.dtype not in _FLOATS:
        return f"attn.sparse_mqa of {q.dtype}: the template takes f32, bf16 and f16"
    head_dim = q.shape[3]
    if not isinstance(head_dim, int):
        return f"attn.sparse_mqa with a symbolic head dim {head_dim}: tiles need it static"
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        return (
            f"attn.sparse_mqa head dim {head_dim}: the template takes even head dims up to "
            f"{MAX_HEAD_DIM} (RoPE pairs; query and accumulator of a head block in registers)"
        )
    return True


@TRITON_EMITTERS.register("attn.sparse_mqa", check=_mqa_check)
def emit_sparse_mqa(node: ir.Node, target: Target | None) -> SparseMQALaunch:
    q = node.operands[0]
    tgt = target or get_target("cpu")
    return SparseMQALaunch(_mqa_source(node), dict(node.attrs), q.dtype, tgt, node.operands)


# --- attn.indexer_topk ------------------------------------------------------------------------


def indexer_config(
    target: Target, heads: int, head_dim: int, k: int, dtype: ir.DType
) -> dict[str, int]:
    """Scores: BLOCK_H index heads x BLOCK_S keys per dot, channels BLOCK_C at a time.
    Selection: K_PAD = the power of two >= k (the sort's length)."""
    block_h = min(64, max(16, next_pow2(heads)))
    block_c = min(128, max(16, next_pow2(head_dim)))
    k_pad = max(16, next_pow2(k))
    if not target.is_gpu:
        return {"BLOCK_H": block_h, "BLOCK_S": 16, "BLOCK_C": block_c, "K_PAD": k_pad,
                "num_warps": 4}  # fmt: skip
    if dtype == ir.DType.f32:  # IEEE fp32 dots hold their operands in registers
        block_c = min(block_c, 32)
    return {"BLOCK_H": block_h, "BLOCK_S": 64, "BLOCK_C": block_c, "K_PAD": k_pad,
            "num_warps": THREADS // target.warp_size}  # fmt: skip


def _indexer_source(q: ir.DType, keys: ir.DType, w: ir.DType, pos: ir.DType) -> KernelSource:
    params = [
        Param("q_ptr", "ptr", q),
        Param("keys_ptr", "ptr", keys),
        Param("w_ptr", "ptr", w),
        Param("pos_ptr", "ptr", pos),
        Param("scores_ptr", "ptr", ir.DType.f32),
        Param("idx_ptr", "ptr", ir.DType.i64),
        *_ints("T", "H", "C", "S", "K"),
        *_consts("RATIO", "SCALE", "DECODE", "STAGE"),
        *_consts("BLOCK_H", "BLOCK_S", "BLOCK_C", "K_PAD", "DOT_IN_F32"),
    ]
    return KernelSource("indexer_topk", INDEXER_SOURCE, tuple(params), ("attn.indexer_topk",))


def _select_options(target: Target) -> dict[str, int]:
    return {"num_warps": SELECT_THREADS // target.warp_size} if target.is_gpu else {}


@dataclass
class IndexerTopKLaunch(OneKernel):
    source: KernelSource
    attrs: dict[str, Any]
    dtype: ir.DType  # of q and keys (the dot operands)
    target: Target
    operands: tuple[ir.Value, ...]

    @property
    def launches(self) -> int:
        return 2  # scores (STAGE 0; none with no keys yet), then the top-k select (STAGE 1)

    def _constexprs(self, heads: int, head_dim: int, target: Target) -> tuple[dict, dict]:
        cfg = indexer_config(target, heads, head_dim, self.attrs["k"], self.dtype)
        tiles, opts = _split(cfg)
        consts = {
            "RATIO": self.attrs["ratio"],
            "SCALE": float(self.attrs["scale"]),
            "DECODE": bool(self.attrs["decode"]),
            **tiles,
            "DOT_IN_F32": _dot_in_f32(self.dtype, target),
        }
        return consts, opts

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        device = next((t.device for t in inputs if t.device.type != "cpu"), inputs[0].device)
        q, keys, w, *pos = (t.to(device).contiguous() for t in inputs)
        batch, tokens, heads, head_dim = q.shape
        n_keys, k = keys.shape[1], self.attrs["k"]
        idx = torch.empty(batch, tokens, k, dtype=torch.int64, device=device)
        if idx.numel() == 0:
            return (idx,)
        # the scratch rows of scores: stage 0 writes the visible columns, stage 1 reads them
        scores = torch.empty(batch, tokens, max(1, n_keys), dtype=torch.float32, device=device)
        consts, opts = self._constexprs(heads, head_dim, self.target)
        args = {
            "q_ptr": q,
            "keys_ptr": keys,
            "w_ptr": w,
            "pos_ptr": pos[0] if pos else idx,
            "scores_ptr": scores,
            "idx_ptr": idx,
            "T": tokens,
            "H": heads,
            "C": head_dim,
            "S": n_keys,
            "K": k,
            **consts,
            **opts,
        }
        kernel = load_jit(self.source)
        rows = batch * tokens
        if n_keys:
            kernel[(rows, cdiv(n_keys, consts["BLOCK_S"]))](**args, STAGE=0)
        kernel[(rows,)](**{**args, **_select_options(self.target)}, STAGE=1)
        return (idx,)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        _, _, heads, head_dim = _dims(self.operands[0], env)
        consts, opts = self._constexprs(heads, head_dim, target)
        hints = {n: 16 for n, v in (("H", heads), ("C", head_dim)) if v % 16 == 0}
        select = {**opts, **_select_options(target)}
        return [AotVariant({**consts, "STAGE": 0}, opts, hints),
                AotVariant({**consts, "STAGE": 1}, select, hints)]  # fmt: skip


def _indexer_check(node: ir.Node) -> bool | str:
    q, keys = node.operands[0], node.operands[1]
    if q.dtype not in _FLOATS or keys.dtype != q.dtype:
        return (
            f"attn.indexer_topk of q {q.dtype} and keys {keys.dtype}: the template takes "
            "f32, bf16 or f16, the same for both"
        )
    return True


@TRITON_EMITTERS.register("attn.indexer_topk", check=_indexer_check)
def emit_indexer_topk(node: ir.Node, target: Target | None) -> IndexerTopKLaunch:
    q, keys, w = node.operands[:3]
    pos = node.operands[3].dtype if node.attrs["decode"] else ir.DType.i64
    source = _indexer_source(q.dtype, keys.dtype, w.dtype, pos)
    tgt = target or get_target("cpu")
    return IndexerTopKLaunch(source, dict(node.attrs), q.dtype, tgt, node.operands)
