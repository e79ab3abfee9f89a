"""TVM's grouped `moe.experts` (issue 19): the CPU kernel that sorts the (token, slot) pairs by
expert and reads each touched expert's weights once (`backends/tvm/moe_grouped.py`), and the BLAS
path as one `torch._grouped_mm` per projection, against the op's reference: N in {1, 3, 8, 40}
tokens on one kernel (N symbolic), k 2..6, experts no token chose, fp32 and bf16, the shared
expert, expert biases with the GPT-OSS gate, sizes with vector tails, quantised weights; and the
op's cost counting only the experts a call can touch."""

from __future__ import annotations

import os

import pytest
import sympy
import torch

import ir
from backends.tvm import TVMBackend
from backends.tvm.semantic_moe import GroupedKernel

E, D, I, J = 8, 40, 36, 20  # d and I not multiples of 16 (vector tails); experts 6, 7 idle
TOKENS = (1, 3, 8, 40)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
ROUTED = ["x", "weights", "experts", "w1", "w3", "w2"]


def _graph(inputs: dict[str, torch.Tensor], attrs: dict) -> ir.Graph:
    """One `moe.experts` over `inputs` (in order) with N symbolic: one kernel for every N."""
    n = ir.sym("N")
    b = ir.Builder(name="experts")
    vals = []
    for name, t in inputs.items():
        shape = (n, *t.shape[1:]) if name in ROUTED[:3] else tuple(t.shape)
        vals.append(b.input(name, ir.TensorType(shape, ir.DType.from_torch(t.dtype))))
    b.output(b.op("moe.experts", vals, **attrs))
    return b.build()


