"""Per-op differential table: each op's reference (run through the interpreter with type checks)
against direct torch, over a few shapes and dtypes, static and with symbolic dims bound."""

from __future__ import annotations

import pytest
import sympy
import torch

import ir
from ir import DType, TensorType

F = torch.nn.functional
N = ir.sym("N")
f32, bf16, f16, i64, i32, i8, b = (
    DType.f32,
    DType.bf16,
    DType.f16,
    DType.i64,
    DType.i32,
    DType.i8,
    DType.bool,
)
f8 = DType.f8e4m3


def make(shape, dtype: DType, kind: str = "any", gen: torch.Generator | None = None):
    if dtype == DType.bool:
        return torch.rand(shape, generator=gen) > (0.5 if kind == "any" else -1.0)
    if dtype.is_float:
        t = torch.randn(shape, generator=gen) * 2
        if kind == "pos":
            t = t.abs() + 0.1
        return t.to(dtype.to_torch())
    lo = 1 if kind in ("pos", "any") else 0
    return torch.randint(lo, 6, shape, generator=gen).to(dtype.to_torch())


class Sample:
    """One row: op(mnemonic, attrs) on inputs [(shape, dtype)], expected torch_fn(*tensors)."""

    def __init__(self, mnemonic, inputs, torch_fn, attrs=None, kind="any", makers=None):
        self.mnemonic, self.inputs, self.torch_fn = mnemonic, inputs, torch_fn
        self.attrs, self.kind, self.makers = attrs or {}, kind, makers or {}

    def id(self):
        ins = ",".join(f"{d.value}{list(s)}" for s, d in self.inputs)
        at = ",".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.mnemonic}({ins}{';' + at if at else ''})"

    def tensors(self):
        gen = torch.Generator().manual_seed(0)
        return [
            self.makers[i]() if i in self.makers else make(s, d, self.kind, gen)
            for i, (s, d) in enumerate(self.inputs)
        ]


UNARY = {
    "neg": torch.neg,
    "abs": torch.abs,
    "exp": torch.exp,
    "log": torch.log,
    "log1p": torch.log1p,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sin": torch.sin,
    "cos": torch.cos,
    "reciprocal": torch.reciprocal,
    "logical_not": torch.logical_not,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "sign": torch.sign,
    "erf": torch.erf,
    "copy": torch.clone,
}
BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "floordiv": lambda a, c: torch.div(a, c, rounding_mode="floor"),
    "remainder": torch.remainder,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "bitwise_and": torch.bitwise_and,
}
BIN_TYPES = [
    ((3, 5), f32, (5,), f32),
    ((2, 1, 5), bf16, (3, 5), bf16),
    ((3, 5), bf16, (), f32),
    ((3, 5), i64, (), f32),
    ((3, 5), i32, (3, 5), i64),
    ((5,), i8, (5,), b),
    ((5,), f16, (5,), bf16),
    ((3, 5), b, (), i64),
    ((5,), b, (5,), b),
]

SAMPLES: list[Sample] = []
for m, fn in UNARY.items():
    for dt in (f32, bf16, i64, b):
        SAMPLES.append(
            Sample(m, [((3, 5), dt)], fn, kind="pos" if m in ("log", "sqrt", "rsqrt") else "any")
        )
SAMPLES += [
    Sample(
        "softplus",
        [((4, 5), f32)],
        lambda x: F.softplus(x, beta=2.0, threshold=1.0),
        {"beta": 2.0, "threshold": 1.0},
    ),
    Sample("cast", [((4, 5), f32)], lambda x: x.to(torch.bfloat16), {"dtype": bf16}),
    Sample("cast", [((4, 5), f32)], lambda x: x.to(torch.int32), {"dtype": i32}),
    Sample("cast", [((4, 5), f32)], lambda x: x.to(torch.float8_e4m3fn), {"dtype": f8}),
    Sample("cast", [((4, 5), i64)], lambda x: x.to(torch.bool), {"dtype": b}),
    Sample(
        "clamp", [((4, 5), f32)], lambda x: torch.clamp(x, -0.5, 0.5), {"min": -0.5, "max": 0.5}
    ),
    Sample("clamp", [((4, 5), i64)], lambda x: torch.clamp(x, min=2), {"min": 2}),
    Sample("clamp", [((4, 5), i64)], lambda x: torch.clamp(x, max=2.5), {"max": 2.5}),
    Sample("where", [((4, 5), b), ((4, 5), f32), ((5,), f32)], torch.where),
    Sample("where", [((4, 5), b), ((4, 5), bf16), ((), f32)], torch.where),
]
for m, fn in BINARY.items():
    for sa, da, sb, db in BIN_TYPES:
        kind = "pos" if m in ("div", "floordiv", "remainder", "pow") else "any"
        SAMPLES.append(Sample(m, [(sa, da), (sb, db)], fn, kind=kind))


