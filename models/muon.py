"""Muon optimizer as used for DeepSeek-V4 (v4-architecture.md §7), with AdamW for the rest.

Per logically independent weight W (n×m), with gradient G, momentum μ, lr η, weight decay λ:

    M   ← μ·M + G                                   momentum buffer
    O'  ← HybridNewtonSchulz(μ·M + G)               Nesterov trick
    O   ← O' · sqrt(max(n, m)) · γ                  update RMS rescale, γ = 0.18
    W   ← W·(1 − ηλ) − η·O                          decoupled weight decay

Which parameter goes where (`muon_param_groups`, `Muon.for_model`), decided by name and rank:

    AdamW  every tensor with ndim < 2 (RMSNorm weights, gate bias, attn_sink, hc_*_base,
           hc_*_scale, ...), `embed.weight`, `head.weight`, any `ape` (compressor positional
           bias, 2-D but a bias), any `*.bias`, any `hc_*_base` / `hc_*_scale`, any `attn_sink`,
           any `*norm.weight` — wherever they appear (main layers and `mtp.*`).
    Muon   every other tensor with ndim >= 2: attention / compressor / indexer projections,
           router `ffn.gate.weight`, shared experts, `hc_*_fn` (an ordinary [24, n_hc·d] matrix),
           `mtp.0.{e,h}_proj.weight`, and the stacked routed experts `ffn.experts.w1|w2|w3`
           [E, rows, cols], which are E independent matrices (NS batched over E, rescale by
           sqrt(max(rows, cols))). Any tensor of rank > 2 is treated the same way: leading dims
           are a batch of independent matrices.

Same-shape matrices are stacked into one batched Newton–Schulz call per step. NS runs in fp32;
optimizer state is kept in fp32 whatever the parameter dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

# (a, b, c) per Newton–Schulz iteration: 8 fast quintic steps, then 2 steps of a polynomial with
# p(1) = 1, p'(1) = 0 that pulls the singular values tightly onto 1.
NS_COEFFS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 8 + (
    (2.0, -1.5, 0.5),
) * 2

UPDATE_RMS = 0.18

_ADAMW_LEAF = re.compile(r"(^|\.)(ape|attn_sink|bias|hc_\w+_(base|scale)|\w*norm\.weight)$")
_ADAMW_EXACT = {"embed.weight", "head.weight"}


def hybrid_newton_schulz(g: Tensor, coeffs: Iterable[tuple[float, float, float]] = NS_COEFFS,
                         eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise each trailing [n, m] matrix of `g` (U Vᵀ of its SVD).

    `g` has shape [..., n, m]; leading dims are a batch. Each matrix is divided by its Frobenius
    norm, then iterated M ← aM + b(MMᵀ)M + c(MMᵀ)²M. Tall matrices are transposed so MMᵀ is the
    small side. Computed in fp32, returned in fp32 with the input's shape.
    """
    if g.ndim < 2:
        raise ValueError(f"hybrid_newton_schulz needs a matrix [..., n, m], "
                         f"got shape {tuple(g.shape)}")
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for a, b, c in coeffs:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def is_muon_param(name: str, p: Tensor) -> bool:
    """The partition rule in the module docstring: True → Muon, False → AdamW."""
    if p.ndim < 2:
        return False
    if name in _ADAMW_EXACT or name.endswith(".embed.weight") or name.endswith(".head.weight"):
        return False
    return _ADAMW_LEAF.search(name) is None


