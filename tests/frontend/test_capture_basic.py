"""Capture of small modules: each translation checked against eager PyTorch, and the errors."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ir
from frontend import CaptureError, UnsupportedOpError, capture


def _check(module: nn.Module, inputs: tuple, *, dynamic=None, atol=1e-6) -> ir.Graph:
    graph = capture(module, inputs, dynamic=dynamic)
    got = ir.interpret(graph, *inputs, params=module.state_dict())
    want = module(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-6)
    return graph


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Parameter(torch.randn(16, 32) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.up(x)) * torch.sigmoid(x.sum(-1, keepdim=True))
        return h @ self.down.T  # the x @ w.T spelling of F.linear


def test_mlp_matches_eager_and_names_parameters() -> None:
    torch.manual_seed(0)
    module = Mlp()
    graph = _check(module, (torch.randn(3, 5, 16),))
    params = {v.name for v in graph.inputs if graph.role(v) == "parameter"}
    assert params == {"up.weight", "up.bias", "down"}
    assert [v.name for v in graph.inputs if graph.role(v) == "activation"] == ["x"]


class Router(nn.Module):
    """Softmax, top-k, gather, scatter_add, cumsum, argsort: the MoE routing vocabulary."""

    def __init__(self, experts: int = 8) -> None:
        super().__init__()
        self.gate = nn.Linear(16, experts, bias=False)
        self.experts = experts

    def forward(self, x: torch.Tensor):
        scores = F.softplus(self.gate(x).float()).sqrt()
        weights, idx = scores.topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        flat = idx.flatten()
        counts = torch.zeros(self.experts, dtype=torch.long).scatter_add(
            0, flat, torch.ones_like(flat)
        )
        order = torch.argsort(flat, stable=True)
        return weights, idx, torch.cumsum(counts, 0), order


def test_router_matches_eager_with_symbolic_tokens() -> None:
    torch.manual_seed(0)
    module = Router()
    graph = _check(module, (torch.randn(7, 16),), dynamic={"x": {0: "N"}})
    assert ir.sym("N") in graph.inputs[-1].type.shape or any(
        ir.sym("N") in v.type.shape for v in graph.inputs
    )
    # The same symbolic graph serves another token count.
    x = torch.randn(11, 16)
    got = ir.interpret(graph, x, params=module.state_dict())
    for g, w in zip(got, module(x)):
        torch.testing.assert_close(g, w)


class Blocks(nn.Module):
    """Symbolic reshapes: T // 4 blocks of 4, a causal mask from iota, a window gather."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        nb = t // 4
        blocks = x[:, : nb * 4].view(b, nb, 4, c).softmax(dim=2).sum(2)
        pos = torch.arange(t)
        window = (pos[:, None] - torch.arange(3)[None, :]).clamp(min=0)
        gathered = x[:, window]  # [b, t, 3, c]
        causal = pos[None, :] > pos[:, None]
        scores = (x @ x.transpose(1, 2)).masked_fill(causal, float("-inf")).softmax(-1)
        return blocks, gathered.mean(2) + scores @ x


@pytest.mark.parametrize("t", [9, 16])
def test_symbolic_blocks_and_masks(t: int) -> None:
    torch.manual_seed(0)
    module = Blocks()
    graph = capture(module, (torch.randn(2, 13, 8),), dynamic={"x": {0: "B", 1: "T"}})
    x = torch.randn(2, t, 8)
    for g, w in zip(ir.interpret(graph, x), module(x)):
        torch.testing.assert_close(g, w)


def test_roundtrip_of_captured_graph() -> None:
    graph = capture(Router(), (torch.randn(7, 16),), dynamic={"x": {0: "N"}})
    assert ir.structurally_equal(ir.parse(ir.to_text(graph)), graph)


def _line_of(code: str) -> str:
    lines, start = inspect.getsourcelines(Mlp.forward)
    offset = next(i for i, line in enumerate(lines) if code in line)
    return f"test_capture_basic.py:{start + offset}"


def test_provenance_names_module_and_source_line() -> None:
    graph = capture(Mlp(), (torch.randn(2, 16),))
    locs = [(n.name, n.loc.module, n.loc.source) for n in graph.ops]
    silu_line, down_line = _line_of("F.silu(self.up(x))"), _line_of("h @ self.down.T")
    assert ("matmul", "up", silu_line) in locs  # inside nn.Linear: module path of the Linear
    assert ("silu", "", silu_line) in locs  # the user's line, not torch's
    assert ("matmul", "", down_line) in locs


class Nonzero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).cummax(dim=-1).values


def test_unsupported_op_names_op_module_and_line() -> None:
    with pytest.raises(UnsupportedOpError) as info:
        capture(Nonzero(), (torch.randn(3, 4),))
    message = str(info.value)
    assert "aten.cummax" in message
    assert "test_capture_basic.py:" in message and ".cummax(dim=-1)" in message
    assert "frontend/aten.py" in message  # says how to fix


def test_unknown_dynamic_input_is_a_clear_error() -> None:
    with pytest.raises(CaptureError, match=r"dynamic= names \['y'\].*inputs are \['x'\]"):
        capture(Mlp(), (torch.randn(2, 16),), dynamic={"y": {0: "B"}})


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(CaptureError, match="has no method 'decode'"):
        capture(Mlp(), (torch.randn(2, 16),), method="decode")
