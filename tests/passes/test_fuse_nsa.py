"""`fuse_nsa` (passes/fuse_nsa.py) on NSA (models/attention_nsa.py, preset tiny-nsa): every layer
forms three `attn.sdpa` (cmp: bool mask, win: causal window, slc: indexed) and one
`attn.block_select`, in prefill and in decode; the fused graphs interpret equal to eager; a
selection whose forced local blocks are off by one stays unfused and `explain` names why.

Inputs avoid top-k ties: each comparison first asserts a margin between the last picked and the
first unpicked block (the eager selection is spied on, as in tests/models/test_dsa_nsa.py).
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import pytest
import torch

import ir
import passes
from frontend import capture
from models.attention_nsa import NSAttention
from models.deepseek_v4 import Config, Transformer
from passes import PassContext, explain
from passes.fuse_nsa import RULES, fuse_nsa

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import test_dsa_nsa as nsa_tests  # noqa: E402  (the sensitive init and the top-k spy)

ATOL = 1e-5
SELECT = "fuse_nsa.attn.block_select"


def _layer(seed: int = 7, cls: type[NSAttention] = NSAttention) -> NSAttention:
    torch.manual_seed(seed)
    return nsa_tests._sensitive(cls(Config.preset("tiny-nsa")), seed)


def _x(t: int, seed: int = 8) -> torch.Tensor:
    return torch.randn(2, t, 64, generator=torch.Generator().manual_seed(seed))


def _fused(g: ir.Graph) -> tuple[ir.Graph, PassContext]:
    ctx = PassContext()
    out = fuse_nsa(passes.canonicalize(g), ctx)
    ir.verify(out)
    return out, ctx


def _ops(g: ir.Graph, name: str) -> list[ir.Node]:
    return [n for n in g.ops if n.name == name]


def _sdpa_kinds(g: ir.Graph) -> list[tuple]:
    """(mask, indexed, causal, window, kv_layout) of each attn.sdpa, sorted; checks that a
    "bshd" op reads k and v as the graph holds them (no permute absorbed into a copy)."""
    producers = {r: n for n in g.ops for r in n.results}
    for n in _ops(g, "attn.sdpa"):
        if n.attrs["kv_layout"] == "bshd":
            r = n.op.roles(n.operands)
            kv = [x for x in (r["k"], r["v"]) if x is not None]
            names = [producers[x].name for x in kv if x in producers]
            assert "permute" not in names, names
    return sorted(
        (n.attrs["mask"], n.attrs["indexed"], n.attrs["causal"], n.attrs["window"],
         n.attrs["kv_layout"])  # fmt: skip
        for n in _ops(g, "attn.sdpa")
    )


# cmp attends to the compressed [B,G,N,D] keys; win and slc to the [B,S,G,D] caches as stored
BRANCHES = [("bool", False, False, 0, "bhsd"), ("none", False, True, 8, "bshd"),
            ("none", True, False, 0, "bshd")]  # fmt: skip
BRANCHES_DECODE = [("bool", False, False, 0, "bhsd"), ("bool", False, False, 0, "bshd"),
                   ("none", True, False, 0, "bshd")]  # fmt: skip


def test_layer_prefill_forms_three_attentions_and_a_selection(monkeypatch) -> None:
    layer, x = _layer(), _x(56)
    g = capture(layer, (x,))
    fused, ctx = _fused(g)
    assert ctx.counters["fuse_nsa.attn.sdpa"] == 3 and ctx.counters[SELECT] == 1
    assert _sdpa_kinds(fused) == BRANCHES  # cmp (block-causal mask), win (window 8), slc
    (sel,) = _ops(fused, "attn.block_select")
    want = {"cmp_block": 8, "cmp_stride": 4, "slc_block": 8, "blocks": 7, "topn": 5,
            "initial": 1, "local": 2, "decode": False, "scale": 0.25}  # fmt: skip
    assert {k: sel.attrs[k] for k in want} == want
    assert not _ops(fused, "topk") and not _ops(fused, "softmax")
    assert ir.parse(ir.to_text(fused)) == fused  # the new op's attributes print and parse
    log = nsa_tests._TopkLog(nsa_tests.nsa_mod, monkeypatch)
    with torch.no_grad():
        want_out = layer(x)
    assert 1e-5 < log.margin() < float("inf"), "selection near-tie: pick another seed"
    (got,) = ir.interpret(fused, x, params=layer.state_dict())
    torch.testing.assert_close(got, want_out, atol=ATOL, rtol=ATOL)


def test_selection_matters_in_the_fused_graph(monkeypatch) -> None:
    """The fused graph's selection is not a no-op: a top-n of every block changes the output
    far above the tolerance, so a wrong selection would fail the comparison above."""
    layer, x = _layer(), _x(56)
    fused, _ = _fused(capture(layer, (x,)))
    (got,) = ir.interpret(fused, x, params=layer.state_dict())
    layer.topn = 7
    with torch.no_grad():
        assert (layer(x) - got).abs().max() > 1e-3


def _decode_inputs(layer: NSAttention, x: torch.Tensor, at: int) -> tuple:
    cache = layer.init_cache(2, 64, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        _, new = layer(x[:, :at], cache)
    return x[:, at : at + 1], torch.tensor(at), {**cache, **new}


def test_layer_decode_forms_the_same_ops_and_equals_eager(monkeypatch) -> None:
    """One decode graph for every position: fused, it equals eager decode at positions where
    the window is not full yet, where blocks complete and where the selection must choose."""
    layer, x = _layer(), _x(48)
    g = capture(layer, _decode_inputs(layer, x, 37), method="decode")
    fused, ctx = _fused(g)
    assert ctx.counters["fuse_nsa.attn.sdpa"] == 3 and ctx.counters[SELECT] == 1
    assert _sdpa_kinds(fused) == BRANCHES_DECODE  # cmp mask, ring mask, slc indexed
    (sel,) = _ops(fused, "attn.block_select")
    assert sel.attrs["decode"] and sel.attrs["blocks"] == 8
    log = nsa_tests._TopkLog(nsa_tests.nsa_mod, monkeypatch)
    for at in (3, 13, 30, 37, 47):
        token, pos, cache = _decode_inputs(layer, x, at)
        with torch.no_grad():
            want, new = layer.decode(token, pos, cache)
        got = ir.interpret(fused, token, pos, *cache.values(), params=layer.state_dict())
        torch.testing.assert_close(got[0], want, atol=ATOL, rtol=ATOL, msg=f"position {at}")
        for name, value in zip(new, got[1:]):
            torch.testing.assert_close(value, new[name], atol=ATOL, rtol=ATOL, msg=name)
    assert 1e-5 < log.margin() < float("inf"), "selection near-tie: pick another seed"


class _OffByOne(NSAttention):
    """Forces the two blocks before the query's own block instead of its own and the one
    before — a plausible bug; the selection it makes is not attn.block_select's."""

    def _select(self, p_cmp, pos, n_slc):
        overlap = nsa_tests.nsa_mod.block_overlap(p_cmp.shape[-1], n_slc, self.cfg, p_cmp.device)
        importance = torch.einsum("btgn,ns->btgs", p_cmp.sum(3), overlap)
        j = torch.arange(n_slc, device=p_cmp.device)
        own = (pos // self.ls).unsqueeze(1)
        forced = (j == 0) | (j == own - 1) | (j == own - 2)
        rank = importance + forced.unsqueeze(1).float() * self.forced_bonus
        visible = (j * self.ls <= pos.unsqueeze(1)).unsqueeze(1)
        return nsa_tests.nsa_mod.topk_visible(rank, visible, self.topn)


def test_forced_blocks_off_by_one_stay_unfused() -> None:
    layer, x = _layer(cls=_OffByOne), _x(56)
    fused, ctx = _fused(capture(layer, (x,)))
    assert ctx.counters[SELECT] == 0 and ctx.near_misses[SELECT] >= 1
    assert _ops(fused, "topk") and not _ops(fused, "attn.block_select")
    why = str(explain(RULES[1], fused))
    assert "failed at forced" in why, why
    assert "row 8 column 1 is False, expected True" in why, why  # t = 8 lost its own block 1
    # the branches still fuse, and the graph still computes the model
    assert ctx.counters["fuse_nsa.attn.sdpa"] == 3
    (got,) = ir.interpret(fused, x, params=layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), atol=ATOL, rtol=ATOL)


