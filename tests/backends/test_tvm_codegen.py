"""GPU code from the TVM backend without a GPU: CUDA source for sm_90 compiled to a cubin by
nvcc, OpenCL and WebGPU source, for every kernel of a small graph (matmul + softmax + a fused
norm body, symbolic T), and CUDA for every kernel of the whole tiny-512 model (prefill and
decode graphs: attention, compressor, indexer, MoE and mHC kernels with symbolic B, T)."""

from __future__ import annotations

import shutil

import pytest
import torch

import ir
import passes

pytest.importorskip("tvm")

from backends.tvm.codegen import device_source, nvcc_cubin

F32 = ir.DType.f32
T = ir.sym("T")


def small_graph() -> ir.Graph:
    bb = ir.Builder(name="rms")
    x = bb.input("x", ir.TensorType((T, 64), F32))
    ms = bb.op("mean", [bb.op("mul", [x, x])], dims=[1], keepdim=True)
    bb.output(bb.op("mul", [x, bb.op("rsqrt", [bb.op("add", [ms, bb.constant(1e-6, F32)])])]))
    body = bb.build()

    b = ir.Builder(name="small")
    x = b.input("x", ir.TensorType((T, 64), F32))
    w = b.input("w", ir.TensorType((64, 48), F32), role="parameter")
    h = b.op("fused.kernel", [x], body=body)
    y = b.op("softmax", [b.op("matmul", [h, w])], dim=-1)
    b.output(b.op("sum", [y], dims=[0]))
    return b.build()


def test_cuda_source_compiles_to_sm90_cubin(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (CUDA toolkit missing)")
    src = device_source(small_graph(), "sm_90")
    assert len(src.kernels) == 5 and not src.skipped  # rms, matmul nn/nt, softmax, sum
    assert src.source.count('extern "C" __global__') >= 5
    cubin = nvcc_cubin(src, tmp_path, "small")
    assert cubin.stat().st_size > 0 and cubin.name == "small.sm_90.cubin"


def tiny_512_graphs() -> list[ir.Graph]:
    """The prefill and decode graphs of tiny-512 after the pass pipeline (B, T symbolic)."""
    from frontend import capture
    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny-512")).eval()
    tokens = torch.zeros(2, 24, dtype=torch.long)
    prefill = capture(model, (tokens,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")
    args = (tokens[:, :1], torch.tensor(23), model.init_cache(2, 32))
    decode = capture(model, args, dynamic={"token": {0: "B"}, "cache": {0: "B"}}, method="decode")
    return [passes.pipeline(prefill), passes.pipeline(decode)]


def test_tiny_512_cuda_compiles_to_sm90_cubin(tmp_path):
    """Every kernel the CPU build of tiny-512 launches has CUDA source, and nvcc takes it all."""
    from backends.tvm.codegen import graph_kernels

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (CUDA toolkit missing)")
    semantic = ["attn_sparse_mqa", "attn_indexer_topk", "moe_route", "moe_experts", "hc_pre"]
    semantic += ["hc_post", "hc_head"]
    for g, name in zip(tiny_512_graphs(), ("prefill", "decode")):
        src = device_source(g, "sm_90")
        assert not src.skipped, src.skipped
        assert sorted(src.kernels) == sorted(k.symbol for k in graph_kernels(g))
        compress = "attn_compress_step" if name == "decode" else "attn_compress"
        for op in [*semantic, compress]:
            assert any(k.startswith(op + "_") for k in src.kernels), (name, op)
        assert src.source.count('extern "C" __global__') >= len(src.kernels)
        cubin = nvcc_cubin(src, tmp_path, f"tiny512_{name}")
        assert cubin.stat().st_size > 0


@pytest.mark.parametrize("kind", ["opencl", "webgpu"])
def test_opencl_and_webgpu_source(kind):
    src = device_source(small_graph(), "sm_90", kind=kind)
    assert len(src.kernels) == 5 and src.source
    assert ("__kernel" in src.source) if kind == "opencl" else ("@compute" in src.source)


def test_cuda_needs_an_nvidia_target():
    with pytest.raises(ValueError, match="NVIDIA"):
        device_source(small_graph(), "gfx942")
