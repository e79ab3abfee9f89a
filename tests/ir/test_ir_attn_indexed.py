"""`attn.sdpa` with index-selected keys (`indexed=True`) and values inside the keys
(`value_dim`): the reference equals the dense op restricted to the same key set (a bool mask
built from the indices), -1 pads and empty rows give 0, the verifier names what is wrong, the
text form round-trips and the cost is ∝ T·n.
"""

from __future__ import annotations

import pytest
import torch

import ir
from ir.ops.attn_dense import DenseAttention

GEN = torch.Generator().manual_seed(3)


def _distinct_picks(b: int, heads: int, t: int, s: int, n: int) -> torch.Tensor:
    """[b, heads, t, n] distinct key rows per (sequence, head, query), a few -1 pads."""
    rows = [torch.randperm(s, generator=GEN)[:n] for _ in range(b * heads * t)]
    idx = torch.stack(rows).view(b, heads, t, n)
    idx[0, 0, 1, 0] = -1
    idx[-1, -1, -1, -1] = -1
    return idx


def _keep(idx: torch.Tensor, s: int, hq: int) -> torch.Tensor:
    """The bool mask [B,Hq,T,S] of the keys the indices pick (the dense formulation)."""
    b, hi, t, n = idx.shape
    keep = torch.zeros(b, hi, t, s + 1, dtype=torch.bool)
    keep.scatter_(3, torch.where(idx >= 0, idx, s), True)
    return keep[..., :s].repeat_interleave(hq // hi, dim=1)


@pytest.mark.parametrize("hi", [1, 2])
@pytest.mark.parametrize("attrs", [{"causal": True}, {"causal": True, "offset": 3, "window": 4},
                                   {"sinks": True}, {"softcap": 1.5}])  # fmt: skip
def test_indexed_equals_dense_over_the_picked_keys(hi: int, attrs: dict) -> None:
    q, k, v = torch.randn(2, 4, 6, 8, generator=GEN), torch.randn(2, 2, 9, 8, generator=GEN), \
        torch.randn(2, 2, 9, 5, generator=GEN)  # fmt: skip
    idx = _distinct_picks(2, hi, 6, 9, 4)
    sinks = [torch.randn(4, generator=GEN)] if attrs.get("sinks") else []
    (got,) = DenseAttention(scale=0.4, indexed=True, **attrs).reference(q, k, v, idx, *sinks)
    dense = DenseAttention(scale=0.4, mask="bool", **attrs)
    (want,) = dense.reference(q, k, v, _keep(idx, 9, 4), *sinks)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the indices matter: all keys differ
    (everything,) = DenseAttention(scale=0.4, **attrs).reference(q, k, v, *sinks)
    assert (everything - got).abs().max() > 1e-2


def test_rows_without_a_valid_key_are_zero_and_out_of_range_is_no_key() -> None:
    q, k, v = (torch.randn(1, 2, 3, 4, generator=GEN) for _ in range(3))
    idx = torch.tensor([[[[2, -1], [-1, -1], [7, 0]]]])  # row 1: nothing; 7 >= S: no key
    (o,) = DenseAttention(indexed=True).reference(q, k, v, idx)
    assert not o.isnan().any() and bool((o[:, :, 1] == 0).all())
    (one,) = DenseAttention().reference(q[:, :, 2:], k[:, :, :1], v[:, :, :1])
    torch.testing.assert_close(o[:, :, 2:], one)
    # causal: query 0 picks key 2 > 0, which it may not see -> 0
    (c,) = DenseAttention(indexed=True, causal=True).reference(q, k, v, idx)
    assert bool((c[:, :, 0] == 0).all())


def test_value_dim_reads_values_from_the_keys_and_an_add_mask_is_gathered() -> None:
    q, k = torch.randn(1, 4, 5, 12, generator=GEN), torch.randn(1, 1, 7, 12, generator=GEN)
    bias = torch.randn(5, 7, generator=GEN)
    idx = _distinct_picks(1, 1, 5, 7, 3)
    op = DenseAttention(scale=0.3, indexed=True, value_dim=8, mask="add")
    (got,) = op.reference(q, k, bias, idx)
    assert got.shape == (1, 4, 5, 8)
    keep = _keep(idx, 7, 4)
    masked = bias.masked_fill(~keep, float("-inf"))
    (want,) = DenseAttention(scale=0.3, mask="add").reference(q, k, k[..., :8], masked)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _types(*shapes_dtypes):
    return [ir.TensorType(s, d) for s, d in shapes_dtypes]


F32, I64 = ir.DType.f32, ir.DType.i64
QKV = ((1, 4, 6, 8), F32), ((1, 2, 9, 8), F32), ((1, 2, 9, 8), F32)


@pytest.mark.parametrize("attrs, extra, message", [
    ({"indexed": True}, [((1, 2, 6, 3), F32)], "indices must be i64 or i32"),
    ({"indexed": True}, [((1, 2, 6), I64)], "got rank 3"),
    ({"indexed": True}, [((1, 3, 6, 3), I64)], "[B,Hi,T,n] = [1, 1 or 2, 6, n]"),
    ({"indexed": True}, [((1, 2, 5, 3), I64)], "got [1, 2, 5, 3]"),
    ({"indexed": True}, [], "takes 4 operands (q, k, v, indices), got 3"),
])  # fmt: skip
def test_verifier_names_what_is_wrong(attrs, extra, message) -> None:
    with pytest.raises(ir.IRTypeError) as e:
        DenseAttention(**attrs).infer_type(*_types(*QKV, *extra))
    assert message in str(e.value)


def test_value_dim_out_of_range() -> None:
    with pytest.raises(ir.IRTypeError) as e:
        DenseAttention(value_dim=9).infer_type(*_types(*QKV[:2]))
    assert "value_dim 9 must be in [1, 8]" in str(e.value)


def test_text_round_trip_and_cost_scales_with_picks() -> None:
    b = ir.Builder(name="g")
    q = b.input("q", ir.TensorType((1, 4, 2, 16), F32))  # decode-like: 2 queries, 64 keys
    k = b.input("k", ir.TensorType((1, 1, 64, 16), F32))
    idx = b.input("idx", ir.TensorType((1, 1, 2, 4), I64))
    o = b.op("attn.sdpa", [q, k, idx], scale=0.25, causal=True, indexed=True, value_dim=8)
    b.output(o)
    g = b.build()
    assert o.type.shape == (1, 4, 2, 8)
    text = ir.to_text(g)
    assert ir.to_text(ir.parse(text)) == text and "indexed=true" in text
    node = g.ops[0]
    sparse = node.op.cost([v.type for v in node.operands], [o.type])
    dense = DenseAttention(scale=0.25, causal=True, value_dim=8).cost(
        [q.type, k.type], [o.type])  # fmt: skip
    assert sparse.flops * 16 == dense.flops  # 4 picks of 64 keys
    # q, indices, o, and the 2·4 picked rows of k (16 f32 each), not all 64
    assert sparse.bytes == 512 + 64 + 256 + 2 * 4 * 16 * 4 < dense.bytes / 3
