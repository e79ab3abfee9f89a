"""Hugging Face DeepSeek-V4 hyper-connection modules for the mHC fusion tests
(tests/passes/test_hf_hc_forms.py, tests/backends/test_hf_hc_backends.py): HF's own modules and a
copy of HF's forward with the Sinkhorn axes and the RMS dim as parameters (for near misses)."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

N, D = 4, 16  # streams, hidden size


def hf_config(iters: int = 20):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(
        hidden_size=D, hc_mult=N, hc_sinkhorn_iters=iters, hc_eps=1e-6, rms_norm_eps=1e-5
    )


class SinkhornAxes(hf_v4.DeepseekV4HyperConnection):
    """HF's forward with the Sinkhorn normalisations spelled as a list of axes (HF's own:
    -2, then iters - 1 times (-1, -2)) and the RMS mean over `norm_dim` (HF's own: -1)."""

    def __init__(self, cfg, axes: tuple[int, ...], norm_dim: int = -1) -> None:
        super().__init__(cfg)
        self.axes, self.norm_dim = axes, norm_dim

    def forward(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, n, eps = *streams.shape[:2], self.hc_mult, self.hc_eps
        flat = streams.view(b, s, -1).float()
        flat = flat * torch.rsqrt(flat.square().mean(self.norm_dim, keepdim=True) + 1e-5)
        pre_w, post_w, comb_w = F.linear(flat, self.fn.float()).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        a_pre, a_post, a_comb = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * a_pre + pre_b) + eps
        post = 2 * torch.sigmoid(post_w * a_post + post_b)
        comb = torch.softmax(comb_w.view(b, s, n, n) * a_comb + comb_b.view(n, n), dim=-1) + eps
        for axis in self.axes:
            comb = comb / (comb.sum(dim=axis, keepdim=True) + eps)  # SINKHORN_STEP
        return post, comb, (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def _line_of(fn, marker: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return next(start + i for i, text in enumerate(lines) if marker in text)


SINKHORN_LINE = _line_of(SinkhornAxes.forward, "SINKHORN_STEP")


def hf_axes(iters: int) -> tuple[int, ...]:
    return (-2,) + (-1, -2) * (iters - 1)


class Streams(nn.Module):
    """The mHC parts of HF's DeepSeek-V4: expanded embeddings, two decoder-layer mixes (attention
    and MLP replaced by one linear each, post spelled as in DeepseekV4DecoderLayer), the head."""

    def __init__(self, cfg, hc=None) -> None:
        super().__init__()
        make = hc or hf_v4.DeepseekV4HyperConnection
        self.mixes = nn.ModuleList([make(cfg), make(cfg)])
        self.blocks = nn.ModuleList([nn.Linear(D, D, bias=False) for _ in range(2)])
        self.hc_head = hf_v4.DeepseekV4HyperHead(cfg)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # HF leaves these uninitialised (torch.empty) until _init_weights
            for name, p in self.named_parameters():
                scale = 0.5 if name.endswith(("base", "scale")) else 0.1
                p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def forward(self, h: Tensor) -> Tensor:
        x = h.unsqueeze(2).expand(-1, -1, N, -1).contiguous()
        for mix, block in zip(self.mixes, self.blocks):
            post, comb, collapsed = mix(x)
            out = block(collapsed)
            x = post.to(x.dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
                comb.to(x.dtype).transpose(-1, -2), x
            )
        return self.hc_head(x)


def hidden() -> Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))




def params(model: nn.Module) -> dict[str, Tensor]:
    """The graph's parameter inputs: state_dict() plus non-persistent buffers."""
    return {**dict(model.named_buffers()), **model.state_dict()}
