"""The MoE templates (`moe.route`, `moe.experts`) on the Triton CPU interpreter vs the ops'
reference, at small shapes: score and hash routing, every score function, fp32 and bf16,
experts no token chose, token counts that are not multiples of the tiles, with and without the
shared expert. Each test builds a graph of the nodes under test (as test_tvm_semantic.py does)
and asserts they ran as Triton kernels, not as the reference fallback."""

from __future__ import annotations

import pytest
import torch
from backend_graphs import graph_of

import ir
from backends.triton import TritonBackend

GEN = torch.Generator().manual_seed(0)


def _t(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=GEN) * scale).to(dtype)


def _run(
    nodes: list[tuple[str, list[str], dict]], inputs: dict[str, torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(Triton outputs, reference outputs) of a graph of `nodes`; every node is a kernel."""
    g = graph_of(nodes, inputs)
    exe = TritonBackend().compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    args = list(inputs.values())
    got, want = exe(*args), ir.interpret(g, *args)
    assert {k["name"] for k in exe.report()["kernels"]} <= {"moe_route", "moe_experts"}
    for v, a, b in zip(g.outputs, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, v
    return got, want


# --- moe.route --------------------------------------------------------------------------------


def _distinct_picks(scores: torch.Tensor, k: int) -> None:
    """The test's inputs have no near-ties at the k-th pick (so top-k is well defined)."""
    top = scores.topk(k + 1, dim=-1).values
    assert (top[:, :-1] - top[:, 1:]).min() > 2e-5, "inputs too close to a top-k tie"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_scores_bias_and_hash(dtype):
    """N = 21 tokens: a block of 16 and a partial one; E = 37 experts: 27 masked score columns."""
    n, d, e, k = 21, 40, 37, 6
    x, gate = _t(n, d, dtype=dtype), _t(e, d, scale=0.3, dtype=dtype)
    inputs = {
        "x": x,
        "gate": gate,
        "bias": _t(e, scale=0.1),
        "table": torch.randint(0, e, (11, k), generator=GEN),
        "ids": torch.randint(0, 11, (n, 2), generator=GEN)[:, 1],  # strided, like a decode step's
    }
    logits = x.float() @ gate.float().T
    scores = torch.nn.functional.softplus(logits).sqrt()
    _distinct_picks(scores + inputs["bias"], k)
    _distinct_picks(scores, k)
    _distinct_picks(logits, 3)  # softmax and sigmoid are monotonic in the logits
    got, want = _run(
        [
            ("moe.route", ["x", "gate", "bias"], {"k": k, "bias": True, "route_scale": 2.5}),
            (
                "moe.route",
                ["x", "gate", "table", "ids"],
                {"k": k, "hash": True, "route_scale": 1.5},
            ),
            ("moe.route", ["x", "gate"], {"k": 3, "score": "softmax"}),
            ("moe.route", ["x", "gate"], {"k": 3, "score": "sigmoid", "renorm": False}),
        ],
        inputs,
    )
    for i, (a, b) in enumerate(zip(got, want)):
        if i % 2:  # expert indices: exactly the reference's, in its (descending) order
            assert torch.equal(a, b), (i, a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"weights of node {i // 2}")


# --- moe.experts ------------------------------------------------------------------------------


def _experts_inputs(n: int, d: int, inter: int, e: int, dtype: torch.dtype) -> dict:
    # every token picks expert 0 (N rows: a partial second tile when N = 17) and one of 2, 3, in
    # either slot; experts 1 (between used ones) and 4.. get no token
    other = 2 + torch.randint(0, 2, (n,), generator=GEN)
    experts = torch.stack([torch.zeros_like(other), other], dim=1)
    swap = torch.rand(n, generator=GEN) < 0.5
    experts[swap] = experts[swap].flip(1)
    return {
        "x": _t(n, d, dtype=dtype),
        "weights": torch.rand(n, 2, generator=GEN) + 0.1,
        "experts": experts,
        "w1": _t(e, inter, d, scale=0.3, dtype=dtype),
        "w3": _t(e, inter, d, scale=0.3, dtype=dtype),
        "w2": _t(e, d, inter, scale=0.3, dtype=dtype),
        "s1": _t(24, d, scale=0.3, dtype=dtype),
        "s3": _t(24, d, scale=0.3, dtype=dtype),
        "s2": _t(d, 24, scale=0.3, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_routed_and_shared(dtype):
    """N = 17 tokens: the shared expert's and expert 0's 17 rows are a full 16-row tile and one
    row, experts 2 and 3 get partial tiles; of 6 experts three get no token; I = 80 is two
    blocks of hidden columns, the shared expert's J = 24 only one; limit 1.5 clips."""
    inputs = _experts_inputs(17, 48, 80, 6, dtype)
    assert not torch.isin(torch.tensor([1, 4, 5]), inputs["experts"]).any()
    routed = ["x", "weights", "experts", "w1", "w3", "w2"]
    got, want = _run(
        [
            ("moe.experts", routed, {"limit": 1.5}),
            ("moe.experts", [*routed, "s1", "s3", "s2"], {"shared": True}),
        ],
        inputs,
    )
    tol = {} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_experts_hash_duplicates_and_single_token():
    """A hash table may send a token to one expert twice (weights add up), and a decode step
    has one token: most of the static grid exits early. Expert indices as int32."""
    inputs = _experts_inputs(1, 32, 16, 5, torch.float32)
    inputs["experts"] = torch.tensor([[2, 2]], dtype=torch.int32)
    got, want = _run([("moe.experts", ["x", "weights", "experts", "w1", "w3", "w2"], {})], inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


# --- AOT at DeepSeek-V4 sizes -----------------------------------------------------------------

V4 = {"v4-flash": (4096, 256, 2048), "v4-pro": (7168, 384, 3072)}  # d, experts, expert width


def v4_moe_graph(preset: str = "v4-flash", k: int = 6, vocab: int = 129280) -> ir.Graph:
    """One MoE layer of `preset` in bf16 over N symbolic tokens: score routing, hash routing
    and the routed + shared experts (sizes from models/config.py)."""
    d, e, inter = V4[preset]
    n = ir.sym("N")
    b = ir.Builder(name=preset.replace("-", "_") + "_moe")

    def param(name: str, shape: tuple, dtype: ir.DType = ir.DType.bf16) -> ir.Value:
        return b.input(name, ir.TensorType(shape, dtype), role="parameter")

    x = b.input("x", ir.TensorType((n, d), ir.DType.bf16))
    ids = b.input("ids", ir.TensorType((n,), ir.DType.i64))
    gate, bias = param("gate", (e, d)), param("bias", (e,), ir.DType.f32)
    table = param("tid2eid", (vocab, k), ir.DType.i64)
    w1, w3, w2 = param("w1", (e, inter, d)), param("w3", (e, inter, d)), param("w2", (e, d, inter))
    s1, s3, s2 = param("s1", (inter, d)), param("s3", (inter, d)), param("s2", (d, inter))
    weights, experts = b.op("moe.route", [x, gate, bias], k=k, bias=True, route_scale=1.5)
    hashed = b.op("moe.route", [x, gate, table, ids], k=k, hash=True, route_scale=1.5)
    y = b.op("moe.experts", [x, weights, experts, w1, w3, w2, s1, s3, s2], shared=True)
    b.output(y, *hashed)
    return b.build()


def aot_rows(preset: str, tokens: int, targets: list[str]) -> list:
    """`aot_compile` of the layer's kernels, each row named by its variant (score/hash route,
    the phase of moe.experts)."""
    import dataclasses

    from backends.triton.aot import aot_compile

    exe = TritonBackend().compile(v4_moe_graph(preset), targets[0])
    assert not exe.fallbacks(), exe.fallbacks()
    rows = aot_compile(exe, targets, bindings={"N": tokens})
    named = []
    for r in rows:
        variant = r.constexprs.get("PHASE") or ("hash" if r.constexprs.get("HASH") else "score")
        named.append(dataclasses.replace(r, kernel=f"{r.kernel}[{variant}]"))
    return named


def test_aot_sm90_v4_flash_no_spills():
    """Every kernel variant compiles for sm_90 at v4-flash sizes (256 experts, top-6, d = 4096,
    I = 2048) for a 4096-token prefill, without spills."""
    try:
        rows = aot_rows("v4-flash", 4096, ["sm_90"])
    except RuntimeError as e:  # e.g. a triton wheel without the GPU backends' toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    phases = [f"moe_experts[{p}]" for p in ("count", "place", "up", "down", "combine")]
    assert [r.kernel for r in rows] == ["moe_route[score]", "moe_route[hash]", *phases]
    for r in rows:
        assert r.error is None, (r.kernel, r.error)
        assert r.spills == 0 and 0 < r.registers <= 255, (r.kernel, r.registers, r.spills)
        assert r.shared < 227 * 1024


if __name__ == "__main__":  # the table: python tests/backends/test_triton_moe.py v4-pro 4096
    import sys

    from backends.targets import GPU_TARGETS
    from backends.triton.aot import format_table

    preset = sys.argv[1] if len(sys.argv) > 1 else "v4-flash"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    print(f"{preset} MoE layer, {tokens} tokens")
    print(format_table(aot_rows(preset, tokens, list(GPU_TARGETS))))
