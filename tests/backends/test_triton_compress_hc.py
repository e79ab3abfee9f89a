"""The Triton templates of the KV compressor (`attn.compress`, `attn.compress_step`) and of mHC
(`hc.pre`, `hc.post`, `hc.head`) vs the reference interpreter, on the CPU interpreter at small
shapes. Each graph runs twice: with the interpreter's tiles ("cpu") and with sm_90's (smaller
tiles, so the K, channel, entry and token loops take several steps with ragged last tiles).
fp32 everywhere, bf16 activations where a bf16 model feeds them (tolerance of bf16 rounding on
bf16 outputs only). Edge cases: token counts and widths that are not multiples of the tiles,
T not a multiple of the ratio, an overlap window across an entry-tile boundary, a decode step
inside a block, completing one, on the first block (-inf predecessor scores) and past the
cache's last row; nodes the templates refuse run the reference with a reason."""

from __future__ import annotations

import pytest
import torch
from backend_graphs import graph_of, rope_tables

import ir
from backends.triton import TritonBackend

GEN = torch.Generator().manual_seed(0)
TARGETS = ["cpu", "sm_90"]


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN).to(dtype)


def _check(nodes, inputs: dict[str, torch.Tensor], target: str) -> dict:
    """Run the graph of `nodes` through Triton kernels (no fallback) and the reference."""
    g = graph_of(nodes, inputs)
    exe = TritonBackend().compile(g, target)
    assert not exe.fallbacks(), exe.fallbacks()
    args = list(inputs.values())
    for v, got, want in zip(g.outputs, exe(*args), ir.interpret(g, *args)):
        assert got.dtype == want.dtype and got.shape == want.shape, v
        tol = 2e-2 if got.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=str(v))
    return exe.report()


# --- mHC --------------------------------------------------------------------------------------


def _hc_inputs(b: int, t: int, n: int, d: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "x": _t(b, t, n, d, dtype=dtype),
        "fn": _t((2 + n) * n, n * d) * 0.1,
        "scale": _t(3),
        "base": _t((2 + n) * n),
        "f": _t(b, t, d, dtype=dtype),
        "post": _t(b, t, n).abs(),
        "comb": _t(b, t, n, n).abs(),
        "fn_head": _t(n, n * d) * 0.1,
        "scale1": _t(1),
        "base_head": _t(n),
    }


HC_NODES = [
    ("hc.pre", ["x", "fn", "scale", "base"], {}),
    ("hc.post", ["f", "x", "post", "comb"], {}),
    ("hc.head", ["x", "fn_head", "scale1", "base_head"], {}),
]


@pytest.mark.parametrize("target", TARGETS)
def test_hc_pre_post_head_fp32(target):
    """17 tokens (16-token tiles: one full, one ragged); d = 72: n·d = 288 is 2.25 K tiles of
    sm_90's 128 and d 1.1 of its 64-channel chunks."""
    report = _check(HC_NODES, _hc_inputs(1, 17, 4, 72, torch.float32), target)
    names = sorted(k["name"] for k in report["kernels"])
    assert names == ["hc_head", "hc_post", "hc_pre"]


def test_hc_bf16_streams_and_few_sinkhorn_steps():
    inputs = _hc_inputs(2, 3, 4, 24, torch.bfloat16)
    nodes = [("hc.pre", ["x", "fn", "scale", "base"], {"iters": 3, "eps": 1e-3}), *HC_NODES[1:]]
    _check(nodes, inputs, "sm_90")


def test_hc_pre_with_eight_streams():
    _check(HC_NODES[:1], _hc_inputs(1, 3, 8, 8, torch.float32), "cpu")


