"""Prefill forms of the sparse attention ops (backends/tvm/semantic_sparse.py) at sizes that span
several query blocks: the indexer's BLAS path (causal key range per query block) and the kernel,
against the reference."""

from __future__ import annotations

import pytest
import torch
from test_tvm_semantic import _check

from backends.tvm import semantic_sparse
from backends.tvm.host_parallel import parallel_blocks

GEN = torch.Generator().manual_seed(19)


def _t(*shape: int, positive: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=GEN)
    return x.abs() + 0.05 if positive else x


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def torch_threads(request, monkeypatch):
    """Torch's threads during the test, every torch step counted heavy (these sizes are not: it
    would run on 1): with 2 the BLAS paths run their blocks on 2 Python threads
    (`host_parallel.parallel_blocks`), with 1 in the caller. Checks the BLAS paths saw them."""
    from backends.tvm import runtime

    monkeypatch.setattr(runtime, "TORCH_PARALLEL_MIN_FLOPS", 0)
    seen: list[int] = []

    def spy(blocks, fn):
        seen.append(torch.get_num_threads())
        return parallel_blocks(blocks, fn)

    monkeypatch.setattr(semantic_sparse, "parallel_blocks", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
    assert not seen or set(seen) == {request.param}, seen


@pytest.mark.parametrize("blas", ["always", "never"])
def test_indexer_topk_prefill_blocks(blas, torch_threads, monkeypatch):
    """T = 150: query blocks of 32 (QUERY_BLOCK set so: 4 full blocks and one of 22); 37 keys
    (ratio 4: the last 0..3 keys of a block are visible to some of its queries only); k = 12 and
    k = 48 > S (pads). Positive q/keys/w: distinct scores, so the order of the picks is well
    defined."""
    monkeypatch.setattr(semantic_sparse, "QUERY_BLOCK", 32)
    b, t, h, c, s = 2, 150, 16, 32, 37
    inputs = {
        "q": _t(b, t, h, c, positive=True),
        "keys": _t(b, s, c, positive=True),
        "w": _t(b, t, h, positive=True),
    }
    report = _check(
        [
            ("attn.indexer_topk", ["q", "keys", "w"], {"k": 12, "ratio": 4, "scale": 0.25}),
            ("attn.indexer_topk", ["q", "keys", "w"], {"k": 48, "ratio": 4}),
        ],
        inputs,
        blas=blas,
    )
    assert str(report)  # the report names the path taken


@pytest.mark.parametrize(
    ("blas", "dense", "b"),
    [("always", 0, 2), ("always", 3, 2), ("always", 100, 2), ("always", 3, 1), ("never", 3, 2)],
)
def test_sparse_mqa_prefill_blocks(blas, dense, b, torch_threads, monkeypatch):
    """T = 75: query blocks of 16 (MQA_BLOCK set so: 4 full blocks and one of 11; the window
    part of a later block starts at t0 - window + 1); every variant, csa picks with -1 holes and
    repeats, its compressed part gathered (dense 0), a GEMM over the distinct picked rows (100;
    batch 1: over the first rows while they hold every pick), or both by block (3)."""
    from backend_graphs import rope_tables

    monkeypatch.setattr(semantic_sparse, "DENSE_PICKS", dense)
    monkeypatch.setattr(semantic_sparse, "MQA_BLOCK", 16)

    t, h, c, half, window, ratio, k = 75, 8, 32, 4, 9, 4, 5
    cos, sin = rope_tables(GEN, t, half)
    vis = (torch.arange(t) + 1) // ratio
    r = (torch.rand(b, t, k, generator=GEN) * vis.view(1, t, 1)).long()
    picks = torch.where(torch.arange(k).view(1, 1, k) < vis.view(1, t, 1), r, -1)
    inputs = {
        "q": _t(b, t, h, c),
        "kv": _t(b, t, c),
        "sink": _t(h),
        "cos": cos,
        "sin": sin,
        "comp": _t(b, t // ratio, c),
        "picks": picks.contiguous(),
    }
    base = ["q", "kv", "sink", "cos", "sin"]
    common = {"window": window, "scale": 0.3}
    _check(
        [
            ("attn.sparse_mqa", base, {**common, "q_norm_eps": 1e-6}),
            ("attn.sparse_mqa", [*base, "comp"], {**common, "variant": "hca", "ratio": ratio}),
            (
                "attn.sparse_mqa",
                [*base, "comp", "picks"],
                {**common, "variant": "csa", "ratio": ratio, "q_norm_eps": 1e-6},
            ),
        ],
        inputs,
        blas=blas,
    )
