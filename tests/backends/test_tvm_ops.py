"""TVM emitters vs the reference interpreter at small fp32 shapes (llvm, this CPU).

A table of samples drives op x shape; each table compiles as one graph (one LLVM module), so
the whole file builds a handful of modules. Edge cases: sizes that are not multiples of the
tiles or vector width, 0-d operands, size-1 broadcasts, reductions over inner/outer dims,
matmuls on transposed (weight) views, inputs at unaligned offsets.
"""

from __future__ import annotations

import pytest
import torch
from backend_graphs import check_guard_paged

import ir

pytest.importorskip("tvm")

from backends.tvm import TVMBackend

F32, I64, BOOL = ir.DType.f32, ir.DType.i64, ir.DType.bool
B, T = ir.sym("B"), ir.sym("T")
ENV = {B: 2, T: 7}  # T = 7: not a multiple of any tile


def _tensor(t: ir.TensorType, gen: torch.Generator) -> torch.Tensor:
    shape = [int(d.subs(ENV)) if not isinstance(d, int) else d for d in t.shape]
    if t.dtype == BOOL:
        return torch.rand(shape, generator=gen) > 0.5
    if t.dtype == I64:
        return torch.randint(-5, 6, shape, generator=gen)
    return torch.randn(shape, generator=gen) + 0.1


def _run(build, blas: str = "never") -> tuple:
    """Build a graph with `build(builder)`, run it with TVM and the interpreter, compare."""
    b = ir.Builder(name="sample")
    outs = build(b)
    b.output(*outs)
    g = b.build()
    gen = torch.Generator().manual_seed(0)
    args = [_tensor(v.type, gen) for v in g.inputs]
    exe = TVMBackend().compile(g, "cpu", blas=blas)
    want = ir.interpret(g, *args)

    def check(got) -> None:
        for v, x, y in zip(g.outputs, got, want):
            assert x.dtype == y.dtype and x.shape == y.shape, v
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, equal_nan=True, msg=str(v))

    check(exe(*args))
    # again with every input against an unreadable page on either side (see test_tvm_semantic)
    check_guard_paged(exe, args, check)
    return exe, args


UNARY = [
    "neg",
    "abs",
    "exp",
    "log1p",
    "sqrt",
    "rsqrt",
    "sigmoid",
    "silu",
    "relu",
    "tanh",
    "sin",
    "cos",
    "reciprocal",
    "erf",
    "softplus",
    "floor",
    "ceil",
    "sign",
]


def test_unary_ops_and_casts():
    def build(b):
        x = b.input("x", ir.TensorType((B, T, 37), F32))
        i = b.input("i", ir.TensorType((T, 5), I64))
        outs = [
            b.op(m, [b.op("abs", [x])] if m in ("sqrt", "rsqrt", "log1p") else [x]) for m in UNARY
        ]
        outs += [b.op("exp", [i]), b.op("cast", [x], dtype=I64), b.op("cast", [i], dtype=BOOL)]
        outs += [b.op("logical_not", [i]), b.op("clamp", [x], min=-0.5, max=0.25)]
        outs += [b.op("clamp", [i], min=1.5)]
        return outs

    exe, _ = _run(build)
    assert not exe.fallbacks(), exe.fallbacks()


BINARY = [
    "add",
    "sub",
    "mul",
    "div",
    "maximum",
    "minimum",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
]


def test_binary_ops_broadcast_and_promote():
    def build(b):
        x = b.input("x", ir.TensorType((B, T, 19), F32))
        y = b.input("y", ir.TensorType((T, 1), F32))
        s = b.input("s", ir.TensorType((), F32))
        i = b.input("i", ir.TensorType((B, 1, 19), I64))
        outs = [b.op(m, [x, y]) for m in BINARY]
        outs += [b.op("mul", [x, s]), b.op("add", [i, s]), b.op("div", [i, i])]
        outs += [b.op("floordiv", [x, y]), b.op("remainder", [i, b.op("clamp", [i], min=1)])]
        outs += [b.op("pow", [b.op("abs", [x]), y]), b.op("sub", [i, x])]
        outs += [b.op("where", [b.op("gt", [x, s]), x, y])]
        return outs

    exe, _ = _run(build)
    assert not exe.fallbacks(), exe.fallbacks()