def test_hc_sinkhorn_runs_its_iterations():
    """The kernel's comb differs between 1 and 20 Sinkhorn steps as the reference's does (a
    kernel that ignored ITERS would match one of the two graphs only)."""
    inputs = _hc_inputs(1, 2, 4, 8, torch.float32)
    outs = []
    for iters in (1, 20):
        g = graph_of([("hc.pre", ["x", "fn", "scale", "base"], {"iters": iters})], inputs)
        exe = TritonBackend().compile(g, "cpu")
        outs.append(exe(*inputs.values())[2])
        torch.testing.assert_close(outs[-1], ir.interpret(g, *inputs.values())[2])
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    torch.testing.assert_close(outs[1].sum(-2), torch.ones(1, 2, 4))  # columns sum to 1


# --- attn.compress ----------------------------------------------------------------------------


def _compress_inputs(b, t, d, c, m, half, dtype) -> dict[str, torch.Tensor]:
    cos, sin = rope_tables(GEN, t // m, half)
    return {
        "x": _t(b, t, d, dtype=dtype),
        "wkv2": _t(2 * c, d, dtype=dtype),
        "wgate2": _t(2 * c, d, dtype=dtype),
        "ape2": _t(m, 2 * c),
        "wkv": _t(c, d, dtype=dtype),
        "wgate": _t(c, d, dtype=dtype),
        "ape": _t(m, c),
        "norm": _t(c),
        "cos": cos,
        "sin": sin,
    }


def _compress_nodes(m: int) -> list[tuple[str, list[str], dict]]:
    rope = ["norm", "cos", "sin"]
    return [
        ("attn.compress", ["x", "wkv2", "wgate2", "ape2", *rope], {"ratio": m}),
        ("attn.compress", ["x", "wkv", "wgate", "ape", *rope], {"ratio": m, "overlap": False}),
    ]


@pytest.mark.parametrize("target", TARGETS)
def test_compress_ragged_sequence(target):
    """T = 9 with ratio 2: the last token is not a complete block; c = 6 of a 16-wide tile."""
    _check(_compress_nodes(2), _compress_inputs(2, 9, 8, 6, 2, 2, torch.float32), target)


@pytest.mark.parametrize("target", TARGETS)
def test_compress_across_entry_and_channel_tiles(target):
    """Ratio 16: 4-entry tiles, T = 100 gives 6 entries (a second, ragged tile whose first entry
    pools the previous tile's last block); c = 72: three of sm_90's 32-channel tiles; d = 40:
    three of its 16-wide fp32 K tiles."""
    _check(_compress_nodes(16), _compress_inputs(1, 100, 40, 72, 16, 4, torch.float32), target)


def test_compress_bf16():
    _check(_compress_nodes(4), _compress_inputs(2, 13, 16, 32, 4, 4, torch.bfloat16), "sm_90")


def test_compress_shorter_than_a_block():
    _check(_compress_nodes(4), _compress_inputs(1, 3, 8, 6, 4, 2, torch.float32), "cpu")


# --- attn.compress_step -----------------------------------------------------------------------


def _step_inputs(pos: int, dtype: torch.dtype, c: int = 20) -> dict[str, torch.Tensor]:
    b, d, m, rows = 2, 24, 4, 6
    kv2, score2 = _t(b, 2 * m, 2 * c), _t(b, 2 * m, 2 * c)
    if pos < m:  # the first block: no predecessor (the model's init_state)
        kv2[:, :m], score2[:, :m] = 0.0, float("-inf")
    cos, sin = rope_tables(GEN, 1, 4)
    return {
        "x": _t(b, 1, d, dtype=dtype),
        "pos": torch.tensor(pos),
        "kv_state": kv2,
        "score_state": score2,
        "wkv": _t(2 * c, d, dtype=dtype),
        "wgate": _t(2 * c, d, dtype=dtype),
        "ape": _t(m, 2 * c),
        "kv1": _t(b, m, c),
        "score1": _t(b, m, c),
        "wkv1": _t(c, d, dtype=dtype),
        "wgate1": _t(c, d, dtype=dtype),
        "ape1": _t(m, c),
        "norm": _t(c),
        "cos": cos,
        "sin": sin,
        "cache": _t(b, rows, c, dtype=dtype),
    }


def _step_nodes() -> list[tuple[str, list[str], dict]]:
    rest = ["norm", "cos", "sin", "cache"]
    overlap = ["x", "pos", "kv_state", "score_state", "wkv", "wgate", "ape", *rest]
    plain = ["x", "pos", "kv1", "score1", "wkv1", "wgate1", "ape1", *rest]
    return [
        ("attn.compress_step", overlap, {"ratio": 4}),
        ("attn.compress_step", plain, {"ratio": 4, "overlap": False}),
    ]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("pos", [3, 5, 7, 27])  # first block ends / inside / ends / past L rows
def test_compress_step(pos, target):
    """c = 20: two of sm_90's 16-channel tiles, the second ragged."""
    _check(_step_nodes(), _step_inputs(pos, torch.float32), target)


@pytest.mark.parametrize("pos", [6, 11])
def test_compress_step_bf16(pos):
    _check(_step_nodes(), _step_inputs(pos, torch.bfloat16), "sm_90")


def test_compress_step_writes_the_cache_only_on_a_block_boundary():
    inputs = _step_inputs(5, torch.float32)
    g = graph_of(_step_nodes()[:1], inputs)
    exe = TritonBackend().compile(g, "cpu")
    cache, kv_state, _ = exe(*inputs.values())
    assert torch.equal(cache, inputs["cache"])
    assert not torch.equal(kv_state, inputs["kv_state"])  # the token went into the state
    inputs["pos"] = torch.tensor(7)
    cache, _, _ = exe(*inputs.values())
    changed = (cache != inputs["cache"]).any(-1)
    assert changed[:, 1].all() and changed.sum() == 2  # row 7 // 4 of each batch row


# --- what the templates refuse ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "inputs", "reason"),
    [
        (HC_NODES[0], _hc_inputs(1, 2, 2, 8, torch.float32), "power of two >= 4"),
        (_compress_nodes(3)[1], _compress_inputs(1, 7, 8, 6, 3, 2, torch.float32), "ratio 3"),
    ],
)
def test_refused_nodes_run_the_reference_with_a_reason(node, inputs, reason):
    g = graph_of([node], inputs)
    exe = TritonBackend().compile(g, "cpu")
    ((op, why),) = exe.fallbacks()
    assert op == node[0] and reason in why
    for got, want in zip(exe(*inputs.values()), ir.interpret(g, *inputs.values())):
        torch.testing.assert_close(got, want)


