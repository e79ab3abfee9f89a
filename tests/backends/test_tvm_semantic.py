"""The semantic ops (sparse MQA, indexer top-k, compression, MoE route/experts, mHC) through TVM
kernels vs the reference interpreter, fp32 at small shapes. Edge cases: -1 picks, queries whose
window starts before position 0, decode rings not yet full, top-k wider than the visible keys,
sequence lengths that are not multiples of the compression ratio, experts no token chose.
Each test compiles its nodes as one graph (one LLVM module)."""

from __future__ import annotations

import pytest
import torch
from backend_graphs import check_guard_paged, graph_of, rope_tables

import ir

pytest.importorskip("tvm")

from backends.tvm import TVMBackend

GEN = torch.Generator().manual_seed(0)


def _t(*shape: int, positive: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=GEN)
    return x.abs() + 0.05 if positive else x


def _check(
    nodes: list[tuple[str, list[str], dict]],
    inputs: dict[str, torch.Tensor],
    blas: str = "auto",
    gpu_ir: bool = False,
) -> dict:
    """Build one graph of `nodes` (mnemonic, input names, attrs), run TVM and the reference;
    returns the executable's report. `gpu_ir`: run the kernels as lowered for a GPU (top-k in
    the kernel instead of TVM's extern CPU sort), built for this CPU."""
    g = graph_of(nodes, inputs)
    exe = TVMBackend().compile(g, "cpu", blas=blas)
    assert not exe.fallbacks(), exe.fallbacks()
    if gpu_ir:
        _use_gpu_ir(exe)
    args = list(inputs.values())
    wants = ir.interpret(g, *args)

    def check(gots) -> None:
        for v, got, want in zip(g.outputs, gots, wants):
            assert got.dtype == want.dtype and got.shape == want.shape, v
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=str(v))

    check(exe(*args))
    # then every input against an unreadable page on either side: an out-of-bounds read (a
    # branch TVM evaluates although its condition is false) crashes a forked child, and the test
    # fails naming the side
    check_guard_paged(exe, args, check)
    return exe.report()


_MODULES = []  # built modules stay alive while their functions are used


def _use_gpu_ir(exe) -> None:
    import tvm

    for k in exe.kernels():
        gpu = k.gpu_ir()
        assert gpu is not k.tensor_ir, k.name  # these tests lower top-k kernels only
        assert "tvm_call_packed" not in gpu.script()
        _MODULES.append(tvm.tirx.build(tvm.IRModule({k.symbol: gpu}), target=exe.llvm_target))
        exe.fns[k.key] = _MODULES[-1][k.symbol]


def test_sparse_mqa_prefill_variants():
    b, t, h, c, half = 2, 7, 2, 16, 4
    cos, sin = rope_tables(GEN, t, half)
    picks = torch.tensor([[-1, 0], [2, -1], [1, 0], [-1, -1], [0, 1], [2, 1], [1, 2]])
    inputs = {
        "q": _t(b, t, h, c),
        "kv": _t(b, t, c),
        "sink": _t(h),
        "cos": cos,
        "sin": sin,
        "comp": _t(b, 3, c),
        "picks": picks.expand(b, t, 2).contiguous(),
    }
    base = ["q", "kv", "sink", "cos", "sin"]
    common = {"window": 3, "scale": 0.3}
    _check(
        [
            ("attn.sparse_mqa", base, {**common, "q_norm_eps": 1e-6}),
            ("attn.sparse_mqa", [*base, "comp"], {**common, "variant": "hca", "ratio": 2}),
            ("attn.sparse_mqa", [*base, "comp", "picks"], {**common, "variant": "csa", "ratio": 2}),
        ],
        inputs,
    )


