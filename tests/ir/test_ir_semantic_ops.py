"""Semantic ops (ir/ops/attn.py, moe.py, hc.py): each op in a one-op graph, run by the interpreter,
against the reference model's own modules and functions on random inputs (fp32 ≤ 1e-5, identical
indices); text round trip; type errors for bad operands."""

from __future__ import annotations

import pytest
import torch

import ir
from ir import Builder, DType, TensorType
from models.attention import Compressor, Indexer, sparse_attention, topk_visible
from models.config import Config
from models.hc import hc_head, hc_post, hc_pre
from models.layers import Rotary, apply_rope, rms_normalize
from models.moe import Experts, Gate, SharedExpert

B, T = ir.sym("B"), ir.sym("T")
f32, i64 = DType.f32, DType.i64
TOL = 1e-5


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws its random inputs from the same seed, whatever ran before it."""
    torch.manual_seed(0)


def tt(*shape, dtype: DType = f32) -> TensorType:
    return TensorType(tuple(shape), dtype)


def one_op(mnemonic: str, inputs: list[tuple[str, TensorType]], **attrs) -> ir.Graph:
    """A graph applying one op to fresh inputs; checks the text round trip."""
    b = Builder(name="g")
    vals = [b.input(name, t) for name, t in inputs]
    out = b.op(mnemonic, vals, **attrs)
    b.output(*(out if isinstance(out, tuple) else (out,)))
    g = b.build()
    assert ir.parse(ir.to_text(g)) == g
    return g


def run(g: ir.Graph, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ir.interpret(g, *args, check=True)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() <= TOL


def init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


def rotary(cfg: Config) -> Rotary:
    return Rotary(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.rope_factor, 65536, 32, 1)


# --- attn.compress --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,ratio,out", [("tiny", 4, 32), ("tiny", 8, 32), ("tiny-512", 4, 512), ("tiny", 4, 16)]
)
def test_compress_matches_compressor(preset: str, ratio: int, out: int) -> None:
    cfg = Config.preset(preset)
    rot = Rotary(16 if out == 16 else cfg.rope_head_dim, 160000.0, 16.0)
    comp = init(Compressor(cfg, ratio, out, rot), seed=ratio + out)
    t = 19  # 4 or 2 complete blocks and a remainder
    x = torch.randn(2, t, cfg.dim)
    cos, sin = rot.cos_sin(torch.arange(t // ratio) * ratio)
    w = 2 * out if ratio == 4 else out
    g = one_op(
        "attn.compress",
        [
            ("x", tt(B, T, cfg.dim)),
            ("wkv", tt(w, cfg.dim)),
            ("wgate", tt(w, cfg.dim)),
            ("ape", tt(ratio, w)),
            ("norm", tt(out)),
            ("cos", tt(T // ratio, rot.rope_dim // 2)),
            ("sin", tt(T // ratio, rot.rope_dim // 2)),
        ],
        ratio=ratio,
        overlap=ratio == 4,
        eps=cfg.norm_eps,
    )
    params = (comp.wkv.weight, comp.wgate.weight, comp.ape, comp.norm.weight)
    with torch.no_grad():
        (got,) = run(g, x, *params, cos, sin)
        close(got, comp(x))


# --- attn.indexer_topk ----------------------------------------------------------------------


def test_indexer_topk_matches_indexer() -> None:
    cfg = Config.preset("tiny")
    rot = rotary(cfg)
    idx_mod = init(Indexer(cfg, rot), seed=1)
    t, h, c = 21, cfg.index_n_heads, cfg.index_head_dim
    x, cq = torch.randn(2, t, cfg.dim), torch.randn(2, t, cfg.q_lora_rank)
    cos, sin = rot.cos_sin(torch.arange(t))
    with torch.no_grad():
        keys = idx_mod.compressor(x)
        scores = idx_mod.scores(x, cq, cos, sin, keys)
        q = apply_rope(idx_mod.wq_b(cq).unflatten(-1, (h, c)), cos.unsqueeze(-2), sin.unsqueeze(-2))
        w = idx_mod.weights_proj(x)
    s = keys.shape[1]
    visible = torch.arange(s) < ((torch.arange(t) + 1) // 4).unsqueeze(1)
    seen = scores[visible.expand_as(scores)]
    assert torch.isfinite(seen).all() and seen.unique().numel() == seen.numel(), "ties"
    g = one_op(
        "attn.indexer_topk",
        [("q", tt(B, T, h, c)), ("keys", tt(B, T // 4, c)), ("w", tt(B, T, h))],
        k=cfg.index_topk,
        ratio=4,
        scale=(c * h) ** -0.5,
    )
    (got,) = run(g, q, keys, w)
    want = topk_visible(scores, visible, cfg.index_topk)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert (got[:, :3] == -1).all() and (got[:, -1] >= 0).all()  # pads early, none late


# --- attn.sparse_mqa ------------------------------------------------------------------------


def expected_attention(q_raw, kv, comp, picks, sink, cos, sin, window, ratio, scale, eps):
    """The model's own pieces (Attention._project / forward / _output without the GEMMs)."""
    b, t = q_raw.shape[:2]
    q = apply_rope(rms_normalize(q_raw, eps), cos.unsqueeze(-2), sin.unsqueeze(-2))
    pos = torch.arange(t)
    win = pos.unsqueeze(1) - window + 1 + torch.arange(window)
    idx = win.masked_fill(win < 0, -1).expand(b, t, window)
    entries = kv
    if comp is not None:
        s = torch.arange(comp.shape[1])
        visible = s.unsqueeze(0) < ((pos + 1) // ratio).unsqueeze(1)
        if picks is None:
            picks = torch.where(visible, s, -1).expand(b, t, -1)
        idx = torch.cat((idx, torch.where(picks >= 0, picks + t, -1)), dim=-1)
        entries = torch.cat((kv, comp), dim=1)
    o = sparse_attention(q, entries, idx, sink, scale)
    return apply_rope(o, cos.unsqueeze(-2), sin.unsqueeze(-2), inverse=True)


@pytest.mark.parametrize(
    "variant,c,rope,window,ratio",
    [
        ("window", 32, 16, 8, 0),
        ("hca", 32, 16, 8, 8),
        ("csa", 32, 16, 8, 4),
        ("csa", 512, 64, 8, 4),
        ("hca", 512, 64, 4, 4),
        ("window", 512, 64, 32, 0),  # window longer than the sequence
    ],
)
def test_sparse_mqa_matches_model(variant: str, c: int, rope: int, window: int, ratio: int):
    torch.manual_seed(c + window + ratio)
    b, t, h, k = 2, 18, 3, 5
    rot = Rotary(rope, 160000.0, 16.0)
    cos, sin = rot.cos_sin(torch.arange(t))
    q_raw, kv = torch.randn(b, t, h, c), torch.randn(b, t, c)
    sink = torch.randn(h)
    comp = torch.randn(b, t // max(ratio, 1), c) if ratio else None
    picks = None
    if variant == "csa":  # distinct visible entries per query, -1 pads where fewer are visible
        n_vis = (torch.arange(t) + 1) // ratio
        rank = torch.rand(b, t, comp.shape[1]).argsort(-1)
        picks = torch.where(rank < n_vis.view(1, t, 1), torch.arange(comp.shape[1]), -1)
        picks = picks.sort(-1, descending=True).values  # k > S: padded with -1 columns
        picks = torch.nn.functional.pad(picks, (0, k), value=-1)[..., :k]
    scale, eps = c**-0.5, 1e-6
    inputs = [("q", tt(B, T, h, c)), ("kv", tt(B, T, c)), ("sink", tt(h))]
    inputs += [("cos", tt(T, rope // 2)), ("sin", tt(T, rope // 2))]
    args = [q_raw, kv, sink, cos, sin]
    if comp is not None:
        inputs.append(("comp", tt(B, T // ratio, c)))
        args.append(comp)
    if picks is not None:
        inputs.append(("picks", tt(B, T, k, dtype=i64)))
        args.append(picks)
    attrs = {
        "variant": variant,
        "window": window,
        "ratio": ratio,
        "scale": scale,
        "q_norm_eps": eps,
    }
    g = one_op("attn.sparse_mqa", inputs, **attrs)
    (got,) = run(g, *args)
    want = expected_attention(q_raw, kv, comp, picks, sink, cos, sin, window, ratio, scale, eps)
    close(got, want)


def test_sparse_mqa_without_query_norm() -> None:
    torch.manual_seed(0)
    q, kv, sink = torch.randn(1, 6, 2, 32), torch.randn(1, 6, 32), torch.randn(2)
    cos, sin = Rotary(16, 10000.0).cos_sin(torch.arange(6))
    g = one_op(
        "attn.sparse_mqa",
        [("q", tt(1, T, 2, 32)), ("kv", tt(1, T, 32)), ("sink", tt(2))]
        + [("cos", tt(T, 8)), ("sin", tt(T, 8))],
        variant="window",
        window=4,
        scale=0.2,
    )
    (got,) = run(g, q, kv, sink, cos, sin)
    rq = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
    win = torch.arange(6).unsqueeze(1) - 3 + torch.arange(4)
    o = sparse_attention(rq, kv, win.masked_fill(win < 0, -1).unsqueeze(0), sink, 0.2)
    close(got, apply_rope(o, cos.unsqueeze(-2), sin.unsqueeze(-2), inverse=True))


# --- moe.route / moe.experts ----------------------------------------------------------------


@pytest.mark.parametrize("hash_routing", [False, True])
def test_route_matches_gate(hash_routing: bool) -> None:
    cfg = Config.preset("tiny")
    gate = init(Gate(cfg, hash_routing), seed=3)
    n, e, k = 20, cfg.n_routed_experts, cfg.n_activated_experts
    x, ids = torch.randn(n, cfg.dim), torch.randint(0, cfg.vocab_size, (n,))
    inputs = [("x", tt(B, cfg.dim)), ("gate", tt(e, cfg.dim))]
    args = [x, gate.weight]
    if hash_routing:
        gate.tid2eid.copy_(torch.rand(cfg.vocab_size, e).argsort(-1)[:, :k])
        inputs += [("tid2eid", tt(cfg.vocab_size, k, dtype=i64)), ("ids", tt(B, dtype=i64))]
        args += [gate.tid2eid, ids]
    else:
        inputs.append(("bias", tt(e)))
        args.append(gate.bias)
    attrs = {"k": k, "score": "sqrtsoftplus", "route_scale": cfg.route_scale}
    g = one_op("moe.route", inputs, bias=not hash_routing, hash=hash_routing, **attrs)
    with torch.no_grad():
        weights, experts = run(g, *args)
        want_w, want_e = gate(x, ids)
    assert torch.equal(experts, want_e)
    close(weights, want_w)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_other_scores(score: str) -> None:
    torch.manual_seed(4)
    x, w = torch.randn(7, 16), torch.randn(5, 16)
    g = one_op("moe.route", [("x", tt(7, 16)), ("gate", tt(5, 16))], k=2, score=score, renorm=False)
    weights, experts = run(g, x, w)
    s = (x @ w.T).softmax(-1) if score == "softmax" else (x @ w.T).sigmoid()
    want_w, want_e = s.topk(2, dim=-1)
    assert torch.equal(experts, want_e)
    close(weights, want_w)


@pytest.mark.parametrize("shared", [False, True])
def test_experts_match_model(shared: bool) -> None:
    cfg = Config.preset("tiny")
    experts_mod, shared_mod = init(Experts(cfg), seed=5), init(SharedExpert(cfg), seed=6)
    n, k, e = 13, cfg.n_activated_experts, cfg.n_routed_experts
    x = torch.randn(n, cfg.dim) * 3  # large enough that the SwiGLU clamps bite
    with torch.no_grad():  # ... and outputs O(1), so 1e-5 is a meaningful absolute bound
        experts_mod.w2.mul_(0.01)
        shared_mod.w2.weight.mul_(0.01)
    chosen = torch.rand(n, 4).argsort(-1)[:, :k] * 2  # only even experts: odd ones get no token
    weights = torch.rand(n, k)
    inputs = [("x", tt(B, cfg.dim)), ("weights", tt(B, k)), ("experts", tt(B, k, dtype=i64))]
    inputs += [(f"w{i}", tt(*getattr(experts_mod, f"w{i}").shape)) for i in (1, 3, 2)]
    args = [x, weights, chosen, experts_mod.w1, experts_mod.w3, experts_mod.w2]
    if shared:
        mods = (shared_mod.w1, shared_mod.w3, shared_mod.w2)
        inputs += [(f"s{i}", tt(*m.weight.shape)) for i, m in zip((1, 3, 2), mods)]
        args += [m.weight for m in mods]
    g = one_op("moe.experts", inputs, limit=cfg.swiglu_limit, shared=shared)
    with torch.no_grad():
        (got,) = run(g, *args)
        want = experts_mod(x, weights, chosen) + (shared_mod(x) if shared else 0)
    assert torch.bincount(chosen.flatten(), minlength=e)[1::2].sum() == 0
    close(got, want)


# --- hc.pre / hc.post / hc.head -------------------------------------------------------------


def hc_params(n: int, d: int, rows: int, scales: int) -> tuple[torch.Tensor, ...]:
    return torch.randn(rows, n * d) * 0.05, torch.rand(scales) * 0.5, torch.randn(rows)


def test_hc_pre_matches_model() -> None:
    torch.manual_seed(7)
    n, d = 4, 64
    x = torch.randn(2, 5, n, d)
    fn, scale, base = hc_params(n, d, (2 + n) * n, 3)
    g = one_op(
        "hc.pre",
        [("x", tt(B, T, n, d)), ("fn", tt(24, n * d)), ("scale", tt(3)), ("base", tt(24))],
        iters=20,
        eps=1e-6,
        norm_eps=1e-6,
    )
    assert len(g.ops) == 1  # the 20 Sinkhorn iterations stay inside the op
    got = run(g, x, fn, scale, base)
    want = hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for a, b in zip(got, want):
        close(a, b)


def test_hc_post_and_head_match_model() -> None:
    torch.manual_seed(8)
    n, d = 4, 32
    f, r = torch.randn(3, 2, d), torch.randn(3, 2, n, d)
    post, comb = torch.rand(3, 2, n) * 2, torch.rand(3, 2, n, n)
    g = one_op(
        "hc.post",
        [
            ("f", tt(B, T, d)),
            ("r", tt(B, T, n, d)),
            ("post", tt(B, T, n)),
            ("comb", tt(B, T, n, n)),
        ],
    )
    close(run(g, f, r, post, comb)[0], hc_post(f, r, post, comb))
    fn, scale, base = hc_params(n, d, n, 1)
    g = one_op(
        "hc.head",
        [("x", tt(B, T, n, d)), ("fn", tt(n, n * d)), ("scale", tt(1)), ("base", tt(n))],
    )
    close(run(g, r, fn, scale, base)[0], hc_head(r, fn, scale, base, 1e-6, 1e-6))


# --- type errors ----------------------------------------------------------------------------


def build_error(mnemonic: str, shapes: list[TensorType], **attrs) -> str:
    b = Builder()
    vals = [b.input(f"v{i}", t) for i, t in enumerate(shapes)]
    with pytest.raises(ir.IRTypeError) as info:
        b.op(mnemonic, vals, **attrs)
    return str(info.value)


MQA = [tt(B, T, 4, 32), tt(B, T, 32), tt(4), tt(T, 8), tt(T, 8)]


@pytest.mark.parametrize(
    "mnemonic,shapes,attrs,message",
    [
        ("attn.sparse_mqa", MQA[:4], {"variant": "window"}, "takes 5 operands, got 4"),
        ("attn.sparse_mqa", MQA, {"variant": "hca", "ratio": 8}, "takes 6 operands"),
        ("attn.sparse_mqa", MQA, {"variant": "window", "ratio": 4}, "does not fit variant"),
        ("attn.sparse_mqa", MQA, {"variant": "dense"}, "variant must be one of"),
        ("attn.sparse_mqa", [MQA[0], tt(B, T, 64)] + MQA[2:], {}, "head dim of q and kv"),
        ("attn.sparse_mqa", MQA[:2] + [tt(3)] + MQA[3:], {}, "sink: [H]"),
        ("attn.sparse_mqa", MQA[:3] + [tt(T, 20), tt(T, 20)], {}, "rope width 2*20"),
        (
            "attn.sparse_mqa",
            MQA + [tt(B, T // 4, 32), tt(B, T, 4)],
            {"variant": "csa", "ratio": 4},
            "picks must be i64 or i32",
        ),
        (
            "attn.compress",
            [tt(B, T, 64), tt(64, 64), tt(64, 64), tt(4, 64), tt(32), tt(T // 4, 8), tt(T // 4, 8)],
            {"ratio": 4, "overlap": False},
            "W must be 32",
        ),
        (
            "attn.compress",
            [tt(B, T, 64), tt(64, 64), tt(64, 64), tt(4, 64), tt(32), tt(T, 8), tt(T, 8)],
            {"ratio": 4},
            "cos/sin need one row per position",
        ),
        (
            "attn.indexer_topk",
            [tt(B, T, 8, 32), tt(B, T // 4, 16), tt(B, T, 8)],
            {"k": 4},
            "head dim of q and keys",
        ),
        ("attn.indexer_topk", [tt(B, T, 8, 32), tt(B, T // 4, 32), tt(B, T)], {}, "ranks"),
        ("moe.route", [tt(B, 64), tt(8, 64)], {"k": 9}, "k must be in [1, E=8]"),
        ("moe.route", [tt(B, 64), tt(8, 64)], {"score": "relu"}, "score must be one of"),
        ("moe.route", [tt(B, 64), tt(8, 64)], {"bias": True}, "expected 3 operands"),
        (
            "moe.route",
            [tt(B, 64), tt(8, 64), tt(128, 2, dtype=i64), tt(T, dtype=i64)],
            {"k": 2, "hash": True},
            "ids must be [N]",
        ),
        (
            "moe.experts",
            [tt(B, 64), tt(B, 2), tt(B, 2, dtype=i64), tt(8, 32, 64), tt(8, 32, 64), tt(8, 32, 64)],
            {},
            "w2 must be [E,d,I]",
        ),
        (
            "moe.experts",
            [tt(B, 64), tt(B, 2), tt(B, 2), tt(8, 32, 64), tt(8, 32, 64), tt(8, 64, 32)],
            {},
            "experts must be i64 or i32",
        ),
        ("hc.pre", [tt(B, T, 4, 64), tt(24, 128), tt(3), tt(24)], {}, "n*d = 256 columns"),
        ("hc.pre", [tt(B, T, 4, 64), tt(20, 256), tt(3), tt(20)], {}, "fn must have 24 rows"),
        ("hc.head", [tt(B, T, 4, 64), tt(4, 256), tt(3), tt(4)], {}, "scale must be [1]"),
        ("hc.post", [tt(B, T, 64), tt(B, T, 4, 64), tt(B, T, 4), tt(B, T, 4)], {}, "comb must"),
        ("attn.sparse_mqa", MQA, {"decode": True}, "takes 6 operands"),
        ("attn.sparse_mqa", [*MQA, tt(B)], {"decode": True}, "pos must be a 0-d"),
        ("attn.sparse_mqa", [*MQA, tt(dtype=i64)], {"decode": True}, "one query per sequence"),
        (
            "attn.sparse_mqa",
            [tt(B, 1, 4, 32), tt(B, 16, 32), tt(4), tt(1, 8), tt(1, 8), tt(dtype=i64)],
            {"decode": True, "window": 8},
            "decode kv must be the ring [B,8,c]",
        ),
        (
            "attn.indexer_topk",
            [tt(B, 1, 8, 32), tt(B, 16, 32), tt(B, 1, 8)],
            {"decode": True},
            "expected 4",
        ),
    ],
)
def test_type_errors(mnemonic: str, shapes, attrs, message: str) -> None:
    text = build_error(mnemonic, shapes, **attrs)
    assert text.startswith(mnemonic + "(") and message in text, text


def test_verifier_rejects_wrong_recorded_type() -> None:
    g = one_op(
        "hc.post", [("f", tt(T, 8)), ("r", tt(T, 4, 8)), ("p", tt(T, 4)), ("c", tt(T, 4, 4))]
    )
    text = ir.to_text(g).replace("f32[T,4,8] = hc.post", "f32[T,4,9] = hc.post")
    with pytest.raises((ir.VerifyError, ir.ParseError)) as info:
        ir.verify(ir.parse(text))
    assert "hc.post" in str(info.value)


# --- decode: one query at position `pos`, ring window ---------------------------------------


@pytest.mark.parametrize(
    "variant,c,rope,ratio,pos",
    [
        ("window", 32, 16, 0, 3),  # ring not full yet: slots > pos are no entries
        ("hca", 32, 16, 8, 40),
        ("csa", 32, 16, 4, 41),
        ("csa", 512, 64, 4, 17),
    ],
)
def test_sparse_mqa_decode_matches_model(variant: str, c: int, rope: int, ratio: int, pos: int):
    torch.manual_seed(pos + c)
    b, h, w, k, max_len = 2, 3, 8, 5, 64
    rot = Rotary(rope, 160000.0, 16.0)
    cos, sin = rot.cos_sin(torch.tensor([pos]))
    q_raw, ring, sink = torch.randn(b, 1, h, c), torch.randn(b, w, c), torch.randn(h)
    comp = torch.randn(b, max_len // max(ratio, 1), c) if ratio else None
    position = torch.tensor(pos)
    # the model's Attention.decode, without the projections
    slots = torch.arange(w)
    idx = torch.where(slots <= position, slots, -1).view(1, 1, w).expand(b, 1, w)
    entries, picks = ring, None
    if comp is not None:
        s = torch.arange(comp.shape[1])
        visible = s < (position + 1) // ratio
        if variant == "csa":
            scores = torch.randn(b, 1, comp.shape[1])
            picks = topk_visible(scores, visible, k)
            chosen = picks
        else:
            chosen = torch.where(visible, s, -1).view(1, 1, -1).expand(b, 1, -1)
        idx = torch.cat((idx, torch.where(chosen >= 0, chosen + w, -1)), dim=-1)
        entries = torch.cat((ring, comp), dim=1)
    q = apply_rope(rms_normalize(q_raw, 1e-6), cos.unsqueeze(-2), sin.unsqueeze(-2))
    o = sparse_attention(q, entries, idx, sink, c**-0.5)
    want = apply_rope(o, cos.unsqueeze(-2), sin.unsqueeze(-2), inverse=True)

    inputs = [("q", tt(B, 1, h, c)), ("kv", tt(B, w, c)), ("sink", tt(h))]
    inputs += [("cos", tt(1, rope // 2)), ("sin", tt(1, rope // 2))]
    args = [q_raw, ring, sink, cos, sin]
    if comp is not None:
        inputs.append(("comp", tt(B, comp.shape[1], c)))
        args.append(comp)
    if picks is not None:
        inputs.append(("picks", tt(B, 1, k, dtype=i64)))
        args.append(picks)
    inputs.append(("pos", tt(dtype=i64)))
    args.append(position)
    attrs = {"variant": variant, "window": w, "ratio": ratio, "scale": c**-0.5}
    g = one_op("attn.sparse_mqa", inputs, q_norm_eps=1e-6, decode=True, **attrs)
    close(run(g, *args)[0], want)


def test_indexer_topk_decode_matches_model() -> None:
    torch.manual_seed(9)
    b, h, c, s, k, pos = 2, 8, 32, 16, 4, 21
    q, keys, w = torch.randn(b, 1, h, c), torch.randn(b, s, c), torch.randn(b, 1, h)
    scores = (torch.einsum("bthc,bsc->bths", q, keys).relu() * (w * 0.1).unsqueeze(-1)).sum(2)
    visible = torch.arange(s) < (torch.tensor(pos) + 1) // 4
    g = one_op(
        "attn.indexer_topk",
        [("q", tt(B, 1, h, c)), ("keys", tt(B, s, c)), ("w", tt(B, 1, h)), ("pos", tt(dtype=i64))],
        k=k,
        ratio=4,
        scale=0.1,
        decode=True,
    )
    (got,) = run(g, q, keys, w, torch.tensor(pos))
    assert torch.equal(got, topk_visible(scores, visible, k))


@pytest.mark.parametrize("ratio,out,rope", [(4, 32, 16), (8, 32, 16), (4, 512, 64)])
def test_compress_step_matches_compressor_decode(ratio: int, out: int, rope: int) -> None:
    """Consecutive decode steps from an empty state, across block boundaries."""
    from models.attention import _scatter_rows

    cfg = Config.preset("tiny")
    rot = Rotary(rope, 160000.0, 16.0)
    comp = init(Compressor(cfg, ratio, out, rot), seed=ratio + out + 1)
    w, rows, b, max_len = (2 if ratio == 4 else 1) * out, comp.state_rows, 2, 24
    g = one_op(
        "attn.compress_step",
        [
            ("x", tt(B, 1, cfg.dim)),
            ("pos", tt(dtype=i64)),
            ("kv_state", tt(B, rows, w)),
            ("score_state", tt(B, rows, w)),
            ("wkv", tt(w, cfg.dim)),
            ("wgate", tt(w, cfg.dim)),
            ("ape", tt(ratio, w)),
            ("norm", tt(out)),
            ("cos", tt(1, rope // 2)),
            ("sin", tt(1, rope // 2)),
            ("cache", tt(B, max_len // ratio, out)),
        ],
        ratio=ratio,
        overlap=ratio == 4,
        eps=cfg.norm_eps,
    )
    params = (comp.wkv.weight, comp.wgate.weight, comp.ape, comp.norm.weight)
    kv_state, score_state = comp.init_state(b, torch.device("cpu"))
    cache = torch.zeros(b, max_len // ratio, out)
    for p in range(2 * ratio + 1):
        x, pos = torch.randn(b, 1, cfg.dim), torch.tensor(p)
        cos, sin = rot.cos_sin((pos // ratio * ratio).view(1))
        with torch.no_grad():
            got = run(g, x, pos, kv_state, score_state, *params, cos, sin, cache)
            entry, emit, kv_state, score_state = comp.decode(x, pos, kv_state, score_state)
            cache = _scatter_rows(cache, pos // ratio, entry, emit)
        for a, want in zip(got, (cache, kv_state, score_state)):
            assert torch.equal(torch.isinf(a), torch.isinf(want))
            close(torch.nan_to_num(a, neginf=0.0), torch.nan_to_num(want, neginf=0.0))


@pytest.mark.parametrize(
    "activation, limit", [("clamped_swiglu", 7.0), ("swiglu", float("inf")), ("gpt_oss", 7.0)]
)
def test_gated_inplace_has_the_reference_bits(activation, limit) -> None:
    """The experts' BLAS path computes the gated activation in place (moe.gated_inplace); it must
    give exactly the bits of the op's reference, clamps included (values beyond ±limit)."""
    from ir.ops.moe import gated_inplace, gated_reference

    gen = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(64, 48, generator=gen) * 6 for _ in range(2))
    want = gated_reference(gate, up, activation, limit, 1.702)
    got = gated_inplace(gate.clone(), up.clone(), activation, limit, 1.702)
    assert torch.equal(got, want)
