"""Shared helpers for the pass tests: random inputs, differential runs, the captured tiny model."""

from __future__ import annotations

import functools

import torch

import ir
import passes
from ir import DType


def random_inputs(g: ir.Graph, seed: int = 0, sizes: dict[str, int] | None = None) -> list:
    """A random tensor for each non-parameter input (symbols bound from `sizes`, default 3)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in g.inputs:
        shape = [d if isinstance(d, int) else (sizes or {}).get(str(d), 3) for d in v.type.shape]
        if v.dtype.is_float:
            out.append(torch.randn(shape, generator=gen).to(v.dtype.to_torch()))
        elif v.dtype == DType.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            out.append(torch.randint(-4, 5, shape, generator=gen).to(v.dtype.to_torch()))
    return out


def assert_same_outputs(a: ir.Graph, b: ir.Graph, seed: int = 0, atol: float = 0.0) -> None:
    """Interpret both graphs on the same random inputs; outputs must agree (exactly by default)."""
    inputs = random_inputs(a, seed)
    want, got = ir.interpret(a, *inputs), ir.interpret(b, *inputs)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        if w.dtype.is_floating_point:
            torch.testing.assert_close(g, w, atol=atol, rtol=0, equal_nan=True)
        else:
            assert torch.equal(g, w)


def canonical(g: ir.Graph) -> tuple[ir.Graph, passes.PassContext]:
    """Canonicalise `g` with a fresh context; the result must verify."""
    ctx = passes.PassContext()
    out = passes.canonicalize(g, ctx)
    ir.verify(out)
    return out, ctx


@functools.cache
def tiny_model():
    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    return Transformer(Config.preset("tiny")).eval()


@functools.cache
def tiny_prefill_graph() -> ir.Graph:
    """The tiny model's prefill, captured once per test session (~15 s)."""
    from frontend import capture

    tokens = torch.zeros(2, 24, dtype=torch.long)
    dynamic = {"tokens": {0: "B", 1: "T"}}
    return capture(tiny_model(), (tokens,), dynamic=dynamic, method="prefill")


class RouteBiasSubtracted(torch.nn.Module):  # selection by s - bias: not the router's rule
    def forward(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple:
        s = torch.nn.functional.softplus(x @ w.t()).sqrt()
        picks = (s - bias).topk(2, dim=-1).indices
        weights = s.gather(1, picks)
        return weights / weights.sum(-1, keepdim=True), picks


def route_args() -> tuple:
    """x [9, 16], gate [6, 16], bias [6] for the router modules (seeded)."""
    gen = torch.Generator().manual_seed(2)
    return tuple(torch.randn(s, generator=gen) for s in ((9, 16), (6, 16), (6,)))


def dsa_layer() -> torch.nn.Module:
    """One attention layer of the tiny-dsa preset (models/attention_dsa.py), seeded."""
    from models.attention_dsa import DSAttention
    from models.config import Config

    torch.manual_seed(0)
    return DSAttention(Config.preset("tiny-dsa")).eval()


class DSADecode(torch.nn.Module):
    """A DSA layer's decode step with its cache dict as plain tensors in and out (capturable)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, pos, kv, keys):
        out, new = self.layer.decode(x, pos, {"kv": kv, "indexer.keys": keys})
        return out, new["kv"], new["indexer.keys"]
