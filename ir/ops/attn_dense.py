"""`attn.sdpa`: dense scaled-dot-product attention, the op every standard transformer attention
fuses into (MHA, GQA, MQA; causal, sliding window, explicit masks, sinks), whatever spelling
the model used (`F.scaled_dot_product_attention`, HF eager, hand-written softmax(QKᵀ)V).

Layout (torch SDPA's): q [B,Hq,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> o [B,Hq,T,Dv] in q's dtype,
Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv) (HF `repeat_kv`, torch
`repeat_interleave` and SDPA's `enable_gqa` all group heads this way).

Operands: q, k, v, then `mask` when mask != "none" (broadcastable to [B,Hq,T,S]: bool, True =
attend, or float, added to the logits), then `sinks` [Hq] when sinks=True.

Visibility of key s to query t (positions: query t sits at t + offset, key s at s):
    causal            s <= t + offset
    window w > 0      t + offset - s < w    (only with causal: the band of the last w keys)
and the mask operand, if any. In fp32: z = scale · q·kᵀ, capped to softcap·tanh(z/softcap)
when softcap > 0 (Gemma 2, Grok), (+ float mask), -inf where not visible; with sinks one more
logit per head, sinks[h], joins the softmax (its column is then dropped);
o = softmax(z)·v. A query that sees no key (and has no sink) gets 0, as torch SDPA's math path.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import io_cost, numel, require
from ir.symbolic import same_dim
from ir.types import DType, TensorType

__all__ = ["KERNEL_HEAD_DIM", "MASKS", "DenseAttention", "visible_reference"]

MASKS = ("none", "bool", "add")
# The widest head (D and Dv) the backends' kernels take (Triton keeps BLOCK_M rows of q and of
# the fp32 accumulator in registers); `fuse_sdpa` forms no op past it. The reference takes any.
KERNEL_HEAD_DIM = 256


def visible_reference(t: int, s: int, causal: bool, offset: int, window: int, device=None):
    """[t, s] bool: which keys each query sees by position (True everywhere when not causal)."""
    q_pos = torch.arange(t, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(s, device=device).unsqueeze(0)
    seen = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        seen = k_pos <= q_pos
    if window > 0:
        seen = seen & (q_pos - k_pos < window)
    return seen


@register
@dataclass(frozen=True)
class DenseAttention(Op):
    """Dense attention: q [B,Hq,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] (, mask) (, sinks [Hq])
    -> o [B,Hq,T,Dv] in q's dtype; Hq % Hkv == 0, head h reads KV head h // (Hq // Hkv).

    z[t,s] = scale · q_t·k_s in fp32 (then softcap·tanh(z/softcap) when softcap > 0), plus the
    mask operand when mask="add"; -inf where key s is
    not visible: not causal-visible (s > t + offset), outside the window (t + offset - s >=
    window, window > 0, only with causal), or masked out (mask="bool", False). With sinks the
    logit sinks[h] joins each row's softmax. o = Σ_s softmax(z)[t,s] · v_s; a row with no
    visible key and no sink is 0.
    """

    mnemonic = "attn.sdpa"
    kind = Kind.OPAQUE
    num_operands = None
    scale: float = 1.0
    causal: bool = False
    offset: int = 0
    window: int = 0
    mask: str = "none"
    sinks: bool = False
    softcap: float = 0.0

    def _arity(self) -> int:
        return 3 + int(self.mask != "none") + int(self.sinks)

    def infer_type(self, *types: TensorType):
        require(self, self.mask in MASKS, f"mask must be one of {MASKS}, got {self.mask!r}", *types)
        n = self._arity()
        require(self, len(types) == n, f"takes {n} operands (q, k, v{self._extras()}), "
                f"got {len(types)}", *types)  # fmt: skip
        require(self, self.window >= 0, f"window must be >= 0, got {self.window}", *types)
        require(self, self.softcap >= 0, f"softcap must be >= 0, got {self.softcap}", *types)
        require(self, self.window == 0 or self.causal, "a window needs causal=true", *types)
        q, k, v = types[:3]
        require(self, q.rank == 4 and k.rank == 4 and v.rank == 4,
                "q, k, v must be [B,H,T,D], [B,Hkv,S,D], [B,Hkv,S,Dv]", *types)  # fmt: skip
        require(self, q.dtype.is_float and k.dtype.is_float and v.dtype.is_float,
                "q, k, v must be float", *types)  # fmt: skip
        require(self, same_dim(q.shape[0], k.shape[0]) and same_dim(k.shape[0], v.shape[0]),
                "batch of q, k, v differs", *types)  # fmt: skip
        require(self, same_dim(k.shape[1], v.shape[1]) and same_dim(k.shape[2], v.shape[2]),
                "k and v must have the same heads and length", *types)  # fmt: skip
        require(self, same_dim(q.shape[3], k.shape[3]), "head dim of q and k differs", *types)
        hq, hkv = q.shape[1], k.shape[1]
        if isinstance(hq, int) and isinstance(hkv, int):
            require(self, hkv >= 1 and hq % hkv == 0,
                    f"query heads {hq} must be a multiple of KV heads {hkv}", *types)  # fmt: skip
        else:
            require(self, same_dim(hq, hkv), "symbolic head counts must be equal", *types)
        if self.mask != "none":
            self._check_mask(types[3], q, k, *types)
        if self.sinks:
            sinks = types[-1]
            ok = sinks.rank == 1 and same_dim(sinks.shape[0], hq) and sinks.dtype.is_float
            require(self, ok, f"sinks must be float [{hq}] (one logit per query head)", *types)
        return (TensorType((*q.shape[:3], v.shape[3]), q.dtype),)

    def _extras(self) -> str:
        return (", mask" if self.mask != "none" else "") + (", sinks" if self.sinks else "")

    def _check_mask(self, mask: TensorType, q: TensorType, k: TensorType, *types) -> None:
        want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if self.mask == "bool":
            require(self, mask.dtype == DType.bool, "mask='bool' needs a bool mask", *types)
        else:
            require(self, mask.dtype.is_float, "mask='add' needs a float mask", *types)
        require(self, mask.rank <= 4, f"the mask must broadcast to [B,Hq,T,S] = {want}", *types)
        for got, full in zip(reversed(mask.shape), reversed(want)):
            ok = got == 1 or same_dim(got, full)
            require(self, ok, f"mask dim {got} does not broadcast to {full} of {want}", *types)

    def reference(self, q, k, v, *rest):
        b, hq, t, _ = q.shape
        s, group = k.shape[2], hq // k.shape[1]
        kf = k.float().repeat_interleave(group, dim=1)
        vf = v.float().repeat_interleave(group, dim=1)
        z = (q.float() @ kf.transpose(-1, -2)) * self.scale
        if self.softcap > 0:
            z = torch.tanh(z / self.softcap) * self.softcap
        seen = visible_reference(t, s, self.causal, self.offset, self.window, q.device)
        seen = seen.expand(b, hq, t, s)
        if self.mask == "bool":
            seen = seen & rest[0]
        elif self.mask == "add":
            z = z + rest[0].float()
        z = z.masked_fill(~seen, float("-inf"))
        if self.sinks:
            sink_col = rest[-1].float().view(1, hq, 1, 1).expand(b, hq, t, 1)
            p = torch.softmax(torch.cat((z, sink_col), dim=-1), dim=-1)[..., :s]
        else:
            p = torch.softmax(z, dim=-1)
            p = torch.where(torch.isneginf(z).all(-1, keepdim=True), 0.0, p)
        return ((p @ vf).to(q.dtype),)

    def cost(self, operand_types, result_types):
        q, k, v = operand_types[:3]
        pairs = numel(q.shape[:3]) * k.shape[2]
        return io_cost(pairs * (2 * q.shape[3] + 2 * v.shape[3] + 5), operand_types, result_types)
