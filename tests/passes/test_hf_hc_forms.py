"""mHC fusions on Hugging Face's spelling of DeepSeek-V4 (transformers' DeepseekV4HyperConnection /
DeepseekV4HyperHead): `hc.pre` (Sinkhorn kept as a loop), `hc.post` and `hc.head` form as on
models.deepseek_v4, the fused graph equals HF eager, and near misses stay unfused, exact and
explained by sub-pattern and source line.

HF's spelling differs from ours in the RMS norm (before the projection: (x·r)·fnᵀ, ours
(x·fnᵀ)·r), in unbind's scale picks (reshape(slice)), in the comb split (reshape before the
affine map) and in the first layer's expanded streams; passes/fuse_hc.py accepts each.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ir
import passes
from frontend import capture
from passes.fuse_hc import RULES, fuse_hc

pytest.importorskip("transformers.models.deepseek_v4")
from hf_hc_modules import (  # noqa: E402  (needs transformers)
    SINKHORN_LINE,
    SinkhornAxes,
    Streams,
    hf_axes,
    hf_config,
    hidden,
    params,
)

SLOW = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="minutes on 2 cores")


def fuse(module: nn.Module) -> tuple[ir.Graph, ir.Graph, passes.PassContext]:
    g = passes.canonicalize(capture(module, (hidden(),)))
    ctx = passes.PassContext()
    out = fuse_hc(g, ctx)
    ir.verify(out)
    return g, out, ctx


def hc_ops(g: ir.Graph) -> collections.Counter:
    return collections.Counter(n.name for n in g.ops if n.name.startswith("hc."))


def assert_equals_eager(module: nn.Module, fused: ir.Graph) -> None:
    with torch.no_grad():
        want = module(hidden())
    (got,) = ir.interpret(fused, hidden(), params=params(module))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hf_hc_modules_fuse_and_equal_eager() -> None:
    module = Streams(hf_config()).eval()
    _, out, ctx = fuse(module)
    assert hc_ops(out) == {"hc.pre": 2, "hc.post": 2, "hc.head": 1}
    assert {n.attrs["iters"] for n in out.ops if n.name == "hc.pre"} == {20}
    assert {n.attrs["norm_eps"] for n in out.ops if n.name in ("hc.pre", "hc.head")} == {1e-5}
    assert not any(n.name in ("softmax", "div", "sigmoid") for n in out.ops)
    assert sum(ctx.near_misses.values()) == 0
    assert_equals_eager(module, out)


@SLOW  # ~25 s: the symbolic capture
def test_symbolic_batch_and_length_and_bf16() -> None:
    """One capture with symbolic B, T serves other shapes; a bf16 model fuses too (the ops
    compute in fp32 and round once where HF rounds post, comb and each product: measured 0.6%
    of the largest value apart, both 0.4% from the fp32 model)."""
    module = Streams(hf_config()).eval()
    dynamic = {"h": {0: "B", 1: "T"}}
    out = fuse_hc(passes.canonicalize(capture(module, (hidden(),), dynamic=dynamic)))
    assert hc_ops(out) == {"hc.pre": 2, "hc.post": 2, "hc.head": 1}
    h = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = module(h)
    (got,) = ir.interpret(out, h, params=params(module))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    module = module.to(torch.bfloat16)
    h = hidden().bfloat16()
    out = fuse_hc(passes.canonicalize(capture(module, (h,))))
    assert hc_ops(out) == {"hc.pre": 2, "hc.post": 2, "hc.head": 1}
    with torch.no_grad():
        want = module(h)
    (got,) = ir.interpret(out, h, params=params(module))
    assert got.dtype == torch.bfloat16
    largest = want.float().abs().max()  # error relative to the largest value, as test_hf_models
    assert (got.float() - want.float()).abs().max() <= 2**-7 * largest  # one bf16 ulp of it


@pytest.mark.parametrize("iters", [1, 3])
def test_sinkhorn_length_follows_the_config(iters: int) -> None:
    cfg = hf_config(iters)
    module = Streams(cfg, lambda c: SinkhornAxes(c, hf_axes(iters))).eval()
    _, out, _ = fuse(module)
    assert hc_ops(out) == {"hc.pre": 2, "hc.post": 2, "hc.head": 1}
    assert {n.attrs["iters"] for n in out.ops if n.name == "hc.pre"} == {iters}
    assert_equals_eager(module, out)


def test_sinkhorn_starting_on_rows_is_a_near_miss() -> None:
    """A Sinkhorn normalising rows first is not hc.pre's: nothing forms, the graph stays exact,
    and explain names the sub-pattern and the line of the offending normalisation."""
    module = Streams(hf_config(), lambda c: SinkhornAxes(c, (-1, -2) * 3)).eval()
    g, out, ctx = fuse(module)
    assert hc_ops(out) == {"hc.post": 2, "hc.head": 1}
    assert ctx.near_misses["fuse_hc.hc.pre"] == 2
    assert_equals_eager(module, out)
    text = str(passes.explain(RULES[0], g))
    assert "failed at comb.sinkhorn" in text, text
    assert "step 1 normalises dim 3; Sinkhorn starts with the columns (dim 2)" in text, text
    assert "= sum(%" in text and f"@ hf_hc_modules.py:{SINKHORN_LINE}" in text, text


def test_sinkhorn_ending_on_rows_keeps_the_extra_step() -> None:
    """One normalisation too many (ending on rows): hc.pre takes the alternation up to its last
    column step (iters=2) and the extra row step stays in the graph, reading the op's comb."""
    module = Streams(hf_config(), lambda c: SinkhornAxes(c, hf_axes(2) + (-1,))).eval()
    _, out, _ = fuse(module)
    assert hc_ops(out) == {"hc.pre": 2, "hc.post": 2, "hc.head": 1}
    assert {n.attrs["iters"] for n in out.ops if n.name == "hc.pre"} == {2}
    assert sum(n.name == "div" for n in out.ops) == 2  # one row step per layer
    assert_equals_eager(module, out)


