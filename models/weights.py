"""Load and save DeepSeek-V4 checkpoints in the Hugging Face safetensors layout.

Checkpoint layout (v4-architecture.md §2.2), read by `load_safetensors` and written by
`save_safetensors`:

* A directory holding `model.safetensors.index.json` (`{"metadata": {"total_size": N},
  "weight_map": {tensor name: shard file}}`) and its shards, or one `.safetensors` file.
* Tensor names equal the model's `state_dict()` names, except routed experts: the model stores
  them stacked (`<p>.ffn.experts.w1` [E, I, d], `.w3` [E, I, d], `.w2` [E, d, I]), the checkpoint
  per expert (`<p>.ffn.experts.{j}.w1.weight` [I, d], ...). `<p>` is `layers.{i}` or `mtp.0`.
* Quantised weights: `X.weight` with a companion `X.scale` is dequantised on load.
    FP8   weight float8_e4m3fn [out, in]; scale [ceil(out/128), ceil(in/128)], one per 128×128
          block; value = fp8 · scale.
    FP4   (MXFP4, routed experts) weight int8 (or uint8) [out, in/2] holding two e2m1 codes per
          byte — ASSUMPTION: the low nibble is the even column (2k), the high nibble the odd
          column (2k+1). e2m1 code: bit 3 = sign, bits 0-2 index (0, .5, 1, 1.5, 2, 3, 4, 6).
          scale [out, ceil(in/32)], one per 1×32 block; value = e2m1 · scale.
  Scales are ue8m0: float8_e8m0fnu, or any float dtype holding powers of two.
  Loading dequantises. To run with the routed experts compressed again (in memory and in the
  compiled `moe.experts`), apply `models.quant.quantize_experts(model, "fp4_e2m1")` after the
  load: requantising e2m1·2^k values is exact, so the experts hold the checkpoint's values
  (possibly as other code/scale pairs, e.g. codes doubled under a halved scale).
* A tensor shared by two modules (MTP's embedding / head) is stored once, under its first name.
* Integer tensors (`ffn.gate.tid2eid`, int64 in the checkpoint, int32 accepted) are cast to the
  model buffer's dtype; float tensors are cast to the parameter's dtype.

`load_safetensors` checks every name, shape, dtype and scale from the file headers before it
writes anything, so a failed load leaves the model untouched. It never unpickles. Failures raise
`WeightsError` (a ValueError) naming the tensor, the shard, expected vs got, and what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

INDEX_NAME = "model.safetensors.index.json"
FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# Stacked expert parameter in the model → per-expert names in the checkpoint.
_EXPERTS = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<w>w[123])$")
# Weights the official checkpoint stores in FP8 (spec §2.2), used by save_safetensors(fp8=True).
FP8_WEIGHTS = re.compile(
    r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]"
    r"|e_proj|h_proj)\.weight$"
)
# Non-quantised tensors the official checkpoint keeps in fp32 (everything else float: bf16).
_FP32_TENSORS = re.compile(r"(^|\.)(hc_\w+|attn_sink|ape|gate\.bias)$")


class WeightsError(ValueError):
    """A checkpoint does not match the model; the message says which tensor and how to fix."""


# ---------------------------------------------------------------------------------------------
# Quantisation formats (pure functions)


def _pow2_scale(amax: Tensor, qmax: float) -> Tensor:
    """Smallest power of two s with amax / s <= qmax (ue8m0-representable), fp32."""
    exp = torch.ceil(torch.log2(amax.float().clamp(min=1e-30) / qmax)).clamp(-127, 127)
    return torch.exp2(exp)


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """[out, in] float → (float8_e4m3fn [out, in], float8_e8m0fnu [ceil(out/128), ceil(in/128)])."""
    out, inp = w.shape
    rows, cols = math.ceil(out / FP8_BLOCK), math.ceil(inp / FP8_BLOCK)
    padded = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK)
    padded[:out, :inp] = w.float()
    blocks = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK)
    scale = _pow2_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX)
    q = (w.float() / _expand_fp8_scale(scale, out, inp)).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def dequantize_fp8(q: Tensor, scale: Tensor) -> Tensor:
    """Inverse of `quantize_fp8` (exact: fp8 · 2^k in fp32)."""
    return q.float() * _expand_fp8_scale(scale.float(), *q.shape)


def _expand_fp8_scale(scale: Tensor, out: int, inp: int) -> Tensor:
    expanded = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return expanded[:out, :inp]


def quantize_fp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """[out, in] float, in even → (int8 [out, in/2] packed e2m1, e8m0 scale [out, ceil(in/32)]).

    Rounds to the nearest e2m1 value; a tie goes to the smaller magnitude.
    """
    out, inp = w.shape
    if inp % 2:
        raise WeightsError(f"FP4 packing needs an even input dim, got shape {list(w.shape)}")
    cols = math.ceil(inp / FP4_BLOCK)
    padded = torch.zeros(out, cols * FP4_BLOCK)
    padded[:, :inp] = w.float()
    scale = _pow2_scale(padded.view(out, cols, FP4_BLOCK).abs().amax(-1), FP4_MAX)
    x = w.float() / scale.repeat_interleave(FP4_BLOCK, 1)[:, :inp]
    midpoints = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
    codes = torch.bucketize(x.abs(), midpoints) | ((x < 0).to(torch.int64) << 3)
    byte = codes[:, 0::2] | (codes[:, 1::2] << 4)  # low nibble = even column
    return byte.to(torch.uint8).view(torch.int8), scale.to(torch.float8_e8m0fnu)


def unpack_fp4(packed: Tensor) -> Tensor:
    """int8/uint8 [out, in/2] of e2m1 code pairs → fp32 values [out, in] (no scale)."""
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)  # low nibble first = even column
    magnitude = E2M1_VALUES[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def dequantize_fp4(packed: Tensor, scale: Tensor) -> Tensor:
    """Inverse of `quantize_fp4`: e2m1 · scale per 1×32 block, fp32 [out, in]."""
    values = unpack_fp4(packed)
    return values * scale.float().repeat_interleave(FP4_BLOCK, 1)[:, : values.shape[1]]


# ---------------------------------------------------------------------------------------------
# Name map: checkpoint name → where it goes in the model


@dataclass(frozen=True)
class _Slot:
    """One checkpoint tensor's destination: `model_name` (optionally `[expert]`), shape, dtype."""

    model_name: str
    expert: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype


