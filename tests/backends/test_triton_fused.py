"""Generated kernels for fused bodies and lone elementwise/reduction ops, run on the Triton CPU
interpreter and compared with `ir.interpret` (fp32 and bf16, rows and columns that are not
multiples of the tiles)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ir
from backends.triton import TritonBackend, emit_fused
from backends.triton import samples as bodies
from ir import DType, TensorType

GOLDEN = Path(__file__).parent / "golden"
TOL = {DType.f32: dict(rtol=1e-5, atol=1e-5), DType.bf16: dict(rtol=2e-2, atol=4e-2)}


def make_inputs(g: ir.Graph, env: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def tensor(v: ir.Value) -> torch.Tensor:
        shape = [int(ir.symbolic.subs_dim(d, env)) for d in v.shape]
        if v.dtype == DType.bool:
            return torch.rand(shape, generator=gen) > 0.5
        if not v.dtype.is_float:
            return torch.randint(-5, 6, shape, generator=gen).to(v.dtype.to_torch())
        return (3 * torch.randn(shape, generator=gen)).to(v.dtype.to_torch())

    args = [tensor(v) for v in g.inputs if g.roles[v.name] != "parameter"]
    params = {v.name: tensor(v) for v in g.params}
    return args, params


def check(g: ir.Graph, env: dict, dtype: DType = DType.f32, fallbacks: int = 0):
    exe = TritonBackend().compile(g, "cpu")
    assert len(exe.fallbacks()) == fallbacks, exe.fallbacks()
    args, params = make_inputs(g, env)
    got = exe(*args, params=params)
    want = ir.interpret(g, *args, params=params)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        # the interpreter rounds f32 -> bf16 by truncation: allow one bf16 ulp on bf16 outputs
        dtype = DType.bf16 if a.dtype == torch.bfloat16 else dtype
        torch.testing.assert_close(a.float(), b.float(), equal_nan=True, **TOL[dtype])
    return exe


@pytest.mark.parametrize("dtype", [DType.f32, DType.bf16], ids=str)
@pytest.mark.parametrize("rows", [1, 19])
@pytest.mark.parametrize(
    "make", [bodies.rmsnorm, bodies.swiglu, bodies.softmax], ids=lambda f: f.__name__
)
def test_fused_bodies(make, rows, dtype):
    body = make(dtype=dtype)
    exe = check(bodies.wrap(body), {bodies.T: rows}, dtype)
    assert [k["name"] for k in exe.report()["kernels"]] == [f"fused_{body.name}"]


def test_wide_rows_not_a_power_of_two():
    # 1000 columns: one 1024-wide block per row, 24 padded lanes masked out of the reduction
    check(bodies.wrap(bodies.rmsnorm(dim=1000)), {bodies.T: 3})
    check(bodies.wrap(bodies.swiglu(dim=1500)), {bodies.T: 3})  # two column blocks


def _one(mnemonic: str, in_types, **attrs) -> ir.Graph:
    b = ir.Builder(name=mnemonic)
    ins = [b.input(f"x{i}", t) for i, t in enumerate(in_types)]
    out = b.op(mnemonic, ins, **attrs)
    b.output(*(out if isinstance(out, tuple) else (out,)))
    return b.build()


T = bodies.T
F = TensorType((T, 37), DType.f32)
H = TensorType((T, 37), DType.bf16)
ROW = TensorType((T, 1), DType.f32)
COL = TensorType((37,), DType.f32)
I64 = TensorType((T, 37), DType.i64)
B = TensorType((T, 37), DType.bool)
SCALAR = TensorType((), DType.f32)

SINGLE_OPS = [
    ("exp", [F], {}),
    ("rsqrt", [TensorType((T, 37), DType.i64)], {}),  # ints become f32
    ("sigmoid", [H], {}),
    ("tanh", [F], {}),
    ("erf", [F], {}),
    ("relu", [I64], {}),
    ("softplus", [F], {"beta": 2.0, "threshold": 5.0}),
    ("cast", [F], {"dtype": DType.bf16}),
    ("cast", [H], {"dtype": DType.i32}),
    ("cast", [I64], {"dtype": DType.bool}),
    ("logical_not", [B], {}),
    ("sub", [F, ROW], {}),
    ("div", [I64, COL], {}),
    ("maximum", [F, SCALAR], {}),
    ("minimum", [I64, TensorType((T, 37), DType.i32)], {}),
    ("floor", [I64], {}),
    ("ceil", [F], {}),
    ("lt", [F, COL], {}),
    ("add", [B, B], {}),
    ("logical_and", [I64, B], {}),
    ("where", [B, F, ROW], {}),
    ("clamp", [I64], {"min": -2, "max": 3}),
    ("sum", [F], {"dims": (-1,), "keepdim": True}),
    ("sum", [I64], {"dims": (1,)}),
    ("mean", [H], {"dims": (-1,)}),
    ("amin", [F], {"dims": (-1,), "keepdim": True}),
    ("softmax", [H], {"dim": 1}),
    ("log_softmax", [F], {"dim": -1}),
]


@pytest.mark.parametrize(
    "mnemonic,in_types,attrs",
    SINGLE_OPS,
    ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(SINGLE_OPS)],
)
def test_single_ops(mnemonic, in_types, attrs):
    g = _one(mnemonic, in_types, **attrs)
    dtype = DType.bf16 if DType.bf16 in [t.dtype for t in in_types] else DType.f32
    check(g, {T: 6}, dtype)


def test_unsupported_ops_fall_back_with_reasons():
    b = ir.Builder(name="mixed")
    x = b.input("x", F)
    s0 = b.op("sum", [x], dims=(0, 1), keepdim=True, name="total")  # two dims at once
    c = b.op("cumsum", [x], dim=-1, name="running")  # no emitter
    y = b.op("mul", [x, s0], name="y")
    b.output(y, c)
    g = b.build()
    exe = check(g, {T: 4}, fallbacks=2)
    reasons = dict(exe.fallbacks())
    assert "a body reduces one dim" in reasons["sum"]
    assert reasons["cumsum"] == "no triton emitter for cumsum"
    report = exe.report()
    assert [k["name"] for k in report["kernels"]] == ["fused_mul"]
    assert {(f["op"], f["kind"]) for f in report["fallbacks"]} == {
        ("sum", "reduction"),
        ("cumsum", "opaque"),
    }


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    g = bodies.wrap(bodies.swiglu())
    exe = TritonBackend().compile(g, "cpu")
    args, _ = make_inputs(g, {T: 2})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        exe(*args)


def test_source_is_deterministic_and_shared_by_equal_bodies():
    a = emit_fused(bodies.rmsnorm()).source
    b = emit_fused(ir.parse(ir.to_text(bodies.rmsnorm()))).source
    assert a.source == b.source and a.key == b.key
    assert emit_fused(bodies.rmsnorm(dim=128)).source.key != a.key


def _epilogue_source() -> str:
    from backends.targets import get_target
    from backends.triton import emit_node

    g = bodies.wrap(bodies.linear_epilogue(dtype=DType.bf16))
    return emit_node(g.ops[0], get_target("sm_90")).source.source


GOLDEN_KERNELS = {
    "fused_rmsnorm": lambda: emit_fused(bodies.rmsnorm(dtype=DType.bf16)).source.source,
    "fused_scaled_softmax": lambda: emit_fused(bodies.softmax(dtype=DType.bf16)).source.source,
    "matmul_bf16_add_silu_mul": _epilogue_source,
}


@pytest.mark.parametrize("name", sorted(GOLDEN_KERNELS))
def test_golden_sources(name):
    """Diff generated source against the checked-in file (DSV4C_UPDATE_GOLDEN=1 rewrites it)."""
    src = GOLDEN_KERNELS[name]()
    path = GOLDEN / f"{name}.py"
    if os.environ.get("DSV4C_UPDATE_GOLDEN") == "1":
        path.write_text(src)
    want = path.read_text()
    if src != want:
        import difflib

        diff = "".join(difflib.unified_diff(want.splitlines(True), src.splitlines(True)))
        pytest.fail(f"generated {name} differs from {path} (DSV4C_UPDATE_GOLDEN=1):\n{diff}")


def test_reduction_over_a_middle_dim():
    """mHC-like: weight the 4 streams of x [T,4,24] by w [4,1], sum them (dim 1), scale rows."""
    b = ir.Builder(name="hc_sum")
    x = b.input("x", TensorType((T, 4, 24), DType.f32))
    w = b.input("w", TensorType((4, 1), DType.f32))
    scale = b.input("scale", TensorType((T, 1, 24), DType.f32))
    xw = b.op("mul", [x, w], name="weighted")
    s = b.op("sum", [xw], dims=(1,), keepdim=True, name="mixed")
    out = b.op("mul", [s, scale], name="scaled")
    p = b.op("softmax", [xw], dim=1, name="stream_probs")
    b.output(b.op("squeeze", [out], dim=1, name="out"), p)
    g = b.build()
    exe = check(bodies.wrap(g), {T: 5})
    (kernel,) = exe.kernels()
    assert "stride n_inner" in kernel.source and "(rows // n_inner)" in kernel.source
    check(_one("sum", [F], dims=(0,)), {T: 9})  # column sums: the inner stride is the row


def test_rows_longer_than_one_block_fall_back():
    g = _one("softmax", [TensorType((T, 40000), DType.f32)], dim=-1)
    exe = TritonBackend().compile(g, "cpu")
    ((op, reason),) = exe.fallbacks()
    assert op == "softmax" and "exceeds one block" in reason


def test_kernels_are_shared_across_layers():
    """The same body at two layers (different parameter names and value numbers): one kernel."""
    b = ir.Builder(name="two_layers")
    x = b.input("x", F)
    outs = []
    for layer in (0, 3):
        w = b.input(f"layers.{layer}.attn_norm.weight", COL, role="parameter")
        h = b.op("mul", [x, w])
        outs.append(b.op("add", [h, x]))
        outs.append(b.op("mul", [x, b.input(f"layers.{layer}.ffn.weight", COL)]))
    b.output(*outs)
    exe = check(b.build(), {T: 3})
    names = sorted(k.name for k in exe.kernels())
    assert names == ["fused_add", "fused_mul"]  # every x * <...>.weight is one kernel
    assert all("layers" not in k.source and "attn_norm" not in k.source for k in exe.kernels())
    assert "weight_ptr" in next(k.source for k in exe.kernels() if k.name == "fused_mul")


def test_outputs_may_drop_leading_ones_of_the_domain():
    b = ir.Builder(name="squeezed_out")
    x = b.input("x", TensorType((1, 1, 8), DType.f32))
    y = b.input("y", TensorType((1, 8), DType.f32))
    b.output(b.op("add", [x, y], name="s"), b.op("mul", [y, y], name="sq"))
    check(bodies.wrap(b.build()), {})
