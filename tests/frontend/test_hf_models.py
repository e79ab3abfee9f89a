"""Hugging Face `transformers` models (tiny configs, random weights, fp32) against HF eager.

Prefill is captured once with a symbolic sequence length and run at two lengths; errors are
relative to the largest logit (bound 1e-4). The fast tier interprets the IR of Mixtral (and
returns its DynamicCache as flat tensors); the slow tier (DSV4C_SLOW=1, about 15 minutes on 2
busy cores) interprets all three and compiles them for TVM and the Triton interpreter and
through torch.compile(backend="dsv4c") with DSV4C_STRICT=1 (no graph may fall back to eager).
"""

from __future__ import annotations

import functools
import os

import hf_tiny
import pytest
import torch

import ir
from frontend import capture

RTOL = 1e-4
LENGTHS = (12, 7)
slow = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="minutes on 2 cores")


@functools.cache
def _model(name: str) -> torch.nn.Module:
    return hf_tiny.MODELS[name]()


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict() plus the non-persistent buffers (rotary inv_freq), all graph inputs."""
    return {**dict(model.named_buffers()), **model.state_dict()}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype
    return ((got - want).abs().max() / want.abs().max()).item()


def _eager(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


DYNAMIC = {"input_ids": {1: "T"}}


@pytest.mark.parametrize(
    "name",
    ["mixtral", pytest.param("deepseek_v32", marks=slow), pytest.param("deepseek_v4", marks=slow)],
)
def test_prefill_interprets_like_hf_eager(name: str) -> None:
    model = _model(name)
    graph = capture(model, (hf_tiny.tokens(1, 12),), dynamic=DYNAMIC)
    for length in LENGTHS:
        ids = hf_tiny.tokens(1, length, seed=length)
        (got,) = ir.interpret(graph, ids, params=_params(model))
        assert _relative_error(got, _eager(model, ids)) <= RTOL


def test_model_output_with_a_cache_returns_logits_and_flat_cache_tensors() -> None:
    model = _model("mixtral")
    ids = hf_tiny.tokens(1, 9)
    model.config.use_cache = True
    try:
        graph = capture(model, (ids,), outputs="logits+cache")
        with torch.no_grad():
            out = model(ids, use_cache=True)
    finally:
        model.config.use_cache = False
    from frontend.outputs import flat_cache

    want = [out.logits, *flat_cache(out.past_key_values)]
    got = ir.interpret(graph, ids, params=_params(model))
    assert len(got) == len(want) == 1 + 2 * 2  # logits, then keys and values of 2 layers
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@slow
@pytest.mark.parametrize("backend", ["tvm", "triton"])
@pytest.mark.parametrize("name", list(hf_tiny.MODELS))
def test_compiles_and_equals_hf_eager(name: str, backend: str) -> None:
    import dsv4c

    model = _model(name)
    compiled = dsv4c.compile(
        model, (hf_tiny.tokens(1, 12),), backend=backend, target="cpu", dynamic=DYNAMIC
    )
    for length in LENGTHS:
        ids = hf_tiny.tokens(1, length, seed=length)
        (got,) = compiled(ids)
        assert _relative_error(got, _eager(model, ids)) <= RTOL


@slow
@pytest.mark.parametrize("name", list(hf_tiny.MODELS))
def test_torch_compile_strict_has_no_fallback(name: str, monkeypatch) -> None:
    import dsv4c.dynamo

    monkeypatch.setenv("DSV4C_STRICT", "1")
    torch._dynamo.reset()
    dsv4c.dynamo.reset_fallbacks()
    model = _model(name)
    fn = torch.compile(model, backend="dsv4c", dynamic=False)
    for length in LENGTHS:
        ids = hf_tiny.tokens(1, length, seed=length)
        with torch.no_grad():
            got = fn(ids).logits
        assert _relative_error(got, _eager(model, ids)) <= RTOL
    assert dsv4c.dynamo.fallbacks() == []
    torch._dynamo.reset()
