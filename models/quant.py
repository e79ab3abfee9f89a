"""FP8 weights kept in their checkpoint precision: `FP8Linear` and `quantize_fp8_linears`.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.weights import FP8_BLOCK, quantize_fp8

__all__ = ["FP8Linear", "dequantize_blocks", "quantize_fp8_linears"]


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
