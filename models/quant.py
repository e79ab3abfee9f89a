"""Weights kept in their checkpoint precision: FP8 linears (`FP8Linear`, `quantize_fp8_linears`) and
FP4 / FP8 routed experts (`QuantExperts`, `quantize_experts`).

A `FP8Linear` holds `qweight` float8_e4m3fn [out, in] and `scale` fp32 [ceil(out/128),
ceil(in/128)] (one power-of-two scale per 128×128 block, `models.weights.quantize_fp8`), the
layout of the checkpoint's FP8 tensors (`X.weight` + `X.scale`). Its forward dequantises in the
canonical spelling below, which `passes/fuse_quant.py` folds with the following linear into one
`linalg.matmul_fp8` op (the weight then stays 1 byte per element in the compiled program):

    w = (qweight.float().view(R, 128, C, 128) padded...) -- spelled as
    w = qweight.float() * scale[:, None, :, None].expand(R, 128, C, 128).reshape(R·128, C·128)
                                                  [:out, :in]
    y = F.linear(x.float(), w).to(x.dtype)

Code that reads `module.weight` (the compressor does `F.linear(x, wkv.weight.float())`) gets the
dequantised fp32 weight through the `weight` property, so a model transformed by
`quantize_fp8_linears` runs unchanged in eager. Eager output on a quantised model is the
reference "eager on the dequantised weights" that compiled FP8 kernels are tested against.

Routed experts (`QuantExperts`, in place of `models.moe.Experts`) hold each of w1, w3 [E, I, d]
and w2 [E, d, I] compressed, as `<w>_q` + `<w>_scale` buffers:

    "fp4_e2m1"  (MXFP4, the checkpoint's routed experts) `<w>_q` int8 [E, rows, cols/2], two e2m1
                codes a byte (low nibble = even column), `<w>_scale` int8 [E, rows, ceil(cols/32)]
                holding ue8m0 bytes u (read unsigned: 2^(u - 127)), one per 1×32 block of a row;
    "fp8_e4m3"  `<w>_q` float8_e4m3fn [E, rows, cols], `<w>_scale` fp32 [E, ceil(rows/128),
                ceil(cols/128)] (powers of two).

Their forward dequantises (`dequantize_fp4_experts` / `dequantize_fp8_experts`, exact, f32),
rounds to x's dtype and runs the routed experts exactly as `models.moe.Experts` does;
`passes/fuse_quant.py` folds those spellings into `moe.experts(weight_format=...)`, whose kernels
dequantise in the GEMM loop (0.5 + 1/32 bytes per FP4 weight element read instead of 2 or 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.moe import Experts, expert_mix
from models.weights import FP4_BLOCK, FP8_BLOCK, quantize_fp4, quantize_fp8

__all__ = [
    "FORMATS",
    "FP8Linear",
    "QuantExperts",
    "decode_e2m1",
    "decode_ue8m0",
    "dequantize_blocks",
    "dequantize_fp4_experts",
    "dequantize_fp8_experts",
    "quantize_experts",
    "quantize_fp4_experts",
    "quantize_fp8_linears",
]

FORMATS = ("fp4_e2m1", "fp8_e4m3")


def dequantize_blocks(qweight: Tensor, scale: Tensor) -> Tensor:
    """float8_e4m3fn [N, K] and fp32 scales [ceil(N/128), ceil(K/128)] -> fp32 [N, K], exact
    (fp8 · 2^k). The spelling is the one `passes/fuse_quant.py` matches; keep them in step."""
    n, k = qweight.shape
    rows, cols = scale.shape
    full = scale[:, None, :, None].expand(rows, FP8_BLOCK, cols, FP8_BLOCK)
    full = full.reshape(rows * FP8_BLOCK, cols * FP8_BLOCK)[:n, :k]
    return qweight.float() * full


class FP8Linear(nn.Module):
    """y = (x.float() @ dequantize_blocks(qweight, scale).T).to(x.dtype), no bias.

    Buffers (not parameters: FP8 weights are not trained here): `qweight` float8_e4m3fn [out, in],
    `scale` fp32 [ceil(out/128), ceil(in/128)].
    """

    def __init__(self, qweight: Tensor, scale: Tensor) -> None:
        super().__init__()
        out, inp = qweight.shape
        want = (math.ceil(out / FP8_BLOCK), math.ceil(inp / FP8_BLOCK))
        if qweight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8Linear: qweight must be float8_e4m3fn, got {qweight.dtype}")
        if tuple(scale.shape) != want:
            raise ValueError(f"FP8Linear: scale for weight {[out, inp]} must be {list(want)} "
                             f"(one per {FP8_BLOCK}x{FP8_BLOCK} block), got {list(scale.shape)}")
        self.in_features, self.out_features = inp, out
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantise `linear`'s weight block-wise (amax / 448, rounded up to a power of two)."""
        if linear.bias is not None:
            raise ValueError("FP8Linear: linears with a bias are not supported (V4 has none)")
        q, scale = quantize_fp8(linear.weight.detach())
        return cls(q.to(linear.weight.device), scale.float().to(linear.weight.device))

    @property
    def weight(self) -> Tensor:
        """The dequantised fp32 weight [out, in] (for code that reads `.weight` directly)."""
        return dequantize_blocks(self.qweight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), dequantize_blocks(self.qweight, self.scale)).to(x.dtype)


