"""The semantic fusions must not depend on how the batch is spelled (issue 15): the tiny V4 model
captured with a static batch of 1, a static batch of 2 and a symbolic batch forms the same ops
of every family, in prefill and in decode, and the fused graph equals eager.

At B = 1 decode every broadcast over (B, T) = (1, 1) is the identity, which canonicalize drops
(`expand(x, shape(x)) = x`): the sink, window and ring indices reach the attention as plain
reshapes. `fuse_attention.broadcast` reads that form; before it, decode at B = 1 formed no
`attn.sparse_mqa` ("attend: expected op expand, got reshape").

Counts (tiny, 16 index heads: no exact top-k ties), the same at B = 1, 2 and symbolic B:
prefill compress 5, indexer_topk 2, sparse_mqa 4, moe.route 4, moe.experts 4, hc.pre 8,
hc.post 8, hc.head 1; decode the same with compress_step 5 in place of compress.
B = 2 and symbolic B take ~1 min more: DSV4C_SLOW=1.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import Counter

import pytest
import torch

import ir
import passes
from frontend import capture
from passes.fuse_attention import fuse_attention
from passes.fuse_hc import fuse_hc
from passes.fuse_moe import fuse_moe

slow = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="~30 s each on 2 cores")
FAMILIES = {"moe.route": 4, "moe.experts": 4, "hc.pre": 8, "hc.post": 8, "hc.head": 1}
PREFILL = {"attn.compress": 5, "attn.indexer_topk": 2, "attn.sparse_mqa": 4, **FAMILIES}
DECODE = {"attn.compress_step": 5, "attn.indexer_topk": 2, "attn.sparse_mqa": 4, **FAMILIES}
PROMPT, MAX_LEN = 24, 64
BATCHES = [1, pytest.param(2, marks=slow), pytest.param("B", marks=slow)]


@functools.cache
def model() -> torch.nn.Module:
    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    return Transformer(dataclasses.replace(Config.preset("tiny"), index_n_heads=16)).eval()


def tokens(batch: int, length: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def fused(g: ir.Graph) -> ir.Graph:
    g = passes.canonicalize(g)
    for fuse in (fuse_attention, fuse_moe, fuse_hc):
        g = fuse(g)
        ir.verify(g)
    return g


def semantic(g: ir.Graph) -> dict[str, int]:
    return dict(Counter(n.name for n in g.ops if n.name.startswith(("attn.", "moe.", "hc."))))


def example_batch(batch: int | str) -> int:
    """The example's batch size: the static one, or 2 for a symbolic B."""
    return 2 if batch == "B" else batch


def run_batch(batch: int | str) -> int:
    """The batch the fused graph runs at: the static one, or 3 (not the example's) for B."""
    return 3 if batch == "B" else batch


@pytest.mark.parametrize("batch", BATCHES)
def test_prefill_forms_every_family_and_equals_eager(batch: int | str) -> None:
    b = example_batch(batch)
    dynamic = {"tokens": {0: "B"}} if batch == "B" else None
    g = fused(capture(model(), (tokens(b, PROMPT),), dynamic=dynamic, method="prefill"))
    assert semantic(g) == PREFILL
    ids = tokens(run_batch(batch), PROMPT, seed=6)
    (got,) = ir.interpret(g, ids, params=model().state_dict())
    with torch.no_grad():
        want = model().prefill(ids)
    assert (got - want).abs().max().item() <= 1e-5


def prefilled(batch: int, pos: int) -> dict[str, torch.Tensor]:
    """The cache after a `pos`-token prompt (so decode reads real window and compressed rows)."""
    with torch.no_grad():
        return model().prefill(tokens(batch, pos, seed=7), model().init_cache(batch, MAX_LEN))[1]


@pytest.mark.parametrize("batch", BATCHES)
def test_decode_forms_every_family_and_equals_eager(batch: int | str) -> None:
    b = example_batch(batch)
    dynamic = {"token": {0: "B"}, "cache": {0: "B"}} if batch == "B" else None
    example = (tokens(b, 1), torch.tensor(PROMPT), prefilled(b, PROMPT))
    g = fused(capture(model(), example, dynamic=dynamic, method="decode"))
    assert semantic(g) == DECODE
    n = run_batch(batch)
    for pos in (PROMPT + 7, PROMPT + 15):  # 31 completes a ratio-4 block, 39 a ratio-8 one too
        cache, token = prefilled(n, pos), tokens(n, 1, seed=pos)
        got = ir.interpret(g, token, torch.tensor(pos), *cache.values(),
                           params=model().state_dict())
        with torch.no_grad():
            logits, new = model().decode(token, torch.tensor(pos), cache)
        for g_out, w_out in zip(got, (logits, *new.values()), strict=True):
            assert (g_out - w_out).abs().max().item() <= 1e-5


@slow
@pytest.mark.parametrize("name", ["deepseek_v4", "deepseek_v32", "mixtral"])
def test_hf_models_form_the_same_ops_at_batch_1_and_2(name: str) -> None:
    """Hugging Face's tiny models (tests/frontend/hf_tiny.py; V4: the three-layer one of
    test_hf_fusion_counts): the pipeline forms the same ops at batch 1 and 2, = HF eager. V4's
    compressor rotates by tables of position_ids expanded to [B, n]; before the expand_late
    forms (passes/attention_forms.py) B = 2 formed no attn.compress (3 -> 0, sparse_mqa 3 -> 2)."""
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).parents[1] / "frontend"))
    import hf_tiny
    import test_hf_fusion_counts as counts

    hf = counts._hf_v4() if name == "deepseek_v4" else hf_tiny.MODELS[name]()
    length = 16 if name == "deepseek_v4" else 12
    got = {b: semantic(counts._fused_and_checked(hf, hf_tiny.tokens(b, length))) for b in (1, 2)}
    assert got[1] == got[2]
