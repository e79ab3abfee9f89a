"""`attn.sdpa` through TVM kernels and the Triton template (CPU interpreter) vs the reference
interpreter. Edge cases: sequence lengths that are not multiples of the tiles, a KV cache with
a query offset and a window that starts inside it, GQA and MQA, head dims that are not powers
of two (and a value dim unlike the key dim), an additive [T,S] mask with sinks, a bool padding
mask that leaves a sequence no key (its rows are 0), bf16 on Triton. The Triton GPU AOT
compile of the template runs under DSV4C_SLOW.
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


def _case(name: str, dtype=torch.float32) -> tuple[dict, dict]:
    """(inputs, attrs) of one named case."""
    if name == "mha_causal_multi_block":
        qkv = {"q": _t(1, 2, 19, 16, dtype=dtype), "k": _t(1, 2, 19, 16, dtype=dtype),
               "v": _t(1, 2, 19, 16, dtype=dtype)}  # fmt: skip
        return qkv, {"scale": 0.25, "causal": True}
    if name == "gqa_cache_offset_window":
        qkv = {"q": _t(2, 4, 5, 8), "k": _t(2, 2, 37, 8), "v": _t(2, 2, 37, 8)}
        return qkv, {"scale": 0.3, "causal": True, "offset": 32, "window": 20, "softcap": 1.5}
    if name == "mqa_additive_mask_sinks":
        qkv = {"q": _t(1, 4, 6, 24), "k": _t(1, 1, 6, 24), "v": _t(1, 1, 6, 40),
               "bias": _t(6, 6), "sinks": _t(4)}  # fmt: skip
        return qkv, {"scale": 0.2, "mask": "add", "sinks": True}
    if name == "bool_padding_empty_row":
        keep = torch.rand(2, 1, 1, 9, generator=GEN) > 0.4
        keep[1] = False  # sequence 1 sees nothing: its output is 0
        qkv = {"q": _t(2, 2, 4, 8), "k": _t(2, 2, 9, 8), "v": _t(2, 2, 9, 8), "keep": keep}
        return qkv, {"scale": 0.3, "mask": "bool"}
    raise KeyError(name)


CASES = ["mha_causal_multi_block", "gqa_cache_offset_window", "mqa_additive_mask_sinks",
         "bool_padding_empty_row"]  # fmt: skip


def _run(backend, inputs: dict, attrs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = graph_of([("attn.sdpa", list(inputs), attrs)], inputs)
    exe = backend.compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    args = list(inputs.values())
    return exe(*args)[0], ir.interpret(g, *args)[0]


@pytest.mark.parametrize("case", CASES)
def test_tvm_equals_reference(case):
    pytest.importorskip("tvm")
    from backends.tvm import TVMBackend

    got, want = _run(TVMBackend(), *_case(case))
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case == "bool_padding_empty_row":
        assert bool((got[1] == 0).all())


@pytest.mark.parametrize("case", CASES)
def test_triton_equals_reference(case):
    from backends.triton import TritonBackend

    got, want = _run(TritonBackend(), *_case(case))
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case == "bool_padding_empty_row":
        assert bool((got[1] == 0).all()) and not got.isnan().any()


def test_triton_bf16():
    from backends.triton import TritonBackend

    got, want = _run(TritonBackend(), *_case("mha_causal_multi_block", torch.bfloat16))
    assert got.dtype == torch.bfloat16
    # the kernel rounds p to bf16 before p·v (as a GPU flash kernel does), the reference not
    tol = 2 * BF16_EPS * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * BF16_EPS, atol=tol)


def test_unsupported_head_dim_is_a_reason():
    from backends.triton.templates.attention_sdpa import _sdpa_check

    inputs = {"q": _t(1, 1, 2, 320), "k": _t(1, 1, 2, 320), "v": _t(1, 1, 2, 320)}
    g = graph_of([("attn.sdpa", list(inputs), {})], inputs)
    assert "up to 256" in _sdpa_check(g.ops[0])


@pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="~1 min on 2 cores; DSV4C_SLOW=1")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_aot_for_gpu_targets(dtype, tmp_path):
    from backends.triton import TritonBackend
    from backends.triton.aot import aot_compile

    inputs = {"q": _t(1, 8, 64, 128, dtype=dtype), "k": _t(1, 2, 64, 128, dtype=dtype),
              "v": _t(1, 2, 64, 128, dtype=dtype), "sinks": _t(8)}  # fmt: skip
    attrs = {"scale": 0.1, "causal": True, "window": 16, "sinks": True}
    exe = TritonBackend().compile(graph_of([("attn.sdpa", list(inputs), attrs)], inputs), "cpu")
    try:
        results = aot_compile(exe, ["sm_80", "sm_90", "gfx942"], keep_dir=tmp_path)
    except RuntimeError as e:  # a triton wheel without the GPU toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert [r.target for r in results] == ["sm_80", "sm_90", "gfx942"]
    for r in results:
        assert r.error is None, r.error
        assert r.kernel == "sdpa_fwd" and 0 < r.registers <= 512


@pytest.mark.parametrize(
    "backend",
    ["triton", pytest.param("tvm", marks=pytest.mark.skipif(
        not os.environ.get("DSV4C_SLOW"), reason="~1 min on 2 cores; DSV4C_SLOW=1"))],
)  # fmt: skip
def test_sliding_window_layer_compiles_and_equals_eager(backend):
    """A Mistral-style layer (tests/passes/test_fuse_sdpa.py) compiled whole: one attn.sdpa
    launch with its window, the result equal to eager."""
    import sys
    from pathlib import Path

    import dsv4c

    sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
    from test_fuse_sdpa import SlidingWindowGQA

    torch.manual_seed(0)
    layer = SlidingWindowGQA(window=5).eval()
    x = _t(2, 21, 32)
    compiled = dsv4c.compile(layer, (x,), backend=backend, target="cpu")
    ops = [n for n in compiled.graph.ops if n.name == "attn.sdpa"]
    assert len(ops) == 1 and ops[0].attrs["window"] == 5
    with torch.no_grad():
        want = layer(x)
    torch.testing.assert_close(compiled(x)[0], want, rtol=1e-5, atol=1e-5)
