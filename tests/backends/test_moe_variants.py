"""The `moe.route` / `moe.experts` variants the Hugging Face spellings fuse to (issue 15) on both
backends vs the ops' reference: renormalisation with an eps, grouped top-k (DeepSeek-V3's
n_group/topk_group, sigmoid + bias, masked by 0 or -inf), unclamped SwiGLU experts with and
without the shared expert, and GPT-OSS's router bias on the logits, "gpt_oss" gate and
per-expert biases (fp32 and bf16; TVM's BLAS path too; Triton AOT for the GPU targets). Triton
runs on the CPU interpreter (conftest)."""

from __future__ import annotations

import os

import pytest
import torch
from backend_graphs import graph_of
from test_tvm_semantic import _use_gpu_ir

import ir
from backends.triton import TritonBackend
from backends.tvm import TVMBackend

GEN = torch.Generator().manual_seed(3)
BACKENDS = {"tvm": TVMBackend, "triton": TritonBackend}


def _t(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * scale


def _run(backend: str, nodes: list, inputs: dict[str, torch.Tensor], gpu_ir: bool = False) -> None:
    """Compile the graph of `nodes` with `backend` (no fallback; `gpu_ir`: TVM's kernels as
    lowered for a GPU, top-k in the kernel, built for this CPU) and compare with the reference:
    expert indices exactly, floats to fp32 rounding (relative to the output's magnitude: the
    unclamped SwiGLU outputs reach ~1e3)."""
    g = graph_of(nodes, inputs)
    exe = BACKENDS[backend]().compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    if gpu_ir:
        _use_gpu_ir(exe)
    args = list(inputs.values())
    for v, got, want in zip(g.outputs, exe(*args), ir.interpret(g, *args)):
        assert got.dtype == want.dtype and got.shape == want.shape, v
        if not want.dtype.is_floating_point:
            assert torch.equal(got, want), (v, got, want)
        else:
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale, msg=str(v))


@pytest.mark.parametrize("backend", ["tvm", "tvm_gpu_ir", "triton"])
def test_route_grouped_and_eps(backend):
    """E = 8 experts in 4 groups of 2 (2 kept), k = 3; renormalised with eps, scaled. Inputs from
    their own generator (seed 23: every gap below > 9e-3), whatever ran before."""
    draw, _ = _seeded(23)
    n, d, e = 19, 16, 8
    inputs = {"x": draw(n, d), "gate": draw(e, d, scale=0.5), "bias": draw(e, scale=0.2)}
    logits = inputs["x"] @ inputs["gate"].T
    s = logits.sigmoid() + inputs["bias"]
    groups = s.reshape(n, 4, 2).sum(-1)
    top = groups.sort(-1, descending=True).values
    assert (top[:, 1] - top[:, 2]).min() > 1e-3, "inputs too close to a group tie"
    kept = torch.zeros(n, 4, dtype=torch.bool).scatter(1, groups.topk(2, -1).indices, True)
    for fill in (0.0, float("-inf")):  # the dropped groups' experts score `group_fill`
        best = s.masked_fill(~kept.repeat_interleave(2, 1), fill).sort(-1, True).values
        assert (best[:, 2] - best[:, 3]).min() > 1e-3, "inputs too close to a 3rd-expert tie"
    probs = logits.softmax(-1).sort(-1, descending=True).values
    assert (probs[:, 1] - probs[:, 2]).min() > 1e-3, "inputs too close to a softmax top-2 tie"
    grouped = {"k": 3, "score": "sigmoid", "bias": True, "n_group": 4, "topk_group": 2}
    nodes = [
        ("moe.route", ["x", "gate", "bias"], {**grouped, "eps": 1e-20, "route_scale": 2.5}),
        ("moe.route", ["x", "gate", "bias"], {**grouped, "group_fill": float("-inf")}),
        ("moe.route", ["x", "gate"], {"k": 2, "score": "softmax", "eps": 0.5}),
    ]
    _run(backend.removesuffix("_gpu_ir"), nodes, inputs, gpu_ir=backend.endswith("gpu_ir"))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_experts_unclamped_swiglu(backend):
    """Activation "swiglu": no clamp (gate values far beyond the unused limit 0.5)."""
    n, d, inter, e, k = 5, 16, 16, 4, 2
    inputs = {
        "x": _t(n, d, scale=3.0),
        "weights": _t(n, k).abs(),
        "experts": torch.tensor([[0, 3], [3, 1], [0, 1], [1, 0], [3, 0]]),  # expert 2 idle
        "w1": _t(e, inter, d),
        "w3": _t(e, inter, d),
        "w2": _t(e, d, inter),
        "s1": _t(8, d),
        "s3": _t(8, d),
        "s2": _t(d, 8),
    }
    routed = ["x", "weights", "experts", "w1", "w3", "w2"]
    plain = {"activation": "swiglu", "limit": 0.5}
    nodes = [
        ("moe.experts", routed, plain),
        ("moe.experts", [*routed, "s1", "s3", "s2"], {**plain, "shared": True}),
    ]
    _run(backend, nodes, inputs)
    clamped = ir.interpret(graph_of([("moe.experts", routed, {"limit": 0.5})], inputs),
                           *inputs.values())[0]
    unclamped = ir.interpret(graph_of(nodes[:1], inputs), *inputs.values())[0]
    assert (clamped - unclamped).abs().max() > 1.0  # the test's inputs do exercise the clamp


