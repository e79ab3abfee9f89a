"""Targets table, Backend protocol and the reference backend."""

from __future__ import annotations

import pytest
import torch

import ir
from backends.base import Backend, EmitterTable, Executable
from backends.reference import ReferenceBackend
from backends.targets import GPU_TARGETS, TARGETS, UnknownTargetError, get_target
from backends.triton import TritonBackend
from backends.triton import samples as bodies


def test_targets_table_is_complete():
    gpus = ("sm_80", "sm_90", "sm_100", "sm_120", "gfx942", "gfx950")
    assert set(TARGETS) == {"cpu", *gpus, "opencl", "webgpu"}
    assert GPU_TARGETS == gpus  # binaries ahead of time; opencl/webgpu are source only
    assert [n for n, t in TARGETS.items() if t.source_only] == ["opencl", "webgpu"]
    for t in TARGETS.values():
        assert t.peak_bf16_flops > 1e12 and t.hbm_bandwidth > 1e11 and t.smem_per_block > 0
    assert get_target("sm_90").smem_per_block == 227 * 1024
    assert get_target("gfx942").warp_size == 64 and get_target("sm_80").warp_size == 32


def test_gpu_target_triples():
    t = get_target("gfx950").gpu_target()
    assert (t.backend, t.arch, t.warp_size) == ("hip", "gfx950", 64)
    t = get_target("sm_120").gpu_target()
    assert (t.backend, t.arch, t.warp_size) == ("cuda", 120, 32)
    with pytest.raises(ValueError, match="not a GPU"):
        get_target("cpu").gpu_target()
    with pytest.raises(ValueError, match="TVM backend only"):
        get_target("opencl").gpu_target()


def test_unknown_target_lists_known_ones():
    with pytest.raises(UnknownTargetError) as e:
        get_target("sm_89")
    msg = str(e.value)
    assert "unknown target 'sm_89'" in msg
    for name in TARGETS:
        assert name in msg
    with pytest.raises(UnknownTargetError):
        TritonBackend().compile(bodies.wrap(bodies.swiglu()), "h100")


def test_backends_follow_the_protocol():
    for backend in (ReferenceBackend(), TritonBackend()):
        assert isinstance(backend, Backend)
        exe = backend.compile(bodies.wrap(bodies.swiglu()), "cpu")
        assert isinstance(exe, Executable)


def test_emitter_table_checker_and_reasons():
    table: EmitterTable = EmitterTable("toy")

    @table.register("exp", check=lambda n: n.result.dtype == ir.DType.f32 or "f32 only")
    def emit_exp(node):
        return "exp!"

    b = ir.Builder()
    x = b.input("x", ir.TensorType((4,), ir.DType.f32))
    h = b.input("h", ir.TensorType((4,), ir.DType.bf16))
    b.output(b.op("exp", [x]), b.op("exp", [h]), b.op("log", [x]))
    g = b.build()
    assert table.supports(g.ops[0]) is True
    assert table.supports(g.ops[1]) == "f32 only"
    assert table.supports(g.ops[2]) == "no toy emitter for log"
    with pytest.raises(ValueError, match="already registered"):
        table.register("exp")(emit_exp)


def test_reference_backend_equals_interpret():
    g = bodies.wrap(bodies.rmsnorm())
    x, w = torch.randn(3, 64), torch.randn(64)
    exe = ReferenceBackend().compile(g)
    (got,) = exe(x, params={"weight": w})
    (want,) = ir.interpret(g, x, params={"weight": w})
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert exe.report()["fallbacks"] == {}


def test_backend_registry():
    import backends

    assert isinstance(backends.get_backend("triton"), TritonBackend)
    assert isinstance(backends.get_backend("reference"), ReferenceBackend)
    with pytest.raises(ValueError, match="known backends: reference, triton, tvm"):
        backends.get_backend("xla")
