"""The Triton attention templates (`attn.sparse_mqa` prefill and split-KV decode, window / HCA /
CSA; `attn.indexer_topk` prefill and decode) against the reference interpreter on the CPU
interpreter. Edge cases: head dim 512 with 64 RoPE channels, -1 picks, windows that start
before position 0, decode rings not yet full, decode splits with no visible entry, head counts
and sequence lengths that are not multiples of the tiles, top-k wider than the visible keys.
fp32 compares at 1e-5; bf16 at 2 ulp of the largest output (the reference rounds the softmax
weights after normalising, the kernel before; 1 ulp is what it measured).
"""

from __future__ import annotations

import pytest
import torch
from backend_graphs import graph_of, rope_tables

import ir
from backends.targets import get_target
from backends.triton import TritonBackend
from backends.triton.templates.attention import _decode_splits, mqa_config

GEN = torch.Generator().manual_seed(0)
BF16_EPS = 2.0**-7  # bf16 keeps 8 significant bits


def _t(*shape: int, dtype=torch.float32, positive: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=GEN)
    return (x.abs() + 0.05 if positive else x).to(dtype)


def _run(nodes, inputs) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """(Triton outputs, reference outputs, report) of one graph holding `nodes`."""
    g = graph_of(nodes, inputs)
    exe = TritonBackend().compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    args = list(inputs.values())
    return list(exe(*args)), list(ir.interpret(g, *args)), exe.report()


def _check_close(nodes, inputs) -> dict:
    got, want, report = _run(nodes, inputs)
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        where = f"output {i} ({nodes[i][2]})"
        tol = {"rtol": 1e-5, "atol": 1e-5}
        if y.dtype == torch.bfloat16:  # 2 ulp of the largest output: o and its rotation round
            tol = {"rtol": 2 * BF16_EPS, "atol": 2 * BF16_EPS * y.abs().max().item()}
        torch.testing.assert_close(x, y, **tol, msg=lambda m, where=where: f"{where}: {m}")
    return report


def _mqa_inputs(b, t, h, c, half, s, k, dtype, window_rows=None) -> dict[str, torch.Tensor]:
    cos, sin = rope_tables(GEN, t, half)
    picks = torch.randint(-1, s, (b, t, k), generator=GEN)  # about 1 in s+1 is -1
    return {
        "q": _t(b, t, h, c, dtype=dtype),
        "kv": _t(b, window_rows or t, c, dtype=dtype),
        "sink": _t(h),
        "cos": cos,
        "sin": sin,
        "comp": _t(b, s, c, dtype=dtype),
        "picks": picks,
    }


BASE = ["q", "kv", "sink", "cos", "sin"]


