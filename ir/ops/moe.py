"""MoE kernels of DeepSeek-V4 (v4-architecture.md §3.6, §5 K14-K18) as named ops.

- `moe.route`: gate GEMM (+ an optional router bias on the logits, GPT-OSS), scoring
  (sqrt-softplus, softmax or sigmoid), expert choice (top-k of score + bias, the same within the
  best `topk_group` of `n_group` expert groups, or a token-id hash table), gather, renormalise
  (+ eps), scale -> (weights, experts).
- `moe.experts`: the fused MoE — dispatch, grouped gated expert GEMMs (SwiGLU plain or clamped,
  or GPT-OSS's clamped (up + 1)·gate·sigmoid(alpha·gate)) with optional per-expert biases, the
  routing weight applied before w2, weighted combine, and optionally the shared expert; the
  routed weights dense or kept compressed (`weight_format`: MXFP4 or block-scaled FP8, with
  their scales as operands), dequantised by the kernels in the GEMM loop.

Data-dependent routing never leaves the device: `moe.experts` takes the [N,k] expert-index tensor
itself (not per-expert row counts known to the host), so a kernel sizes its grid by the static
upper bound N·k rows (an expert may receive anywhere from 0 to N·k of them) and exits early.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import INT_INDEX, io_cost, require
from ir.ops.quant import FP4_BLOCK, FP8_BLOCK, dequant_fp4, dequant_fp8
from ir.symbolic import same_dim
from ir.types import DType, TensorType

__all__ = [
    "ACTIVATIONS",
    "SCORES",
    "WEIGHT_FORMATS",
    "Experts",
    "Route",
    "clamped_swiglu_reference",
    "gated_inplace",
    "gated_reference",
]

SCORES = ("sqrtsoftplus", "softmax", "sigmoid")
# silu(gate)·up with or without the ±limit clamps; GPT-OSS: (up + 1)·gate·sigmoid(alpha·gate),
# clamped like clamped_swiglu
ACTIVATIONS = ("clamped_swiglu", "swiglu", "gpt_oss")
# how moe.experts' routed weights are stored (`Experts` docstring)
WEIGHT_FORMATS = ("dense", "fp4_e2m1", "fp8_e4m3")


def clamped_swiglu_reference(gate, up, limit: float):
    """silu(min(gate, limit)) · clamp(up, -limit, limit) in fp32."""
    gate = gate.float().clamp(max=limit)
    up = up.float().clamp(-limit, limit)
    return torch.nn.functional.silu(gate) * up


def gated_reference(gate, up, activation: str, limit: float, alpha: float):
    """The experts' gated activation in fp32 (`Experts`): for "gpt_oss",
    g·sigmoid(alpha·g)·(u + 1) with g = min(gate, limit), u = clamp(up, ±limit); else the SwiGLU
    (`limit` inf for the unclamped one)."""
    if activation != "gpt_oss":
        return clamped_swiglu_reference(gate, up, limit)
    g = gate.float().clamp(max=limit)
    u = up.float().clamp(-limit, limit)
    return g * torch.sigmoid(g * alpha) * (u + 1.0)


def gated_inplace(gate, up, activation: str, limit: float, alpha: float):
    """`gated_reference` written into `gate` and `up` (fp32 tensors the caller owns): the same
    operations in the same order, so the same bits, without a fresh tensor per step (a prefill's
    [pairs, inter] rows: 25 MB each for small at 4096 tokens)."""
    g = gate.clamp_(max=limit)
    u = up.clamp_(-limit, limit)
    if activation != "gpt_oss":
        return torch.nn.functional.silu(g, inplace=True).mul_(u)
    return g.mul_(torch.sigmoid(g * alpha)).mul_(u.add_(1.0))


@register
@dataclass(frozen=True)
class Route(Op):
    """Router: x [N,d], gate [E,d], then bias [E] (score routing with `bias`) or tid2eid [V,k]
    and ids [N] (`hash`), then with `logit_bias` the router's own bias b [E] -> (weights [N,k]
    f32, experts [N,k] i64).

    s = score(x·gateᵀ [+ b]) in fp32 (`logit_bias`: GPT-OSS's biased router linear; b moves the
    scores and so the weights, unlike `bias`, which only selects) with score = sqrt(softplus),
    softmax (over E) or sigmoid. Experts: tid2eid[ids] when `hash`, else the indices of topk(c, k) with chooser c = s + bias (bias only
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
    logit_bias: bool = False

    def infer_type(self, *types: TensorType):
        require(self, self.score in SCORES, f"score must be one of {SCORES}", *types)
        grouped = self.n_group > 1
        require(self, not (grouped and self.hash), "grouped top-k and hash exclude each other")
        ok = 1 <= self.topk_group <= self.n_group
        require(self, ok, f"topk_group must be in [1, n_group={self.n_group}]", *types)
        require(self, not (self.bias and self.hash), "bias and hash exclude each other", *types)
        arity = (4 if self.hash else (3 if self.bias else 2)) + self.logit_bias
        require(self, len(types) == arity, f"expected {arity} operands (x, gate"
                f"{', bias' * self.bias}{', tid2eid, ids' * self.hash}"
                f"{', logit_bias' * self.logit_bias}), got {len(types)}", *types)
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
        if self.logit_bias:
            b = types[-1]
            ok = b.rank == 1 and same_dim(b.shape[0], gate.shape[0]) and b.dtype.is_float
            require(self, ok, f"logit_bias must be float [E={gate.shape[0]}], got {b}", *types)
        out = (x.shape[0], self.k)
        return (TensorType(out, DType.f32), TensorType(out, DType.i64))

    def reference(self, x, gate, *rest):
        logits = x.float() @ gate.float().T
        if self.logit_bias:
            logits = logits + rest[-1].float()
            rest = rest[:-1]
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
        flops = flops + x.shape[0] * gate.shape[0] * int(self.logit_bias)
        return io_cost(flops, operand_types, result_types)


@register
@dataclass(frozen=True)
class Experts(Op):
    """Fused MoE: x [N,d], weights [N,k], experts [N,k] int, w1 [E,I,d], w3 [E,I,d], w2 [E,d,I],
    with `shared` then s1 [J,d], s3 [J,d], s2 [d,J], with `expert_bias` then b1 [E,I], b3 [E,I],
    b2 [E,d] (float, any width) -> y [N,d] in x's dtype.

    y[n] = Σ_slots weights[n,j] · FFN_{experts[n,j]}(x[n])  (+ FFN_shared(x[n]) unweighted), with
    FFN_e(x) = (weight · act(x·w1[e]ᵀ + b1[e], x·w3[e]ᵀ + b3[e])) · w2[e]ᵀ + weight · b2[e]
    (no b without `expert_bias`):
    GEMMs in x's dtype, biases, activation and routing weight in fp32, the hidden rows cast to
    x's dtype before w2; the routed sum is accumulated in fp32. `activation`:
    "clamped_swiglu" silu(min(g, limit)) · clamp(u, ±limit); "swiglu" silu(g)·u (`limit`
    unused); "gpt_oss" g'·sigmoid(`alpha`·g')·(clamp(u, ±limit) + 1) with g' = min(g, limit).
    The shared expert (no biases) uses the same activation. Experts no token chose contribute
    nothing; no count of rows per expert is needed by the host (module docstring).

    `weight_format` says how w1/w3/w2 are stored (the shared expert and biases stay dense):
    "dense" in x's dtype; "fp4_e2m1" (MXFP4, the checkpoint's routed experts) packed int8
    w1/w3 [E,I,d/2], w2 [E,d,I/2] (two e2m1 codes a byte, low nibble = even column) with
    ue8m0 scales, int8 bytes u meaning 2^(u-127), w1s/w3s [E,I,ceil(d/32)], w2s [E,d,ceil(I/32)]
    (one per 1×32 block of a row); "fp8_e4m3" f8e4m3 w1/w3 [E,I,d], w2 [E,d,I] with f32
    power-of-two scales w1s/w3s [E,ceil(I/128),ceil(d/128)], w2s [E,ceil(d/128),ceil(I/128)].
    Quantised formats take the three scales as the last operands (after the biases); their
    semantics are the dense op's on the weights dequantised in f32 (`ir.ops.quant.dequant_fp4`
    / `dequant_fp8`, exact) and rounded to x's dtype (exact for f32 and bf16 x). Kernels
    dequantise in the GEMM loop, so the weights stay 0.5 + 1/32 (FP4) or 1 + 1/4096 (FP8)
    bytes per element in memory; the cost counts those bytes.
    """

    mnemonic = "moe.experts"
    kind = Kind.OPAQUE
    num_operands = None
    limit: float = 10.0
    shared: bool = False
    activation: str = "clamped_swiglu"
    alpha: float = 1.702
    expert_bias: bool = False
    weight_format: str = "dense"

    @property
    def quantised(self) -> bool:
        """Whether w1/w3/w2 are stored compressed, with three scale operands last."""
        return self.weight_format != "dense"

    @property
    def clamp(self) -> float:
        """The gate/up clamp bound (inf when the activation does not clamp)."""
        return float("inf") if self.activation == "swiglu" else self.limit

    def infer_type(self, *types: TensorType):
        ok = self.activation in ACTIVATIONS
        require(self, ok, f"activation must be one of {ACTIVATIONS}", *types)
        ok = self.weight_format in WEIGHT_FORMATS
        require(self, ok, f"weight_format must be one of {WEIGHT_FORMATS}, got "
                f"{self.weight_format!r}", *types)
        arity = 6 + 3 * self.shared + 3 * self.expert_bias + 3 * self.quantised
        names = "x, weights, experts, w1, w3, w2" + ", s1, s3, s2" * self.shared
        names += ", b1, b3, b2" * self.expert_bias + ", w1s, w3s, w2s" * self.quantised
        require(self, len(types) == arity, f"expected {arity} operands ({names}), got "
                f"{len(types)}", *types)
        x, weights, experts, w1, w3, w2 = types[:6]
        require(self, x.rank == 2 and x.dtype.is_float, "x must be float [N,d]", *types)
        require(self, weights.rank == 2 and weights.dtype.is_float, "weights: float [N,k]", *types)
        require(self, experts.shape == weights.shape, "experts must be [N,k] like weights", *types)
        require(self, experts.dtype in INT_INDEX, "experts must be i64 or i32", *types)
        require(self, same_dim(weights.shape[0], x.shape[0]), "weights need N rows", *types)
        if self.quantised:
            self._check_quantised(types, x, w1, w3, w2)
        else:
            require(self, w1.rank == 3 and w1.shape == w3.shape, "w1/w3 must be [E,I,d]", *types)
            require(self, same_dim(w1.shape[2], x.shape[1]), "w1's d differs from x's", *types)
            want = (w1.shape[0], x.shape[1], w1.shape[1])
            require(self, w2.rank == 3 and w2.shape == want, "w2 must be [E,d,I]", *types)
            ok = w1.dtype == w3.dtype == w2.dtype == x.dtype
            require(self, ok, "weights need x's dtype", *types)
        if self.shared:
            s1, s3, s2 = types[6:9]
            require(self, s1.rank == 2 and s1.shape == s3.shape, "s1/s3 must be [J,d]", *types)
            require(self, same_dim(s1.shape[1], x.shape[1]), "s1's d differs from x's", *types)
            ok = s2.shape == (x.shape[1], s1.shape[0])
            require(self, ok, "s2 must be [d,J]", *types)
            require(self, s1.dtype == s3.dtype == s2.dtype == x.dtype, "s* need x's dtype", *types)
        if self.expert_bias:
            self._check_biases(types, (w1.shape[0], w1.shape[1], x.shape[1]))
        return (x,)

    def _check_quantised(self, types, x: TensorType, w1: TensorType, w3: TensorType,
                         w2: TensorType) -> None:
        """Compressed w1/w3/w2 and their scales (the last three operands), `weight_format`."""
        fp4 = self.weight_format == "fp4_e2m1"
        ok = x.dtype in (DType.f32, DType.bf16, DType.f16)
        require(self, ok, f"x must be f32, bf16 or f16 with {self.weight_format} weights, got "
                f"{x.dtype}", *types)
        want_dtype = DType.i8 if fp4 else DType.f8e4m3
        for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
            require(self, w.rank == 3 and w.dtype == want_dtype, f"{name} must be "
                    f"{want_dtype} [E,..] ({self.weight_format} weights), got {w}", *types)
        e, inter = w1.shape[:2]
        d = x.shape[1]
        require(self, all(isinstance(v, int) for v in (e, inter, d)),
                "E, I and d must be static with quantised weights", *types)
        per = 2 if fp4 else 1  # elements per stored byte along a row
        for name, w, want in (("w1", w1, (e, inter, d)), ("w3", w3, (e, inter, d)),
                              ("w2", w2, (e, d, inter))):
            stored = (want[0], want[1], want[2] // per)
            ok = tuple(w.shape) == stored and want[2] % per == 0
            require(self, ok, f"{name} must be {list(stored)} (logical {list(want)}"
                    f"{', two e2m1 codes a byte' if fp4 else ''}), got {w}", *types)
            self._check_scale(types, name, want, types[-3 + ("w1", "w3", "w2").index(name)])

    def _check_scale(self, types, name: str, logical: tuple[int, int, int],
                     scale: TensorType) -> None:
        """`name`s' scale: ue8m0 int8 [E,rows,ceil(cols/32)] (FP4) or f32
        [E,ceil(rows/128),ceil(cols/128)] (FP8) for the logical weight [E,rows,cols]."""
        e, rows, cols = logical
        if self.weight_format == "fp4_e2m1":
            want, dtype = (e, rows, -(-cols // FP4_BLOCK)), DType.i8
            what = f"ue8m0 bytes, one per 1x{FP4_BLOCK} block of {name}'s rows"
        else:
            want, dtype = (e, -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)), DType.f32
            what = f"power-of-two scales, one per {FP8_BLOCK}x{FP8_BLOCK} block of {name}"
        ok = tuple(scale.shape) == want and scale.dtype == dtype
        require(self, ok, f"{name}s must be {dtype}{list(want)} ({what}, weight {name} "
                f"{list(logical)} logical), got {scale}", *types)

    def _check_biases(self, types: tuple[TensorType, ...], shape: tuple) -> None:
        """b1/b3 [E,I] and b2 [E,d], float (after the shared weights, before any scales)."""
        start = 6 + 3 * self.shared
        b1, b3, b2 = types[start : start + 3]
        e, inter, d = shape
        for name, b, want in (("b1", b1, (e, inter)), ("b3", b3, (e, inter)), ("b2", b2, (e, d))):
            ok = b.rank == 2 and all(same_dim(g, w) for g, w in zip(b.shape, want))
            require(self, ok and b.dtype.is_float, f"{name} must be float [{want[0]},{want[1]}] "
                    f"(one row per expert), got {b}", *types)

    def dense_weights(self, x, w1, w3, w2, *scales):
        """(w1, w3, w2) in x's dtype: as given ("dense"), or dequantised (`weight_format`)."""
        if not self.quantised:
            return w1, w3, w2
        deq = dequant_fp4 if self.weight_format == "fp4_e2m1" else dequant_fp8
        return tuple(deq(w, s).to(x.dtype) for w, s in zip((w1, w3, w2), scales))

    def reference(self, x, weights, experts, w1, w3, w2, *rest):
        if self.quantised:
            w1, w3, w2 = self.dense_weights(x, w1, w3, w2, *rest[-3:])
            rest = rest[:-3]
        b1, b3, b2 = rest[-3:] if self.expert_bias else (None, None, None)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(w1.shape[0]):  # every token, weight 0 unless it chose e: no host sync
            we = (weights.float() * (experts == e)).sum(-1, keepdim=True)
            gate, up = (x @ w1[e].T).float(), (x @ w3[e].T).float()
            if self.expert_bias:
                gate, up = gate + b1[e].float(), up + b3[e].float()
            h = self._act(gate, up) * we
            down = (h.to(x.dtype) @ w2[e].T).float()
            out = out + (down + we * b2[e].float() if self.expert_bias else down)
        y = out.to(x.dtype)
        if not self.shared:
            return (y,)
        s1, s3, s2 = rest[:3]
        h = self._act(x @ s1.T, x @ s3.T)
        return (y + h.to(x.dtype) @ s2.T,)

    def _act(self, gate, up):
        return gated_reference(gate, up, self.activation, self.clamp, self.alpha)

    def cost(self, operand_types, result_types):
        """Flops of the N·k rows' GEMMs (+ the shared expert's, the biases'); bytes of the
        activations, the shared expert and min(E, N·k) experts' weights, biases and scales —
        the most a call can touch, each read once — not all E."""
        x, weights, _, w1 = operand_types[:4]
        rows = x.shape[0] * weights.shape[1]
        flops = 6 * rows * w1.shape[1] * x.shape[1]
        if self.shared:
            flops = flops + 6 * x.shape[0] * operand_types[6].shape[0] * x.shape[1]
        if self.expert_bias:  # the bias adds and the weighted b2
            flops = flops + rows * (2 * w1.shape[1] + 2 * x.shape[1])
        touched = _min_dim(w1.shape[0], rows)
        per_expert = {3, 4, 5}
        if self.expert_bias:
            per_expert |= {6 + 3 * self.shared + i for i in range(3)}
        if self.quantised:
            per_expert |= {len(operand_types) - 3 + i for i in range(3)}
        read = [
            TensorType((touched, *t.shape[1:]), t.dtype) if i in per_expert else t
            for i, t in enumerate(operand_types)
        ]
        return io_cost(flops, read, result_types)


def _min_dim(a, b):
    """min(a, b) for dims: an int when both are, else a sympy Min."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return sympy.Min(a, b)