@pytest.mark.parametrize("pos", [1, 9])  # ring not yet full / wrapped
def test_sparse_mqa_decode(pos):
    b, h, c, half, window = 2, 2, 16, 4, 4
    cos, sin = rope_tables(GEN, 1, half)
    inputs = {
        "q": _t(b, 1, h, c),
        "kv": _t(b, window, c),
        "sink": _t(h),
        "cos": cos,
        "sin": sin,
        "comp": _t(b, 5, c),
        "picks": torch.tensor([3, -1, 0]).expand(b, 1, 3).contiguous(),
        "pos": torch.tensor(pos),
    }
    common = {"window": window, "scale": 0.25, "decode": True}
    _check(
        [
            ("attn.sparse_mqa", ["q", "kv", "sink", "cos", "sin", "pos"], common),
            (
                "attn.sparse_mqa",
                ["q", "kv", "sink", "cos", "sin", "comp", "pos"],
                {**common, "variant": "hca", "ratio": 2},
            ),
            (
                "attn.sparse_mqa",
                ["q", "kv", "sink", "cos", "sin", "comp", "picks", "pos"],
                {**common, "variant": "csa", "ratio": 2, "q_norm_eps": 1e-6},
            ),
        ],
        inputs,
    )


def test_sparse_mqa_decode_batch_1():
    """A batch-1 decode step shaped as small's (scaled down): 8 heads (one register tile of the
    weighted sum), c = 64 (4 vectors, RoPE on the last 16), a full window ring and csa picks
    with -1s, hca's visible prefix."""
    h, c, half, window = 8, 64, 8, 8
    cos, sin = rope_tables(GEN, 1, half)
    inputs = {
        "q": _t(1, 1, h, c),
        "kv": _t(1, window, c),
        "sink": _t(h),
        "cos": cos,
        "sin": sin,
        "comp": _t(1, 12, c),
        "picks": torch.tensor([[[7, -1, 0, 11, 3, -1]]]),
        "pos": torch.tensor(45),
    }
    common = {"window": window, "scale": 0.125, "decode": True}
    _check(
        [
            (
                "attn.sparse_mqa",
                ["q", "kv", "sink", "cos", "sin", "comp", "pos"],
                {**common, "variant": "hca", "ratio": 4},
            ),
            (
                "attn.sparse_mqa",
                ["q", "kv", "sink", "cos", "sin", "comp", "picks", "pos"],
                {**common, "variant": "csa", "ratio": 4, "q_norm_eps": 1e-6},
            ),
        ],
        inputs,
    )


@pytest.mark.parametrize("gpu_ir", [False, True], ids=["cpu_ir", "gpu_ir"])
@pytest.mark.parametrize("c", [8, 32])  # 32: q·k as 16 vector lanes of partial sums
def test_indexer_topk_prefill_and_decode(c, gpu_ir):
    """Positive q/keys/w: distinct scores, so the order of the picks is well defined."""
    b, t, h, s = 2, 9, 3, 4
    inputs = {
        "q": _t(b, t, h, c, positive=True),
        "keys": _t(b, s, c, positive=True),
        "w": _t(b, t, h, positive=True),
        "q1": _t(b, 1, h, c, positive=True),
        "w1": _t(b, 1, h, positive=True),
        "pos": torch.tensor(6),
    }
    _check(
        [
            ("attn.indexer_topk", ["q", "keys", "w"], {"k": 3, "ratio": 2, "scale": 0.5}),
            ("attn.indexer_topk", ["q", "keys", "w"], {"k": 6, "ratio": 2}),  # k > S
            (
                "attn.indexer_topk",
                ["q1", "keys", "w1", "pos"],
                {"k": 3, "ratio": 2, "decode": True},
            ),
        ],
        inputs,
        gpu_ir=gpu_ir,
    )


def test_indexer_topk_decode_batch_1():
    """A batch-1 decode step shaped as small's: 16 heads (one vector), 37 keys (key tiles run in
    parallel, each tile's scores summed right after its dots; the last tile is partial), 35 of
    them visible at position 140 with ratio 4."""
    inputs = {
        "q": _t(1, 1, 16, 32, positive=True),
        "keys": _t(1, 37, 32, positive=True),
        "w": _t(1, 1, 16, positive=True),
        "pos": torch.tensor(140),
    }
    _check(
        [("attn.indexer_topk", ["q", "keys", "w", "pos"], {"k": 8, "ratio": 4, "decode": True})],
        inputs,
    )