# --- AOT at DeepSeek-V4 sizes -----------------------------------------------------------------

V4 = {"v4-flash": 4096, "v4-pro": 7168}  # model dim d; n = 4 streams, rope half 32 in both
COMPRESSORS = (("csa", 512, 4, True), ("indexer", 128, 4, True), ("hca", 512, 128, False))


def v4_graph(preset: str = "v4-flash", dtype: ir.DType = ir.DType.bf16) -> ir.Graph:
    """The mHC ops and the three compressors of `preset` (prefill over T tokens and one decode
    step each), activations and weights in `dtype`, mHC parameters and states in fp32."""
    d, n, f32 = V4[preset], 4, ir.DType.f32
    bsz, t = ir.sym("B"), ir.sym("T")
    b = ir.Builder(name=preset.replace("-", "_") + "_compress_hc")

    def inp(name: str, shape: tuple, kind: ir.DType = dtype, role: str = "activation"):
        return b.input(name, ir.TensorType(shape, kind), role=role)

    def param(name: str, shape: tuple, kind: ir.DType = dtype):
        return inp(name, shape, kind, "parameter")

    streams, x, x1 = inp("streams", (bsz, t, n, d)), inp("x", (bsz, t, d)), inp("x1", (bsz, 1, d))
    pos = inp("pos", (), ir.DType.i64)
    mix = [param("fn", ((2 + n) * n, n * d), f32), param("scale", (3,), f32)]
    outs = list(b.op("hc.pre", [streams, *mix, param("base", ((2 + n) * n,), f32)]))
    weights = [inp("post", (bsz, t, n), f32), inp("comb", (bsz, t, n, n), f32)]
    outs.append(b.op("hc.post", [x, streams, *weights]))
    head = [param("fn_head", (n, n * d), f32), param("scale1", (1,), f32)]
    outs.append(b.op("hc.head", [streams, *head, param("base_head", (n,), f32)]))
    for name, c, m, overlap in COMPRESSORS:
        w, rows = (2 * c, 2 * m) if overlap else (c, m)
        proj = [param(f"{name}_wkv", (w, d)), param(f"{name}_wgate", (w, d))]
        proj += [param(f"{name}_ape", (m, w), f32), param(f"{name}_norm", (c,))]
        rope = [param(f"{name}_cos", (t // m, 32), f32), param(f"{name}_sin", (t // m, 32), f32)]
        attrs = {"ratio": m, "overlap": overlap}
        outs.append(b.op("attn.compress", [x, *proj, *rope], **attrs))
        state = [inp(f"{name}_{s}_state", (bsz, rows, w), f32) for s in ("kv", "score")]
        rope1 = [inp(f"{name}_cos1", (1, 32), f32), inp(f"{name}_sin1", (1, 32), f32)]
        cache = inp(f"{name}_cache", (bsz, 4096 // m, c), role="cache")
        step = [x1, pos, *state, *proj, *rope1, cache]
        outs.extend(b.op("attn.compress_step", step, **attrs))
    b.output(*outs)
    return b.build()


def aot_rows(preset: str, dtype: ir.DType, tokens: int, targets: list[str]) -> list:
    """`aot_compile` of the graph's kernels, each row named by its variant (ratio, step)."""
    import dataclasses

    from backends.triton.aot import aot_compile

    exe = TritonBackend().compile(v4_graph(preset, dtype), targets[0])
    assert not exe.fallbacks(), exe.fallbacks()
    rows = aot_compile(exe, targets, bindings={"T": tokens, "B": 1})
    named = []
    for r in rows:
        variant = [f"m={r.constexprs['RATIO']}"] if "RATIO" in r.constexprs else []
        variant += ["step"] if r.constexprs.get("STEP") else []
        name = f"{r.kernel}[{','.join(variant)}]" if variant else r.kernel
        named.append(dataclasses.replace(r, kernel=name))
    return named


def test_aot_sm90_v4_flash_no_spills():
    """Every kernel and variant compiles for sm_90 at v4-flash sizes in bf16 (d = 4096, the CSA,
    indexer and HCA compressors, a 4096-token prefill), without spills."""
    try:
        rows = aot_rows("v4-flash", ir.DType.bf16, 4096, ["sm_90"])
    except RuntimeError as e:  # e.g. a triton wheel without the GPU backends' toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    kernels = {r.kernel for r in rows}
    assert {"hc_pre", "hc_post", "hc_head", "compress_pool[m=4]", "compress_pool[m=128]"} <= kernels
    assert {"compress_step[m=4]", "compress_norm_rope[m=128,step]"} <= kernels
    for r in rows:
        assert r.error is None, (r.kernel, r.error)
        assert r.spills == 0 and 0 < r.registers <= 255, (r.kernel, r.registers, r.spills)
        assert r.shared < 227 * 1024


if __name__ == "__main__":  # the table: python tests/backends/test_triton_compress_hc.py v4-pro f32
    import sys

    from backends.targets import GPU_TARGETS
    from backends.triton.aot import format_table

    preset = sys.argv[1] if len(sys.argv) > 1 else "v4-flash"
    dtype = ir.DType(sys.argv[2]) if len(sys.argv) > 2 else ir.DType.bf16
    print(f"{preset} mHC and compressors in {dtype.value}, 4096 tokens")
    print(format_table(aot_rows(preset, dtype, 4096, list(GPU_TARGETS))))
