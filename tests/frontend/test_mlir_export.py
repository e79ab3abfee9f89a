"""`ir.to_mlir`: graphs as `torch` dialect MLIR that torch-mlir's bindings parse, and, for graphs
of primitives, lower to linalg-on-tensors."""

from __future__ import annotations

import collections
import functools
import re

import pytest
import torch
from torch import nn

import ir
import passes
from frontend import capture
from frontend.mlir import lower_to_linalg, parse_mlir
from models.deepseek_v4 import Config, Transformer

pytest.importorskip("torch_mlir")


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.softmax(self.up(x) * 0.5, dim=-1)
        return self.down(torch.nn.functional.silu(h)).reshape(-1, 2).mean(0)


def test_primitive_graph_lowers_to_linalg() -> None:
    graph = capture(_Mlp(), (torch.randn(6, 8),), dynamic={"x": {0: "T"}})
    text = ir.to_mlir(graph)
    assert "torch.operator" not in text  # every op has a torch dialect spelling
    assert "%x: !torch.vtensor<[?,8],f32>" in text and 'loc("up"(' in text
    linalg = lower_to_linalg(text)
    assert "linalg.matmul" in linalg and "torch.aten" not in linalg
    assert "tensor<?x8xf32>" in linalg  # the symbolic T survives as a dynamic dim


@functools.cache
def _tiny() -> tuple[ir.Graph, ir.Graph]:
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny")).eval()
    tokens = torch.zeros(2, 24, dtype=torch.long)
    graph = capture(model, (tokens,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")
    return graph, passes.pipeline(graph)


@pytest.mark.parametrize("stage", ["captured", "fused"])
def test_tiny_prefill_parses(stage: str) -> None:
    graph = _tiny()[0 if stage == "captured" else 1]
    module = parse_mlir(ir.to_mlir(graph))
    func = module.body.operations[0]
    ops = func.regions[0].blocks[0].operations
    custom = collections.Counter(
        str(op.attributes["name"]).strip('"').removeprefix("dsv4c.")
        for op in ops
        if op.operation.name == "torch.operator"
    )
    semantic = collections.Counter(
        n.name for n in graph.ops if n.name.split(".")[0] in ("attn", "moe", "hc", "fused")
    )
    for mnemonic, count in semantic.items():  # every semantic op is one named custom op
        assert custom[mnemonic] == count, mnemonic
    if stage == "fused":
        assert custom["attn.sparse_mqa"] == 4 and custom["fused.kernel"] > 0
    assert len(func.arguments) == len(graph.inputs)


def test_custom_op_carries_attributes() -> None:
    fused = _tiny()[1]
    text = ir.to_mlir(fused)
    line = next(ln for ln in text.splitlines() if '"dsv4c.attn.sparse_mqa"' in ln)
    assert re.search(r'variant = "(window|hca|csa)"', line) and "window = " in line
    kernel = next(ln for ln in text.splitlines() if '"dsv4c.fused.kernel"' in ln)
    assert "body = " in kernel  # the body's IR text, parseable by ir.parse