def _reduce_fn(fn, dims, keep):
    return lambda x: fn(x, dim=list(dims), keepdim=keep) if dims else fn(x)


RED = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}
for m, fn in RED.items():
    for dims, keep in (((1,), False), ((0, -1), True), ((), False)):
        for dt in (f32, bf16, i64):
            tfn = _reduce_fn(fn, dims, keep)
            SAMPLES.append(Sample(m, [((3, 5, 4), dt)], tfn, {"dims": dims, "keepdim": keep}))
SAMPLES += [
    Sample("prod", [((3, 5), f32)], lambda x: torch.prod(x, 1), {"dims": (1,)}),
    Sample("prod", [((3, 5), i32)], lambda x: torch.prod(x), {"dims": ()}),
    Sample(
        "prod",
        [((3, 5, 2), f32)],
        lambda x: torch.prod(torch.prod(x, 2, True), 0, True),
        {"dims": (0, 2), "keepdim": True},
    ),
    Sample("any", [((3, 5), b)], lambda x: torch.any(x, dim=1), {"dims": (1,)}),
    Sample("all", [((3, 5), i64)], lambda x: torch.all(x), {"dims": ()}),
    Sample(
        "argmax",
        [((3, 5), f32)],
        lambda x: torch.argmax(x, 1, keepdim=True),
        {"dim": 1, "keepdim": True},
    ),
    Sample("argmax", [((3, 5), f32)], lambda x: torch.argmax(x), {"dim": None}),
    Sample("argmin", [((3, 5), i64)], lambda x: torch.argmin(x, 0), {"dim": 0}),
    Sample("softmax", [((3, 5), f32)], lambda x: torch.softmax(x, -1), {"dim": -1}),
    Sample("softmax", [((3, 5), bf16)], lambda x: torch.softmax(x, 0), {"dim": 0}),
    Sample("log_softmax", [((3, 5), f32)], lambda x: torch.log_softmax(x, 1), {"dim": 1}),
    Sample("cumsum", [((3, 5), f32)], lambda x: torch.cumsum(x, 1), {"dim": 1}),
    Sample("cumsum", [((3, 5), i32)], lambda x: torch.cumsum(x, 0), {"dim": 0}),
    Sample("matmul", [((3, 5), f32), ((5, 4), f32)], torch.matmul),
    Sample("matmul", [((2, 3, 5), bf16), ((5, 4), bf16)], torch.matmul),
    Sample("matmul", [((2, 1, 3, 5), f32), ((4, 5, 2), f32)], torch.matmul),
    Sample("matmul", [((5,), f32), ((3, 5, 4), f32)], torch.matmul),
    Sample("matmul", [((3, 5), f32), ((5,), f32)], torch.matmul),
    Sample("matmul", [((5,), f32), ((5,), f32)], torch.matmul),
    Sample(
        "gather",
        [((3, 5), f32), ((3, 2), i64)],
        lambda x, i: torch.gather(x, 1, i),
        {"dim": 1},
        makers={1: lambda: torch.tensor([[0, 4], [1, 1], [3, 2]])},
    ),
    Sample(
        "index_select",
        [((5, 3), f32), ((4,), i64)],
        lambda x, i: torch.index_select(x, 0, i),
        {"dim": 0},
        makers={1: lambda: torch.tensor([4, 0, 0, 2])},
    ),
    Sample(
        "index",
        [((2, 5, 3), f32), ((2, 2), i64)],
        lambda x, i: x[:, i],
        {"dim": 1},
        makers={1: lambda: torch.tensor([[4, 0], [1, 2]])},
    ),
    Sample(
        "index",
        [((5, 3), bf16), ((), i64)],
        lambda x, i: x[i],
        {"dim": 0},
        makers={1: lambda: torch.tensor(3)},
    ),
    Sample(
        "embedding",
        [((5, 3), f32), ((2, 4), i64)],
        lambda w, i: F.embedding(i, w),
        makers={1: lambda: torch.tensor([[4, 0, 1, 1], [2, 3, 0, 0]])},
    ),
    Sample(
        "scatter",
        [((3, 5), f32), ((3, 2), i64), ((3, 2), f32)],
        lambda x, i, s: torch.scatter(x, 1, i, s),
        {"dim": 1},
        makers={1: lambda: torch.tensor([[0, 4], [1, 2], [3, 2]])},
    ),
    Sample(
        "scatter_add",
        [((3, 5), f32), ((3, 2), i64), ((3, 2), f32)],
        lambda x, i, s: torch.scatter_add(x, 1, i, s),
        {"dim": 1},
        makers={1: lambda: torch.tensor([[0, 0], [1, 2], [3, 3]])},
    ),
    Sample(
        "index_put",
        [((5, 3), f32), ((2,), i64), ((2, 3), f32)],
        lambda x, i, v: x.index_put((i,), v, accumulate=True),
        {"dim": 0, "accumulate": True},
        makers={1: lambda: torch.tensor([4, 4])},
    ),
    Sample(
        "index_put",
        [((3, 5), f32), ((2,), i64), ((3, 2), f32)],
        lambda x, i, v: x.index_put((slice(None), i), v) if False else _index_put_dim1(x, i, v),
        {"dim": 1},
        makers={1: lambda: torch.tensor([0, 3])},
    ),
    Sample("topk", [((3, 5), f32)], lambda x: tuple(torch.topk(x, 2, dim=-1)), {"k": 2}),
    Sample(
        "topk",
        [((3, 5), bf16)],
        lambda x: tuple(torch.topk(x, 3, dim=0, largest=False)),
        {"k": 3, "dim": 0, "largest": False},
    ),
    Sample(
        "sort",
        [((3, 5), f32)],
        lambda x: tuple(torch.sort(x, dim=1, descending=True, stable=True)),
        {"dim": 1, "descending": True, "stable": True},
    ),
    Sample(
        "argsort",
        [((3, 5), i64)],
        lambda x: torch.argsort(x, dim=0, stable=True),
        {"dim": 0, "stable": True},
    ),
    Sample("reshape", [((3, 5, 4), f32)], lambda x: x.reshape(15, 4), {"shape": (15, 4)}),
    Sample("reshape", [((3, 5, 4), f32)], lambda x: x.reshape(3, -1), {"shape": (3, -1)}),
    Sample("permute", [((3, 5, 4), f32)], lambda x: x.permute(2, 0, 1), {"dims": (2, 0, 1)}),
    Sample("expand", [((3, 1), f32)], lambda x: x.expand(2, 3, 5), {"shape": (2, 3, 5)}),
    Sample("expand", [((3, 1), f32)], lambda x: x.expand(-1, 4), {"shape": (-1, 4)}),
    Sample(
        "slice", [((3, 5), f32)], lambda x: x[:, 1:4:2], {"dim": 1, "start": 1, "end": 4, "step": 2}
    ),
    Sample("slice", [((3, 5), f32)], lambda x: x[:, -2:], {"dim": -1, "start": -2}),
    Sample("slice", [((3, 5), f32)], lambda x: x[1:], {"dim": 0, "start": 1, "end": 2**63 - 1}),
    Sample(
        "concat",
        [((3, 5), f32), ((2, 5), f32), ((1, 5), f32)],
        lambda *xs: torch.cat(xs, 0),
        {"dim": 0},
    ),
    Sample("concat", [((3, 2), bf16), ((3, 5), f32)], lambda *xs: torch.cat(xs, 1), {"dim": 1}),
    Sample(
        "pad",
        [((3, 5), f32)],
        lambda x: F.pad(x, (1, 2, 0, 1), value=1.5),
        {"pads": (1, 2, 0, 1), "value": 1.5},
    ),
    Sample("pad", [((3, 5), i64)], lambda x: F.pad(x, (-1, 1)), {"pads": (-1, 1), "value": 0}),
    Sample("select", [((3, 5), f32)], lambda x: x[:, -1], {"dim": 1, "index": -1}),
    Sample("squeeze", [((3, 1, 5), f32)], lambda x: x.squeeze(1), {"dim": 1}),
    Sample("squeeze", [((3, 5), f32)], lambda x: x.squeeze(0), {"dim": 0}),
    Sample("unsqueeze", [((3, 5), f32)], lambda x: x.unsqueeze(-1), {"dim": -1}),
    Sample("flip", [((3, 5), f32)], lambda x: torch.flip(x, (0, 1)), {"dims": (0, 1)}),
    Sample("repeat", [((3, 5), f32)], lambda x: x.repeat(2, 1, 3), {"repeats": (2, 1, 3)}),
]


