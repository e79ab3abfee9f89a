"""FP8 shared experts on the tiny DeepSeek-V4: their weights are dequantised next to the shared
expert, i.e. after the routed experts, so `moe.experts` cannot take them as operands. fuse_moe
then forms the routed experts alone (counted as `fuse_moe.shared_not_folded`) instead of
raising RewriteError, the shared expert's FP8 linears become `linalg.matmul_fp8`, and the
compiled graph equals eager."""

from __future__ import annotations

from collections import Counter

import torch

import ir
import passes
from frontend import capture
from models.quant import quantize_fp8_linears
from models.weights import FP8_WEIGHTS
from passes.context import PassContext


def test_fp8_shared_experts_pipeline_equals_eager() -> None:
    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny")).eval()
    names = quantize_fp8_linears(
        model, lambda n, m: FP8_WEIGHTS.search(n + ".weight") is not None or "shared" in n
    )
    assert sum("shared_experts" in n for n in names) == 15  # 4 layers + MTP, w1 w2 w3 each
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    ctx = PassContext.from_env(options={})
    g = passes.pipeline(capture(model, (ids,), method="prefill"), ctx=ctx)
    experts = [n for n in g.ops if n.name == "moe.experts"]
    assert len(experts) == 4  # one per layer: the routed experts still form
    assert not any(n.op.attrs.get("shared") for n in experts)
    assert ctx.counters["fuse_moe.shared_not_folded"] == 4
    # 18 attention/indexer projections + 4 layers x 3 shared-expert linears
    assert Counter(n.name for n in g.ops)["linalg.matmul_fp8"] == 30
    (got,) = ir.interpret(g, ids, params=model.state_dict())
    with torch.no_grad():
        want = model.prefill(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
