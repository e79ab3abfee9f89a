"""NSA (models/attention_nsa.py, preset tiny-nsa) on the TVM (llvm) and Triton (interpreter)
backends: `attn.block_select` against its reference (prefill and decode; TVM also as lowered for
GPUs, top-n in the kernel), then the fused NSA layer and the whole tiny-nsa model against eager.
Every semantic op runs as a kernel, none falls back to its reference.

Inputs avoid top-k ties: the op tests assert a margin between the last pick and the first
unpicked block of the reference's ranking; the layer and model tests spy on the eager selection
(tests/models/test_dsa_nsa.py's _TopkLog). Shapes are tiny: the Triton interpreter is slow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from backend_graphs import graph_of

import ir
import passes
from frontend import capture
from ir.ops.attn_select import block_overlap, forced_blocks

pytest.importorskip("tvm")

from backends.triton import TritonBackend  # noqa: E402
from backends.tvm import TVMBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import test_dsa_nsa as nsa_tests  # noqa: E402  (sensitive init, top-k spy)

ATOL = 1e-5
SEMANTIC = ("attn.", "moe.", "hc.")
slow = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="~1 min on 2 cores")
ATTRS = {"scale": 0.25, "cmp_block": 8, "cmp_stride": 4, "slc_block": 8, "blocks": 4, "topn": 3}


def _backend(name: str):
    return TVMBackend() if name == "tvm" else TritonBackend()


def _margin(q: torch.Tensor, k: torch.Tensor, attrs: dict, positions: torch.Tensor) -> float:
    """Smallest gap between the n-th and (n+1)-th visible rank over rows that must choose."""
    a = {**ATTRS, **attrs}
    group = q.shape[1] // k.shape[1]
    seen = (torch.arange(k.shape[2]) * a["cmp_stride"] + a["cmp_block"] - 1) <= positions[:, None]
    z = (q @ k.repeat_interleave(group, 1).transpose(-1, -2) * a["scale"]).masked_fill(~seen, -1e30)
    probs = torch.where(seen, z.softmax(-1), 0.0).unflatten(1, (k.shape[1], group)).sum(2)
    imp = probs @ block_overlap(k.shape[2], a["blocks"], a["cmp_block"], a["cmp_stride"],
                                a["slc_block"])  # fmt: skip
    forced = forced_blocks(positions, a["blocks"], a["slc_block"], 1, 2)
    visible = torch.arange(a["blocks"]) * a["slc_block"] <= positions[:, None]
    rank = (imp + forced * (group + 1.0)).masked_fill(~visible, float("-inf"))
    ranked = rank.sort(-1, descending=True).values
    crowded = visible.sum(-1) > a["topn"]
    n = a["topn"]
    return float((ranked[..., n - 1] - ranked[..., n])[..., crowded].min())


def _run(backend: str, g: ir.Graph, args: list, gpu_ir: bool = False) -> tuple:
    exe = _backend(backend).compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    if gpu_ir:
        _use_gpu_ir(exe)
    return exe(*args)


_MODULES = []  # built modules stay alive while their functions are used


def _use_gpu_ir(exe) -> None:
    """Run the TVM kernels as lowered for GPUs (top-n by rank in the kernel, no sort extern)."""
    import tvm

    for k in exe.kernels():
        gpu = k.gpu_ir()
        assert gpu is not k.tensor_ir and "tvm_call_packed" not in gpu.script()
        _MODULES.append(tvm.tirx.build(tvm.IRModule({k.symbol: gpu}), target=exe.llvm_target))
        exe.fns[k.key] = _MODULES[-1][k.symbol]


CASES = [("tvm", False), ("tvm", True), ("triton", False)]


@pytest.mark.parametrize("backend,gpu_ir", CASES, ids=["tvm", "tvm_gpu_ir", "triton"])
def test_block_select_prefill(backend: str, gpu_ir: bool) -> None:
    """2 sequences, 2 groups of 2 heads, 30 tokens: rows with no complete compressed block
    (t < 7), fewer visible blocks than n (t < 24), and rows that must choose (t >= 24)."""
    gen = torch.Generator().manual_seed(3)
    inputs = {"q": torch.randn(2, 4, 30, 16, generator=gen),
              "k": torch.randn(2, 2, 6, 16, generator=gen)}  # fmt: skip
    assert _margin(*inputs.values(), {}, torch.arange(30)) > 1e-4
    g = graph_of([("attn.block_select", ["q", "k"], ATTRS)], inputs)
    (want,) = ir.interpret(g, *inputs.values())
    (got,) = _run(backend, g, list(inputs.values()), gpu_ir)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert (want == -1).any() and (want[:, :, 24:] >= 0).all()


@pytest.mark.parametrize("backend,gpu_ir", CASES, ids=["tvm", "tvm_gpu_ir", "triton"])
def test_block_select_decode(backend: str, gpu_ir: bool) -> None:
    """One query at positions 0 (nothing complete), 12, 27 and 31 against 7 compressed keys."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, 1, 16, generator=gen), torch.randn(2, 2, 7, 16, generator=gen)
    inputs = {"q": q, "k": k, "pos": torch.tensor(0)}
    g = graph_of([("attn.block_select", ["q", "k", "pos"], {**ATTRS, "decode": True})], inputs)
    exe = _backend(backend).compile(g, "cpu")
    assert not exe.fallbacks(), exe.fallbacks()
    if gpu_ir:
        _use_gpu_ir(exe)
    for p in (0, 12, 27, 31):
        if p >= 24:
            assert _margin(q, k, {}, torch.tensor([p])) > 1e-4
        (want,) = ir.interpret(g, q, k, torch.tensor(p))
        (got,) = exe(q, k, torch.tensor(p))
        assert torch.equal(got, want), p


