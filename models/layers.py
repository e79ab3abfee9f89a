"""Small shared building blocks: RMSNorm and the interleaved (GPT-J) rotary embedding with YaRN.

RoPE (v4-architecture.md §3.2): pairs (x[2i], x[2i+1]) of the LAST `rope_dim` channels are rotated
by pos·freq_i. Layers with a compressor use base `compress_rope_theta` with YaRN frequency
interpolation (no attention-temperature change); sliding-window-only layers use `rope_theta` and
no YaRN. Frequencies are computed from torch ops on every call (a few dozen flops) instead of a
buffer, so a model built on the meta device and loaded later has no stale tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x · rsqrt(mean(x²) + eps) over the last dim, computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """weight · x · rsqrt(mean(x²) + eps) over the last dim; statistics in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


@dataclass(frozen=True)
class Rotary:
    """Rotary table for one layer. `cos_sin(positions)` -> (cos, sin), each [*positions.shape,
    rope_dim // 2] fp32. `yarn_factor` None means plain RoPE."""

    rope_dim: int
    base: float
    yarn_factor: float | None = None
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1

    def inv_freq(self, device: torch.device) -> Tensor:
        half = self.rope_dim // 2
        i = torch.arange(half, device=device, dtype=torch.float32)
        freqs = 1.0 / self.base ** (2.0 * i / self.rope_dim)
        if self.yarn_factor is None:
            return freqs
        low, high = self._correction_range()
        ramp = ((i - low) / (high - low)).clamp(0.0, 1.0)
        keep = 1.0 - ramp  # 1 on fast (high-frequency) dims that keep their frequency
        return freqs / self.yarn_factor * (1.0 - keep) + freqs * keep

    def _correction_range(self) -> tuple[float, float]:
        # Dimension index at which a frequency completes `rotations` turns over the original
        # context; dims below `low` rotate fast enough to be left alone, above `high` are scaled.
        def dim_for(rotations: float) -> float:
            ratio = self.original_seq_len / (rotations * 2 * math.pi)
            return self.rope_dim * math.log(ratio) / (2 * math.log(self.base))

        low = max(math.floor(dim_for(self.beta_fast)), 0)
        high = min(math.ceil(dim_for(self.beta_slow)), self.rope_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        return float(low), float(high)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq(positions.device)
        return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate the last 2·cos.shape[-1] channels of x (interleaved pairs); the rest pass through.

    cos/sin must broadcast against x[..., :half] (the caller inserts head dims). `inverse` rotates
    by −angle (multiplication by the conjugate), which undoes a forward rotation exactly.
    """
    rope_dim = 2 * cos.shape[-1]
    keep, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    pairs = rot.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((keep, rotated.to(x.dtype)), dim=-1)