def test_compress_with_and_without_overlap():
    b, t, d, c, m = 2, 9, 8, 6, 2  # T = 9: the last token is not a complete block
    cos, sin = rope_tables(GEN, t // m, 2)
    inputs = {
        "x": _t(b, t, d),
        "wkv2": _t(2 * c, d),
        "wgate2": _t(2 * c, d),
        "ape2": _t(m, 2 * c),
        "wkv": _t(c, d),
        "wgate": _t(c, d),
        "ape": _t(m, c),
        "norm": _t(c),
        "cos": cos,
        "sin": sin,
    }
    _check(
        [
            ("attn.compress", ["x", "wkv2", "wgate2", "ape2", "norm", "cos", "sin"], {"ratio": m}),
            (
                "attn.compress",
                ["x", "wkv", "wgate", "ape", "norm", "cos", "sin"],
                {"ratio": m, "overlap": False},
            ),
        ],
        inputs,
    )


@pytest.mark.parametrize("gpu_ir", [False, True], ids=["cpu_ir", "gpu_ir"])
def test_moe_route_scores_bias_and_hash(gpu_ir):
    n, d, e, k = 5, 8, 7, 2
    inputs = {
        "x": _t(n, d),
        "gate": _t(e, d),
        "bias": _t(e),
        "table": torch.randint(0, e, (11, k), generator=GEN),
        "ids": torch.tensor([3, 0, 10, 3, 7]),
    }
    _check(
        [
            ("moe.route", ["x", "gate", "bias"], {"k": k, "bias": True, "route_scale": 2.5}),
            ("moe.route", ["x", "gate"], {"k": 3, "score": "softmax"}),
            ("moe.route", ["x", "gate"], {"k": k, "score": "sigmoid", "renorm": False}),
            ("moe.route", ["x", "gate", "table", "ids"], {"k": k, "hash": True}),
        ],
        inputs,
        gpu_ir=gpu_ir,
    )


@pytest.mark.parametrize("blas", ["never", "always"])  # the kernel, or grouped GEMMs via BLAS
def test_moe_experts_with_idle_experts_and_shared(blas):
    n, d, inter, e, k = 3, 8, 6, 6, 2
    inputs = {
        "x": _t(n, d),
        "weights": _t(n, k, positive=True),
        "experts": torch.tensor([[0, 4], [4, 1], [0, 1]]),  # experts 2, 3, 5: no tokens
        "w1": _t(e, inter, d),
        "w3": _t(e, inter, d),
        "w2": _t(e, d, inter),
        "s1": _t(5, d),
        "s3": _t(5, d),
        "s2": _t(d, 5),
    }
    routed = ["x", "weights", "experts", "w1", "w3", "w2"]
    report = _check(
        [
            ("moe.experts", routed, {"limit": 1.5}),
            ("moe.experts", [*routed, "s1", "s3", "s2"], {"shared": True}),
        ],
        inputs,
        blas,
    )
    assert len(report["blas_calls"]) == (2 if blas == "always" else 0)


def test_hc_pre_post_head():
    b, t, n, d = 2, 3, 4, 8
    inputs = {
        "x": _t(b, t, n, d),
        "fn": _t((2 + n) * n, n * d) * 0.1,
        "scale": _t(3),
        "base": _t((2 + n) * n),
        "f": _t(b, t, d),
        "post": _t(b, t, n),
        "comb": _t(b, t, n, n),
        "fn_head": _t(n, n * d) * 0.1,
        "scale1": _t(1),
        "base_head": _t(n),
    }
    _check(
        [
            ("hc.pre", ["x", "fn", "scale", "base"], {"iters": 5}),
            ("hc.post", ["f", "x", "post", "comb"], {}),
            ("hc.head", ["x", "fn_head", "scale1", "base_head"], {}),
        ],
        inputs,
    )


def test_hc_pre_post_decode_batch_1():
    """A batch-1 decode step (one token, n·d a multiple of 16: the mixing projection's register
    tile; hc.post's n streams summed in one elementwise stage)."""
    n, d = 4, 16
    inputs = {
        "x": _t(1, 1, n, d),
        "fn": _t((2 + n) * n, n * d) * 0.1,
        "scale": _t(3),
        "base": _t((2 + n) * n),
        "f": _t(1, 1, d),
        "post": _t(1, 1, n),
        "comb": _t(1, 1, n, n),
    }
    _check(
        [
            ("hc.pre", ["x", "fn", "scale", "base"], {"iters": 20}),
            ("hc.post", ["f", "x", "post", "comb"], {}),
        ],
        inputs,
    )


@pytest.mark.parametrize("pos", [5, 7])  # inside a block / completing one (written to the cache)
def test_compress_step_decode(pos):
    b, d, c, m, rows = 2, 8, 4, 4, 6
    cos, sin = rope_tables(GEN, 1, 1)
    inputs = {
        "x": _t(b, 1, d),
        "pos": torch.tensor(pos),
        "kv_state": _t(b, 2 * m, 2 * c),
        "score_state": _t(b, 2 * m, 2 * c),
        "wkv": _t(2 * c, d),
        "wgate": _t(2 * c, d),
        "ape": _t(m, 2 * c),
        "kv1": _t(b, m, c),
        "score1": _t(b, m, c),
        "wkv1": _t(c, d),
        "wgate1": _t(c, d),
        "ape1": _t(m, c),
        "norm": _t(c),
        "cos": cos,
        "sin": sin,
        "cache": _t(b, rows, c),
    }
    overlap = ["x", "pos", "kv_state", "score_state", "wkv", "wgate", "ape", "norm", "cos", "sin"]
    plain = ["x", "pos", "kv1", "score1", "wkv1", "wgate1", "ape1", "norm", "cos", "sin"]
    _check(
        [
            ("attn.compress_step", [*overlap, "cache"], {"ratio": m}),
            ("attn.compress_step", [*plain, "cache"], {"ratio": m, "overlap": False}),
        ],
        inputs,
    )


@pytest.mark.parametrize(
    "b, d, c, m",
    # batch 1 with d = 512, W >= 64: the projections' register tiles, run in parallel over the
    # weight rows as one loop for both (`schedule_compress_step`), as in small's decode
    [(2, 8, 4, 2), (1, 512, 64, 4)],
    ids=["untiled", "tiled_b1"],
)
@pytest.mark.parametrize("overlap", [True, False])
def test_compress_step_in_place_rows(overlap, b, d, c, m):
    """The in-place row form (`backends.tvm.inplace`: the kernel returns one cache row and one
    new state row; the writer stores the row at its slot, rolls an overlapping state when a block
    completes, writes the entry) over positions inside and completing blocks equals the
    reference stepping functionally."""
    rows = 4
    w = 2 * c if overlap else c
    r = 2 * m if overlap else m
    cos, sin = rope_tables(GEN, 1, 1)
    inputs = {
        "x": _t(b, 1, d),
        "pos": torch.tensor(0),
        "kv_state": _t(b, r, w),
        "score_state": _t(b, r, w),
        "wkv": _t(w, d),
        "wgate": _t(w, d),
        "ape": _t(m, w),
        "norm": _t(c),
        "cos": cos,
        "sin": sin,
        "cache": _t(b, rows, c),
    }
    g = graph_of([("attn.compress_step", list(inputs), {"ratio": m, "overlap": overlap})], inputs)
    g.aliases = {0: "cache", 1: "kv_state", 2: "score_state"}
    exe = TVMBackend().compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    mine = dict(inputs)
    mine.update({k: inputs[k].clone() for k in ("cache", "kv_state", "score_state")})
    want = dict(mine)
    for pos in range(2 * m + 1):
        x = _t(b, 1, d)
        mine.update(x=x, pos=torch.tensor(pos))
        want.update(x=x, pos=torch.tensor(pos))
        got = exe(*mine.values(), inplace=True)
        names = ("cache", "kv_state", "score_state")
        want.update(zip(names, ir.interpret(g, *want.values())))
        for name, result in zip(names, got):
            assert result.data_ptr() == mine[name].data_ptr(), name  # written where it is
            torch.testing.assert_close(result, want[name], rtol=1e-4, atol=1e-5, msg=name)