def _weights(
    dtype: torch.dtype, k: int, seed: int, shared: bool = False, bias: bool = False, inter: int = I
):
    """(a function of N -> the per-token inputs, the weight inputs) from one generator."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    ws = {"w1": t(E, inter, D), "w3": t(E, inter, D), "w2": t(E, D, inter)}
    if shared:
        ws |= {"s1": t(J, D), "s3": t(J, D), "s2": t(D, J)}
    if bias:
        ws |= {"b1": t(E, inter), "b3": t(E, inter), "b2": t(E, D).float()}  # b2 wider than x

    def tokens(n: int) -> dict[str, torch.Tensor]:
        x = (torch.randn(n, D, generator=gen) * 2.0).to(dtype)
        weights = torch.rand(n, k, generator=gen) + 0.1
        experts = torch.stack([torch.randperm(E - 2, generator=gen)[:k] for _ in range(n)])
        return {"x": x, "weights": weights, "experts": experts}

    return tokens, ws


def _close(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """fp32 to fp32 rounding; bf16 to its own rtol relative to the output's magnitude (the
    kernel rounds where the op does but sums the dot products in another order)."""
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    scale = want.float().abs().max().item()
    tol = 1e-5 if want.dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=msg)


def _check(attrs: dict, tokens, ws: dict, blas: str = "never", counts=TOKENS) -> dict:
    g = _graph({**tokens(1), **ws}, attrs)
    exe = TVMBackend().compile(g, "cpu", blas=blas)
    assert not exe.fallbacks(), exe.fallbacks()
    assert [type(k) for k in exe.kernels()] == [GroupedKernel]  # not the gather form
    for n in counts:
        args = list({**tokens(n), **ws}.values())
        (want,) = ir.interpret(g, *args)
        (got,) = exe(*args)
        _close(got, want, f"N={n}, {attrs}")
    return exe.report()


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_kernel_equals_reference(dtype: str, k: int) -> None:
    """The grouped kernel (BLAS off) at N = 1, 3, 8, 40: from most experts idle to ~40 rows
    each; experts 6 and 7 never chosen."""
    tokens, ws = _weights(DTYPES[dtype], k, seed=k)
    report = _check({}, tokens, ws)
    (kernel,) = report["kernels"]
    assert kernel["name"] == "moe_experts" and not report["blas_calls"]


def test_kernel_on_two_threads() -> None:
    """The parallel tasks (expert, row chunk) on two threads: each task's partial sums are its
    own (N = 40, k = 6: every expert's rows split over both threads)."""
    tokens, ws = _weights(torch.float32, 6, seed=3, shared=True)
    g = _graph({**tokens(1), **ws}, {"shared": True})
    exe = TVMBackend().compile(g, "cpu", blas="never", threads=2)
    for _ in range(3):
        args = list({**tokens(40), **ws}.values())
        _close(exe(*args)[0], ir.interpret(g, *args)[0], "two threads")


VARIANTS = {
    "shared": ({"shared": True}, {"shared": True}),
    "gpt_oss_bias": ({"activation": "gpt_oss", "limit": 1.5, "expert_bias": True}, {"bias": True}),
    "swiglu_shared_bias": (
        {"activation": "swiglu", "shared": True, "expert_bias": True},
        {"shared": True, "bias": True},
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_kernel_variants(dtype: str, variant: str) -> None:
    """The shared expert, per-expert biases (b2 wider than x), the GPT-OSS gate (clamp
    reached: limit 1.5) and the unclamped SwiGLU, k = 4."""
    attrs, extra = VARIANTS[variant]
    tokens, ws = _weights(DTYPES[dtype], 4, seed=7, **extra)
    _check(attrs, tokens, ws, counts=(1, 8, 40))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_blas_path_is_one_grouped_mm_per_projection(dtype: str, monkeypatch) -> None:
    """BLAS always: the routed experts take three `torch._grouped_mm` calls a step (w1, w3, w2),
    no per-expert matmul, and equal the reference (I = 48: bf16 hidden rows of 96 bytes, the
    16-byte multiple it needs)."""
    calls = []
    grouped_mm = torch._grouped_mm

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return grouped_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    tokens, ws = _weights(DTYPES[dtype], 3, seed=11, shared=True, bias=True, inter=48)
    attrs = {"activation": "gpt_oss", "shared": True, "expert_bias": True}
    report = _check(attrs, tokens, ws, blas="always", counts=(1, 40))
    assert sum(report["blas_calls"].values()) == 2
    assert calls == [(E, D, 48), (E, D, 48), (E, 48, D)] * 2


def test_blas_path_unaligned_rows_loop() -> None:
    """fp32 rows of d = 6 (24 bytes: not the 16-byte strides `torch._grouped_mm` needs) take
    one matmul per expert instead, same result."""
    from backends.tvm.semantic_moe import grouped_experts

    gen = torch.Generator().manual_seed(5)
    x, experts = torch.randn(5, 6, generator=gen), torch.randint(0, 4, (5, 2), generator=gen)
    ws = {"w1": torch.randn(4, 8, 6, generator=gen), "w3": torch.randn(4, 8, 6, generator=gen)}
    ws["w2"] = torch.randn(4, 6, 8, generator=gen)
    inputs = {"x": x, "weights": torch.rand(5, 2, generator=gen), "experts": experts, **ws}
    g = _graph(inputs, {})
    (want,) = ir.interpret(g, *inputs.values())
    _close(grouped_experts(g.ops[0].op, *inputs.values()), want, "unaligned")


@pytest.mark.parametrize("blas", ["never", "always"])
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3"])
def test_kernel_reads_quantised_weights(fmt: str, blas: str) -> None:
    """`weight_format`: the grouped kernel decodes w1/w3/w2 through `backends.tvm.dequant` (FP4
    rows into a tile first), the BLAS path dequantises them first; both = the reference (dense
    math on the dequantised weights), bf16 x."""
    from models.weights import quantize_fp4, quantize_fp8

    tokens, ws = _weights(torch.float32, 3, seed=13)
    quant = {}
    for name in ("w1", "w3", "w2"):
        pairs = [(quantize_fp4 if fmt == "fp4_e2m1" else quantize_fp8)(w) for w in ws[name]]
        quant[name] = torch.stack([q for q, _ in pairs])
        scales = torch.stack([s for _, s in pairs])
        fp4 = fmt == "fp4_e2m1"
        quant[name + "s"] = scales.view(torch.uint8).view(torch.int8) if fp4 else scales.float()

    def bf16(n: int) -> dict[str, torch.Tensor]:
        return {k: v.bfloat16() if k == "x" else v for k, v in tokens(n).items()}

    ordered = {k: quant[k] for k in ("w1", "w3", "w2", "w1s", "w3s", "w2s")}
    report = _check({"weight_format": fmt}, bf16, ordered, blas=blas, counts=(1, 8))
    assert len(report["blas_calls"]) == (blas == "always")


def test_cost_counts_touched_experts() -> None:
    """Bytes: min(E, N·k) experts' weights (each read once), not all E; the shared expert and
    the activations in full; symbolic N gives a Min."""
    tokens, ws = _weights(torch.float32, 2, seed=1, shared=True)
    g = _graph({**tokens(1), **ws}, {"shared": True})
    node = g.ops[0]
    types = [v.type for v in node.operands]
    expert = 3 * I * D * 4
    rest = sum(v.type.nbytes for v in node.operands if v.name not in ("w1", "w3", "w2"))
    out = D * 4 * ir.sym("N")
    cost = node.op.cost(types, [node.result.type])
    n = ir.sym("N")
    assert sympy.simplify(cost.bytes - (rest + out + sympy.Min(E, 2 * n) * expert)) == 0
    assert cost.bytes.subs(n, 1) == (rest + out).subs(n, 1) + 2 * expert
    assert cost.bytes.subs(n, 40) == (rest + out).subs(n, 40) + E * expert


@pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="~20 s on 2 busy cores; DSV4C_SLOW=1")
def test_benchmark_script_writes_rows(tmp_path) -> None:
    """benchmarks/moe_grouped.py on tiny (the speed figures live in docs/benchmarks.md): one row
    per token count with the three implementations' times and the grouped kernel's difference."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "moe.json"
    cmd = [sys.executable, str(root / "benchmarks" / "moe_grouped.py"), "--model", "tiny",
           "--tokens", "1", "5", "--layers", "2", "--repeat", "2", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=root, timeout=300)
    doc = json.loads(out.read_text())
    assert [r["tokens"] for r in doc["rows"]] == [1, 5]
    for r in doc["rows"]:
        assert r["gather_ms"] > 0 and r["grouped_ms"] > 0 and r["blas_ms"] > 0
        assert r["rel_diff"] < 1e-5 and 1 <= r["experts_touched"] <= 8