def test_reductions_and_softmax():
    def build(b):
        x = b.input("x", ir.TensorType((B, T, 33), F32))
        i = b.input("i", ir.TensorType((T, 6), I64))
        outs = [
            b.op("sum", [x], dims=[2], keepdim=True),
            b.op("sum", [x], dims=[0, 2]),
            b.op("mean", [x], dims=[1], keepdim=True),
            b.op("amax", [x], dims=[2]),
            b.op("amin", [x], dims=[1]),
            b.op("prod", [x], dims=[0]),
            b.op("sum", [i], dims=[1]),
            b.op("any", [b.op("gt", [x, x])], dims=[2]),
            b.op("all", [b.op("ge", [x, x])], dims=[2]),
            b.op("softmax", [x], dim=-1),
            b.op("softmax", [x], dim=1),
            b.op("log_softmax", [x], dim=-1),
        ]
        return outs

    exe, _ = _run(build)
    assert not exe.fallbacks(), exe.fallbacks()


def _matmuls(b):
    x = b.input("x", ir.TensorType((B, T, 70), F32))
    w = b.input("w", ir.TensorType((50, 70), F32))  # stored [out, in]: used transposed
    v = b.input("v", ir.TensorType((70, 33), F32))
    bx = b.input("bx", ir.TensorType((B, 1, 70, 9), F32))
    x64 = b.input("x64", ir.TensorType((T, 64), F32))
    w64 = b.input("w64", ir.TensorType((24, 64), F32))
    wt = b.op("permute", [w], dims=[1, 0])
    return [
        b.op("matmul", [x64, b.op("permute", [w64], dims=[1, 0])]),  # nt, K = 64: dot products
        b.op("matmul", [x, wt]),  # nt: reads w as stored
        b.op("matmul", [x, v]),  # nn, N = 33 (not a tile multiple)
        b.op("matmul", [b.op("permute", [bx], dims=[0, 1, 3, 2]), bx]),  # batched, broadcast
    ]


@pytest.mark.parametrize("blas", ["never", "always"])
def test_matmul_layouts_and_blas(blas):
    exe, _ = _run(_matmuls, blas)
    report = exe.report()
    assert {f["op"] for f in report["fallbacks"]} == {"permute"}
    if blas == "always":
        assert len(report["blas_calls"]) == 4
    else:
        assert not report["blas_calls"]
        names = {k["name"].split("_")[1] for k in report["kernels"]}
        assert names == {"nn"}  # keys name the first variant; both layouts built
        assert len(exe.kernels()) == 8


def test_fused_body_with_constants_iota_and_unaligned_views():
    """A fused body (rms norm with a constant eps, an iota mask) on a column slice of a row."""
    bb = ir.Builder(name="body")
    x = bb.input("x", ir.TensorType((T, 24), F32))
    sq = bb.op("mul", [x, x])
    ms = bb.op("mean", [sq], dims=[1], keepdim=True)
    r = bb.op("rsqrt", [bb.op("add", [ms, bb.constant(1e-6, F32)])])
    pos = bb.op("iota", [], start=0, end=24, dtype=I64)
    keep = bb.op("lt", [pos, bb.constant(T - 1, I64)])
    y = bb.op("where", [keep, bb.op("mul", [x, r]), bb.constant(0.0, F32)])
    bb.output(y)
    body = bb.build()

    def build(b):
        row = b.input("row", ir.TensorType((T, 25), F32))
        xs = b.op("slice", [row], dim=1, start=1, end=25)  # an unaligned view
        return [b.op("fused.kernel", [xs], body=body)]

    exe, _ = _run(build)
    assert [k.fused_ops for k in exe.kernels()] == [tuple(n.name for n in body.ops)]


def test_kernels_are_shared_and_sizes_stay_symbolic():
    def build(b):
        x = b.input("x", ir.TensorType((B, T, 16), F32))
        y = b.op("exp", [x])
        z = b.op("exp", [b.op("neg", [y])])  # same signature as the first exp: one kernel
        return [z]

    exe, _ = _run(build)
    assert len(exe.kernels()) == 2
    x = torch.randn(3, 11, 16)
    (got,) = exe(x)
    torch.testing.assert_close(got, torch.exp(-torch.exp(x)))
    uses = {k["ops"][0]: k["uses"] for k in exe.report()["kernels"]}
    assert uses == {"exp": 2, "neg": 1}


def test_repeat_is_a_kernel():
    """repeat copies (not a view): standalone it runs a TVM kernel, with symbolic dims, a
    repeated dim of size 1, and leading repeats that add dims."""

    def build(b):
        x = b.input("x", ir.TensorType((B, 1, 5), F32))
        return [b.op("repeat", [x], repeats=(1, 4, 1)), b.op("repeat", [x], repeats=(3, 1, 2, 2))]

    exe, _ = _run(build)
    assert not exe.fallbacks()


