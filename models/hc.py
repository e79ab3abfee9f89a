"""Manifold-constrained hyper-connections (mHC), v4-architecture.md §3.1 (the code version).

The residual stream X is [B, T, n, d] (n = hc_mult = 4 copies). Around every sub-layer f:

    x, post, comb = hc_pre(X, ...)       x = Σ_j pre_j X_j, fed to norm + f
    X' = hc_post(f(x), X, post, comb)    X'_k = post_k f(x) + Σ_j comb[j, k] X_j   (combᵀ·X)

Per token the mixing coefficients come from one [n·d -> (2+n)·n] projection of the RMS-normalised
flattened stream, rows ordered [pre(n) | post(n) | comb(n·n, row-major)], scaled by
hc_scale = [α_pre, α_post, α_comb] and shifted by hc_base. pre = sigmoid + eps, post = 2·sigmoid,
comb = Sinkhorn(row-softmax + eps, then alternate column / row normalisation). All of it in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sinkhorn(logits: Tensor, iters: int, eps: float) -> Tensor:
    """Near doubly-stochastic [.., n, n] matrix: row-softmax + eps, column-normalise, then
    (iters - 1) rounds of row- then column-normalisation (so columns sum to 1 exactly-ish)."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def _mix_logits(x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    """(flatten(X) @ fnᵀ) · rsqrt(mean(flatten(X)²) + eps): a unit-weight RMSNorm whose weight is
    folded into fn, applied after the projection (cheaper: 24 outputs instead of n·d)."""
    xf = x.flatten(-2).float()
    rs = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(xf, fn.float()) * rs


def hc_pre(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float, norm_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x [B,T,n,d] -> (sub-layer input [B,T,d] in x.dtype, post [B,T,n] fp32, comb [B,T,n,n] fp32)."""
    n = x.shape[-2]
    mix = _mix_logits(x, fn, norm_eps)
    scale, base = scale.float(), base.float()
    pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
    post = 2.0 * torch.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb_logits = (mix[..., 2 * n :] * scale[2] + base[2 * n :]).unflatten(-1, (n, n))
    comb = sinkhorn(comb_logits, iters, eps)
    mixed = (pre.unsqueeze(-1) * x.float()).sum(-2)
    return mixed.to(x.dtype), post, comb


def hc_post(f: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """X'[.., k, :] = post[k]·f + Σ_j comb[j, k]·residual[.., j, :]; f [B,T,d], residual [B,T,n,d].
    The transpose matters: output stream k reads column k of comb."""
    carried = torch.einsum("btjk,btjd->btkd", comb, residual.float())
    out = post.unsqueeze(-1) * f.float().unsqueeze(-2) + carried
    return out.to(residual.dtype)


def hc_head(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float
) -> Tensor:
    """Final contraction of the n streams: Σ_j (sigmoid(mix_j·α + base_j) + eps)·X_j -> [B,T,d]."""
    mix = _mix_logits(x, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + eps
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
