"""moe.experts' `weight_format`: FP4 (MXFP4) and FP8 routed experts as compressed operands.

The op on quantised weights equals the dense op on the dequantised weights (its reference is
that, so this checks the decode against models/weights.py's independent one), the attribute
round-trips through the text form, bad operands give errors naming the operand and the fix,
and the cost counts the compressed bytes."""

from __future__ import annotations

import pytest
import torch

import ir
from ir import Builder, DType, TensorType
from ir.errors import IRTypeError
from models.weights import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8

E, I, D, N, K = 4, 64, 32, 5, 2


def _graph(fmt: str, types: list[tuple[str, TensorType]], **attrs) -> ir.Graph:
    b = Builder(name="g")
    vals = [b.input(name, t) for name, t in types]
    b.output(b.op("moe.experts", vals, weight_format=fmt, **attrs))
    g = b.build()
    assert ir.parse(ir.to_text(g)) == g
    return g


def _quantised(fmt: str, seed: int = 0):
    """Stacked dense expert weights and their (stored, scale) tensors in `fmt`."""
    gen = torch.Generator().manual_seed(seed)
    dense = {"w1": torch.randn(E, I, D, generator=gen), "w3": torch.randn(E, I, D, generator=gen),
             "w2": torch.randn(E, D, I, generator=gen)}
    stored, deq = {}, {}
    for name, w in dense.items():
        rows = []
        for e in range(E):
            if fmt == "fp4_e2m1":
                q, s = quantize_fp4(w[e])
                rows.append((q, s.view(torch.uint8).view(torch.int8), dequantize_fp4(q, s)))
            else:
                q, s = quantize_fp8(w[e])
                rows.append((q, s.float(), dequantize_fp8(q, s)))
        stored[name] = torch.stack([r[0] for r in rows])
        stored[name + "s"] = torch.stack([r[1] for r in rows])
        deq[name] = torch.stack([r[2] for r in rows])
    order = ("w1", "w3", "w2", "w1s", "w3s", "w2s")  # the op's operand order
    return {n: stored[n] for n in order}, deq


def _routing(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    weights = torch.rand(N, K, generator=gen) + 0.1
    experts = torch.randperm(E, generator=gen)[:K].repeat(N, 1)
    experts[1:, 0] = (experts[1:, 0] + 1) % E
    experts[:, 1] = (experts[:, 0] + 1 + torch.arange(N) % (E - 1)) % E
    return x, weights, experts


def _types(t: dict[str, torch.Tensor]) -> list[tuple[str, TensorType]]:
    return [(name, TensorType(tuple(v.shape), DType.from_torch(v.dtype))) for name, v in t.items()]


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3"])
def test_quantised_experts_equal_dense_on_dequantised(fmt: str) -> None:
    stored, deq = _quantised(fmt)
    x, weights, experts = _routing()
    args = {"x": x, "weights": weights, "experts": experts}
    ws = {n: stored[n] for n in ("w1", "w3", "w2")}
    scales = {n + "s": stored[n + "s"] for n in ("w1", "w3", "w2")}
    g = _graph(fmt, _types(args | ws | scales))
    assert f'weight_format="{fmt}"' in ir.to_text(g) or f"weight_format='{fmt}'" in ir.to_text(g)
    (got,) = ir.interpret(g, *args.values(), *ws.values(), *scales.values(), check=True)
    dense = _graph("dense", _types(args | deq))
    (want,) = ir.interpret(dense, *args.values(), *deq.values(), check=True)
    assert torch.equal(got, want)


def test_fp4_cost_counts_compressed_bytes() -> None:
    stored, deq = _quantised("fp4_e2m1")
    x, weights, experts = _routing()
    args = {"x": x, "weights": weights, "experts": experts}
    q = _graph("fp4_e2m1", _types(args | stored))
    d = _graph("dense", _types(args | deq))
    qb, db = _bytes(q.ops[0]), _bytes(d.ops[0])
    elements = 3 * E * I * D
    assert db - qb == elements * 4 - elements * (0.5 + 1 / 32)


def _bytes(node: ir.Node) -> float:
    types = [v.type for v in node.operands]
    return float(node.op.cost(types, list(node.op.infer_type(*types))).bytes)


def _error(fmt: str, stored: dict, **change: TensorType) -> str:
    x, weights, experts = _routing()
    types = dict(_types({"x": x, "weights": weights, "experts": experts} | stored))
    types.update(change)
    with pytest.raises(IRTypeError) as info:
        _graph(fmt, list(types.items()))
    return str(info.value)


def test_bad_scale_shape_is_named() -> None:
    stored, _ = _quantised("fp4_e2m1")
    msg = _error("fp4_e2m1", stored, w2s=TensorType((E, D, 1), DType.i8))
    assert "w2s must be i8[4, 32, 2]" in msg and "1x32 block" in msg and "got i8[4,32,1]" in msg


def test_bad_scale_dtype_and_packing_are_named() -> None:
    stored, _ = _quantised("fp4_e2m1")
    msg = _error("fp4_e2m1", stored, w1s=TensorType((E, I, 1), DType.f32))
    assert "w1s must be i8" in msg and "ue8m0" in msg
    msg = _error("fp4_e2m1", stored, w3=TensorType((E, I, D), DType.i8))
    assert f"w3 must be [{E}, {I}, {D // 2}]" in msg and "two e2m1 codes a byte" in msg
    stored8, _ = _quantised("fp8_e4m3")
    msg = _error("fp8_e4m3", stored8, w1s=TensorType((E, I, 1), DType.f32))
    assert "w1s must be f32[4, 1, 1]" in msg and "128x128" in msg


def test_missing_scales_and_unknown_format() -> None:
    stored, _ = _quantised("fp4_e2m1")
    three = {n: stored[n] for n in ("w1", "w3", "w2")}
    msg = _error("fp4_e2m1", three)
    assert "expected 9 operands" in msg and "w1s, w3s, w2s" in msg
    msg = _error("int4", three)
    assert "weight_format must be one of" in msg