# --- the fused NSA layer and model --------------------------------------------------------------


def _layer():
    from models.attention_nsa import NSAttention
    from models.deepseek_v4 import Config

    torch.manual_seed(7)
    return nsa_tests._sensitive(NSAttention(Config.preset("tiny-nsa")), 7)


def _layouts(g: ir.Graph) -> list[str]:
    """kv_layout of each attn.sdpa: the cmp branch's compressed keys [B,G,N,D] ("bhsd"), the
    win and slc branches' caches read as stored ([B,S,G,D], "bshd": no transposed copy)."""
    return sorted(n.attrs["kv_layout"] for n in g.ops if n.name == "attn.sdpa")


def _semantic_kernels(exe) -> set[str]:
    ran = {s.node.name for s in exe.steps if s.launch is not None}
    assert not [f for f in exe.fallbacks() if f[0].startswith(SEMANTIC)], exe.fallbacks()
    return {n for n in ran if n.startswith(SEMANTIC)}


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_nsa_layer_prefill_and_decode(backend: str, monkeypatch) -> None:
    """One tiny-nsa layer, 48 tokens (6 selection blocks for top-5), then a decode step at 44
    and 47 from the 44-token cache (one decode graph for both)."""
    layer = _layer()
    x = torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(8))
    params, steps = layer.state_dict(), {}
    with monkeypatch.context() as patch:  # spy on eager only, not on the captures
        log = nsa_tests._TopkLog(nsa_tests.nsa_mod, patch)
        with torch.no_grad():
            want = layer(x)
            for at in (44, 47):
                steps[at] = _eager_step(layer, x, at)
        assert 1e-5 < log.margin() < float("inf"), "selection near-tie: pick another seed"
    g = passes.pipeline(capture(layer, (x,)))
    assert _layouts(g) == ["bhsd", "bshd", "bshd"]
    exe = _backend(backend).compile(g, "cpu")
    (got,) = exe(x, params=params)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert _semantic_kernels(exe) == {"attn.sdpa", "attn.block_select"}

    cache = steps[44][1]
    dg = passes.pipeline(capture(layer, (x[:, 44:45], torch.tensor(44), cache), method="decode"))
    assert _layouts(dg) == ["bhsd", "bshd", "bshd"]
    dexe = _backend(backend).compile(dg, "cpu")
    for at, (step, cache_at) in steps.items():
        got = dexe(x[:, at : at + 1], torch.tensor(at), *cache_at.values(), params=params)
        torch.testing.assert_close(got[0], step, atol=ATOL, rtol=ATOL, msg=f"position {at}")
    assert _semantic_kernels(dexe) == {"attn.sdpa", "attn.block_select"}


