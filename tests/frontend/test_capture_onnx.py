"""The ONNX frontend: a file written by `torch.onnx.export` -> torch-mlir -> IR, checked against
eager PyTorch. Weights become parameter inputs named as in the module's state_dict.

What cannot go this way: the whole MoE layer of the model. The TorchScript ONNX exporter stops at
its expert sort ("ONNX export of operator Sort, Out parameter is not supported"), and its grouped
GEMM is a custom op (`dsv4c_models::grouped_mm`) with no ONNX form; the dynamo-based exporter
needs `onnxscript`, which dsv4c does not depend on. Its shared expert (clamped SwiGLU) is tested.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ir
from frontend.capture import CaptureError
from frontend.mlir import capture_onnx, onnx_weights
from models.deepseek_v4 import Config
from models.moe import SharedExpert

pytest.importorskip("onnx")
pytest.importorskip("torch_mlir")
# The TorchScript exporter is deprecated but is the one that needs no onnxscript.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ATOL = 1e-5


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.up(self.norm(x)))
        return torch.log_softmax(self.down(h) / 3.0, dim=-1)


def _export(module: nn.Module, x: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(
        module, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "T"}}
    )
    return path


def test_small_module_round_trip(tmp_path: Path) -> None:
    module = _Head().eval()
    graph = capture_onnx(_export(module, torch.randn(4, 8), tmp_path / "head.onnx"))
    (x,) = graph.inputs_with_role("activation")
    assert x.name == "x" and x.type.shape == (ir.sym("T"), 8)
    params = {v.name for v in graph.inputs_with_role("parameter")}
    assert params == set(module.state_dict())
    assert {"up", "down"} <= {node.loc.module for node in graph.ops if node.loc}
    for t in (3, 17):
        x = torch.randn(t, 8)
        (got,) = ir.interpret(graph, x, params=module.state_dict())
        assert (got - module(x)).abs().max().item() <= ATOL


def test_shared_expert_of_tiny(tmp_path: Path) -> None:
    torch.manual_seed(0)
    expert = SharedExpert(Config.preset("tiny")).eval()
    x = torch.randn(6, Config.preset("tiny").dim) * 4  # large enough that the clamp binds
    path = _export(expert, x, tmp_path / "expert.onnx")
    graph = capture_onnx(path)
    mnemonics = {node.name for node in graph.ops}
    assert {"matmul", "clamp"} <= mnemonics or {"matmul", "minimum"} <= mnemonics, mnemonics
    x = torch.randn(11, x.shape[1]) * 4
    # The exporter stores these weights transposed under its own names (onnx::MatMul_25):
    # the file's initializers are the parameters.
    (got,) = ir.interpret(graph, x, params=onnx_weights(path))
    assert (got - expert(x)).abs().max().item() <= ATOL


def test_unreadable_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(CaptureError, match=r"bad\.onnx: not a readable ONNX model"):
        capture_onnx(bad)


def test_onnx_module_compiles_and_runs_with_tvm(tmp_path: Path) -> None:
    """End to end: ONNX file -> IR -> pass pipeline -> TVM (llvm, this CPU) -> eager's output."""
    pytest.importorskip("tvm")
    import passes
    from backends.tvm import TVMBackend

    module = _Head().eval()
    graph = passes.pipeline(capture_onnx(_export(module, torch.randn(4, 8), tmp_path / "h.onnx")))
    exe = TVMBackend().compile(graph, "cpu")
    x = torch.randn(9, 8)
    (got,) = exe(x, params=module.state_dict())
    want = module(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item() + 1e-5
    report = exe.report()
    assert sum(k["calls"].get("tvm", 0) for k in report["kernels"]) >= 3  # norm, GEMMs, softmax
    assert {f["op"] for f in report["fallbacks"]} <= {"permute"}  # weight transposes only
