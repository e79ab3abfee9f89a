"""`attn.sdpa`: scaled-dot-product attention, the op every standard transformer attention fuses
into (MHA, GQA, MQA; causal, sliding window, explicit masks, sinks), whatever spelling the model
used (`F.scaled_dot_product_attention`, HF eager, hand-written softmax(QKᵀ)V) — dense over all
S keys, or sparse over index-selected keys (DSA's top-k tokens, NSA's selected blocks).

Layout (torch SDPA's): q [B,Hq,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> o [B,Hq,T,Dv] in q's dtype,
Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv) (HF `repeat_kv`, torch
`repeat_interleave` and SDPA's `enable_gqa` all group heads this way). With kv_layout="bshd"
k and v are [B,S,Hkv,D] / [B,S,Hkv,Dv] instead (flash-attention's and a KV cache's layout: NSA
attends to its [B,S,G,D] caches as stored, no [B,G,S,D] copy); nothing else changes.

Operands, in this order: q, k, then v unless value_dim > 0, then `mask` when mask != "none"
(broadcastable to [B,Hq,T,S]: bool, True = attend, or float, added to the logits), then
`indices` [B,Hi,T,n] when indexed=True, then `sinks` [Hq] when sinks=True.

Values: the v operand, or with value_dim = Dv > 0 the first Dv channels of each key row (MLA's
absorbed form: one latent row per token is both key and value; no sliced copy of k is made).

Keys of query t (positions: query t sits at t + offset, key s at s):
    dense (indexed=False)   every s in [0, S)
    indexed                 the slots j of indices[b, h', t, :] holding a row s in [0, S)
                            (h' = the query's KV head, or 0 when Hi = 1: one index set shared by
                            every KV head); -1 (or anything outside [0, S)) is no key
and of those only the visible ones: causal s <= t + offset; window w > 0 (with causal)
t + offset - s < w; a bool mask's mask[b,h,t,s]. So indices, positions and the mask intersect.
In fp32: z = scale · q·kᵀ, capped to softcap·tanh(z/softcap) when softcap > 0 (Gemma 2, Grok),
(+ float mask[b,h,t,s]), -inf where not visible; with sinks one more logit per head, sinks[h],
joins the softmax (its column is then dropped); o = softmax(z)·v. The indexed softmax runs over
the slots j: a row index repeated in one row counts once per slot (the kernels do not
deduplicate; top-k picks are distinct, and then the indexed op equals the dense op restricted to
the picked keys). A query that sees no key (and has no sink) gets 0, not NaN, as torch SDPA's
math path. Cost ∝ B·Hq·T·n indexed, B·Hq·T·S dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ir._lazy import torch
import sympy

from ir.core import Cost, Kind, Op, register
from ir.ops._util import INT_INDEX, io_cost, numel, require
from ir.symbolic import canon_dim, same_dim
from ir.types import DType, TensorType

__all__ = [
    "INDEXED_HEAD_DIM",
    "INDEXED_VALUE_DIM",
    "KERNEL_HEAD_DIM",
    "KV_LAYOUTS",
    "MASKS",
    "DenseAttention",
    "visible_reference",
]

MASKS = ("none", "bool", "add")
KV_LAYOUTS = ("bhsd", "bshd")  # k/v dims: [B,Hkv,S,D] (torch SDPA) or [B,S,Hkv,D] (flash-attn)
# The widest head (D and Dv) the backends' kernels take (Triton keeps BLOCK_M rows of q and of
# the fp32 accumulator in registers); `fuse_sdpa` forms no op past it. The reference takes any.
KERNEL_HEAD_DIM = 256
# Indexed attention: the kernels walk the key head dim in chunks and hold the value dim in the
# accumulator, so MLA's absorbed rows (576 = 512 latent + 64 rope, values the first 512) fit.
INDEXED_HEAD_DIM, INDEXED_VALUE_DIM = 1024, 512


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
    """Attention: q [B,Hq,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv] (absent when value_dim > 0: v =
    k[..., :value_dim]) (, mask) (, indices [B,Hi,T,n]) (, sinks [Hq]) -> o [B,Hq,T,Dv] in q's
    dtype; Hq % Hkv == 0, head h reads KV head h // (Hq // Hkv); Hi is 1 or Hkv. kv_layout
    "bhsd" (default) is that k/v layout; "bshd" takes k [B,S,Hkv,D], v [B,S,Hkv,Dv] and means
    the same as "bhsd" on k.transpose(1, 2), v.transpose(1, 2).

    z[t,s] = scale · q_t·k_s in fp32 (then softcap·tanh(z/softcap) when softcap > 0), plus the
    mask operand when mask="add"; -inf where key s is not visible: not causal-visible
    (s > t + offset), outside the window (t + offset - s >= window, window > 0, only with
    causal), or masked out (mask="bool", False). Dense: the softmax runs over every s. Indexed:
    over the slots j of indices[b, h', t] (h' = h // G, or 0 when Hi = 1), slot j being key
    s = indices[..., j] when 0 <= s < S and no key otherwise (-1 pads). With sinks the logit
    sinks[h] joins each row's softmax. o = Σ softmax(z)·v_s; a row with no visible key and no
    sink is 0.
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
    indexed: bool = False
    value_dim: int = 0
    kv_layout: str = "bhsd"

    def _arity(self) -> int:
        return (2 + int(self.value_dim == 0) + int(self.mask != "none") + int(self.indexed)
                + int(self.sinks))  # fmt: skip

    def roles(self, operands: tuple | list) -> dict[str, Any]:
        """Operands (values, types or tensors) by role: q, k, v, mask, indices, sinks; v is
        None when value_dim > 0, mask/indices/sinks None when absent."""
        it = iter(operands)
        out = {"q": next(it), "k": next(it), "v": None if self.value_dim else next(it)}
        out["mask"] = next(it) if self.mask != "none" else None
        out["indices"] = next(it) if self.indexed else None
        out["sinks"] = next(it) if self.sinks else None
        return out

    def infer_type(self, *types: TensorType):
        require(self, self.mask in MASKS, f"mask must be one of {MASKS}, got {self.mask!r}", *types)
        n = self._arity()
        require(self, len(types) == n, f"takes {n} operands ({self._names()}), "
                f"got {len(types)}", *types)  # fmt: skip
        require(self, self.window >= 0, f"window must be >= 0, got {self.window}", *types)
        require(self, self.softcap >= 0, f"softcap must be >= 0, got {self.softcap}", *types)
        require(self, self.window == 0 or self.causal, "a window needs causal=true", *types)
        require(self, self.kv_layout in KV_LAYOUTS, f"kv_layout must be one of {KV_LAYOUTS}, "
                f"got {self.kv_layout!r}", *types)  # fmt: skip
        r = self.roles(types)
        q, k = r["q"], self._bhsd_type(r["k"])
        v = k if r["v"] is None else self._bhsd_type(r["v"])
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
        dv = self._value_dim(k, v, *types)
        if r["mask"] is not None:
            self._check_mask(r["mask"], q, k, *types)
        if r["indices"] is not None:
            self._check_indices(r["indices"], q, k, *types)
        if r["sinks"] is not None:
            sinks = r["sinks"]
            ok = sinks.rank == 1 and same_dim(sinks.shape[0], hq) and sinks.dtype.is_float
            require(self, ok, f"sinks must be float [{hq}] (one logit per query head)", *types)
        return (TensorType((*q.shape[:3], dv), q.dtype),)

    def _bhsd_type(self, x: TensorType) -> TensorType:
        """A k or v type seen as [B,Hkv,S,*] (dims 1 and 2 swapped under "bshd")."""
        if self.kv_layout == "bhsd" or x.rank != 4:
            return x
        s = x.shape
        return TensorType((s[0], s[2], s[1], s[3]), x.dtype)

    def kv_bhsd(self, x: Any) -> Any:
        """A k or v tensor as [B,Hkv,S,*] (a transposed view under "bshd", no copy)."""
        return x if self.kv_layout == "bhsd" else x.transpose(1, 2)

    def _names(self) -> str:
        return ", ".join(self._role_names())

    def _role_names(self) -> list[str]:
        """The operands' roles in order (module docstring)."""
        names = ["q", "k"] + (["v"] if self.value_dim == 0 else [])
        names += ["mask"] if self.mask != "none" else []
        names += ["indices"] if self.indexed else []
        return names + (["sinks"] if self.sinks else [])

    def _value_dim(self, k: TensorType, v: TensorType, *types: TensorType) -> Any:
        """Dv: v's last dim, or value_dim (values = the first value_dim channels of k)."""
        if self.value_dim == 0:
            return v.shape[3]
        d = k.shape[3]
        ok = self.value_dim > 0 and (not isinstance(d, int) or self.value_dim <= d)
        require(self, ok, f"value_dim {self.value_dim} must be in [1, {d}] (the first channels "
                "of each key row are the values; 0 = a separate v operand)", *types)  # fmt: skip
        return self.value_dim

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

    def _check_indices(self, idx: TensorType, q: TensorType, k: TensorType, *types) -> None:
        want = f"[B,Hi,T,n] = [{q.shape[0]}, 1 or {k.shape[1]}, {q.shape[2]}, n]"
        require(self, idx.dtype in INT_INDEX, f"indices must be i64 or i32 (key rows, -1 = "
                f"none), got {idx.dtype.value}", *types)  # fmt: skip
        require(self, idx.rank == 4, f"indices must be {want}, got rank {idx.rank}", *types)
        ok = same_dim(idx.shape[0], q.shape[0]) and same_dim(idx.shape[2], q.shape[2])
        ok = ok and (idx.shape[1] == 1 or same_dim(idx.shape[1], k.shape[1]))
        require(self, ok, f"indices must be {want} (one key-row set per sequence, KV head or "
                f"all of them, and query), got {list(idx.shape)}", *types)  # fmt: skip

    def reference(self, *args):
        r = self.roles(args)
        q, k = r["q"], self.kv_bhsd(r["k"])
        v = k[..., : self.value_dim] if self.value_dim else self.kv_bhsd(r["v"])
        b, hq, t, _ = q.shape
        group = hq // k.shape[1]
        kf = k.float().repeat_interleave(group, dim=1)
        vf = v.float().repeat_interleave(group, dim=1)
        if r["indices"] is not None:
            z, pv = self._indexed_logits(q, kf, vf, r["indices"], r["mask"])
        else:
            z, pv = self._dense_logits(q, kf, r["mask"]), None
        if self.sinks:
            sink_col = r["sinks"].float().view(1, hq, 1, 1).expand(b, hq, t, 1)
            p = torch.softmax(torch.cat((z, sink_col), dim=-1), dim=-1)[..., :-1]
        else:
            p = torch.softmax(z, dim=-1)
            p = torch.where(torch.isneginf(z).all(-1, keepdim=True), 0.0, p)
        o = p @ vf if pv is None else (p.unsqueeze(-2) @ pv).squeeze(-2)
        return (o.to(q.dtype),)

    def _capped(self, z):
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap > 0 else z

    def _dense_logits(self, q, kf, mask):
        """z [B,Hq,T,S]: scaled (capped) logits, mask added, -inf where not visible."""
        b, hq, t, _ = q.shape
        s = kf.shape[2]
        z = self._capped((q.float() @ kf.transpose(-1, -2)) * self.scale)
        seen = visible_reference(t, s, self.causal, self.offset, self.window, q.device)
        seen = seen.expand(b, hq, t, s)
        if self.mask == "bool":
            seen = seen & mask
        elif self.mask == "add":
            z = z + mask.float()
        return z.masked_fill(~seen, float("-inf"))

    def _indexed_logits(self, q, kf, vf, indices, mask):
        """(z [B,Hq,T,n] over the index slots, -inf at invalid or invisible ones; the slots'
        values [B,Hq,T,n,Dv])."""
        b, hq, t, _ = q.shape
        s = kf.shape[2]
        idx = indices.long()
        # [B,Hq,T,n]: Hi = 1 is shared by every head; else query head h reads row h // G (kf
        # and vf are already repeated to the query heads)
        idx = idx.repeat_interleave(hq // idx.shape[1], dim=1)
        valid = (idx >= 0) & (idx < s)
        rows = idx.clamp(0, s - 1) if s > 0 else torch.zeros_like(idx)
        n = idx.shape[3]

        def gather(x):  # x [B,Hq,S,C] -> [B,Hq,T,n,C]: row idx[b,h,t,j] of x[b,h]
            flat = rows.reshape(b, hq, t * n, 1).expand(b, hq, t * n, x.shape[3])
            return x.gather(2, flat).reshape(b, hq, t, n, x.shape[3])

        if s == 0:
            keys = kf.new_zeros(b, hq, t, n, kf.shape[3])
            vals = vf.new_zeros(b, hq, t, n, vf.shape[3])
        else:
            keys, vals = gather(kf), gather(vf)
        z = self._capped((q.float().unsqueeze(-2) @ keys.transpose(-1, -2)).squeeze(-2)
                         * self.scale)  # fmt: skip
        q_pos = torch.arange(t, device=q.device).view(1, 1, t, 1) + self.offset
        if self.causal:
            valid = valid & (rows <= q_pos)
        if self.window > 0:
            valid = valid & (q_pos - rows < self.window)
        if mask is not None and s > 0:
            full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            at = full.expand(b, hq, t, s).gather(3, rows)
            if self.mask == "bool":
                valid = valid & at
            else:
                z = z + at.float()
        return z.masked_fill(~valid, float("-inf")), vals

    def cost(self, operand_types, result_types):
        r = self.roles(operand_types)
        q, k, idx = r["q"], self._bhsd_type(r["k"]), r["indices"]
        dv = self.value_dim or r["v"].shape[3]
        keys = k.shape[2] if idx is None else idx.shape[3]
        flops = numel(q.shape[:3]) * keys * (2 * q.shape[3] + 2 * dv + 5)
        if idx is None:
            return io_cost(flops, operand_types, result_types)
        # indexed: each (sequence, KV head, query) reads its n picked rows of k (and v), not all
        # S (and never more bytes than k and v hold: prefill's picks overlap)
        roles = self._role_names()
        rest = [t for t, role in zip(operand_types, roles) if role not in ("k", "v")]
        row = q.shape[3] * k.dtype.itemsize
        row += 0 if self.value_dim else dv * r["v"].dtype.itemsize
        picked = k.shape[0] * k.shape[1] * q.shape[2] * keys * row
        whole = k.nbytes + (r["v"].nbytes if r["v"] is not None else 0)
        base = io_cost(flops, rest, result_types)
        return Cost(base.flops, canon_dim(sympy.sympify(base.bytes + sympy.Min(picked, whole))))