def _eager_step(layer, x: torch.Tensor, at: int) -> tuple[torch.Tensor, dict]:
    """(eager decode output at position `at`, the cache it read: a prefill of x[:, :at])."""
    cache = layer.init_cache(1, 48, torch.float32, torch.device("cpu"))
    _, cache = layer(x[:, :at], cache)
    step, _ = layer.decode(x[:, at : at + 1], torch.tensor(at), cache)
    return step, cache


def _model_case(backend: str, monkeypatch) -> None:
    model = nsa_tests._model("tiny-nsa")
    ids = nsa_tests._tokens(model.cfg, 1, 48)
    with monkeypatch.context() as patch:  # spy on eager only, not on the capture
        log = nsa_tests._TopkLog(nsa_tests.nsa_mod, patch)
        with torch.no_grad():
            want = model.prefill(ids)
        assert 1e-5 < log.margin() < float("inf"), "selection near-tie: pick another seed"
    g = passes.pipeline(capture(model, (ids,), method="prefill"))
    names = {v.name for v in g.params}
    params = {k: v for k, v in {**dict(model.named_buffers()), **model.state_dict()}.items()
              if k in names}  # fmt: skip
    exe = _backend(backend).compile(g, "cpu")
    (got,) = exe(ids, params=params)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert _semantic_kernels(exe) == {"attn.sdpa", "attn.block_select", "hc.pre", "hc.post",
                                      "hc.head", "moe.route", "moe.experts"}  # fmt: skip


def test_tiny_nsa_model_on_tvm(monkeypatch) -> None:
    """The whole 2-layer tiny-nsa prefill (48 tokens) through TVM equals eager."""
    _model_case("tvm", monkeypatch)


@slow
def test_tiny_nsa_model_on_triton(monkeypatch) -> None:
    """The same under the Triton interpreter (about 45 s of kernels on 2 cores)."""
    _model_case("triton", monkeypatch)


# --- ahead of time -----------------------------------------------------------------------------

AOT_TARGETS = ["sm_80", "sm_90", "sm_100", "sm_120", "gfx942", "gfx950"]


@pytest.mark.parametrize("targets", [["sm_90"], pytest.param(AOT_TARGETS, marks=slow)],
                         ids=["sm_90", "six"])  # fmt: skip
def test_block_select_aot_without_spills(targets: list[str]) -> None:
    """The Triton block_select at v4-flash-nsa geometry (64 heads in 4 groups, head dim 192,
    bf16, l = 32, d = 16, l' = 64, top-16) over a 4K context (64 selection blocks) compiles for
    the GPU targets without spilling."""
    from backends.triton.aot import aot_compile
    from models.deepseek_v4 import Config

    cfg = Config.preset("v4-flash-nsa")
    h, g, d, ctx = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 4096
    n_cmp = ctx // cfg.nsa_cmp_stride
    inputs = {"q": torch.zeros(1, h, 2, d, dtype=torch.bfloat16),
              "k": torch.zeros(1, g, n_cmp, d, dtype=torch.bfloat16)}  # fmt: skip
    attrs = {"scale": d**-0.5, "cmp_block": cfg.nsa_cmp_block, "cmp_stride": cfg.nsa_cmp_stride,
             "slc_block": cfg.nsa_slc_block, "blocks": ctx // cfg.nsa_slc_block,
             "topn": cfg.nsa_slc_topn}  # fmt: skip
    exe = TritonBackend().compile(graph_of([("attn.block_select", ["q", "k"], attrs)], inputs),
                                  "sm_90")  # fmt: skip
    try:
        results = aot_compile(exe, targets)
    except RuntimeError as e:  # a triton wheel without the GPU backends' toolchains
        pytest.skip(f"Triton cannot compile for GPUs on this machine: {e}")
    assert [r.target for r in results] == targets
    for r in results:
        assert r.error is None, r.error
        assert r.spills == 0 and 0 < r.registers <= 255, (r.target, r.registers, r.spills)
