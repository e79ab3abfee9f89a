"""fuse_attention on single attention layers with the real head geometry (tiny-512: head dim 512,
64 rope dims): prefill and decode of each layer kind (decode includes the compressor step and
the cache/state outputs), counters and interpreter equality."""

from __future__ import annotations

import pytest
import torch

import ir
import passes
from frontend import capture
from models.attention import Attention, topk_visible
from models.config import Config
from passes.fuse_attention import fuse_attention

CFG = Config.preset("tiny-512")
# ratio -> (compress, indexer_topk, sparse_mqa variant)
KINDS = {4: (2, 1, "csa"), 8: (1, 0, "hca"), 0: (0, 0, "window")}


def layer(ratio: int) -> Attention:
    torch.manual_seed(ratio)
    a = Attention(CFG, ratio).eval()
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return a


def fuse(g: ir.Graph) -> tuple[ir.Graph, dict[str, int]]:
    ctx = passes.PassContext()
    out = fuse_attention(passes.canonicalize(g), ctx)
    ir.verify(out)
    assert ir.parse(ir.to_text(out)) == out
    return out, {k.split(".", 1)[1]: v for k, v in ctx.counters.items() if k.startswith("fuse_")}


def max_diff(a: tuple, b: tuple) -> float:
    assert len(a) == len(b)
    for x, y in zip(a, b):  # states hold -inf scores for the block before the first
        assert torch.equal(torch.isinf(x), torch.isinf(y))
    pairs = [
        (x.double().nan_to_num(neginf=0.0), y.double().nan_to_num(neginf=0.0)) for x, y in zip(a, b)
    ]
    return max((x - y).abs().max().item() for x, y in pairs)


@pytest.mark.parametrize("ratio", [4])  # HCA and window prefill: covered by the tiny model
def test_prefill_layer(ratio: int) -> None:
    a = layer(ratio)
    x = torch.randn(2, 24, CFG.dim)
    g = capture(a, (x,), dynamic={"x": {0: "B", 1: "T"}})
    out, fired = fuse(g)
    n_comp, n_idx, variant = KINDS[ratio]
    assert fired == {
        k: v
        for k, v in {
            "attn.compress": n_comp,
            "attn.indexer_topk": n_idx,
            "attn.sparse_mqa": 1,
        }.items()
        if v
    }
    (mqa,) = [n for n in out.ops if n.name == "attn.sparse_mqa"]
    assert mqa.attrs["variant"] == variant and not mqa.attrs["decode"]
    assert mqa.operands[0].type.shape[-1] == 512
    for t in (29,):
        x = torch.randn(2, t, CFG.dim)
        p = a.state_dict()
        assert max_diff(ir.interpret(g, x, params=p), ir.interpret(out, x, params=p)) <= 1e-5


@pytest.mark.parametrize("ratio", [4, 8, 0])
def test_decode_layer(ratio: int) -> None:
    a = layer(ratio)
    with torch.no_grad():
        cache = a.init_cache(2, 64, torch.float32, torch.device("cpu"))
        _, cache = a(torch.randn(2, 40, CFG.dim), cache)
    x = torch.randn(2, 1, CFG.dim)
    dynamic = {"x": {0: "B"}, "cache": {0: "B"}}
    g = capture(a, (x, torch.tensor(40), cache), dynamic=dynamic, method="decode")
    out, fired = fuse(g)
    n_comp, n_idx, variant = KINDS[ratio]
    want = {"attn.compress_step": n_comp, "attn.indexer_topk": n_idx, "attn.sparse_mqa": 1}
    assert fired == {k: v for k, v in want.items() if v}
    assert not any(n.name in ("softmax", "topk") for n in out.ops)  # ring insert stays
    (mqa,) = [n for n in out.ops if n.name == "attn.sparse_mqa"]
    assert mqa.attrs["variant"] == variant and mqa.attrs["decode"]
    for pos in (40, 43):  # 43: a ratio-4 block completes, the compressed cache grows
        args = (x, torch.tensor(pos), *cache.values())
        want = ir.interpret(g, *args, params=a.state_dict())
        assert max_diff(want, ir.interpret(out, *args, params=a.state_dict())) <= 1e-5


def test_bf16_layer_rounds_where_the_model_does() -> None:
    """A bf16 CSA layer: upcasts are looked through, rounding casts are part of the ops; the
    fused graph computes exactly what the captured one does."""
    a = layer(4).to(torch.bfloat16)
    x = torch.randn(2, 24, CFG.dim, dtype=torch.bfloat16)
    g = capture(a, (x,), dynamic={"x": {0: "B", 1: "T"}})
    out, fired = fuse(g)
    assert fired == {"attn.compress": 2, "attn.indexer_topk": 1, "attn.sparse_mqa": 1}
    p = a.state_dict()
    assert max_diff(ir.interpret(g, x, params=p), ir.interpret(out, x, params=p)) == 0.0


class IndexerPicks(torch.nn.Module):
    """The indexer of a CSA layer on its own: (x, cq, keys) -> top-k visible entry indices."""

    def __init__(self, layer: Attention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cq: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1])
        cos, sin = self.layer.rotary.cos_sin(pos)
        visible = torch.arange(keys.shape[1]).unsqueeze(0) < ((pos + 1) // 4).unsqueeze(1)
        scores = self.layer.indexer.scores(x, cq, cos, sin, keys)
        return topk_visible(scores, visible, self.layer.indexer.topk)


def test_indexer_picks_identical_indices() -> None:
    """The fused indexer picks exactly the entries the model picks. Positive weights, queries
    and keys keep the ReLU sums away from 0 and every score distinct (checked), so the top-k is
    unique and any correct kernel agrees."""
    a = layer(4)
    with torch.no_grad():
        a.indexer.weights_proj.weight.abs_()
        a.indexer.wq_b.weight.abs_()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 24, CFG.dim, generator=gen)
    cq = torch.rand(2, 24, CFG.q_lora_rank, generator=gen)
    keys = torch.rand(2, 6, CFG.index_head_dim, generator=gen)
    module = IndexerPicks(a).eval()
    g = capture(module, (x, cq, keys))
    out, fired = fuse(g)
    assert fired == {"attn.indexer_topk": 1}
    with torch.no_grad():
        pos = torch.arange(24)
        scores = a.indexer.scores(x, cq, *a.rotary.cos_sin(pos), keys)
        want = module(x, cq, keys)
    for row in scores.flatten(0, 1):  # no ties among a query's candidates
        assert row.unique().numel() == row.numel()
    p = module.state_dict()
    got = ir.interpret(out, x, cq, keys, params=p)[0]
    assert torch.equal(got, want) and torch.equal(ir.interpret(g, x, cq, keys, params=p)[0], want)
    assert (want >= 0).any() and (want < 0).any()  # some queries see fewer than k entries
