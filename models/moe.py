"""Mixture of experts (v4-architecture.md §3.6): sqrt-softplus router, hash routing, stacked routed
experts run as grouped GEMMs, one shared expert.

Routing, per token (fp32): s = sqrt(softplus(x·Wgᵀ)); picks = top-k(s + bias) on score layers or
tid2eid[token id] on the first n_hash_layers layers (which still weight by s); weights =
s[picks] / Σ s[picks] · route_scale. Experts are clamped SwiGLU (up ∈ [−lim, lim], gate ≤ lim) with
the routing weight applied before w2; the shared expert is unweighted and clamped the same way.

Dispatch without host syncs or data-dependent shapes: the N·k (token, slot) pairs are stably sorted
by expert, counts come from a scatter_add into a fixed [E] vector, and `grouped_mm` multiplies each
contiguous run of rows by its expert's matrix. Every shape depends on N·k only, so torch.export
captures it with a symbolic token count; experts that receive no token are empty groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import Config

# ---------------------------------------------------------------------------------------------
# Grouped GEMM as a custom op: torch._grouped_mm computes it eagerly on the CPU (fp32 and bf16),
# but its built-in meta kernel rejects fp32, so tracing needs our own fake kernel; and it has no
# usable autograd here, so backward is registered explicitly (two more grouped GEMMs).


def _aligned(*tensors: Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: 16-byte aligned base pointers and
    non-unit strides; on the CPU fp32 and bf16 (verified), elsewhere bf16 only (CUDA's kernel
    is bf16, sm90+; not verified here)."""
    if tensors[0].device.type != "cpu" and tensors[0].dtype != torch.bfloat16:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _group_bounds(offs: Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()  # host sync: only on the fallback path, inside the opaque op
    return list(zip([0] + ends[:-1], ends))


@torch.library.custom_op("dsv4c_models::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x [M, K] with rows grouped by expert, w [G, K, N], offs [G] int32 cumulative row ends
    (offs[-1] == M) -> [M, N]; rows offs[g-1]:offs[g] are multiplied by w[g]. Shapes whose
    strides torch._grouped_mm cannot take (e.g. K not a multiple of 16 bytes) use a loop."""
    if _aligned(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    for g, (lo, hi) in enumerate(_group_bounds(offs)):
        out[lo:hi] = x[lo:hi] @ w[g]
    return out


@grouped_mm.register_fake
def _grouped_mm_fake(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("dsv4c_models::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x: Tensor, dy: Tensor, offs: Tensor) -> Tensor:
    """Per-group xᵀ·dy: x [M, K], dy [M, N], offs [G] -> [G, K, N] (zeros for empty groups)."""
    if _aligned(x.t(), dy):
        return torch._grouped_mm(x.t(), dy, offs=offs)
    out = x.new_zeros(offs.shape[0], x.shape[1], dy.shape[1])
    for g, (lo, hi) in enumerate(_group_bounds(offs)):
        out[g] = x[lo:hi].t() @ dy[lo:hi]
    return out


@grouped_mm_wgrad.register_fake
def _grouped_mm_wgrad_fake(x: Tensor, dy: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grouped_mm(grad, w.transpose(-2, -1), offs)
    grad_w = grouped_mm_wgrad(x, grad, offs)
    return grad_x, grad_w, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def clamped_swiglu(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    """silu(min(gate, limit)) · clamp(up, −limit, limit), in fp32."""
    gate = gate.float().clamp(max=limit)
    up = up.float().clamp(-limit, limit)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------


class Gate(nn.Module):
    """Router. Parameters: `weight` [E, d] (all layers), `bias` [E] fp32 (score layers only; used
    for selection, never for the weights). Buffer `tid2eid` [V, k] int64 (hash layers only)."""

    def __init__(self, cfg: Config, hash_routing: bool) -> None:
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.route_scale = cfg.route_scale
        self.hash_routing = hash_routing
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        if hash_routing:
            self.register_buffer(
                "tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.int64)
            )
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, d], ids [N] -> (weights [N, k] fp32, expert indices [N, k] int64)."""
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()
        if self.hash_routing:
            experts = self.tid2eid[ids]
        else:
            experts = (scores + self.bias.float()).topk(self.topk, dim=-1).indices
        weights = scores.gather(-1, experts)
        weights = weights / weights.sum(-1, keepdim=True) * self.route_scale
        return weights, experts


class Experts(nn.Module):
    """E routed experts stored stacked in nn.Linear layout: w1, w3 [E, I, d], w2 [E, d, I]."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        e, inter, d = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Parameter(torch.empty(e, inter, d))
        self.w3 = nn.Parameter(torch.empty(e, inter, d))
        self.w2 = nn.Parameter(torch.empty(e, d, inter))

    def forward(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """x [N, d], weights/experts [N, k] -> Σ_slots weight · expert(x) [N, d] (x.dtype)."""
        return expert_mix(x, weights, experts, self.w1, self.w3, self.w2, self.limit)


def expert_mix(
    x: Tensor, weights: Tensor, experts: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, limit: float
) -> Tensor:
    """Σ_slots weight · clamped-SwiGLU expert(x) with the experts' stacked weights w1, w3 [E, I, d]
    and w2 [E, d, I]: the (token, slot) pairs sorted by expert, one grouped GEMM per projection.
    Shared by `Experts` and `models.quant.QuantExperts` (on its dequantised weights)."""
    n_experts, k = w1.shape[0], experts.shape[-1]
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    token = order // k
    counts = torch.zeros(n_experts, dtype=torch.int64, device=x.device)
    counts = counts.scatter_add(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)

    rows = x[token]
    gate = grouped_mm(rows, w1.transpose(1, 2), offs)
    up = grouped_mm(rows, w3.transpose(1, 2), offs)
    hidden = clamped_swiglu(gate, up, limit) * weights.flatten()[order].unsqueeze(-1)
    out_rows = grouped_mm(hidden.to(x.dtype), w2.transpose(1, 2), offs)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add(0, token, out_rows.float()).to(x.dtype)


class SharedExpert(nn.Module):
    """Dense clamped-SwiGLU FFN applied to every token, unweighted."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Linear(cfg.dim, cfg.moe_inter_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.moe_inter_dim, bias=False)
        self.w2 = nn.Linear(cfg.moe_inter_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit).to(x.dtype))


class MoE(nn.Module):
    """Routed experts + shared expert. forward(x [B,T,d], ids [B,T]) -> [B,T,d]."""

    def __init__(self, cfg: Config, hash_routing: bool) -> None:
        super().__init__()
        self.gate = Gate(cfg, hash_routing)
        self.experts = Experts(cfg)
        self.shared_experts = SharedExpert(cfg)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        flat = x.flatten(0, 1)
        weights, experts = self.gate(flat, ids.flatten())
        out = self.experts(flat, weights, experts) + self.shared_experts(flat)
        return out.view(x.shape)