def test_fused_body_with_data_movement():
    """reshape/permute/expand/slice/select/unsqueeze/squeeze/concat/pad inside one fused body."""
    bb = ir.Builder(name="moves")
    x = bb.input("x", ir.TensorType((T, 6, 4), F32))
    flat = bb.op("reshape", [x], shape=[T, 24])
    back = bb.op("reshape", [flat], shape=[T, 4, 6])
    perm = bb.op("permute", [x], dims=[0, 2, 1])
    both = bb.op("add", [back, perm])
    cat = bb.op("concat", [both, bb.op("slice", [perm], dim=2, start=1, end=6, step=2)], dim=2)
    row = bb.op(
        "unsqueeze",
        [
            bb.op(
                "select",
                [
                    x,
                ],
                dim=1,
                index=-1,
            )
        ],
        dim=1,
    )
    wide = bb.op("expand", [row], shape=[T, 4, 4])
    padded = bb.op("pad", [wide], pads=[2, 3, 0, 0], value=-1.0)
    out = bb.op("mul", [bb.op("squeeze", [bb.op("unsqueeze", [cat], dim=0)], dim=0), padded])
    bb.output(out)
    body = bb.build()

    def build(b):
        x = b.input("x", ir.TensorType((T, 6, 4), F32))
        return [b.op("fused.kernel", [x], body=body)]

    exe, _ = _run(build)
    assert not exe.fallbacks(), exe.fallbacks()


@pytest.mark.parametrize("blas", ["never", "always"])
def test_gemm_epilogue_kernel_or_blas(blas):
    """A fused GEMM + epilogue (bias row, silu): the kernel, or BLAS then the epilogue."""

    def build(b):
        x = b.input("x", ir.TensorType((B, T, 40), F32))
        w = b.input("w", ir.TensorType((40, 24), F32))
        bias = b.input("bias", ir.TensorType((T, 24), F32))
        bb = ir.Builder(name="gemm")
        xs, ws, bs = (bb.input(v.name, v.type) for v in (x, w, bias))
        bb.output(bb.op("silu", [bb.op("add", [bb.op("matmul", [xs, ws]), bs])]))
        return [b.op("fused.kernel", [x, w, bias], body=bb.build())]

    exe, _ = _run(build, blas)
    assert not exe.fallbacks(), exe.fallbacks()
    assert len(exe.report()["blas_calls"]) == (1 if blas == "always" else 0)


def test_inputs_checked_on_every_call_parameters_once_per_tensor_set():
    """A call with the same parameter tensors checks only the activations; other parameter
    tensors are checked again. Every error names the input."""
    from ir.interpreter import InterpretError

    b = ir.Builder(name="linear")
    x = b.input("x", ir.TensorType((B, 16), F32))
    w = b.input("w", ir.TensorType((16, 8), F32), role="parameter")
    b.output(b.op("matmul", [x, w]))
    exe = TVMBackend().compile(b.build(), "cpu", blas="never")
    params = {"w": torch.randn(16, 8)}
    x1, x2 = torch.randn(3, 16), torch.randn(5, 16)
    for x in (x1, x2):  # the second call reuses the checked parameters, B rebinds
        (got,) = exe(x, params=params)
        torch.testing.assert_close(got, x @ params["w"])
    with pytest.raises(InterpretError, match="input %x: expected"):
        exe(torch.randn(3, 15), params=params)
    with pytest.raises(InterpretError, match="input %x: expected"):
        exe(torch.ones(3, 16, dtype=torch.int64), params=params)
    with pytest.raises(InterpretError, match="input %w: expected"):
        exe(x1, params={"w": torch.randn(16, 9)})
    with pytest.raises(InterpretError, match="missing parameter %w"):
        exe(x1, params={})
    with pytest.raises(InterpretError, match="not graph parameters: v"):
        exe(x1, params={**params, "v": torch.ones(1)})


def test_an_out_of_bounds_read_fails_its_test_instead_of_killing_pytest():
    import ctypes

    def read_one_before(x: torch.Tensor) -> float:
        return ctypes.c_float.from_address(x.data_ptr() - 4).value  # the byte before the input

    with pytest.raises(pytest.fail.Exception, match="unreadable page before them.*SIGSEGV"):
        check_guard_paged(read_one_before, [torch.ones(16)], lambda got: None)