def muon_param_groups(named_params: Iterable[tuple[str, Tensor]]) -> list[dict[str, Any]]:
    """Split (name, param) pairs into a Muon group and an AdamW group (names kept).

    Parameters with requires_grad=False are left out. Empty groups are dropped.
    """
    muon, adamw = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (muon if is_muon_param(name, p) else adamw).append((name, p))
    groups = [{"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False}]
    return [g for g in groups if g["params"]]


class Muon(torch.optim.Optimizer):
    """Muon for matrices, AdamW for everything else, in one `torch.optim.Optimizer`.

    Construction, three equivalent forms:
        Muon(model, lr)                          partition by name (see module docstring)
        Muon(model.named_parameters(), lr)       same, from (name, param) pairs
        Muon([{"params": [...], "use_muon": True}, {"params": [...], "use_muon": False}], lr)
        Muon.for_model(model, lr)                alias of the first form
    A group without `use_muon` defaults to Muon; a Muon group holding a tensor of rank < 2 is an
    error. Per-group options: lr, momentum, weight_decay, nesterov, update_rms (Muon groups);
    lr, betas, eps, weight_decay (AdamW groups). `adamw_lr=None` means AdamW uses `lr` too
    (γ = 0.18 matches Muon's update RMS to AdamW's, so one lr serves both).
    """

    def __init__(self, params: nn.Module | Iterable[Any], lr: float = 2e-4,
                 momentum: float = 0.95, weight_decay: float = 0.1, *, nesterov: bool = True,
                 update_rms: float = UPDATE_RMS, adamw_lr: float | None = None,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-20,
                 adamw_weight_decay: float | None = None) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"Muon: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; "
                             f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        groups = _as_groups(params)
        adamw = {"lr": lr if adamw_lr is None else adamw_lr, "betas": adamw_betas, "eps": adamw_eps,
                 "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay}
        for g in groups:
            g.setdefault("use_muon", True)
            if not g["use_muon"]:
                for k, v in adamw.items():
                    g.setdefault(k, v)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "nesterov": nesterov, "update_rms": update_rms, "betas": adamw_betas,
                    "eps": adamw_eps, "use_muon": True}
        super().__init__(groups, defaults)
        for g in self.param_groups:
            _check_muon_group(g)

    @classmethod
    def for_model(cls, model: nn.Module, lr: float = 2e-4, **kwargs: Any) -> Muon:
        """Muon over `model.named_parameters()`, partitioned by `is_muon_param`."""
        return cls(muon_param_groups(model.named_parameters()), lr, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        # Nesterov inputs, bucketed by matrix shape so same-shape matrices share one NS call.
        buckets: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf = state["momentum_buffer"]
            grad = p.grad.float()
            buf.mul_(mu).add_(grad)
            u = buf * mu + grad if group["nesterov"] else buf.clone()
            buckets.setdefault(tuple(p.shape[-2:]), []).append((p, u))
        for (n, m), items in buckets.items():
            stacked = torch.cat([u.reshape(-1, n, m) for _, u in items])
            ortho = hybrid_newton_schulz(stacked) * (math.sqrt(max(n, m)) * group["update_rms"])
            for (p, _), o in zip(items, ortho.split([u.numel() // (n * m) for _, u in items])):
                new = p.float().mul_(1 - lr * wd).sub_(o.reshape(p.shape), alpha=lr)
                p.copy_(new)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon (AdamW part) does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            t = state["step"].item()
            grad = p.grad.float()
            state["exp_avg"].lerp_(grad, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps)
            new = p.float().mul_(1 - lr * wd)
            new.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
            p.copy_(new)


def _as_groups(params: nn.Module | Iterable[Any]) -> list[dict[str, Any]]:
    """Normalise the accepted `params` forms into a list of group dicts."""
    if isinstance(params, nn.Module):
        return muon_param_groups(params.named_parameters())
    items = list(params)
    if not items:
        raise ValueError("Muon got an empty parameter list")
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return muon_param_groups(items)
    if all(isinstance(x, dict) for x in items):
        return [dict(g) for g in items]
    if all(isinstance(x, Tensor) for x in items):
        return [{"params": items}]
    raise TypeError("Muon params must be an nn.Module, (name, param) pairs, tensors, "
                    "or param-group dicts — not a mix")


def _check_muon_group(group: dict[str, Any]) -> None:
    if not group["use_muon"]:
        return
    names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
    for name, p in zip(names, group["params"]):
        if p.ndim < 2:
            raise ValueError(f"Muon: parameter {name} has shape {tuple(p.shape)} (rank < 2) in a "
                             f"use_muon=True group; put it in a group with use_muon=False "
                             f"(AdamW), or build the optimizer with Muon.for_model(model, lr)")