# --- GPT-OSS: the router's own logit bias, the "gpt_oss" gate and per-expert biases -----------

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def _seeded(seed: int):
    """A `_t` drawing from its own generator: each test's inputs do not depend on which tests
    ran before it (the gap checks below hold for these inputs whatever -k selects)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    return draw, gen


def _close(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """fp32 to fp32 rounding; bf16 to bf16's own rtol (torch's default, 1.6e-2) relative to the
    output's magnitude: the kernels and the reference round the hidden rows and each slot's
    product to bf16 at the same points but sum in different orders."""
    scale = want.float().abs().max().item()
    if want.dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1.6e-2 * scale, msg=msg)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale, msg=msg)


def _run_typed(backend: str, nodes: list, inputs: dict[str, torch.Tensor]) -> None:
    """`_run` with a dtype-aware float comparison (`_close`)."""
    g = graph_of(nodes, inputs)
    exe = BACKENDS[backend.removesuffix("_gpu_ir")]().compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    if backend.endswith("_gpu_ir"):
        _use_gpu_ir(exe)
    args = list(inputs.values())
    for v, got, want in zip(g.outputs, exe(*args), ir.interpret(g, *args)):
        assert got.dtype == want.dtype and got.shape == want.shape, v
        if want.dtype.is_floating_point:
            _close(got, want, str(v))
        else:
            assert torch.equal(got, want), (v, got, want)


def _gap(chooser: torch.Tensor, k: int) -> float:
    """The smallest margin between a token's k-th and (k+1)-th choice (ties flip top-k)."""
    top = chooser.sort(-1, descending=True).values
    return (top[:, k - 1] - top[:, k]).min().item()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("backend", ["tvm", "tvm_gpu_ir", "triton"])
def test_route_logit_bias(backend, dtype):
    """logits = x·gateᵀ + b before scoring: softmax top-2 renormalised (GPT-OSS), sigmoid with a
    selection bias too (k = 3, scaled), and a hash router (b moves only the weights)."""
    n, d, e, dt = 19, 16, 8, DTYPES[dtype]
    t, gen = _seeded(18)
    inputs = {
        "x": t(n, d).to(dt),
        "gate": t(e, d, scale=0.5).to(dt),
        "bias": t(e, scale=0.2),
        "tid2eid": torch.randint(0, e, (11, 2), generator=gen),
        "ids": torch.randint(0, 11, (n,), generator=gen),
        "logit_bias": t(e).to(dt),
    }
    logits = inputs["x"].float() @ inputs["gate"].float().T + inputs["logit_bias"].float()
    assert _gap(logits, 2) > 1e-3 and _gap(logits.sigmoid() + inputs["bias"], 3) > 1e-3
    assert not torch.equal(logits.topk(2).indices, (logits - inputs["logit_bias"]).topk(2).indices)
    nodes = [
        ("moe.route", ["x", "gate", "logit_bias"], {"k": 2, "score": "softmax",
                                                    "logit_bias": True}),
        ("moe.route", ["x", "gate", "bias", "logit_bias"],
         {"k": 3, "score": "sigmoid", "bias": True, "logit_bias": True, "route_scale": 2.5}),
        ("moe.route", ["x", "gate", "tid2eid", "ids", "logit_bias"],
         {"k": 2, "hash": True, "logit_bias": True}),
    ]  # fmt: skip
    _run_typed(backend, nodes, inputs)