def quantize_fp8_linears(
    model: nn.Module, select: Callable[[str, nn.Linear], bool] | None = None
) -> list[str]:
    """Replace (in place) every bias-free `nn.Linear` of `model` that `select(name, linear)`
    accepts (default: all) by an `FP8Linear`; returns the replaced module names, sorted."""
    picked = [
        (name, m) for name, m in model.named_modules()
        if type(m) is nn.Linear and m.bias is None and (select is None or select(name, m))
    ]
    for name, linear in picked:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FP8Linear.from_linear(linear))
    return sorted(name for name, _ in picked)


# ---------------------------------------------------------------------------------------------
# Routed experts in FP4 / FP8. The dequantising spellings below are the ones passes/fuse_quant.py
# matches (rule fuse_quant.experts); keep them in step.


def decode_e2m1(codes: Tensor) -> Tensor:
    """int32 e2m1 codes (0-15) -> fp32, exact: sign bit 3; m = bits 0-2 = 2·E + M gives M/2 for
    E = 0 (0, 0.5), else (1 + M/2)·2^(E-1) (1, 1.5, 2, 3, 4, 6)."""
    m = codes & 7
    exponent = m // 2
    half = (m & 1).float() * 0.5
    power = torch.pow(2.0, (exponent - 1).float())
    magnitude = torch.where(exponent == 0, half, (half + 1.0) * power)
    return torch.where(codes >= 8, -magnitude, magnitude)


def decode_ue8m0(scale: Tensor) -> Tensor:
    """int8 ue8m0 bytes u (read unsigned) -> fp32 2^(u - 127), exact."""
    return torch.pow(2.0, ((scale.to(torch.int32) & 255) - 127).float())