def _checkpoint_slots(model: nn.Module) -> dict[str, _Slot]:
    """Checkpoint names of the model's state. A tensor reachable under two names (the MTP block
    sharing the main embedding / head) is stored once, under its first name."""
    slots, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        m = _EXPERTS.match(name)
        if m is None or t.ndim != 3:
            slots[name] = _Slot(name, None, tuple(t.shape), t.dtype)
            continue
        for j in range(t.shape[0]):
            ckpt = f"{m['prefix']}.{j}.{m['w']}.weight"
            slots[ckpt] = _Slot(name, j, tuple(t.shape[1:]), t.dtype)
    return slots


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class _Header:
    shard: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def _resolve_shards(path: Path) -> dict[str, Path]:
    """Checkpoint path → {tensor name: shard file}, with missing shards reported."""
    if path.is_file() and path.suffix == ".safetensors":
        return {name: path for name in _keys(path)}
    index = path / INDEX_NAME if path.is_dir() else path
    if path.is_dir() and not index.exists():
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) != 1:
            raise WeightsError(f"{path}: no {INDEX_NAME} and {len(singles)} .safetensors files; "
                               f"expected an index or exactly one .safetensors file")
        return {name: singles[0] for name in _keys(singles[0])}
    if not index.exists():
        raise WeightsError(f"{path}: no such checkpoint; pass a directory with {INDEX_NAME} "
                           f"or a .safetensors file")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: no 'weight_map' object mapping tensor names to shard files; "
                           f"regenerate the index")
    shards = {name: index.parent / file for name, file in weight_map.items()}
    for shard in sorted(set(shards.values())):
        if not shard.exists():
            held = sorted(n for n, s in shards.items() if s == shard)
            raise WeightsError(f"shard {shard.name} (listed in {index} for {len(held)} tensors, "
                               f"e.g. {held[0]}) does not exist in {index.parent}; re-download "
                               f"it or fix the index's weight_map")
    return shards


def _keys(shard: Path) -> list[str]:
    with safe_open(str(shard), framework="pt") as f:
        return list(f.keys())