def _gpt_oss_inputs(dt: torch.dtype) -> dict[str, torch.Tensor]:
    n, d, inter, e, k = 6, 16, 24, 4, 2
    _t, _ = _seeded(16)
    return {
        "x": _t(n, d, scale=2.0).to(dt),
        "weights": _t(n, k).abs(),
        "experts": torch.tensor([[0, 3], [3, 1], [0, 1], [1, 0], [3, 0], [1, 3]]),  # 2 idle
        "w1": _t(e, inter, d, scale=0.5).to(dt),
        "w3": _t(e, inter, d, scale=0.5).to(dt),
        "w2": _t(e, d, inter, scale=0.5).to(dt),
        "s1": _t(8, d, scale=0.5).to(dt),
        "s3": _t(8, d, scale=0.5).to(dt),
        "s2": _t(d, 8, scale=0.5).to(dt),
        "b1": _t(e, inter).to(dt),
        "b3": _t(e, inter).to(dt),
        "b2": _t(e, d),  # a wider bias than x: allowed, added in fp32
    }


ROUTED = ["x", "weights", "experts", "w1", "w3", "w2"]
GPT_OSS = {"activation": "gpt_oss", "limit": 1.5, "alpha": 1.702}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_experts_gpt_oss_and_biases(backend, dtype):
    """Activation "gpt_oss" (clamps at 1.5 bite) with per-expert biases, with the shared expert,
    and biases under the clamped SwiGLU."""
    inputs = _gpt_oss_inputs(DTYPES[dtype])
    biases = ["b1", "b3", "b2"]
    nodes = [
        ("moe.experts", [*ROUTED, *biases], {**GPT_OSS, "expert_bias": True}),
        ("moe.experts", [*ROUTED, "s1", "s3", "s2", *biases],
         {**GPT_OSS, "expert_bias": True, "shared": True}),
        ("moe.experts", [*ROUTED, *biases], {"limit": 1.5, "expert_bias": True}),
    ]  # fmt: skip
    _run_typed(backend, nodes, inputs)


def test_gpt_oss_inputs_exercise_every_term():
    """The inputs above make each piece matter: dropping the clamps, the +1, alpha or a bias
    changes the reference by far more than the tolerance."""
    inputs = _gpt_oss_inputs(torch.float32)
    args = [*ROUTED, "b1", "b3", "b2"]

    def ref(**attrs) -> torch.Tensor:
        g = graph_of([("moe.experts", args, {**GPT_OSS, "expert_bias": True, **attrs})], inputs)
        return ir.interpret(g, *inputs.values())[0]

    base = ref()
    for variant in ({"limit": 100.0}, {"alpha": 1.0}, {"activation": "clamped_swiglu"}):
        assert (ref(**variant) - base).abs().max() > 0.1, variant
    zero = dict(inputs, b2=torch.zeros_like(inputs["b2"]))
    g = graph_of([("moe.experts", args, {**GPT_OSS, "expert_bias": True})], zero)
    assert (ir.interpret(g, *zero.values())[0] - base).abs().max() > 0.1


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_experts_blas_path_gpt_oss(dtype):
    """TVM's grouped-GEMM (BLAS) path of moe.experts equals the reference for the new
    variants."""
    from backends.tvm.semantic_moe import grouped_experts

    inputs = _gpt_oss_inputs(DTYPES[dtype])
    names = [*ROUTED, "s1", "s3", "s2", "b1", "b3", "b2"]
    attrs = {**GPT_OSS, "expert_bias": True, "shared": True}
    g = graph_of([("moe.experts", names, attrs)], inputs)
    (want,) = ir.interpret(g, *inputs.values())
    got = grouped_experts(g.ops[-1].op, *(inputs[k] for k in names))
    _close(got, want, "grouped_experts")


# --- AOT: a GPT-OSS-20B-sized MoE layer (d = I = 2880, 32 experts, top-4) in bf16 ---------------

_AOT_TARGETS = ["sm_90"] + (
    ["sm_80", "sm_100", "sm_120", "gfx942", "gfx950"] if os.environ.get("DSV4C_SLOW") else []
)


