"""The whole tiny DeepSeek-V4 prefill through the Triton backend on the CPU interpreter: every
elementwise/reduction op and matmul launches a generated kernel, the rest runs its reference;
logits equal eager PyTorch."""

from __future__ import annotations

import functools
from collections import Counter

import torch

import passes
from backends.triton import TritonBackend


@functools.cache
def tiny():
    from frontend import capture
    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny")).eval()
    tokens = torch.zeros(2, 24, dtype=torch.long)
    g = capture(model, (tokens,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")
    return model, passes.pipeline(g)


def test_tiny_prefill_equals_eager():
    model, g = tiny()
    names = {v.name for v in g.params}
    params = {k: v for k, v in model.state_dict().items() if k in names}
    exe = TritonBackend().compile(g, "cpu")
    tokens = torch.randint(0, 128, (1, 19), generator=torch.Generator().manual_seed(1))
    (logits,) = exe(tokens, params=params)
    with torch.no_grad():
        want = model.prefill(tokens)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), want.argmax(-1))

    launched = [s for s in exe.steps if s.launch is not None]
    fell_back = {op for op, _ in exe.fallbacks()}
    assert not fell_back & {"fused.kernel", "matmul", "grouped_mm"}  # all compute is Triton
    assert len(exe.kernels()) < len(launched) // 3  # identical layers share kernels
    ops = Counter(op for k in exe.kernels() for op in k.fused_ops)
    assert ops["matmul"] >= 1 and ops["rsqrt"] >= 1
    assert all(f["reason"] for f in exe.report()["fallbacks"])


def test_tiny_decode_step_equals_eager():
    """One decode step at position 16 (a ratio-4 block boundary): logits and the new cache."""
    from frontend import capture

    model, _ = tiny()
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.init_cache(2, 32)
        _, cache = model.prefill(tokens[:, :16], cache)
        want_logits, want_cache = model.decode(tokens[:, 16:17], torch.tensor(16), cache)
    args = (tokens[:, 16:17], torch.tensor(16), cache)
    g = capture(model, args, dynamic={"token": {0: "B"}, "cache": {0: "B"}}, method="decode")
    g = passes.pipeline(g)
    names = {v.name for v in g.params}
    params = {k: v for k, v in model.state_dict().items() if k in names}
    exe = TritonBackend().compile(g, "cpu")
    logits, *new_cache = exe(tokens[:, 16:17], torch.tensor(16), *cache.values(), params=params)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), want_logits.argmax(-1))
    for got, want in zip(new_cache, want_cache.values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not {op for op, _ in exe.fallbacks()} & {"fused.kernel", "matmul", "grouped_mm"}