def test_rms_over_the_wrong_dim_is_a_near_miss() -> None:
    """(x·r)·fnᵀ = (x·fnᵀ)·r only for one r per row: an RMS mean over the sequence is left alone
    and explained."""
    module = Streams(hf_config(), lambda c: SinkhornAxes(c, hf_axes(20), norm_dim=1)).eval()
    g, out, _ = fuse(module)
    assert hc_ops(out) == {"hc.post": 2, "hc.head": 1}
    assert_equals_eager(module, out)
    text = str(passes.explain(RULES[0], g))
    assert "failed at pre: " in text, text
    assert "the RMS mean runs over dims [1], not the last dim (2)" in text, text
    assert "@ hf_hc_modules.py:" in text, text


# --- the whole model: HF DeepseekV4ForCausalLM vs models.deepseek_v4 with the same config ------

def ours_config(hf: dict):
    """models.config.Config of a transformers 5.x DeepseekV4Config dict (from_hf reads the
    official config.json's `compress_ratios` / `num_hash_layers`; 5.x spells them per layer)."""
    from models.config import Config

    rates = hf["compress_rates"]
    legacy = {
        "compress_ratios": [rates.get(t, 0) for t in hf["layer_types"]],
        "num_hash_layers": hf["mlp_layer_types"].count("hash_moe"),
    }
    return Config.from_hf({**hf, **legacy})


@SLOW  # ~1 min
def test_hf_deepseek_v4_forms_the_hc_ops_of_ours() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "frontend"))
    import hf_tiny

    from models.deepseek_v4 import Transformer

    hf = hf_tiny.deepseek_v4()
    ids = hf_tiny.tokens(1, 16)
    torch.manual_seed(0)
    ours = Transformer(ours_config(hf.config.to_dict())).eval()
    counts = []
    for model, method in ((hf, "forward"), (ours, "prefill")):
        fused = passes.pipeline(capture(model, (ids,), method=method))
        counts.append(hc_ops(fused))
        if model is hf:
            with torch.no_grad():
                want = hf(ids).logits
            (got,) = ir.interpret(fused, ids, params=params(hf))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert counts[0] == counts[1] == {"hc.pre": 4, "hc.post": 4, "hc.head": 1}, counts