def _index_put_dim1(x, i, v):
    out = x.clone()
    out[:, i] = v
    return out


CREATION = [
    ("constant", {"value": 2.5, "dtype": bf16}, lambda: torch.tensor(2.5, dtype=torch.bfloat16)),
    ("constant", {"value": 3, "dtype": i64}, lambda: torch.tensor(3)),
    ("constant", {"value": True, "dtype": b}, lambda: torch.tensor(True)),
    ("full", {"shape": (2, 3), "value": -1.0, "dtype": f32}, lambda: torch.full((2, 3), -1.0)),
    (
        "iota",
        {"start": 2, "end": 9, "step": 3, "dtype": i32},
        lambda: torch.arange(2, 9, 3, dtype=torch.int32),
    ),
]


def _run(sample: Sample, symbolic: bool):
    tensors = sample.tensors()
    bld = ir.Builder(name="t")
    sub = lambda s: tuple(N if (symbolic and d == 5) else d for d in s)  # noqa: E731
    ins = [bld.input(f"x{i}", TensorType(sub(s), d)) for i, (s, d) in enumerate(sample.inputs)]
    out = bld.op(sample.mnemonic, ins, **sample.attrs)
    outs = out if isinstance(out, tuple) else (out,)
    bld.output(*outs)
    g = bld.build()
    return g, ir.interpret(g, *tensors, check=True), tensors


