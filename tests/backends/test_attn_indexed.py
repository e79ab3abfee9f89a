"""`attn.sdpa` with index-selected keys through the Triton template (CPU interpreter) and TVM
kernels vs the reference interpreter: MQA with values inside the keys (DSA's absorbed MLA), MHA
with one index set shared by every head (HF DeepSeek-V3.2), GQA with per-KV-head sets and sinks,
a window with a query offset (decode into a cache), an additive mask gathered at the picks,
i32 indices; -1 pads, picks past the causal edge and rows left with no key (their output is 0,
not NaN); fp32 and bf16. The GPU AOT compile runs under DSV4C_SLOW.
"""

from __future__ import annotations

import os

import pytest
import torch
from backend_graphs import graph_of

import ir

GEN = torch.Generator().manual_seed(0)
BF16_EPS = 2.0**-7


def _t(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN).to(dtype)


def _picks(b: int, heads: int, t: int, s: int, n: int, dtype=torch.int64) -> torch.Tensor:
    """Distinct rows per (sequence, head, query) with -1 pads; query 0 of head 0 of sequence 0
    has no valid slot at all."""
    rows = [torch.randperm(s, generator=GEN)[:n] for _ in range(b * heads * t)]
    idx = torch.stack(rows).view(b, heads, t, n)
    idx[..., -1] = -1  # a pad in every row
    idx[0, 0, 0] = -1  # a row with no key
    return idx.to(dtype)


def _case(name: str, dtype=torch.float32) -> tuple[dict, dict]:
    """(inputs, attrs) of one named case."""
    if name == "mqa_values_in_keys_causal":  # DSA: 8 heads share one latent key = value row
        qk = {"q": _t(2, 8, 19, 40, dtype=dtype), "k": _t(2, 1, 19, 40, dtype=dtype),
              "idx": _picks(2, 1, 19, 19, 7)}  # fmt: skip
        return qk, {"scale": 0.2, "causal": True, "indexed": True, "value_dim": 32}
    if name == "mha_shared_indices":  # HF V3.2: 4 KV heads, one index set [B,1,T,n]
        qkv = {"q": _t(1, 4, 6, 24, dtype=dtype), "k": _t(1, 4, 6, 24, dtype=dtype),
               "v": _t(1, 4, 6, 16, dtype=dtype), "idx": _picks(1, 1, 6, 6, 4)}  # fmt: skip
        return qkv, {"scale": 0.3, "causal": True, "indexed": True}
    if name == "gqa_per_head_sets_sinks_window":
        qkv = {"q": _t(2, 4, 3, 16), "k": _t(2, 2, 37, 16), "v": _t(2, 2, 37, 16),
               "idx": _picks(2, 2, 3, 37, 20, torch.int32), "sinks": _t(4)}  # fmt: skip
        attrs = {"scale": 0.3, "causal": True, "offset": 34, "window": 12, "sinks": True}
        return qkv, {**attrs, "indexed": True, "softcap": 1.5}
    if name == "additive_mask":
        qkv = {"q": _t(1, 2, 5, 8), "k": _t(1, 2, 9, 8), "v": _t(1, 2, 9, 8),
               "bias": _t(5, 9), "idx": _picks(1, 2, 5, 9, 5)}  # fmt: skip
        return qkv, {"scale": 0.5, "mask": "add", "indexed": True}
    if name == "mla_wide_rows":  # the key head dim in two chunks (128 + 32), values 144 wide
        qk = {"q": _t(1, 4, 3, 160), "k": _t(1, 1, 20, 160), "idx": _picks(1, 1, 3, 20, 8)}
        return qk, {"scale": 0.1, "causal": True, "offset": 17, "indexed": True, "value_dim": 144}
    raise KeyError(name)


CASES = ["mqa_values_in_keys_causal", "mha_shared_indices", "gqa_per_head_sets_sinks_window",
         "additive_mask", "mla_wide_rows"]  # fmt: skip


def _run(backend, inputs: dict, attrs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = graph_of([("attn.sdpa", list(inputs), attrs)], inputs)
    exe = backend.compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    args = list(inputs.values())
    return exe(*args)[0], ir.interpret(g, *args)[0]


def _check(case: str, got: torch.Tensor, want: torch.Tensor, inputs: dict) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if "sinks" not in inputs:  # query 0 of sequence 0, KV head 0 picked nothing: 0
        assert bool((got[0, 0, 0] == 0).all())
    assert want.abs().max() > 0.1  # the case computes something


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case):
    from backends.triton import TritonBackend

    inputs, attrs = _case(case)
    _check(case, *_run(TritonBackend(), inputs, attrs), inputs)


@pytest.mark.parametrize("case", CASES)
def test_tvm_equals_reference(case):
    pytest.importorskip("tvm")
    from backends.tvm import TVMBackend

    inputs, attrs = _case(case)
    _check(case, *_run(TVMBackend(), inputs, attrs), inputs)