def dequantize_fp4_experts(q: Tensor, scale: Tensor) -> Tensor:
    """Packed int8 [E, rows, cols/2] + ue8m0 int8 [E, rows, ceil(cols/32)] -> fp32 [E, rows, cols]
    (= models.weights.dequantize_fp4 per expert)."""
    e, rows, half = q.shape
    b = q.to(torch.int32) & 255
    codes = torch.stack((b & 15, b // 16), dim=-1).reshape(e, rows, 2 * half)  # low nibble first
    groups = scale.shape[2]
    full = decode_ue8m0(scale)[:, :, :, None].expand(e, rows, groups, FP4_BLOCK)
    full = full.reshape(e, rows, groups * FP4_BLOCK)[:, :, : 2 * half]
    return decode_e2m1(codes) * full


def dequantize_fp8_experts(q: Tensor, scale: Tensor) -> Tensor:
    """float8_e4m3fn [E, rows, cols] + fp32 [E, ceil(rows/128), ceil(cols/128)] -> fp32, exact."""
    e, n, k = q.shape
    _, r, c = scale.shape
    full = scale[:, :, None, :, None].expand(e, r, FP8_BLOCK, c, FP8_BLOCK)
    full = full.reshape(e, r * FP8_BLOCK, c * FP8_BLOCK)[:, :n, :k]
    return q.float() * full


def _stored_shapes(fmt: str, e: int, rows: int, cols: int) -> tuple[tuple, tuple, torch.dtype]:
    """(q shape, scale shape, q dtype) of one stacked expert weight of logical [e, rows, cols]."""
    if fmt == "fp4_e2m1":
        return (e, rows, cols // 2), (e, rows, math.ceil(cols / FP4_BLOCK)), torch.int8
    rc = (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
    return (e, rows, cols), (e, *rc), torch.float8_e4m3fn


class QuantExperts(Experts):
    """`models.moe.Experts` with w1, w3 [E, I, d] and w2 [E, d, I] stored in `fmt` (module
    docstring): buffers `w1_q`, `w1_scale`, `w3_q`, ...; `w1`, `w3`, `w2` are the dequantised
    fp32 weights (properties), so the inherited forward runs unchanged on them (rounded to x's
    dtype first)."""

    def __init__(self, fmt: str, limit: float, stored: dict[str, Tensor]) -> None:
        nn.Module.__init__(self)  # no dense parameters: the properties below stand for them
        if fmt not in FORMATS:
            raise ValueError(f"QuantExperts: format must be one of {FORMATS}, got {fmt!r}")
        self.fmt, self.limit = fmt, limit
        e, inter, half = stored["w1_q"].shape
        d = half * (2 if fmt == "fp4_e2m1" else 1)
        logical = {"w1": (e, inter, d), "w3": (e, inter, d), "w2": (e, d, inter)}
        for name, shape in logical.items():
            q_shape, s_shape, q_dtype = _stored_shapes(fmt, *shape)
            q, scale = stored[f"{name}_q"], stored[f"{name}_scale"]
            if q.dtype != q_dtype or tuple(q.shape) != q_shape:
                raise ValueError(f"QuantExperts({fmt}): {name}_q must be {q_dtype} "
                                 f"{list(q_shape)}, got {q.dtype} {list(q.shape)}")
            s_dtype = torch.int8 if fmt == "fp4_e2m1" else torch.float32
            if scale.dtype != s_dtype or tuple(scale.shape) != s_shape:
                raise ValueError(f"QuantExperts({fmt}): {name}_scale must be {s_dtype} "
                                 f"{list(s_shape)} (one per block of {name} {list(shape)}), got "
                                 f"{scale.dtype} {list(scale.shape)}")
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    @classmethod
    def from_experts(cls, experts: Experts, fmt: str) -> QuantExperts:
        """Quantise each expert's matrices (FP4: nearest e2m1, ue8m0 scale per 1×32 block; FP8:
        e4m3 with a power-of-two scale per 128×128 block); d and I must be even for FP4."""
        stored = {}
        for name in ("w1", "w3", "w2"):
            w = getattr(experts, name).detach()
            quantise = quantize_fp4 if fmt == "fp4_e2m1" else quantize_fp8
            pairs = [quantise(w[i].float().cpu()) for i in range(w.shape[0])]
            q = torch.stack([p[0] for p in pairs]).to(w.device)
            scale = torch.stack([p[1] for p in pairs]).to(w.device)
            # FP4: the e8m0 bytes as int8 (the IR has no unsigned byte); FP8: fp32 powers of two
            fp4 = fmt == "fp4_e2m1"
            scale = scale.view(torch.uint8).view(torch.int8) if fp4 else scale.float()
            stored[f"{name}_q"], stored[f"{name}_scale"] = q, scale
        return cls(fmt, experts.limit, stored)

    def _dequantised(self, name: str) -> Tensor:
        q, scale = getattr(self, f"{name}_q"), getattr(self, f"{name}_scale")
        if self.fmt == "fp4_e2m1":
            return dequantize_fp4_experts(q, scale)
        return dequantize_fp8_experts(q, scale)

    @property
    def w1(self) -> Tensor:  # type: ignore[override]
        return self._dequantised("w1")

    @property
    def w3(self) -> Tensor:  # type: ignore[override]
        return self._dequantised("w3")

    @property
    def w2(self) -> Tensor:  # type: ignore[override]
        return self._dequantised("w2")

    def forward(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """`models.moe.Experts.forward` on the dequantised weights rounded to x's dtype."""
        w1, w3, w2 = (self._dequantised(n).to(x.dtype) for n in ("w1", "w3", "w2"))
        return expert_mix(x, weights, experts, w1, w3, w2, self.limit)


def quantize_experts(model: nn.Module, fmt: str = "fp4_e2m1") -> list[str]:
    """Replace (in place) every `models.moe.Experts` of `model` (the routed experts of each MoE
    layer) by a `QuantExperts` in `fmt`; returns the replaced module names, sorted."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_experts: format must be one of {FORMATS}, got {fmt!r}")
    picked = [(name, m) for name, m in model.named_modules() if type(m) is Experts]
    for name, experts in picked:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantExperts.from_experts(experts, fmt))
    return sorted(name for name, _ in picked)


def quantize_fp4_experts(model: nn.Module) -> list[str]:
    """`quantize_experts(model, "fp4_e2m1")`: the checkpoint's MXFP4 routed experts."""
    return quantize_experts(model, "fp4_e2m1")