def _read_headers(shards: dict[str, Path]) -> dict[str, _Header]:
    headers = {}
    for shard in sorted(set(shards.values())):
        with safe_open(str(shard), framework="pt") as f:
            present = set(f.keys())
            for name in sorted(n for n, s in shards.items() if s == shard):
                if name not in present:
                    raise WeightsError(f"{name}: the index maps it to {shard.name} but that shard "
                                       f"does not contain it; fix the index or the shard")
                sl = f.get_slice(name)
                dtype = _safetensors_dtype(sl.get_dtype(), name, shard)
                headers[name] = _Header(shard, tuple(sl.get_shape()), dtype)
    return headers


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E8M0": torch.float8_e8m0fnu, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_dtype(code: str, name: str, shard: Path) -> torch.dtype:
    if code not in _DTYPES:
        raise WeightsError(f"{name} in {shard.name}: stored dtype {code} is not supported "
                           f"(supported: {', '.join(_DTYPES)})")
    return _DTYPES[code]


def _plan(slots: dict[str, _Slot], headers: dict[str, _Header]) -> dict[str, str]:
    """Check names, shapes, dtypes and scales; return {checkpoint name: format}."""
    scales = {n for n in headers if n.endswith(".scale") and n not in slots}
    missing = sorted(set(slots) - set(headers))
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s) the model has: "
                           f"{_list(missing)}; the checkpoint was written for a different config "
                           f"(build the model with the matching Config) or is incomplete")
    extra = sorted(n for n in headers if n not in slots and n not in scales)
    extra += sorted(s for s in scales if s.removesuffix(".scale") + ".weight" not in headers)
    if extra:
        where = ", ".join(f"{n} (in {headers[n].shard.name})" for n in extra[:10])
        raise WeightsError(f"checkpoint has {len(extra)} tensor(s) the model does not: {where}; "
                           f"the checkpoint is for a different config or architecture — build the "
                           f"model with the matching Config")
    return {name: _check_tensor(name, slot, headers) for name, slot in slots.items()}


