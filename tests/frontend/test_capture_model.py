"""Capture of the DeepSeek-V4 reference model: the interpreted IR equals eager PyTorch.

Prefill is captured once with symbolic batch and sequence length and run at two lengths; decode
is captured once with a 0-d position and run after a prefill, comparing logits and every cache
tensor. fp32 throughout, max abs error <= 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn

import ir
from frontend import capture
from models.attention import topk_visible
from models.deepseek_v4 import Config, Transformer

ATOL = 1e-5


@functools.cache
def _model(preset: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(Config.preset(preset)).eval()


@functools.cache
def _prefill_graph(preset: str) -> ir.Graph:
    model = _model(preset)
    tokens = torch.zeros(2, 24, dtype=torch.long)
    return capture(model, (tokens,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")


@pytest.mark.parametrize("preset", ["tiny", "tiny-512"])
@pytest.mark.parametrize("shape", [(2, 40), (1, 53)])
def test_prefill_interprets_like_eager(preset: str, shape: tuple[int, int]) -> None:
    model, graph = _model(preset), _prefill_graph(preset)
    tokens = torch.randint(
        0, model.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        want = model.prefill(tokens)
    (got,) = ir.interpret(graph, tokens, params=model.state_dict())
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() <= ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_prefill_graph_is_symbolic_and_names_parameters() -> None:
    graph = _prefill_graph("tiny")
    (tokens,) = graph.inputs_with_role("activation")
    assert tokens.name == "tokens" and tokens.type.shape == (ir.sym("B"), ir.sym("T"))
    names = {v.name for v in graph.inputs_with_role("parameter")}
    # Every state_dict entry is an input, unused ones (the MTP block in prefill) included, so one
    # `params=model.state_dict()` serves every captured method.
    assert names == set(_model("tiny").state_dict())
    assert "layers.1.attn.indexer.weights_proj.weight" in names
    assert "layers.0.ffn.gate.tid2eid" in names  # buffers are parameters of the graph too
    mnemonics = {node.name for node in graph.ops}
    assert {"topk", "grouped_mm", "softmax", "embedding", "matmul"} <= mnemonics


def test_prefill_graph_round_trips_through_text() -> None:
    graph = _prefill_graph("tiny")
    ir.assert_structural_equal(ir.parse(ir.to_text(graph)), graph)


@pytest.mark.parametrize("preset", ["tiny", "tiny-512"])
def test_decode_interprets_like_eager(preset: str) -> None:
    model = _model(preset)
    tokens = torch.randint(
        0, model.cfg.vocab_size, (2, 42), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        cache = model.init_cache(2, 64)
        _, cache = model.prefill(tokens[:, :40], cache)
    graph = capture(
        model, (tokens[:, 40:41], torch.tensor(40), cache),
        dynamic={"token": {0: "B"}, "cache": {0: "B"}}, method="decode",
    )  # fmt: skip
    assert {graph.role(v) for v in graph.inputs if v.name.startswith("cache.")} == {"cache"}
    # Two steps through the same graph: position 40 and 41 (crosses a ratio-4 block boundary).
    for pos in (40, 41):
        token, position = tokens[:, pos : pos + 1], torch.tensor(pos)
        with torch.no_grad():
            want_logits, want_cache = model.decode(token, position, cache)
        got = ir.interpret(graph, token, position, *cache.values(), params=model.state_dict())
        assert (got[0] - want_logits).abs().max().item() <= ATOL
        assert len(got) == 1 + len(want_cache)
        for g, w in zip(got[1:], want_cache.values()):
            assert g.shape == w.shape and (g - w).abs().max().item() <= ATOL
        cache = want_cache


class _Select(nn.Module):
    def forward(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return topk_visible(scores, visible, 4)


def test_indexer_selection_gives_identical_indices() -> None:
    """The selection step (mask, pad, top-k, −1 for masked picks) through a symbolic graph.
    Scores are continuous random values, so there are no ties to break differently."""
    module = _Select()
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 12, 10, generator=gen)
    visible = torch.arange(10)[None, None, :] < (torch.arange(12)[None, :, None] + 1) // 4
    graph = capture(
        module, (scores, visible), dynamic={"scores": {1: "T", 2: "S"}, "visible": {1: "T", 2: "S"}}
    )
    for t, s in ((12, 10), (31, 7)):
        scores = torch.rand(2, t, s, generator=gen)
        visible = torch.arange(s)[None, None, :] < (torch.arange(t)[None, :, None] + 1) // 4
        (got,) = ir.interpret(graph, scores, visible)
        want = module(scores, visible)
        assert torch.equal(got, want)
        assert (want == -1).any() and (want >= 0).any()  # both picks and pads are exercised


def test_repeated_layers_are_traced_once_and_replayed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Six layers of three kinds: three are traced, three replayed, and the graphs (prefill and
    decode) print exactly as a full trace's, provenance included."""
    from frontend import regions

    cfg = dataclasses.replace(
        Config.preset("tiny"), n_layers=6, n_hash_layers=2, compress_ratios=(0, 0, 4, 4, 8, 8, 0)
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    traced = []
    first = regions.Regions._trace_first
    monkeypatch.setattr(
        regions.Regions, "_trace_first", lambda self, *a: traced.append(a[1]) or first(self, *a)
    )
    tokens = torch.randint(0, cfg.vocab_size, (2, 42), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, cache = model.prefill(tokens[:, :40], model.init_cache(2, 64))
    methods = {
        "prefill": ((tokens[:, :24],), {"tokens": {0: "B", 1: "T"}}),
        "decode": ((tokens[:, 40:41], torch.tensor(40), cache), {"token": {0: "B"}, "cache": {0: "B"}}),
    }  # fmt: skip
    graphs = {}
    for method, (inputs, dynamic) in methods.items():
        traced.clear()
        reused = capture(model, inputs, dynamic=dynamic, method=method)
        assert traced == ["layers.0", "layers.2", "layers.4"], traced
        full = capture(model, inputs, dynamic=dynamic, method=method, reuse_layers=False)
        assert ir.to_text(reused) == ir.to_text(full)
        graphs[method] = reused
    with torch.no_grad():
        want_logits, want_cache = model.decode(tokens[:, 40:41], torch.tensor(40), cache)
    got = ir.interpret(
        graphs["decode"],
        tokens[:, 40:41],
        torch.tensor(40),
        *cache.values(),
        params=model.state_dict(),
    )
    assert (got[0] - want_logits).abs().max().item() <= ATOL
    assert all(
        torch.equal(g, w) or (g - w).abs().max() <= ATOL
        for g, w in zip(got[1:], want_cache.values())
    )


def test_v4_flash_decode_captures_on_meta() -> None:
    """The full-size preset on the meta device (no weights): every layer's parameters are inputs
    and the last layer's ops carry its own module path (replayed regions are re-prefixed)."""
    cfg = Config.preset("v4-flash")
    with torch.device("meta"):
        model = Transformer(cfg)
        cache = model.init_cache(2, 1024)
        inputs = (torch.zeros(2, 1, dtype=torch.long), torch.tensor(300), cache)
    graph = capture(model, inputs, dynamic={"token": {0: "B"}, "cache": {0: "B"}}, method="decode")
    params = {v.name for v in graph.inputs_with_role("parameter")}
    assert params == set(model.state_dict())
    last = f"layers.{cfg.n_layers - 1}"
    used = {v.name for node in graph.ops for v in node.operands}
    assert f"{last}.attn.wq_a.weight" in used and f"{last}.ffn.experts.w1" in used
    modules = {node.loc.module.split(".attn")[0].split(".ffn")[0] for node in graph.ops if node.loc}
    assert {f"layers.{i}" for i in range(cfg.n_layers)} <= modules
    assert len(graph.outputs) == 1 + len(cache)
