"""Ahead-of-time compilation of generated kernels for GPU targets (no GPU needed), with
registers, shared memory and spills read from the binaries."""

from __future__ import annotations

import struct

import pytest

from backends.targets import get_target
from backends.triton import TritonBackend
from backends.triton import samples as bodies
from backends.triton.aot import aot_compile, format_table
from backends.triton.binary import msgpack_loads
from ir import DType


def test_aot_rmsnorm_for_sm90_and_gfx942(tmp_path):
    exe = TritonBackend().compile(bodies.wrap(bodies.rmsnorm(dim=4096, dtype=DType.bf16)))
    try:
        results = aot_compile(exe, ["sm_90", "gfx942"], keep_dir=tmp_path)
    except RuntimeError as e:  # e.g. a triton wheel without the GPU backends' toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert [(r.kernel, r.target) for r in results] == [
        ("fused_rmsnorm", "sm_90"),
        ("fused_rmsnorm", "gfx942"),
    ]
    for r in results:
        assert r.error is None, r.error
        assert 0 < r.registers <= 255 and r.spills == 0
        assert r.shared is not None and r.shared < 227 * 1024
        assert r.constexprs == {"BLOCK_M": 1, "BLOCK_N": 4096}
    nv, amd = results
    assert amd.sgprs is not None and nv.sgprs is None
    suffixes = sorted(p.rsplit(".", 1)[1] for r in results for p in r.files)
    assert suffixes == ["amdgcn", "cubin", "hsaco", "ptx"]
    assert (tmp_path / "sm_90" / f"fused_rmsnorm_{nv.key}.ptx").read_text().count(".entry") == 1
    table = format_table(results)
    assert "fused_rmsnorm  sm_90" in table and "gfx942" in table


def test_aot_failure_is_a_row_not_a_crash():
    from backends.triton.emitters import AotVariant

    exe = TritonBackend().compile(bodies.wrap(bodies.rmsnorm(dim=64)))
    launch = exe.steps[0].launch
    bad = AotVariant({"BLOCK_M": 1, "BLOCK_N": 16}, {"num_warps": 4})  # a row of 64 won't fit
    launch.aot_variants = lambda env, target: [bad]
    try:
        (result,) = aot_compile(exe, ["sm_90"])
    except RuntimeError as e:
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert result.registers is None
    assert "a row of 64 fits one block" in result.error
    assert "error:" in format_table([result])


def test_msgpack_subset():
    blob = b"\x82\xa1a\x93\x01\xcd\x01\x00\xd0\xff\xa4name\xc3"
    assert msgpack_loads(blob) == {"a": [1, 256, -1], "name": True}
    long_str = b"\xd9\x05hello"
    assert msgpack_loads(long_str) == "hello"
    assert msgpack_loads(b"\xcb" + struct.pack(">d", 1.5)) == 1.5


def test_spills_are_detected():
    """Capping registers at 32 (ptxas maxnreg) makes the 4096-wide RMSNorm spill on sm_90."""
    from backends.triton.emitters import AotVariant

    exe = TritonBackend().compile(bodies.wrap(bodies.rmsnorm(dim=4096, dtype=DType.bf16)))
    launch = exe.steps[0].launch
    (normal,) = launch.aot_variants({bodies.T: 4}, get_target("sm_90"))
    tight = AotVariant(normal.constexprs, {**normal.options, "maxnreg": 32}, normal.hints)
    launch.aot_variants = lambda env, target: [tight]
    try:
        (result,) = aot_compile(exe, ["sm_90"])
    except RuntimeError as e:
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert result.error is None and result.registers <= 32
    assert result.spills > 0 and result.stack_bytes > 0  # spill-store bytes from ptxas


def test_sin_cos_stack_is_not_a_spill():
    """libdevice's sin/cos keep an argument-reduction array on the stack: no spill."""
    import ir

    b = ir.Builder(name="rope")
    x = b.input("x", ir.TensorType((bodies.T, 64), DType.f32))
    b.output(b.op("mul", [b.op("sin", [x]), b.op("cos", [x])]))
    body = b.build()
    exe = TritonBackend().compile(bodies.wrap(body))
    try:
        (result,) = aot_compile(exe, ["sm_80"])
    except RuntimeError as e:
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert result.error is None and result.stack_bytes > 0 and result.spills == 0
