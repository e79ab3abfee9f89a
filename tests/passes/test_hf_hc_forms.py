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
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ir
import passes
from frontend import capture
from passes.fuse_hc import RULES, fuse_hc

hf_v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
N, D = 4, 16  # streams, hidden size


def hf_config(iters: int = 20):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(
        hidden_size=D, hc_mult=N, hc_sinkhorn_iters=iters, hc_eps=1e-6, rms_norm_eps=1e-5
    )


class SinkhornAxes(hf_v4.DeepseekV4HyperConnection):
    """HF's forward with the Sinkhorn normalisations spelled as a list of axes (HF's own:
    -2, then iters - 1 times (-1, -2)) and the RMS mean over `norm_dim` (HF's own: -1)."""

    def __init__(self, cfg, axes: tuple[int, ...], norm_dim: int = -1) -> None:
        super().__init__(cfg)
        self.axes, self.norm_dim = axes, norm_dim

    def forward(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, n, eps = *streams.shape[:2], self.hc_mult, self.hc_eps
        flat = streams.view(b, s, -1).float()
        flat = flat * torch.rsqrt(flat.square().mean(self.norm_dim, keepdim=True) + 1e-5)
        pre_w, post_w, comb_w = F.linear(flat, self.fn.float()).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        a_pre, a_post, a_comb = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * a_pre + pre_b) + eps
        post = 2 * torch.sigmoid(post_w * a_post + post_b)
        comb = torch.softmax(comb_w.view(b, s, n, n) * a_comb + comb_b.view(n, n), dim=-1) + eps
        for axis in self.axes:
            comb = comb / (comb.sum(dim=axis, keepdim=True) + eps)  # SINKHORN_STEP
        return post, comb, (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def _line_of(fn, marker: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return next(start + i for i, text in enumerate(lines) if marker in text)


SINKHORN_LINE = _line_of(SinkhornAxes.forward, "SINKHORN_STEP")


def hf_axes(iters: int) -> tuple[int, ...]:
    return (-2,) + (-1, -2) * (iters - 1)


class Streams(nn.Module):
    """The mHC parts of HF's DeepSeek-V4: expanded embeddings, two decoder-layer mixes (attention
    and MLP replaced by one linear each, post spelled as in DeepseekV4DecoderLayer), the head."""

    def __init__(self, cfg, hc=None) -> None:
        super().__init__()
        make = hc or hf_v4.DeepseekV4HyperConnection
        self.mixes = nn.ModuleList([make(cfg), make(cfg)])
        self.blocks = nn.ModuleList([nn.Linear(D, D, bias=False) for _ in range(2)])
        self.hc_head = hf_v4.DeepseekV4HyperHead(cfg)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # HF leaves these uninitialised (torch.empty) until _init_weights
            for name, p in self.named_parameters():
                scale = 0.5 if name.endswith(("base", "scale")) else 0.1
                p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def forward(self, h: Tensor) -> Tensor:
        x = h.unsqueeze(2).expand(-1, -1, N, -1).contiguous()
        for mix, block in zip(self.mixes, self.blocks):
            post, comb, collapsed = mix(x)
            out = block(collapsed)
            x = post.to(x.dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
                comb.to(x.dtype).transpose(-1, -2), x
            )
        return self.hc_head(x)


def hidden() -> Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))


def fuse(module: nn.Module) -> tuple[ir.Graph, ir.Graph, passes.PassContext]:
    g = passes.canonicalize(capture(module, (hidden(),)))
    ctx = passes.PassContext()
    out = fuse_hc(g, ctx)
    ir.verify(out)
    return g, out, ctx


def hc_ops(g: ir.Graph) -> collections.Counter:
    return collections.Counter(n.name for n in g.ops if n.name.startswith("hc."))


def params(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_buffers()), **model.state_dict()}


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
    assert f"= sum(%" in text and f"@ test_hf_hc_forms.py:{SINKHORN_LINE}" in text, text


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
    assert "@ test_hf_hc_forms.py:" in text, text


# --- the whole model: HF DeepseekV4ForCausalLM vs models.deepseek_v4 with the same config ------

SLOW = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="~2 min on 2 cores")


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


@SLOW
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
