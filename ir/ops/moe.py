"""MoE kernels of DeepSeek-V4 (v4-architecture.md §3.6, §5 K14-K18) as named ops.

- `moe.route`: gate GEMM, scoring (sqrt-softplus, softmax or sigmoid), expert choice (top-k of
  score + bias, the same within the best `topk_group` of `n_group` expert groups, or a token-id
  hash table), gather, renormalise (+ eps), scale -> (weights, experts).
- `moe.experts`: the fused MoE — dispatch, grouped SwiGLU (plain or clamped) expert GEMMs with the
  routing weight applied before w2, weighted combine, and optionally the shared expert.

Data-dependent routing never leaves the device: `moe.experts` takes the [N,k] expert-index tensor
itself (not per-expert row counts known to the host), so a kernel sizes its grid by the static
upper bound N·k rows (an expert may receive anywhere from 0 to N·k of them) and exits early.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import INT_INDEX, io_cost, require
from ir.symbolic import same_dim
from ir.types import DType, TensorType

__all__ = ["ACTIVATIONS", "SCORES", "Experts", "Route", "clamped_swiglu_reference"]

SCORES = ("sqrtsoftplus", "softmax", "sigmoid")
ACTIVATIONS = ("clamped_swiglu", "swiglu")  # silu(gate)·up, with or without the ±limit clamps


def clamped_swiglu_reference(gate, up, limit: float):
    """silu(min(gate, limit)) · clamp(up, -limit, limit) in fp32."""
    gate = gate.float().clamp(max=limit)
    up = up.float().clamp(-limit, limit)
    return torch.nn.functional.silu(gate) * up


@register
@dataclass(frozen=True)
class Route(Op):
    """Router: x [N,d], gate [E,d], then bias [E] (score routing with `bias`) or tid2eid [V,k]
    and ids [N] (`hash`) -> (weights [N,k] f32, experts [N,k] i64).

    s = score(x·gateᵀ) in fp32 with score = sqrt(softplus), softmax (over E) or sigmoid. Experts:
    tid2eid[ids] when `hash`, else the indices of topk(c, k) with chooser c = s + bias (bias only
    selects) or s. Grouped top-k (`n_group` > 1, DeepSeek-V3): the E experts form `n_group`
    contiguous groups; a group's score is the sum of its two largest c; outside the `topk_group`
    best groups c is replaced by `group_fill` before the top-k. weights = s[experts], divided by
    (their sum + `eps`) when `renorm`, times `route_scale`.
    """

    mnemonic = "moe.route"
    kind = Kind.OPAQUE
    num_operands = None
    k: int = 6
    score: str = "sqrtsoftplus"
    route_scale: float = 1.0
    renorm: bool = True
    bias: bool = False
    hash: bool = False
    eps: float = 0.0
    n_group: int = 1
    topk_group: int = 1
    group_fill: float = 0.0

    def infer_type(self, *types: TensorType):
        require(self, self.score in SCORES, f"score must be one of {SCORES}", *types)
        grouped = self.n_group > 1
        require(self, not (grouped and self.hash), "grouped top-k and hash exclude each other")
        ok = 1 <= self.topk_group <= self.n_group
        require(self, ok, f"topk_group must be in [1, n_group={self.n_group}]", *types)
        require(self, not (self.bias and self.hash), "bias and hash exclude each other", *types)
        arity = 4 if self.hash else (3 if self.bias else 2)
        require(self, len(types) == arity, f"expected {arity} operands, got {len(types)}", *types)
        x, gate = types[:2]
        n = x.shape[0] if x.rank else None
        require(self, x.rank == 2 and gate.rank == 2, "x must be [N,d], gate [E,d]", *types)
        require(self, x.dtype.is_float and gate.dtype.is_float, "x/gate must be float", *types)
        require(self, same_dim(x.shape[1], gate.shape[1]), "d of x and gate differs", *types)
        if isinstance(gate.shape[0], int):
            require(
                self, 1 <= self.k <= gate.shape[0], f"k must be in [1, E={gate.shape[0]}]", *types
            )
        if grouped and isinstance(gate.shape[0], int):
            size, rem = divmod(gate.shape[0], self.n_group)
            ok = rem == 0 and size >= 2 and self.k <= self.topk_group * size
            require(self, ok, f"E={gate.shape[0]} must split into n_group groups of >= 2 holding"
                    " k picks", *types)
        if self.bias:
            bias = types[2]
            ok = bias.rank == 1 and same_dim(bias.shape[0], gate.shape[0])
            require(self, ok and bias.dtype.is_float, "bias must be float [E]", *types)
        if self.hash:
            table, ids = types[2], types[3]
            require(self, table.rank == 2 and table.shape[1] == self.k, "tid2eid: [V,k]", *types)
            require(self, table.dtype == DType.i64, "tid2eid must be i64", *types)
            require(self, ids.dtype in INT_INDEX, "ids must be i64 or i32", *types)
            require(self, ids.rank == 1 and same_dim(ids.shape[0], n), "ids must be [N]", *types)
        out = (x.shape[0], self.k)
        return (TensorType(out, DType.f32), TensorType(out, DType.i64))

    def reference(self, x, gate, *rest):
        logits = x.float() @ gate.float().T
        if self.score == "sqrtsoftplus":
            s = torch.nn.functional.softplus(logits).sqrt()
        elif self.score == "softmax":
            s = logits.softmax(dim=-1)
        else:
            s = logits.sigmoid()
        if self.hash:
            experts = rest[0][rest[1]]
        else:
            chooser = s + rest[0].float() if self.bias else s
            if self.n_group > 1:
                chooser = self._grouped(chooser)
            experts = chooser.topk(self.k, dim=-1).indices
        weights = s.gather(-1, experts)
        if self.renorm:
            weights = weights / (weights.sum(-1, keepdim=True) + self.eps)
        return (weights * self.route_scale, experts)

    def _grouped(self, chooser):
        """The chooser with `group_fill` outside the `topk_group` best of `n_group` groups."""
        n, e = chooser.shape
        groups = chooser.reshape(n, self.n_group, e // self.n_group)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        best = group_score.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, best, True)
        keep = keep[:, :, None].expand(groups.shape).reshape(n, e)
        return chooser.masked_fill(~keep, self.group_fill)

    def cost(self, operand_types, result_types):
        x, gate = operand_types[0], operand_types[1]
        flops = 2 * x.shape[0] * x.shape[1] * gate.shape[0] + 4 * x.shape[0] * gate.shape[0]
        return io_cost(flops, operand_types, result_types)


@register
@dataclass(frozen=True)
class Experts(Op):
    """Fused MoE: x [N,d], weights [N,k], experts [N,k] int, w1 [E,I,d], w3 [E,I,d], w2 [E,d,I],
    and with `shared` also s1 [J,d], s3 [J,d], s2 [d,J] -> y [N,d] in x's dtype.

    y[n] = Σ_slots weights[n,j] · FFN_{experts[n,j]}(x[n])  (+ FFN_shared(x[n]) unweighted), with
    FFN_e(x) = (weight · swiglu(x·w1[e]ᵀ, x·w3[e]ᵀ)) · w2[e]ᵀ: GEMMs in x's dtype, the SwiGLU
    silu(gate)·up (`activation` "clamped_swiglu": gate ≤ limit, |up| ≤ limit; "swiglu": no clamp,
    `limit` unused) and the routing weight in fp32, cast to x's dtype before w2; the routed sum
    is accumulated in fp32. The shared expert uses the same activation. Experts no token chose
    contribute nothing; no count of rows per expert is needed by the host (module docstring).
    """

    mnemonic = "moe.experts"
    kind = Kind.OPAQUE
    num_operands = None
    limit: float = 10.0
    shared: bool = False
    activation: str = "clamped_swiglu"

    @property
    def clamp(self) -> float:
        """The SwiGLU clamp bound (inf when the activation does not clamp)."""
        return self.limit if self.activation == "clamped_swiglu" else float("inf")

    def infer_type(self, *types: TensorType):
        ok = self.activation in ACTIVATIONS
        require(self, ok, f"activation must be one of {ACTIVATIONS}", *types)
        arity = 9 if self.shared else 6
        require(self, len(types) == arity, f"expected {arity} operands, got {len(types)}", *types)
        x, weights, experts, w1, w3, w2 = types[:6]
        require(self, x.rank == 2 and x.dtype.is_float, "x must be float [N,d]", *types)
        require(self, weights.rank == 2 and weights.dtype.is_float, "weights: float [N,k]", *types)
        require(self, experts.shape == weights.shape, "experts must be [N,k] like weights", *types)
        require(self, experts.dtype in INT_INDEX, "experts must be i64 or i32", *types)
        require(self, same_dim(weights.shape[0], x.shape[0]), "weights need N rows", *types)
        require(self, w1.rank == 3 and w1.shape == w3.shape, "w1/w3 must be [E,I,d]", *types)
        require(self, same_dim(w1.shape[2], x.shape[1]), "w1's d differs from x's", *types)
        want = (w1.shape[0], x.shape[1], w1.shape[1])
        require(self, w2.rank == 3 and w2.shape == want, "w2 must be [E,d,I]", *types)
        require(self, w1.dtype == w3.dtype == w2.dtype == x.dtype, "weights need x's dtype", *types)
        if self.shared:
            s1, s3, s2 = types[6:]
            require(self, s1.rank == 2 and s1.shape == s3.shape, "s1/s3 must be [J,d]", *types)
            require(self, same_dim(s1.shape[1], x.shape[1]), "s1's d differs from x's", *types)
            ok = s2.shape == (x.shape[1], s1.shape[0])
            require(self, ok, "s2 must be [d,J]", *types)
            require(self, s1.dtype == s3.dtype == s2.dtype == x.dtype, "s* need x's dtype", *types)
        return (x,)

    def reference(self, x, weights, experts, w1, w3, w2, *shared):
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(w1.shape[0]):  # every token, weight 0 unless it chose e: no host sync
            we = (weights.float() * (experts == e)).sum(-1, keepdim=True)
            h = clamped_swiglu_reference(x @ w1[e].T, x @ w3[e].T, self.clamp) * we
            out = out + (h.to(x.dtype) @ w2[e].T).float()
        y = out.to(x.dtype)
        if not self.shared:
            return (y,)
        s1, s3, s2 = shared
        h = clamped_swiglu_reference(x @ s1.T, x @ s3.T, self.clamp)
        return (y + h.to(x.dtype) @ s2.T,)

    def cost(self, operand_types, result_types):
        x, weights, _, w1 = operand_types[:4]
        rows = x.shape[0] * weights.shape[1]
        flops = 6 * rows * w1.shape[1] * x.shape[1]
        if self.shared:
            flops = flops + 6 * x.shape[0] * operand_types[6].shape[0] * x.shape[1]
        return io_cost(flops, operand_types, result_types)