def gpt_oss_moe_graph(d: int = 2880, e: int = 32, inter: int = 2880, k: int = 4) -> ir.Graph:
    """The biased softmax router and the gpt_oss experts with biases over N symbolic tokens."""
    n = ir.sym("N")
    b = ir.Builder(name="gpt_oss_moe")

    def param(name: str, shape: tuple) -> ir.Value:
        return b.input(name, ir.TensorType(shape, ir.DType.bf16), role="parameter")

    x = b.input("x", ir.TensorType((n, d), ir.DType.bf16))
    gate, logit_bias = param("gate", (e, d)), param("router_bias", (e,))
    w1, w3, w2 = param("w1", (e, inter, d)), param("w3", (e, inter, d)), param("w2", (e, d, inter))
    b1, b3, b2 = param("b1", (e, inter)), param("b3", (e, inter)), param("b2", (e, d))
    weights, experts = b.op("moe.route", [x, gate, logit_bias], k=k, score="softmax",
                            logit_bias=True)  # fmt: skip
    routed = [x, weights, experts, w1, w3, w2, b1, b3, b2]
    b.output(b.op("moe.experts", routed, activation="gpt_oss", limit=7.0, expert_bias=True))
    return b.build()


@pytest.mark.parametrize("target", _AOT_TARGETS)
def test_aot_gpt_oss_layer(target):
    """Every kernel variant of the layer (route, the five experts phases) compiles for `target`
    for a 4096-token prefill, without spills (all six GPU targets with DSV4C_SLOW=1)."""
    from backends.triton.aot import aot_compile

    exe = TritonBackend().compile(gpt_oss_moe_graph(), target)
    assert not exe.fallbacks(), exe.fallbacks()
    try:
        rows = aot_compile(exe, [target], bindings={"N": 4096})
    except RuntimeError as e:  # e.g. a triton wheel without the GPU backends' toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert [r.kernel for r in rows] == ["moe_route"] + ["moe_experts"] * 5
    for r in rows:
        assert r.error is None, (r.kernel, r.error)
        assert r.spills == 0 and 0 < r.registers <= 255, (r.kernel, r.registers, r.spills)


@pytest.mark.parametrize(
    ("mnemonic", "names", "attrs", "message"),
    [
        ("moe.route", ["x", "gate"], {"k": 2, "logit_bias": True},
         "expected 3 operands (x, gate, logit_bias), got 2"),
        ("moe.route", ["x", "gate", "b2"], {"k": 2, "logit_bias": True},
         "logit_bias must be float [E=4]"),
        ("moe.experts", ROUTED, {"expert_bias": True},
         "expected 9 operands (x, weights, experts, w1, w3, w2, b1, b3, b2), got 6"),
        ("moe.experts", [*ROUTED, "b1", "b2", "b3"], {"expert_bias": True},
         "b3 must be float [4,24] (one row per expert)"),
        ("moe.experts", ROUTED, {"activation": "geglu"}, "activation must be one of"),
    ],
    ids=["route_arity", "route_bias_shape", "experts_arity", "experts_bias_shape", "activation"],
)
def test_verifier_names_the_bad_operand(mnemonic, names, attrs, message):
    """Each new operand rule rejects a corrupted op with a message naming what is wrong."""
    inputs = _gpt_oss_inputs(torch.float32)
    inputs["gate"] = torch.ones(4, 16)
    with pytest.raises(ir.IRTypeError) as info:
        graph_of([(mnemonic, names, attrs)], inputs)
    assert message in str(info.value), str(info.value)


def test_tvm_cuda_gpt_oss_layer_compiles_to_sm90_cubin(tmp_path):
    """TVM's CUDA source of the GPT-OSS layer (both ops, every new variant) and nvcc takes it."""
    import shutil

    from backends.tvm.codegen import device_source, nvcc_cubin

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (CUDA toolkit missing)")
    src = device_source(gpt_oss_moe_graph(d=256, e=8, inter=128, k=2), "sm_90")
    assert not src.skipped, src.skipped
    assert sorted(k.split("_")[1] for k in src.kernels) == ["experts", "route"]
    assert nvcc_cubin(src, tmp_path, "gpt_oss_moe").stat().st_size > 0


def test_gpt_oss_layer_prints_and_parses_back():
    """The new attributes survive the text form: parse(print(g)) prints the same, and verifies."""
    text = ir.to_text(gpt_oss_moe_graph(d=64, e=4, inter=32, k=2))
    assert "logit_bias=true" in text and 'activation="gpt_oss", alpha=1.702' in text
    again = ir.parse(text)
    ir.verify(again)
    assert ir.to_text(again) == text
