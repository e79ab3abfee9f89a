"""Prefill forms of the projection-heavy semantic ops (issue 19) against the reference: the
compressor's BLAS path (`semantic.CompressLaunch`) and its kernel, and the router's tiled logits
(`semantic_moe.schedule_route`) next to the shapes where the tile does not apply."""

from __future__ import annotations

import pytest
import torch
from backend_graphs import rope_tables
from test_tvm_semantic import _check

GEN = torch.Generator().manual_seed(1919)


def _t(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * scale


@pytest.mark.parametrize("blas", ["always", "never"])
def test_compress_prefill_paths(blas):
    """T = 70 (not a multiple of either ratio): overlap at ratio 4, none at ratio 8; "always"
    runs the BLAS path (counted in the report), "never" the kernel."""
    b, t, d, c = 2, 70, 32, 16
    cos4, sin4 = rope_tables(GEN, t // 4, 4)
    cos8, sin8 = rope_tables(GEN, t // 8, 4)
    inputs = {
        "x": _t(b, t, d),
        "wkv2": _t(2 * c, d, scale=0.3),
        "wgate2": _t(2 * c, d, scale=0.3),
        "ape2": _t(4, 2 * c),
        "wkv": _t(c, d, scale=0.3),
        "wgate": _t(c, d, scale=0.3),
        "ape": _t(8, c),
        "norm": _t(c),
        "cos4": cos4,
        "sin4": sin4,
        "cos8": cos8,
        "sin8": sin8,
    }
    overlap = ["x", "wkv2", "wgate2", "ape2", "norm", "cos4", "sin4"]
    plain = ["x", "wkv", "wgate", "ape", "norm", "cos8", "sin8"]
    report = _check(
        [
            ("attn.compress", overlap, {"ratio": 4}),
            ("attn.compress", plain, {"ratio": 8, "overlap": False}),
        ],
        inputs,
        blas=blas,
    )
    assert len(report["blas_calls"]) == (2 if blas == "always" else 0), report["blas_calls"]


@pytest.mark.parametrize(("experts", "width"), [(32, 64), (16, 48), (8, 64), (12, 32), (16, 40)])
def test_route_logits_tiles(experts, width):
    """32 and 16 experts: tiles of 8 (the lane sums of `_logits`); 8 experts (one tile: TVM
    refuses it, generic schedule), 12 (no whole tiles), width 40 (not a multiple of 16: one dot
    per entry). sqrt-softplus scores with a selection bias (V4), and softmax; seeded inputs
    whose top-k has no near ties."""
    n, k = 37, 4
    inputs = {
        "x": _t(n, width),
        "gate": _t(experts, width, scale=0.2),
        "bias": _t(experts, scale=0.05),
    }
    logits = inputs["x"] @ inputs["gate"].T
    top = logits.topk(k + 1).values
    assert (top[:, k - 1] - top[:, k]).min() > 1e-4, "inputs too close to a top-k tie"
    _check(
        [
            ("moe.route", ["x", "gate", "bias"], {"k": k, "bias": True, "route_scale": 2.5}),
            ("moe.route", ["x", "gate"], {"k": k, "score": "softmax"}),
        ],
        inputs,
    )


def test_hc_mix_tiles():
    """mHC's mixing projection: hc.pre's fn has 2n + n² = 24 rows (three tiles of 8, tokens
    fused over B and T), hc.head's n = 4 (no whole tile: generic schedule)."""
    b, t, n, d = 2, 19, 4, 32
    inputs = {
        "x": _t(b, t, n, d),
        "fn": _t(2 * n + n * n, n * d, scale=0.1),
        "scale": _t(3).abs(),
        "base": _t(2 * n + n * n, scale=0.1),
        "fn_head": _t(n, n * d, scale=0.1),
        "scale_head": _t(1).abs(),
        "base_head": _t(n, scale=0.1),
    }
    _check(
        [
            ("hc.pre", ["x", "fn", "scale", "base"], {}),
            ("hc.head", ["x", "fn_head", "scale_head", "base_head"], {}),
        ],
        inputs,
    )