def _list(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")


def _check_tensor(name: str, slot: _Slot, headers: dict[str, _Header]) -> str:
    """Validate one tensor (and its scale); return its format: 'plain', 'fp8' or 'fp4'."""
    h = headers[name]
    sname = name.removesuffix(".weight") + ".scale"
    scale = headers.get(sname) if name.endswith(".weight") else None
    where = f"{name} in {h.shard.name}"
    target = f"the model's {slot.model_name}"
    target += f"[{slot.expert}]" if slot.expert is not None else ""
    if h.dtype == torch.float8_e4m3fn:
        fmt, stored = "fp8", slot.shape
        scale_shape = tuple(math.ceil(n / FP8_BLOCK) for n in slot.shape)
    elif h.dtype in (torch.int8, torch.uint8) and slot.dtype.is_floating_point:
        fmt, stored = "fp4", slot.shape[:-1] + (slot.shape[-1] // 2,)
        scale_shape = slot.shape[:-1] + (math.ceil(slot.shape[-1] / FP4_BLOCK),)
    else:
        fmt, stored, scale_shape = "plain", slot.shape, None
    if h.shape != stored:
        raise WeightsError(f"{where}: shape {list(h.shape)} ({fmt}), expected {list(stored)} for "
                           f"{target} of shape {list(slot.shape)}; the checkpoint was written for "
                           f"a different config — build the model with the matching Config")
    if fmt == "plain":
        if scale is not None:
            raise WeightsError(f"{where}: stored as {h.dtype} but has a companion .scale; only "
                               f"float8_e4m3fn / packed int8 FP4 weights take a scale; drop the "
                               f"stray scale or re-export the weight quantised")
        if slot.dtype.is_floating_point != h.dtype.is_floating_point:
            raise WeightsError(f"{where}: stored dtype {h.dtype} cannot load into {target} "
                               f"({slot.dtype}); re-export the tensor with a compatible dtype")
        return fmt
    if scale is None:
        raise WeightsError(f"{where}: {fmt} weight without its scale {sname}; the checkpoint is "
                           f"incomplete (re-download the shard holding {sname})")
    if scale.shape != scale_shape or not scale.dtype.is_floating_point:
        raise WeightsError(f"{sname} in {scale.shard.name}: scale shape {list(scale.shape)} "
                           f"({scale.dtype}), expected {list(scale_shape)} (ue8m0, one per "
                           f"{'128x128' if fmt == 'fp8' else '1x32'} block of {target} "
                           f"{list(slot.shape)}); the scale does not belong to this weight — "
                           f"re-export the checkpoint with block-scaled quantisation")
    return fmt


def load_safetensors(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a checkpoint (index directory or single .safetensors file) into `model` in place.

    Contract: every model parameter / persistent buffer is in the checkpoint and vice versa
    (`.scale` companions aside); everything is validated from headers before the first write.
    Quantised weights are dequantised in fp32, then cast to the target's dtype.
    """
    slots = _checkpoint_slots(model)
    shards = _resolve_shards(Path(path))
    headers = _read_headers(shards)
    formats = _plan(slots, headers)
    targets = model.state_dict(keep_vars=True)
    for shard in sorted({headers[n].shard for n in slots}):
        with safe_open(str(shard), framework="pt") as f, torch.no_grad():
            for name in (n for n in slots if headers[n].shard == shard):
                value = _read_value(name, formats[name], f, headers)
                slot = slots[name]
                dest = targets[slot.model_name]
                dest = dest if slot.expert is None else dest[slot.expert]
                dest.copy_(value.to(dest.dtype))


def _read_value(name: str, fmt: str, f, headers: dict[str, _Header]) -> Tensor:
    """Read one tensor (plus its scale, possibly from another shard) and dequantise it."""
    t = f.get_tensor(name)
    if fmt == "plain":
        return t
    sname = name.removesuffix(".weight") + ".scale"
    with safe_open(str(headers[sname].shard), framework="pt") as sf:
        scale = sf.get_tensor(sname)
    return dequantize_fp8(t, scale) if fmt == "fp8" else dequantize_fp4(t, scale)


# ---------------------------------------------------------------------------------------------
# Saving


def checkpoint_tensors(model: nn.Module, *, fp8: bool = True, fp4_experts: bool = True,
                       bf16: bool = False) -> dict[str, Tensor]:
    """The model's tensors under checkpoint names, quantised as asked (see `save_safetensors`)."""
    out: dict[str, Tensor] = {}
    state = model.state_dict()
    for name, slot in _checkpoint_slots(model).items():
        t = state[slot.model_name].detach().cpu()
        t = t if slot.expert is None else t[slot.expert]
        is_expert = slot.expert is not None
        scale_name = name.removesuffix(".weight") + ".scale"
        if is_expert and fp4_experts:
            out[name], out[scale_name] = quantize_fp4(t)
        elif fp8 and (is_expert or FP8_WEIGHTS.search(name)):
            out[name], out[scale_name] = quantize_fp8(t)
        elif bf16 and t.is_floating_point() and not _FP32_TENSORS.search(name):
            out[name] = t.to(torch.bfloat16)
        else:
            out[name] = t.clone()
    return out


def save_safetensors(model: nn.Module, path: str | os.PathLike[str], *, fp8: bool = True,
                     fp4_experts: bool = True, bf16: bool = False,
                     shard_size: int = 4 << 30) -> None:
    """Write `model` in the checkpoint format that `load_safetensors` reads.

    fp8:          FP8 e4m3 + 128×128 ue8m0 scales for the projections spec §2.2 stores in FP8
                  (attn.wq_a/wq_b/wkv/wo_a/wo_b, attn.indexer.wq_b, ffn.shared_experts.*,
                  mtp.*.e_proj/h_proj); also for routed experts when fp4_experts is False
                  (as the Base checkpoints do).
    fp4_experts:  routed experts as packed FP4 e2m1 + 1×32 ue8m0 scales.
    bf16:         other float tensors in bf16 except those the spec keeps in fp32 (hc_*,
                  attn_sink, ape, gate.bias); False keeps the model's dtypes.
    path:         a `.safetensors` file (one file, shard_size ignored) or a directory, which gets
                  shards of at most `shard_size` bytes (a tensor larger than that gets its own)
                  and `model.safetensors.index.json`. Every file is written to a temporary name
                  and moved into place with os.replace; the index goes last.
    """
    tensors = checkpoint_tensors(model, fp8=fp8, fp4_experts=fp4_experts, bf16=bf16)
    path = Path(path)
    if path.suffix == ".safetensors":
        _atomic_save(tensors, path)
        return
    path.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _atomic_save({n: tensors[n] for n in names}, path / file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _atomic_write_text(path / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _atomic_save(tensors: dict[str, Tensor], dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, dest)


def _atomic_write_text(dest: Path, text: str) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, dest)
