"""`moe.experts` with FP4 (MXFP4) and FP8 routed weights, per backend, against eager on the
dequantised weights: the op's reference backend, the Triton template in the CPU interpreter
(weights dequantised in the kernel, tiny shapes), and the TVM backend (its experts kernel reads
weights through `backends.tvm.dequant.expert_weight`), which must equal them or refuse the op
with a reason naming the format.

Shapes: d and I not multiples of the 32 block (padded scale columns), one expert no token chose,
with and without the shared expert, f32 and bf16 activations."""

from __future__ import annotations

import os

import pytest
import torch
from backend_graphs import graph_of

import ir
from backends.reference import ReferenceBackend
from backends.triton import TritonBackend
from backends.tvm import TVMBackend
from models.weights import dequantize_fp4, dequantize_fp8, quantize_fp4, quantize_fp8

E, I, D, N, K, J = 5, 48, 40, 7, 2, 24


def _weights(fmt: str, gen: torch.Generator, e: int, i: int, d: int) -> tuple[dict, dict]:
    """({w1, w3, w2: stored; w1s, w3s, w2s: scales}, {w1, w3, w2: dequantised f32})."""
    stored, scales, dense = {}, {}, {}
    for name, shape in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i))):
        qs, ss, ds = [], [], []
        for _ in range(e):
            w = torch.randn(*shape, generator=gen) * 0.3
            if fmt == "fp4_e2m1":
                q, s = quantize_fp4(w)
                qs.append(q), ss.append(s.view(torch.uint8).view(torch.int8))
                ds.append(dequantize_fp4(q, s))
            else:
                q, s = quantize_fp8(w)
                qs.append(q), ss.append(s.float()), ds.append(dequantize_fp8(q, s))
        stored[name], scales[name + "s"], dense[name] = map(torch.stack, (qs, ss, ds))
    return stored | scales, dense


def _case(fmt: str, dtype: torch.dtype, shared: bool, dims: tuple = (E, I, D)):
    """(inputs of the quantised op, inputs of the dense op on the dequantised weights, attrs);
    dims = (experts, I, d)."""
    gen = torch.Generator().manual_seed(0)
    e, _, d = dims
    quant, dense = _weights(fmt, gen, *dims)
    x = torch.randn(N, d, generator=gen).to(dtype)
    weights = torch.rand(N, K, generator=gen) + 0.1
    experts = torch.stack([torch.randperm(e - 1, generator=gen)[:K] for _ in range(N)])
    head = {"x": x, "weights": weights, "experts": experts}  # expert E-1: no token
    ws = {n: quant[n] for n in ("w1", "w3", "w2")}
    tail = {n: quant[n] for n in ("w1s", "w3s", "w2s")}
    dense = {n: w.to(dtype) for n, w in dense.items()}
    shared_w = {}
    if shared:
        shared_w = {n: (torch.randn(*s, generator=gen) * 0.3).to(dtype)
                    for n, s in (("s1", (J, d)), ("s3", (J, d)), ("s2", (d, J)))}
    return head | ws | shared_w | tail, head | dense | shared_w, {"shared": shared}


def _graphs(fmt: str, dtype: torch.dtype, shared: bool, dims: tuple = (E, I, D)):
    q_in, d_in, attrs = _case(fmt, dtype, shared, dims)
    q = graph_of([("moe.experts", list(q_in), {**attrs, "weight_format": fmt})], q_in)
    d = graph_of([("moe.experts", list(d_in), attrs)], d_in)
    (want,) = ir.interpret(d, *d_in.values())  # the dense op on the dequantised weights
    return q, q_in, want


_CASES = [("fp4_e2m1", torch.float32, False), ("fp4_e2m1", torch.bfloat16, True),
          ("fp8_e4m3", torch.float32, True), ("fp8_e4m3", torch.bfloat16, False)]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if want.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max())


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3"])
@pytest.mark.parametrize("shared", [False, True])
def test_reference_backend_equals_dense_on_dequantised(fmt: str, shared: bool) -> None:
    g, inputs, want = _graphs(fmt, torch.float32, shared)
    (got,) = ReferenceBackend().compile(g, "cpu")(*inputs.values())
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt, dtype, shared", _CASES)
def test_triton_dequantises_in_kernel(fmt: str, dtype: torch.dtype, shared: bool) -> None:
    _triton_case(fmt, dtype, shared, (E, I, D))


def test_triton_fp8_several_scale_blocks() -> None:
    """FP8 scales of 2 x 2 blocks per matrix (I = 136, d = 160: partial last blocks), so the
    kernel's per-block scale indexing is exercised (the default shapes have one block)."""
    _triton_case("fp8_e4m3", torch.float32, False, (3, 136, 160))


def _triton_case(fmt: str, dtype: torch.dtype, shared: bool, dims: tuple) -> None:
    g, inputs, want = _graphs(fmt, dtype, shared, dims)
    exe = TritonBackend().compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    assert {k["name"] for k in exe.report()["kernels"]} == {"moe_experts"}
    (got,) = exe(*inputs.values())
    _close(got, want)