def _layer_of(g: ir.Graph, node: ir.Node) -> str:
    """`layers.i` of the nearest attention parameter or cache read by `node` (breadth first:
    its own projections come before the residual stream of earlier layers)."""
    producers = {r.name: n for n in g.ops for r in n.results}
    frontier, seen = list(node.operands), set()
    while frontier:
        nxt = []
        for v in frontier:
            if v.name in seen:
                continue
            seen.add(v.name)
            match = re.search(r"layers\.(\d+)\.attn\.", v.name)
            if v.name not in producers and match:
                return f"layers.{match.group(1)}"
            nxt += list(producers[v.name].operands) if v.name in producers else []
        frontier = nxt
    return "?"


def test_model_forms_the_csa_families_per_layer(monkeypatch) -> None:
    """The whole 2-layer tiny-nsa model through the pipeline: per layer three attn.sdpa and one
    attn.block_select (CSA forms attention ops and a selection op per layer likewise), in
    prefill and decode; both equal eager."""
    torch.manual_seed(0)
    model = nsa_tests._sensitive(Transformer(Config.preset("tiny-nsa")), 0)
    ids = torch.randint(0, 128, (2, 56), generator=torch.Generator().manual_seed(1))
    params = {**dict(model.named_buffers()), **model.state_dict()}
    log = nsa_tests._TopkLog(nsa_tests.nsa_mod, monkeypatch)
    with torch.no_grad():
        want = model.prefill(ids)
        cache = model.init_cache(2, 64)
        _, cache = model.prefill(ids[:, :50], cache)
        step, _ = model.decode(ids[:, 50:51], torch.tensor(50), cache)
    assert 1e-5 < log.margin() < float("inf"), "selection near-tie: pick another seed"
    prefill = passes.pipeline(capture(model, (ids,), method="prefill"))
    decode = passes.pipeline(
        capture(model, (ids[:, 50:51], torch.tensor(50), cache), method="decode")
    )
    for g in (prefill, decode):
        per_layer = collections.Counter(
            (_layer_of(g, n), n.name) for n in g.ops if n.name.startswith("attn.")
        )
        assert per_layer == {
            (f"layers.{i}", op): count
            for i in range(2)
            for op, count in (("attn.sdpa", 3), ("attn.block_select", 1))
        }
    (got,) = ir.interpret(prefill, ids, params=params)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    got = ir.interpret(decode, ids[:, 50:51], torch.tensor(50), *cache.values(), params=params)
    torch.testing.assert_close(got[0], step, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", ["tiny", "tiny-dsa"])
def test_other_variants_form_no_nsa_ops(name: str) -> None:
    """fuse_nsa fires on NSA only: CSA and DSA layers keep their own ops."""
    torch.manual_seed(0)
    model = Transformer(Config.preset(name)).eval()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    g, ctx = _fused(capture(model, (ids,), method="prefill"))
    assert ctx.counters["fuse_nsa.attn.sdpa"] == 0 and ctx.counters[SELECT] == 0


def test_symbolic_length_forms_what_needs_no_evaluation() -> None:
    """Captured at a symbolic T, the cmp and slc attentions still form (their mask and indices
    stay computed tensors); the window band and the selection need masks evaluated at static
    sizes, stay unfused, and explain says so. The graph equals eager at 33 and 56 tokens."""
    layer = _layer()
    fused, ctx = _fused(capture(layer, (_x(40),), dynamic={"x": {1: "T"}}))
    assert ctx.counters["fuse_nsa.attn.sdpa"] == 2 and ctx.counters[SELECT] == 0
    cmp, slc = ("bool", False, False, 0, "bhsd"), ("none", True, False, 0, "bshd")
    assert _sdpa_kinds(fused) == [cmp, slc]
    assert "symbolic shape" in str(explain(RULES[0], fused))
    assert "symbolic shape" in str(explain(RULES[1], fused))
    for t in (33, 56):
        x = _x(t, seed=t)
        (got,) = ir.interpret(fused, x, params=layer.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(got, layer(x), atol=ATOL, rtol=ATOL, msg=f"T={t}")


def test_bf16_logits_are_not_formed() -> None:
    """In bf16 the model rounds q·kᵀ to bf16 before its softmaxes; the ops compute fp32 logits,
    which changed a selection (0.09 off eager when block_select formed). Nothing forms,
    explain says why, and the graph stays exactly eager."""
    layer, x = _layer().to(torch.bfloat16), _x(56).to(torch.bfloat16)
    fused, ctx = _fused(capture(layer, (x,)))
    assert ctx.counters[SELECT] == 0 and ctx.counters["fuse_nsa.attn.sdpa"] == 0
    assert "failed at logits.qk" in str(explain(RULES[1], fused))
    (got,) = ir.interpret(fused, x, params=layer.state_dict())
    with torch.no_grad():
        assert torch.equal(got, layer(x))


# --- the op: reference against the model, type errors ------------------------------------------


def test_block_select_reference_is_the_models_selection() -> None:
    """attn.block_select's reference picks exactly what NSAttention._select picks from the
    compressed attention's probabilities (2 sequences, 2 groups of 2 heads, 56 tokens)."""
    layer = _layer()
    gen = torch.Generator().manual_seed(5)
    b, t, g, hg, d, n = 2, 56, 2, 2, 16, 13
    q, k = torch.randn(b, t, g, hg, d, generator=gen), torch.randn(b, n, g, d, generator=gen)
    pos = torch.arange(t)
    vis = ((torch.arange(n) * 4 + 7)[None] <= pos[:, None])[None, :, None, None, :]
    _, p_cmp = nsa_tests.nsa_mod.masked_attention(q, k.transpose(1, 2), k.transpose(1, 2), vis,
                                                  0.25)  # fmt: skip
    want = layer._select(p_cmp, pos, 7)
    op = ir.OPS["attn.block_select"](scale=0.25, cmp_block=8, cmp_stride=4, slc_block=8,
                                     blocks=7, topn=5)  # fmt: skip
    (got,) = op.reference(q.permute(0, 2, 3, 1, 4).reshape(b, g * hg, t, d), k.transpose(1, 2))
    assert torch.equal(got.permute(0, 2, 1, 3), want)
    assert (want[:, 48:] >= 0).all() and (want[:, :8, :, 1:] == -1).all()


@pytest.mark.parametrize(
    "attrs,types,message",
    [
        ({}, [(1, 4, 5, 16)], "takes 2 operands"),
        ({}, [(1, 4, 5, 16), (1, 3, 6, 16)], "multiple of KV heads 3"),
        ({}, [(1, 4, 5, 16), (1, 2, 6, 8)], "head dim of q and k differs"),
        ({"cmp_stride": 9, "cmp_block": 8}, [(1, 4, 5, 16), (1, 2, 6, 16)], "cmp_stride"),
        ({"decode": True}, [(1, 4, 1, 16), (1, 2, 6, 16)], "takes 3 operands"),
    ],
)
def test_block_select_type_errors(attrs: dict, types: list, message: str) -> None:
    tt = [ir.TensorType(s, ir.DType.f32) for s in types]
    with pytest.raises(ir.IRTypeError, match=message):
        ir.OPS["attn.block_select"](**attrs).infer_type(*tt)
