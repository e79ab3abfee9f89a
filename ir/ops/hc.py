"""Manifold-constrained hyper-connection kernels (v4-architecture.md §3.1, §5 K1-K3, K13, K19).

The residual stream X is [..., n, d] (n copies). Per token the mixing coefficients come from one
[n·d -> rows] projection of the RMS-normalised flattened stream (unit weight, folded into fn):

    mix = (flatten(X)·fnᵀ) · rsqrt(mean(flatten(X)²) + norm_eps)                  fp32

- `hc.pre`: rows [pre(n) | post(n) | comb(n·n, row-major)], scale = [α_pre, α_post, α_comb]:
  pre = sigmoid(α_pre·mix + base) + eps, post = 2·sigmoid(...),
  comb = Sinkhorn(α_comb·mix + base) -> (Σ_j pre_j X_j, post, comb). The Sinkhorn iterations are a loop in the reference, one op.
- `hc.post`: X'_k = post_k·f + Σ_j comb[j,k]·R_j.
- `hc.head`: the final contraction, rows [pre(n)] only -> Σ_j pre_j X_j.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import io_cost, numel, require
from ir.symbolic import same_dim
from ir.types import DType, TensorType

__all__ = ["HCHead", "HCPost", "HCPre", "sinkhorn_reference"]


def sinkhorn_reference(logits, iters: int, eps: float):
    """Row-softmax + eps, column-normalise, then (iters - 1) rounds of rows then columns."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def _mix(x, fn, norm_eps: float):
    xf = x.flatten(-2).float()
    rs = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    return (xf @ fn.float().T) * rs


def _check_stream(
    op: Op,
    x: TensorType,
    fn: TensorType,
    scale: TensorType,
    base: TensorType,
    rows_per_n,
    n_scales: int,
):
    types = (x, fn, scale, base)
    require(op, x.rank >= 3, "x must be [..., n, d]", *types)
    require(op, x.dtype.is_float, "x must be float", *types)
    n, d = x.shape[-2], x.shape[-1]
    rows = rows_per_n(n)
    require(op, fn.rank == 2, "fn must be 2-D", *types)
    require(op, same_dim(fn.shape[0], rows), f"fn must have {rows} rows for n={n}", *types)
    require(op, same_dim(fn.shape[1], n * d), f"fn must have n*d = {n * d} columns", *types)
    require(op, scale.shape == (n_scales,), f"scale must be [{n_scales}]", *types)
    require(op, base.rank == 1 and same_dim(base.shape[0], rows), f"base must be [{rows}]", *types)
    for t in (fn, scale, base):
        require(op, t.dtype.is_float, "fn/scale/base must be float", *types)


@register
@dataclass(frozen=True)
class HCPre(Op):
    """mHC pre-mix: x [...,n,d], fn [(2+n)·n, n·d], scale [3], base [(2+n)·n] -> (y [...,d] in
    x's dtype, post [...,n] f32, comb [...,n,n] f32); see the module docstring. comb is
    `iters` Sinkhorn steps (row-softmax + eps, column normalise, iters-1 × (rows, columns)), each
    normalisation dividing by (sum + eps). y = Σ_j pre_j·X_j in fp32, cast to x's dtype.
    """

    mnemonic = "hc.pre"
    kind = Kind.OPAQUE
    num_operands = 4
    iters: int = 20
    eps: float = 1e-6
    norm_eps: float = 1e-6

    def infer_type(self, x, fn, scale, base):
        require(self, self.iters >= 1, f"iters must be >= 1, got {self.iters}", x, fn, scale, base)
        _check_stream(self, x, fn, scale, base, lambda n: (2 + n) * n, 3)
        lead, n = x.shape[:-2], x.shape[-2]
        return (
            TensorType(lead + (x.shape[-1],), x.dtype),
            TensorType(lead + (n,), DType.f32),
            TensorType(lead + (n, n), DType.f32),
        )

    def reference(self, x, fn, scale, base):
        n = x.shape[-2]
        mix = _mix(x, fn, self.norm_eps)
        scale, base = scale.float(), base.float()
        pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + self.eps
        post = 2.0 * torch.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        logits = (mix[..., 2 * n :] * scale[2] + base[2 * n :]).unflatten(-1, (n, n))
        comb = sinkhorn_reference(logits, self.iters, self.eps)
        y = (pre.unsqueeze(-1) * x.float()).sum(-2)
        return (y.to(x.dtype), post, comb)

    def cost(self, operand_types, result_types):
        x, fn = operand_types[0], operand_types[1]
        tokens = numel(x.shape[:-2])
        n = x.shape[-2]
        flops = 2 * numel(x.shape) * fn.shape[0] + 2 * numel(x.shape)
        flops = flops + tokens * n * n * 4 * self.iters
        return io_cost(flops, operand_types, result_types)


@register
@dataclass(frozen=True)
class HCPost(Op):
    """mHC post-mix: f [...,d], residual [...,n,d], post [...,n], comb [...,n,n] -> [...,n,d] in
    residual's dtype: out[..., k, :] = post[k]·f + Σ_j comb[j, k]·residual[..., j, :] (fp32;
    output stream k reads column k of comb)."""

    mnemonic = "hc.post"
    kind = Kind.OPAQUE
    num_operands = 4

    def infer_type(self, f, residual, post, comb):
        types = (f, residual, post, comb)
        require(self, residual.rank >= 3, "residual must be [..., n, d]", *types)
        lead, n, d = residual.shape[:-2], residual.shape[-2], residual.shape[-1]
        require(self, f.shape == lead + (d,), "f must be residual's shape without n", *types)
        require(self, post.shape == lead + (n,), "post must be [..., n]", *types)
        require(self, comb.shape == lead + (n, n), "comb must be [..., n, n]", *types)
        for t in types:
            require(self, t.dtype.is_float, "operands must be float", *types)
        return (residual,)

    def reference(self, f, residual, post, comb):
        carried = torch.einsum("...jk,...jd->...kd", comb.float(), residual.float())
        out = post.float().unsqueeze(-1) * f.float().unsqueeze(-2) + carried
        return (out.to(residual.dtype),)

    def cost(self, operand_types, result_types):
        r = operand_types[1]
        flops = 2 * numel(r.shape) * r.shape[-2] + 2 * numel(r.shape)
        return io_cost(flops, operand_types, result_types)


@register
@dataclass(frozen=True)
class HCHead(Op):
    """mHC final contraction: x [...,n,d], fn [n, n·d], scale [1], base [n] -> y [...,d] in x's
    dtype, y = Σ_j (sigmoid(α·mix_j + base_j) + eps)·X_j (fp32, module docstring)."""

    mnemonic = "hc.head"
    kind = Kind.OPAQUE
    num_operands = 4
    eps: float = 1e-6
    norm_eps: float = 1e-6

    def infer_type(self, x, fn, scale, base):
        _check_stream(self, x, fn, scale, base, lambda n: n, 1)
        return (TensorType(x.shape[:-2] + (x.shape[-1],), x.dtype),)

    def reference(self, x, fn, scale, base):
        mix = _mix(x, fn, self.norm_eps)
        pre = torch.sigmoid(mix * scale.float() + base.float()) + self.eps
        return ((pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype),)

    def cost(self, operand_types, result_types):
        x, fn = operand_types[0], operand_types[1]
        flops = 2 * numel(x.shape) * fn.shape[0] + 2 * numel(x.shape)
        return io_cost(flops, operand_types, result_types)
