"""The whole tiny and tiny-512 DeepSeek-V4 through the TVM backend on this CPU (llvm): prefill and
one decode step equal eager PyTorch (fp32, 1e-4), most ops run as TVM kernels, identical layers
share them, and every op left to the reference says why. tiny-512 has the real head geometry
(head dim 512 = 448 NoPE + 64 RoPE, index head dim 128) on two layers (CSA m=4, HCA m=8)."""

from __future__ import annotations

import functools

import pytest
import torch

import passes

pytest.importorskip("tvm")

from backends.tvm import TVMBackend

PRESETS = ["tiny", "tiny-512"]
# decode position per preset: 16 opens a ratio-4 block (tiny); at 23 both the ratio-4 and the
# ratio-8 block of tiny-512 complete, so the step writes a compressed cache row of each
DECODE_AT = {"tiny": 16, "tiny-512": 23}


@functools.cache
def model_of(preset: str):
    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    return Transformer(Config.preset(preset)).eval()


@functools.cache
def prefill_graph(preset: str):
    from frontend import capture

    tokens = torch.zeros(2, 24, dtype=torch.long)
    g = capture(model_of(preset), (tokens,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")
    return passes.pipeline(g)


def _params(model, g) -> dict:
    names = {v.name for v in g.params}
    return {k: v for k, v in model.state_dict().items() if k in names}


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_equals_eager(preset):
    model, g = model_of(preset), prefill_graph(preset)
    exe = TVMBackend().compile(g, "cpu")
    tokens = torch.randint(0, 128, (1, 19), generator=torch.Generator().manual_seed(1))
    (logits,) = exe(tokens, params=_params(model, g))
    with torch.no_grad():
        want = model.prefill(tokens)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), want.argmax(-1))

    launched = [s for s in exe.steps if s.launch is not None]
    assert len(launched) > len(g.ops) // 3
    report = exe.report()
    assert len(report["kernels"]) < len(launched) * 3 // 4  # identical layers share kernels
    assert report["llvm"].count("mcpu") == 1 and "generic" not in report["llvm"]
    assert all(f["reason"] for f in report["fallbacks"])
    assert any("matmul" in k["ops"] for k in report["kernels"])


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_step_equals_eager(preset):
    """One decode step after a prefill: logits and the new cache."""
    from frontend import capture

    model, at = model_of(preset), DECODE_AT[preset]
    tokens = torch.randint(0, 128, (2, at + 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.init_cache(2, 32)
        _, cache = model.prefill(tokens[:, :at], cache)
        want_logits, want_cache = model.decode(tokens[:, at:], torch.tensor(at), cache)
    args = (tokens[:, at:], torch.tensor(at), cache)
    g = capture(model, args, dynamic={"token": {0: "B"}, "cache": {0: "B"}}, method="decode")
    g = passes.pipeline(g)
    exe = TVMBackend().compile(g, "cpu")
    logits, *new_cache = exe(
        tokens[:, at:], torch.tensor(at), *cache.values(), params=_params(model, g)
    )
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), want_logits.argmax(-1))
    for got, want in zip(new_cache, want_cache.values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(s.launch is not None for s in exe.steps) > len(g.ops) // 3
