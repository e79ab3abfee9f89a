"""Prefill forms of the sparse attention ops (backends/tvm/semantic_sparse.py) at sizes that span
several query blocks: the indexer's BLAS path (causal key range per query block) and the kernel,
against the reference."""

from __future__ import annotations

import pytest
import torch
from test_tvm_semantic import _check

GEN = torch.Generator().manual_seed(19)


def _t(*shape: int, positive: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=GEN)
    return x.abs() + 0.05 if positive else x


@pytest.mark.parametrize("blas", ["always", "never"])
def test_indexer_topk_prefill_blocks(blas):
    """T = 150: query blocks of 64, 64 and 22; 37 keys (ratio 4: the last 0..3 keys of a block
    are visible to some of its queries only); k = 12 and k = 48 > S (pads). Positive q/keys/w:
    distinct scores, so the order of the picks is well defined."""
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