def _expected(sample: Sample, tensors):
    exp = sample.torch_fn(*tensors)
    return exp if isinstance(exp, tuple) else (exp,)


@pytest.mark.parametrize("sample", SAMPLES, ids=Sample.id)
def test_op_matches_torch(sample: Sample) -> None:
    tensors = sample.tensors()
    try:
        expected = _expected(sample, tensors)
    except (RuntimeError, TypeError):
        # torch rejects this op/dtype: the IR must reject it at type inference too.
        types = [TensorType(s, d) for s, d in sample.inputs]
        with pytest.raises(ir.IRTypeError, match=sample.mnemonic.split(".")[0]):
            ir.OPS[sample.mnemonic](**sample.attrs).infer_type(*types)
        return
    for symbolic in (False, True):
        g, got, _ = _run(sample, symbolic)
        assert ir.parse(ir.to_text(g)) == g  # every table graph round-trips too
        assert len(got) == len(expected)
        for o, e in zip(got, expected):
            assert o.dtype == e.dtype, (sample.id(), o.dtype, e.dtype)
            assert o.shape == e.shape
            if o.dtype.is_floating_point and o.element_size() == 1:
                o, e = o.float(), e.float()
            torch.testing.assert_close(o, e, equal_nan=True, rtol=1e-2, atol=1e-2)


def test_symbolic_types_are_symbolic() -> None:
    g, _, _ = _run(Sample("matmul", [((3, 5), f32), ((5, 4), f32)], torch.matmul), True)
    assert g.ops[0].results[0].type == TensorType((3, 4), f32)
    g, _, _ = _run(Sample("concat", [((5, 2), f32), ((5, 2), f32)], None, {"dim": 0}), True)
    assert g.ops[0].results[0].type.shape == (2 * N, 2)


