"""Structural hashing: signatures ignore value names and locations, see attributes strictly, and
look into fused.kernel bodies; identical layers give identical signatures."""

from __future__ import annotations

from passes_helpers import tiny_prefill_graph

import ir
import passes
from ir import DType, Loc, TensorType
from passes import graph_signature, kernel_signatures, op_signature

T = ir.sym("T")
F32 = DType.f32


def layer(b: ir.Builder, h: ir.Value, w: ir.Value, i: int) -> ir.Value:
    """An RMSNorm + matmul + SiLU residual block with per-layer names and locations."""
    loc = Loc(f"layers.{i}", f"model.py:{10 + i}")
    sq = b.op("mul", [h, h], loc=loc, name=f"l{i}_sq")
    ms = b.op("mean", [sq], dims=(-1,), keepdim=True, loc=loc)
    inv = b.op("rsqrt", [b.op("add", [ms, b.constant(1e-6, F32)], loc=loc)], loc=loc)
    y = b.op("matmul", [b.op("mul", [h, inv], loc=loc), w], loc=loc)
    return b.op("add", [h, b.op("silu", [y], loc=loc)], loc=loc)


def model(n: int) -> ir.Graph:
    b = ir.Builder(name="m")
    h = b.input("x", TensorType((T, 16), F32))
    ws = [b.input(f"layers.{i}.w", TensorType((16, 16), F32), role="parameter") for i in range(n)]
    for i, w in enumerate(ws):
        h = layer(b, h, w, i)
    b.output(h)
    return b.build()


def test_identical_layers_have_identical_signatures() -> None:
    g = model(3)
    per_layer = len(g.ops) // 3
    sigs = [op_signature(n) for n in g.ops]
    assert sigs[:per_layer] == sigs[per_layer : 2 * per_layer] == sigs[2 * per_layer :]
    distinct = kernel_signatures(g)
    assert len(distinct) == per_layer and all(k.count == 3 for k in distinct)
    assert distinct[0].example.startswith("%l0_sq: f32[T,16] = mul(%x, %x)  # layers.0")
    assert len(kernel_signatures(g, mnemonics={"matmul"})) == 1


def test_signatures_see_attributes_strictly_and_types() -> None:
    def one(value, dtype=F32, shape=()):
        b = ir.Builder()
        b.output(b.op("full", [], shape=shape, value=value, dtype=dtype))
        return b.build().ops[0]

    assert op_signature(one(1.0)) == op_signature(one(1.0))
    assert op_signature(one(1.0)) != op_signature(one(1))
    assert op_signature(one(0.0)) != op_signature(one(-0.0))
    assert op_signature(one(float("nan"))) == op_signature(one(float("nan")))
    assert op_signature(one(1.0)) != op_signature(one(1.0, DType.bf16))
    assert op_signature(one(1.0, shape=(T,))) != op_signature(one(1.0, shape=(T + 1,)))


def fused(b: ir.Builder, x: ir.Value, names: tuple[str, str], unary: str) -> ir.Value:
    body = ir.Builder(name=names[0])
    a = body.input(names[1], x.type)
    body.output(body.op(unary, [body.op("mul", [a, a], loc=Loc(names[0]))]))
    return b.op("fused.kernel", [x], body=body.build())


def test_fused_kernel_signature_hashes_the_body_structure() -> None:
    b = ir.Builder()
    x = b.input("x", TensorType((T, 8), F32))
    k1 = fused(b, x, ("k1", "a"), "exp")
    k2 = fused(b, k1, ("k2", "other_name"), "exp")
    k3 = fused(b, k2, ("k3", "a"), "sin")
    b.output(k3)
    g = b.build()
    s1, s2, s3 = (op_signature(n) for n in g.ops)
    assert s1 == s2 != s3
    assert [k.count for k in kernel_signatures(g)] == [2, 1]


def test_graph_signature_ignores_names_and_locations_not_roles() -> None:
    assert graph_signature(model(2)) == graph_signature(model(2))
    assert graph_signature(model(2)) != graph_signature(model(3))
    g = model(1)
    roles = dict(g.roles, **{"layers.0.w": "activation"})
    other = ir.Graph(g.inputs, g.ops, g.outputs, name=g.name, roles=roles)
    assert graph_signature(g) != graph_signature(other)


def test_tiny_prefill_distinct_signatures() -> None:
    g = passes.canonicalize(tiny_prefill_graph())
    distinct = kernel_signatures(g)
    matmuls = kernel_signatures(g, mnemonics={"matmul"})
    print(
        f"\ntiny: {len(g.ops)} ops, {len(distinct)} distinct signatures, "
        f"{sum(k.count for k in matmuls)} matmuls in {len(matmuls)} distinct"
    )
    assert len(distinct) < len(g.ops) // 4  # 4 layers, mostly alike
    assert len(matmuls) < sum(k.count for k in matmuls)