@pytest.mark.parametrize("backend", ["triton", "tvm"])
@pytest.mark.parametrize("case", ["mqa_values_in_keys_causal", "mha_shared_indices"])
def test_bf16(backend, case):
    if backend == "tvm":
        pytest.importorskip("tvm")
        from backends.tvm import TVMBackend as Backend
    else:
        from backends.triton import TritonBackend as Backend
    got, want = _run(Backend(), *_case(case, torch.bfloat16))
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    # the kernels may round p to bf16 before p·v (as a GPU flash kernel does), the reference not
    tol = 2 * BF16_EPS * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * BF16_EPS, atol=tol)


@pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="~3 min on 2 cores; DSV4C_SLOW=1")
@pytest.mark.parametrize("heads, width, values", [(16, 128, 128), (64, 128, 128), (64, 576, 512)])
def test_triton_aot_for_the_six_gpu_targets(heads, width, values, tmp_path):
    """DSA's shapes: bf16 MQA with values inside the keys, `heads` query heads per gathered row,
    key rows `width` wide (576: V3.2's absorbed MLA, walked in chunks), the first `values`
    channels the values. No spills on sm_90."""
    from backends.triton import TritonBackend
    from backends.triton.aot import GPU_TARGETS, aot_compile

    bf16 = torch.bfloat16
    inputs = {"q": _t(1, heads, 4, width, dtype=bf16), "k": _t(1, 1, 64, width, dtype=bf16),
              "idx": _picks(1, 1, 4, 64, 32)}  # fmt: skip
    attrs = {"scale": 0.1, "causal": True, "indexed": True, "value_dim": values}
    exe = TritonBackend().compile(graph_of([("attn.sdpa", list(inputs), attrs)], inputs), "cpu")
    try:
        results = aot_compile(exe, GPU_TARGETS, keep_dir=tmp_path)
    except RuntimeError as e:  # a triton wheel without the GPU toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert [r.target for r in results] == list(GPU_TARGETS)
    for r in results:
        assert r.error is None, r.error
        assert r.kernel == "sdpa_indexed_fwd" and 0 < r.registers <= 512
    (sm90,) = [r for r in results if r.target == "sm_90"]
    assert sm90.spills == 0


def _bshd(inputs: dict, attrs: dict) -> tuple[dict, dict]:
    """The case with k (and v) stored [B,S,Hkv,D] (contiguous in that layout) and
    kv_layout="bshd"."""
    moved = {n: x.transpose(1, 2).contiguous() if n in ("k", "v") else x for n, x in inputs.items()}
    return moved, {**attrs, "kv_layout": "bshd"}


def _dense_gqa() -> tuple[dict, dict]:
    """Dense GQA (4 query heads over 2 KV heads) with a bool mask, a window, an offset and
    sinks: every dense feature that reads k or v."""
    qkv = {"q": _t(2, 4, 5, 16), "k": _t(2, 2, 23, 16), "v": _t(2, 2, 23, 8),
           "keep": torch.rand(5, 23, generator=GEN) > 0.2, "sinks": _t(4)}  # fmt: skip
    attrs = {"scale": 0.25, "causal": True, "offset": 18, "window": 9, "mask": "bool"}
    return qkv, {**attrs, "sinks": True}


@pytest.mark.parametrize("backend", ["triton", "tvm"])
@pytest.mark.parametrize("case", ["dense_gqa", "gqa_per_head_sets_sinks_window",
                                  "mha_shared_indices", "mqa_values_in_keys_causal"])  # fmt: skip
def test_kv_layout_bshd_equals_bhsd(backend, case):
    """kv_layout="bshd" (k, v [B,S,Hkv,D], NSA's caches as stored): the kernels equal the
    reference, and the reference equals the bhsd op on the transposed k, v."""
    if backend == "tvm":
        pytest.importorskip("tvm")
        from backends.tvm import TVMBackend as Backend
    else:
        from backends.triton import TritonBackend as Backend
    base = _dense_gqa() if case == "dense_gqa" else _case(case)
    inputs, attrs = _bshd(*base)
    assert inputs["k"].shape[1] != inputs["k"].shape[2] or case == "mha_shared_indices"
    got, want = _run(Backend(), inputs, attrs)
    g = graph_of([("attn.sdpa", list(base[0]), base[1])], base[0])
    bhsd = ir.interpret(g, *base[0].values())[0]
    torch.testing.assert_close(want, bhsd, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.1


def test_kv_layout_verifier():
    """The verifier reads heads and length from dims 2 and 1 under "bshd", and names bad
    layouts."""
    from ir.ops.attn_dense import DenseAttention
    from ir.types import DType, TensorType

    f32 = DType.f32
    q, k = TensorType((1, 4, 3, 8), f32), TensorType((1, 10, 2, 8), f32)
    v = TensorType((1, 10, 2, 6), f32)
    (o,) = DenseAttention(kv_layout="bshd").infer_type(q, k, v)
    assert tuple(o.shape) == (1, 4, 3, 6)
    with pytest.raises(Exception, match="multiple of KV heads"):
        DenseAttention().infer_type(q, k, v)  # read as bhsd: 10 KV heads
    with pytest.raises(Exception, match="kv_layout"):
        DenseAttention(kv_layout="bsdh").infer_type(q, k, v)