@pytest.mark.parametrize("mnemonic,attrs,fn", CREATION, ids=[c[0] + str(c[1]) for c in CREATION])
def test_creation_ops(mnemonic, attrs, fn) -> None:
    bld = ir.Builder()
    bld.output(bld.op(mnemonic, [], **attrs))
    (got,) = ir.interpret(bld.build(), check=True)
    torch.testing.assert_close(got, fn())


def test_iota_symbolic_end_binds() -> None:
    bld = ir.Builder()
    x = bld.input("x", TensorType((N,), f32))
    r = bld.op("iota", [], start=0, end=N, step=2, dtype=i64)
    assert r.type.shape == (sympy.floor((N + 1) / 2),)
    bld.output(r)
    (got,) = ir.interpret(bld.build(), torch.zeros(7), check=True)
    assert got.tolist() == [0, 2, 4, 6]
    del x


def test_grouped_mm() -> None:
    x, w = torch.randn(7, 4), torch.randn(3, 4, 5)
    offsets = torch.tensor([2, 2, 6])
    bld = ir.Builder()
    ins = [
        bld.input("x", TensorType((N, 4), f32)),
        bld.input("w", TensorType((3, 4, 5), f32)),
        bld.input("off", TensorType((3,), i64)),
    ]
    bld.output(bld.op("grouped_mm", ins))
    (got,) = ir.interpret(bld.build(), x, w, offsets, check=True)
    want = torch.cat([x[0:2] @ w[0], x[2:6] @ w[2], torch.zeros(1, 5)])
    torch.testing.assert_close(got, want)


def test_promotion_matches_torch_for_every_pair() -> None:
    from ir.types import promote

    for a in DType:
        for c in DType:
            try:
                want = DType.from_torch(torch.promote_types(a.to_torch(), c.to_torch()))
            except (RuntimeError, TypeError):
                with pytest.raises(ir.IRTypeError):
                    promote(a, c)
                continue
            assert promote(a, c) == want, (a, c)


def test_dtype_torch_roundtrip_and_text() -> None:
    for d in DType:
        assert DType.from_torch(d.to_torch()) is d
        assert str(d) == d.value
    assert [d.value for d in DType] == [
        "f32",
        "bf16",
        "f16",
        "f8e4m3",
        "f8e5m2",
        "i64",
        "i32",
        "i8",
        "bool",
    ]
    with pytest.raises(ir.IRTypeError, match="float64"):
        DType.from_torch(torch.float64)


def test_cost_is_symbolic() -> None:
    a, c = TensorType((N, 64), f32), TensorType((64, 32), f32)
    op = ir.OPS["matmul"]()
    (r,) = op.infer_type(a, c)
    cost = op.cost([a, c], [r])
    assert sympy.simplify(cost.flops - 2 * N * 64 * 32) == 0
    assert sympy.simplify(cost.bytes - 4 * (64 * N + 64 * 32 + 32 * N)) == 0


def test_type_errors_name_the_op_and_types() -> None:
    with pytest.raises(
        ir.IRTypeError, match=r"matmul\(f32\[3,5\], f32\[4,2\]\): contracted dims differ: 5 vs 4"
    ):
        ir.OPS["matmul"]().infer_type(TensorType((3, 5), f32), TensorType((4, 2), f32))
    with pytest.raises(ir.IRTypeError, match=r"add\(f32\[3\], f32\[4\]\): shapes do not broadcast"):
        ir.OPS["add"]().infer_type(TensorType((3,), f32), TensorType((4,), f32))
    with pytest.raises(ir.IRTypeError, match="attribute `dim`: expected int, got str"):
        ir.OPS["softmax"](dim="x")


def test_every_op_has_docstring_kind_and_is_in_table() -> None:
    assert len(ir.OPS) >= 80
    for m, cls in ir.OPS.items():
        assert cls.mnemonic == m and isinstance(cls.kind, ir.Kind) and cls.__doc__
