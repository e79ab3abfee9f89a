"""The `moe.route` / `moe.experts` variants the Hugging Face spellings fuse to (issue 15) on both
backends vs the ops' reference: renormalisation with an eps, grouped top-k (DeepSeek-V3's
n_group/topk_group, sigmoid + bias, masked by 0 or -inf), and unclamped SwiGLU experts with and
without the shared expert. Triton runs on the CPU interpreter (conftest)."""

from __future__ import annotations

import pytest
import torch
from backend_graphs import graph_of
from test_tvm_semantic import _use_gpu_ir

import ir
from backends.triton import TritonBackend
from backends.tvm import TVMBackend

GEN = torch.Generator().manual_seed(3)
BACKENDS = {"tvm": TVMBackend, "triton": TritonBackend}


def _t(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * scale


def _run(backend: str, nodes: list, inputs: dict[str, torch.Tensor], gpu_ir: bool = False) -> None:
    """Compile the graph of `nodes` with `backend` (no fallback; `gpu_ir`: TVM's kernels as
    lowered for a GPU, top-k in the kernel, built for this CPU) and compare with the reference:
    expert indices exactly, floats to fp32 rounding (relative to the output's magnitude: the
    unclamped SwiGLU outputs reach ~1e3)."""
    g = graph_of(nodes, inputs)
    exe = BACKENDS[backend]().compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    if gpu_ir:
        _use_gpu_ir(exe)
    args = list(inputs.values())
    for v, got, want in zip(g.outputs, exe(*args), ir.interpret(g, *args)):
        assert got.dtype == want.dtype and got.shape == want.shape, v
        if not want.dtype.is_floating_point:
            assert torch.equal(got, want), (v, got, want)
        else:
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale, msg=str(v))


@pytest.mark.parametrize("backend", ["tvm", "tvm_gpu_ir", "triton"])
def test_route_grouped_and_eps(backend):
    """E = 8 experts in 4 groups of 2 (2 kept), k = 3; renormalised with eps, scaled."""
    n, d, e = 19, 16, 8
    inputs = {"x": _t(n, d), "gate": _t(e, d, scale=0.5), "bias": _t(e, scale=0.2)}
    s = (inputs["x"] @ inputs["gate"].T).sigmoid() + inputs["bias"]
    top = s.reshape(n, 4, 2).sum(-1).sort(-1, descending=True).values
    assert (top[:, 1] - top[:, 2]).min() > 1e-4, "inputs too close to a group tie"
    grouped = {"k": 3, "score": "sigmoid", "bias": True, "n_group": 4, "topk_group": 2}
    nodes = [
        ("moe.route", ["x", "gate", "bias"], {**grouped, "eps": 1e-20, "route_scale": 2.5}),
        ("moe.route", ["x", "gate", "bias"], {**grouped, "group_fill": float("-inf")}),
        ("moe.route", ["x", "gate"], {"k": 2, "score": "softmax", "eps": 0.5}),
    ]
    _run(backend.removesuffix("_gpu_ir"), nodes, inputs, gpu_ir=backend.endswith("gpu_ir"))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_experts_unclamped_swiglu(backend):
    """Activation "swiglu": no clamp (gate values far beyond the unused limit 0.5)."""
    n, d, inter, e, k = 5, 16, 16, 4, 2
    inputs = {
        "x": _t(n, d, scale=3.0),
        "weights": _t(n, k).abs(),
        "experts": torch.tensor([[0, 3], [3, 1], [0, 1], [1, 0], [3, 0]]),  # expert 2 idle
        "w1": _t(e, inter, d),
        "w3": _t(e, inter, d),
        "w2": _t(e, d, inter),
        "s1": _t(8, d),
        "s3": _t(8, d),
        "s2": _t(d, 8),
    }
    routed = ["x", "weights", "experts", "w1", "w3", "w2"]
    plain = {"activation": "swiglu", "limit": 0.5}
    nodes = [
        ("moe.experts", routed, plain),
        ("moe.experts", [*routed, "s1", "s3", "s2"], {**plain, "shared": True}),
    ]
    _run(backend, nodes, inputs)
    clamped = ir.interpret(graph_of([("moe.experts", routed, {"limit": 0.5})], inputs),
                           *inputs.values())[0]
    unclamped = ir.interpret(graph_of(nodes[:1], inputs), *inputs.values())[0]
    assert (clamped - unclamped).abs().max() > 1.0  # the test's inputs do exercise the clamp
