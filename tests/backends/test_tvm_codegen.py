"""GPU code from the TVM backend without a GPU: CUDA source for sm_90 compiled to a cubin by
nvcc, OpenCL and WebGPU source, for every kernel of a small graph (matmul + softmax + a fused
norm body, symbolic T)."""

from __future__ import annotations

import shutil

import pytest

import ir

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


@pytest.mark.parametrize("kind", ["opencl", "webgpu"])
def test_opencl_and_webgpu_source(kind):
    src = device_source(small_graph(), "sm_90", kind=kind)
    assert len(src.kernels) == 5 and src.source
    assert ("__kernel" in src.source) if kind == "opencl" else ("@compute" in src.source)


def test_cuda_needs_an_nvidia_target():
    with pytest.raises(ValueError, match="NVIDIA"):
        device_source(small_graph(), "gfx942")