@pytest.mark.parametrize("fmt, dtype, shared", _CASES)
def test_tvm_equals_or_refuses_with_reason(fmt: str, dtype: torch.dtype, shared: bool) -> None:
    """The TVM backend either lowers the quantised op (its experts kernel reading weights
    through `backends.tvm.dequant.expert_weight`) and equals eager on the dequantised weights,
    or refuses it naming the format; never a dense kernel run on the packed bytes."""
    g, inputs, want = _graphs(fmt, dtype, shared)
    support = TVMBackend().supports(g.ops[0])
    if support is not True:
        assert fmt in str(support)
        return
    exe = TVMBackend().compile(g, "cpu")
    (got,) = exe(*inputs.values())
    _close(got, want)


# --- through the pipeline: models/quant.py experts compiled by each backend ----------------------

slow = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="TVM builds: ~12 s on 2 cores")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3"])
@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("tvm", marks=slow)])
def test_compiled_quantised_experts_equal_eager(fmt: str, backend: str, dtype) -> None:
    """`QuantExperts` captured, fused (fuse_moe, then fuse_quant.experts, which looks through
    the rounding of the dequantised weights to bf16) and compiled: one moe.experts reading the
    stored int8 / e4m3 weights, equal to eager on the dequantised weights (d = 40: a padded
    FP4 block)."""
    import dataclasses

    import dsv4c
    from models.config import Config
    from models.moe import Experts
    from models.quant import QuantExperts

    cfg = dataclasses.replace(Config.preset("tiny"), dim=40, moe_inter_dim=24, n_routed_experts=5)
    gen = torch.Generator().manual_seed(0)
    dense = Experts(cfg)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    module = QuantExperts.from_experts(dense, fmt).eval()
    x, weights = torch.randn(9, 40, generator=gen).to(dtype), torch.rand(9, 2, generator=gen) + 0.1
    experts = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    compiled = dsv4c.compile(module, (x, weights, experts), backend=backend, target="cpu")
    (node,) = compiled.graph.ops
    stored = ir.DType.i8 if fmt == "fp4_e2m1" else ir.DType.f8e4m3
    assert node.name == "moe.experts" and node.op.weight_format == fmt
    assert node.operands[3].dtype == stored
    got = compiled(x, weights, experts)
    got = got[0] if isinstance(got, (tuple, list)) else got
    with torch.no_grad():
        want = module(x, weights, experts)
    _close(got, want)


# --- AOT at DeepSeek-V4 sizes -----------------------------------------------------------------


def _v4_flash_quantised(fmt: str) -> ir.Graph:
    """v4-flash's routed + shared experts (256 experts, top-6, d = 4096, I = 2048) in bf16 over
    N symbolic tokens, the routed weights in `fmt`."""
    d, e, inter, k, n = 4096, 256, 2048, 6, ir.sym("N")
    b = ir.Builder(name="v4_flash_experts_" + fmt)

    def param(name: str, shape: tuple, dtype: ir.DType) -> ir.Value:
        return b.input(name, ir.TensorType(shape, dtype), role="parameter")

    x = b.input("x", ir.TensorType((n, d), ir.DType.bf16))
    weights = b.input("weights", ir.TensorType((n, k), ir.DType.f32))
    experts = b.input("experts", ir.TensorType((n, k), ir.DType.i64))
    if fmt == "fp4_e2m1":
        i8 = ir.DType.i8
        ws = [param("w1", (e, inter, d // 2), i8), param("w3", (e, inter, d // 2), i8),
              param("w2", (e, d, inter // 2), i8)]
        ss = [param("w1s", (e, inter, d // 32), i8), param("w3s", (e, inter, d // 32), i8),
              param("w2s", (e, d, inter // 32), i8)]
    else:
        f8, f32 = ir.DType.f8e4m3, ir.DType.f32
        ws = [param("w1", (e, inter, d), f8), param("w3", (e, inter, d), f8),
              param("w2", (e, d, inter), f8)]
        ss = [param("w1s", (e, inter // 128, d // 128), f32),
              param("w3s", (e, inter // 128, d // 128), f32),
              param("w2s", (e, d // 128, inter // 128), f32)]
    bf = ir.DType.bf16
    shared = [param("s1", (inter, d), bf), param("s3", (inter, d), bf), param("s2", (d, inter), bf)]
    y = b.op("moe.experts", [x, weights, experts, *ws, *shared, *ss], shared=True,
             weight_format=fmt)
    b.output(y)
    return b.build()


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3"])
def test_aot_sm90_v4_flash_quantised_no_spills(fmt: str) -> None:
    """The five phases compile for sm_90 (`triton.compile(ASTSource(...), GPUTarget("cuda", 90,
    32))` inside `aot_compile`) with the in-kernel dequantisation, for a 4096-token prefill,
    without spills."""
    from backends.triton.aot import aot_compile

    exe = TritonBackend().compile(_v4_flash_quantised(fmt), "sm_90")
    assert not exe.fallbacks(), exe.fallbacks()
    try:
        rows = aot_compile(exe, ["sm_90"], bindings={"N": 4096})
    except RuntimeError as e:  # e.g. a triton wheel without the GPU backends' toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert len(rows) == 5
    for r in rows:
        assert r.error is None, (r.constexprs.get("PHASE"), r.error)
        assert r.constexprs["WFMT"] == (1 if fmt == "fp4_e2m1" else 2)
        assert r.spills == 0 and 0 < r.registers <= 255, (r.constexprs, r.registers, r.spills)
        assert r.shared < 227 * 1024