def _variants(common: dict, ratio: int, tail: list[str] = ()) -> list[tuple[str, list, dict]]:
    tail = list(tail)
    return [
        ("attn.sparse_mqa", [*BASE, *tail], {**common, "q_norm_eps": 1e-6}),
        ("attn.sparse_mqa", [*BASE, "comp", *tail], {**common, "variant": "hca", "ratio": ratio}),
        (
            "attn.sparse_mqa",
            [*BASE, "comp", "picks", *tail],
            {**common, "variant": "csa", "ratio": ratio, "q_norm_eps": 1e-6},
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mqa_prefill_variants(dtype):
    """11 tokens, 3 heads: neither is a multiple of the 16-wide tiles; the window (5) starts
    before position 0 for the first tokens; HCA sees 0..3 entries; 20 CSA picks (two blocks)
    hold -1s."""
    inputs = _mqa_inputs(b=2, t=11, h=3, c=32, half=4, s=6, k=20, dtype=dtype)
    report = _check_close(_variants({"window": 5, "scale": 0.3}, ratio=3), inputs)
    assert [k["name"] for k in report["kernels"]] == ["sparse_mqa_prefill"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mqa_prefill_head_dim_512(dtype):
    """The real head: 448 NoPE + 64 RoPE channels, query norm, window 4, HCA and CSA."""
    inputs = _mqa_inputs(b=1, t=6, h=2, c=512, half=32, s=3, k=3, dtype=dtype)
    _check_close(_variants({"window": 4, "scale": 512**-0.5}, ratio=2), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", [2, 45])  # ring not yet full (two HCA entries) / wrapped
def test_sparse_mqa_decode_split_kv(dtype, pos):
    """Window 8 + 40 compressed rows = 48 entries: three splits of 16 on the CPU tiles, the
    later ones empty at pos 2 (HCA sees (pos+1)//ratio entries)."""
    b, h, c, window, s, k = 2, 3, 64, 8, 40, 24
    splits, _ = _decode_splits(get_target("cpu"), window + s, b, 1, 16)
    assert splits == 3 and mqa_config(get_target("cpu"), c, ir.DType.f32)["BLOCK_N"] == 16
    inputs = _mqa_inputs(b, 1, h, c, half=8, s=s, k=k, dtype=dtype, window_rows=window)
    inputs["pos"] = torch.tensor(pos)
    common = {"window": window, "scale": 0.2, "decode": True}
    report = _check_close(_variants(common, ratio=1, tail=["pos"]), inputs)
    assert [k["name"] for k in report["kernels"]] == ["sparse_mqa_decode"]


def test_sparse_mqa_decode_head_dim_512_bf16():
    inputs = _mqa_inputs(b=1, t=1, h=2, c=512, half=32, s=5, k=4, dtype=torch.bfloat16,
                         window_rows=4)  # fmt: skip
    inputs["pos"] = torch.tensor(13)
    common = {"window": 4, "scale": 512**-0.5, "decode": True}
    _check_close(_variants(common, ratio=4, tail=["pos"])[1:], inputs)


def test_sparse_mqa_check_gives_reasons():
    """Nodes the template cannot take run their reference, with the reason reported."""
    inputs = _mqa_inputs(b=1, t=3, h=2, c=14, half=2, s=2, k=2, dtype=torch.float32)
    odd = _mqa_inputs(b=1, t=3, h=2, c=15, half=2, s=2, k=2, dtype=torch.float32)
    wide = _mqa_inputs(b=1, t=2, h=1, c=1024, half=2, s=2, k=2, dtype=torch.float32)
    for case, ok in ((inputs, True), (odd, False), (wide, False)):
        g = graph_of([("attn.sparse_mqa", BASE, {"window": 2})], case)
        reasons = TritonBackend().compile(g, "cpu").fallbacks()
        assert (reasons == []) == ok, reasons
        if not ok:
            assert "head dim" in reasons[0][1] and "even head dims up to 512" in reasons[0][1]


# --- attn.indexer_topk ------------------------------------------------------------------------


def _scores(q, keys, w, scale, ratio, pos=None) -> torch.Tensor:
    """The indexer's fp32 scores with -inf where invisible (as the op's reference)."""
    logits = torch.einsum("bthc,bsc->bths", q.float(), keys.float()).relu()
    score = (logits * (w.float() * scale).unsqueeze(-1)).sum(2)
    p = torch.arange(q.shape[1]) + (0 if pos is None else int(pos))
    visible = torch.arange(keys.shape[1]) < ((p + 1) // ratio).unsqueeze(1)
    return score.masked_fill(~visible, float("-inf"))


def _assert_topk(got: torch.Tensor, want: torch.Tensor, score: torch.Tensor) -> None:
    """Tie-robust: the same -1 slots, no index twice in a row, and slot by slot the picks'
    scores equal the reference picks' scores (near-equal scores may swap between fp32 sums)."""
    assert torch.equal(got < 0, want < 0)
    valid = want >= 0
    picked = score.gather(-1, got.clamp(min=0))
    assert torch.isfinite(picked[valid]).all()  # only visible keys
    for row, ok in zip(got.flatten(0, 1), valid.flatten(0, 1)):
        assert len(set(row[ok].tolist())) == int(ok.sum())
    best = score.gather(-1, want.clamp(min=0))
    torch.testing.assert_close(picked[valid], best[valid], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk_prefill(dtype):
    """S = 21 keys (not a multiple of the 16-key blocks), ratio 1, 24 queries: the first see
    fewer than k = 5 keys (-1 pads), the last all 21, in two K_PAD = 16 chunks to merge.
    Positive q, keys and weights: 8 heads of ReLUs that all fire, no exact ties."""
    b, t, h, s, c = 1, 24, 8, 21, 32
    q, keys = _t(b, t, h, c, dtype=dtype, positive=True), _t(b, s, c, dtype=dtype, positive=True)
    w = _t(b, t, h, positive=True)
    attrs = {"k": 5, "ratio": 1, "scale": 0.5}
    (got,), (want,), _ = _run([("attn.indexer_topk", ["q", "keys", "w"], attrs)],
                              {"q": q, "keys": keys, "w": w})  # fmt: skip
    _assert_topk(got, want, _scores(q, keys, w, 0.5, 1))
    assert (want == -1).any() and (want >= 0).all(-1).any()  # both pads and full rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", [0, 6, 70])  # nothing, 3, all 24 keys visible (ratio 2)
def test_indexer_topk_decode(dtype, pos):
    b, h, s, c = 2, 8, 24, 128
    q, keys = _t(b, 1, h, c, dtype=dtype, positive=True), _t(b, s, c, dtype=dtype, positive=True)
    w = _t(b, 1, h, positive=True)
    inputs = {"q": q, "keys": keys, "w": w, "pos": torch.tensor(pos)}
    nodes = [
        ("attn.indexer_topk", ["q", "keys", "w", "pos"], {"k": 4, "ratio": 2, "decode": True}),
        ("attn.indexer_topk", ["q", "keys", "w", "pos"], {"k": 32, "ratio": 2, "decode": True}),
    ]  # k = 32 > S
    got, want, report = _run(nodes, inputs)
    for x, y in zip(got, want):
        _assert_topk(x, y, _scores(q, keys, w, 1.0, 2, pos))
    assert [k["name"] for k in report["kernels"]] == ["indexer_topk"]


# --- ahead of time ----------------------------------------------------------------------------


def _flash_graph() -> ir.Graph:
    """CSA prefill at 4096 tokens, CSA decode and the prefill indexer at v4-flash sizes, bf16."""
    bf16, f32, i64 = ir.DType.bf16, ir.DType.f32, ir.DType.i64
    t, h, c = 4096, 64, 512
    shapes = {
        "q": (bf16, (1, t, h, c)), "kv": (bf16, (1, t, c)), "sink": (f32, (h,)),
        "cos": (f32, (t, 32)), "sin": (f32, (t, 32)), "comp": (bf16, (1, t // 4, c)),
        "picks": (i64, (1, t, 512)), "q1": (bf16, (1, 1, h, c)), "ring": (bf16, (1, 128, c)),
        "cos1": (f32, (1, 32)), "sin1": (f32, (1, 32)), "picks1": (i64, (1, 1, 512)),
        "pos": (i64, ()), "qi": (bf16, (1, t, 64, 128)), "keys": (bf16, (1, t // 4, 128)),
        "w": (f32, (1, t, 64)),
    }  # fmt: skip
    b = ir.Builder(name="flash_attention")
    v = {n: b.input(n, ir.TensorType(s, d)) for n, (d, s) in shapes.items()}
    attrs = {"window": 128, "scale": c**-0.5, "q_norm_eps": 1e-6, "variant": "csa", "ratio": 4}
    prefill = [v[n] for n in ("q", "kv", "sink", "cos", "sin", "comp", "picks")]
    decode = [v[n] for n in ("q1", "ring", "sink", "cos1", "sin1", "comp", "picks1", "pos")]
    b.output(
        b.op("attn.sparse_mqa", prefill, **attrs),
        b.op("attn.sparse_mqa", decode, **attrs, decode=True),
        b.op("attn.indexer_topk", [v["qi"], v["keys"], v["w"]], k=512, ratio=4),
    )
    return b.build()


def test_aot_sm90_at_flash_sizes_without_spills():
    """Five compiles (prefill, decode partials and combine, indexer scores and selection);
    `benchmarks/aot_table.py` covers the six targets."""
    from backends.triton.aot import aot_compile

    exe = TritonBackend().compile(_flash_graph(), "sm_90")
    try:
        results = aot_compile(exe, ["sm_90"])
    except RuntimeError as e:  # a triton wheel without the GPU backends' toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    names = [(r.kernel, r.constexprs.get("STAGE")) for r in results]
    assert names == [("sparse_mqa_prefill", None), ("sparse_mqa_decode", 0),
                     ("sparse_mqa_decode", 1), ("indexer_topk", 0), ("indexer_topk", 1)]  # fmt: skip
    for r in results:
        assert r.error is None, r.error
        assert r.spills == 0 and r.registers <= 255, r
        assert r.shared <= 227 * 1024, r
    assert results[0].constexprs["BLOCK_C"] == 256  # head dim 512 as two halves
