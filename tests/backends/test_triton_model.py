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
    assert len(launched) > len(g.ops) // 2  # most ops run as Triton kernels
    assert len(exe.kernels()) < len(launched) // 4  # identical layers share kernels
    kinds = Counter(k.fused_ops[0] for k in exe.kernels())
    assert kinds["matmul"] >= 1 and kinds["softmax"] >= 1
    assert all(f["reason"] for f in exe.report()["fallbacks"])
