"""The torch-mlir frontend: PyTorch -> `torch` dialect -> IR, checked against eager PyTorch and
against the torch.export frontend (same op histogram, same fusions)."""

from __future__ import annotations

import collections
import functools

import pytest
import torch
from torch import nn

import ir
import passes
from frontend import capture
from frontend.capture import CaptureError, UnsupportedOpError
from frontend.mlir import capture_mlir
from models.deepseek_v4 import Config, Transformer

pytest.importorskip("torch_mlir")

ATOL = 1e-5


class _Block(nn.Module):
    """Linear, scalar arithmetic on a dynamic size, softmax, reductions, a dtype argument."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.softmax(self.proj(x) * 2.0, dim=-1)
        return h.sum(0, dtype=torch.float32) + x.shape[0] - h.amax(0).to(torch.bfloat16).float()


def test_small_module_is_symbolic_and_equals_eager() -> None:
    module = _Block()
    graph = capture_mlir(module, (torch.randn(5, 8),), dynamic={"x": {0: "T"}})
    (x,) = graph.inputs_with_role("activation")
    assert x.type.shape == (ir.sym("T"), 8)
    assert {v.name for v in graph.inputs_with_role("parameter")} == {"proj.weight", "proj.bias"}
    assert all(
        node.loc and node.loc.source.startswith("test_capture_mlir.py:") for node in graph.ops
    )
    for t in (3, 11):
        x = torch.randn(t, 8)
        (got,) = ir.interpret(graph, x, params=module.state_dict())
        assert (got - module(x)).abs().max().item() <= ATOL


@functools.cache
def _tiny_graphs() -> tuple[Transformer, ir.Graph, ir.Graph]:
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny")).eval()
    tokens = torch.zeros(2, 24, dtype=torch.long)
    dynamic = {"tokens": {0: "B", 1: "T"}}
    via_mlir = capture_mlir(model, (tokens,), dynamic=dynamic, method="prefill")
    via_export = capture(model, (tokens,), dynamic=dynamic, method="prefill")
    return model, via_mlir, via_export


@pytest.mark.parametrize("shape", [(2, 40), (1, 29)])
def test_tiny_prefill_equals_eager(shape: tuple[int, int]) -> None:
    model, graph, _ = _tiny_graphs()
    tokens = torch.randint(
        0, model.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        want = model.prefill(tokens)
    (got,) = ir.interpret(graph, tokens, params=model.state_dict())
    assert (got - want).abs().max().item() <= ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_tiny_prefill_matches_the_export_frontend() -> None:
    """Same op histogram as the torch.export path, before and after the pass pipeline, and the
    pipeline's rules fire the same number of times on both."""
    _, via_mlir, via_export = _tiny_graphs()

    def histogram(g: ir.Graph) -> collections.Counter:
        return collections.Counter(node.name for node in g.ops)

    assert histogram(via_mlir) == histogram(via_export)
    contexts = [passes.PassContext(), passes.PassContext()]
    after = [passes.pipeline(g, ctx=c) for g, c in zip((via_mlir, via_export), contexts)]
    assert histogram(after[0]) == histogram(after[1])
    # the export path resolves a view's -1 from torch's shapes at capture; the MLIR import has
    # none, so `reshape_explicit` does it there: every other rule fires the same number of times
    via_mlir_counts, via_export_counts = (dict(c.counters) for c in contexts)
    assert via_mlir_counts.pop("reshape_explicit", 0) > via_export_counts.pop("reshape_explicit", 0)
    assert via_mlir_counts == via_export_counts
    assert sum(contexts[0].counters.values()) > 0


def test_frozen_tensor_constant_is_rejected_with_its_line() -> None:
    class WithConstant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.tensor([1.0, 2.0, 3.0])

    with pytest.raises(CaptureError, match=r"register it as a buffer") as info:
        capture_mlir(WithConstant(), (torch.randn(4, 3),))
    assert "test_capture_mlir.py:" in str(info.value)


def test_unsupported_op_names_op_and_line() -> None:
    class Cumprod(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumprod(x, dim=0)

    with pytest.raises(UnsupportedOpError, match=r"cumprod") as info:
        capture_mlir(Cumprod(), (torch.randn(4, 3),))
    assert info.value.source.startswith("test_capture_mlir.py:")
