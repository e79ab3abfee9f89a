"""Collective IR ops (`dist.*`, `moe.dispatch/combine`): text round trip, verifier fixtures,
the interpreter at world size 1 (identity) and with a bound fake group."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ir
from ir import DType, Node, TensorType
from ir.ops.collective import bind_groups

T = ir.sym("T")
f32, i64 = DType.f32, DType.i64


def _graph(size: int = 1) -> ir.Graph:
    b = ir.Builder(name="collectives")
    x = b.input("x", TensorType((T, 8), f32))
    w = b.input("w", TensorType((T, 2), f32))
    e = b.input("e", TensorType((T, 2), i64))
    r = b.op("dist.all_reduce", [x], group="tp", size=size)
    g = b.op("dist.all_gather", [r], group="tp", size=size, dim=1)
    s = b.op("dist.reduce_scatter", [g], group="tp", size=size, dim=1)
    a = b.op("dist.all_to_all", [s], group="tp", size=size, dim=1)
    rx, rw, slots = b.op("moe.dispatch", [x, w, e], group="ep", n_experts=4, capacity=T)
    y = b.op("moe.combine", [rx, e, slots], group="ep", n_experts=4)
    i = b.op("dist.axis_index", [], group="ep")
    b.output(a, y, i, rw)
    return b.build()


def test_round_trip_and_types() -> None:
    g = _graph(size=2)
    text = ir.to_text(g)
    assert ir.parse(text) == g and ir.to_text(ir.parse(text)) == text
    assert "= dist.all_gather(%0, group=\"tp\", size=2, dim=1)" in text
    assert "%1: f32[T,16]" in text and "%2: f32[T,8]" in text  # gather x2, scatter /2
    assert "f32[4,T,8], %5: f32[4,T], %6: i64[T,2] = moe.dispatch(" in text
    ir.verify(ir.parse(text))


def _inputs(n: int = 6):
    torch.manual_seed(0)
    x = torch.randn(n, 8)
    w = torch.rand(n, 2)
    e = torch.stack([torch.randperm(4)[:2] for _ in range(n)])  # distinct experts per token
    return x, w, e


def test_world_size_one_is_identity_and_moe_exchange_is_exact() -> None:
    x, w, e = _inputs()
    a, y, i, rw = ir.interpret(_graph(size=1), x, w, e)
    assert torch.equal(a, x) and int(i) == 0
    # identity experts scaled by the routing weight: combine(dispatch(x)) = sum_j w_j x
    b = ir.Builder(name="moe_identity")
    xv = b.input("x", TensorType((T, 8), f32))
    wv = b.input("w", TensorType((T, 2), f32))
    ev = b.input("e", TensorType((T, 2), i64))
    rx, rw_, sl = b.op("moe.dispatch", [xv, wv, ev], n_experts=4, capacity=T)
    scaled = b.op("mul", [rx, b.op("reshape", [rw_], shape=[4, T, 1])])
    b.output(b.op("moe.combine", [scaled, ev, sl], n_experts=4))
    (got,) = ir.interpret(b.build(), x, w, e)
    assert torch.allclose(got, (w[..., None] * x[:, None]).sum(1), atol=1e-6)


def test_capacity_drops_pairs_beyond_it() -> None:
    x, w, e = _inputs()
    e = torch.zeros_like(e)
    e[:, 1] = 1  # every token picks experts 0 and 1: 6 pairs per expert, capacity 4
    op = ir.OPS["moe.dispatch"](n_experts=4, capacity=4)
    rx, rw, slots = op.reference(x, w, e)
    assert slots[:4].tolist() == [[p, p] for p in range(4)]
    assert (slots[4:] == -1).all() and rx.shape == (4, 4, 8)
    assert torch.equal(rx[0], x[:4]) and torch.equal(rw[1], w[:4, 1])


def test_unbound_axis_of_size_two_is_a_clear_error() -> None:
    x, w, e = _inputs()
    with pytest.raises(RuntimeError, match="over mesh axis 'tp' \\(size 2\\) has no process group"):
        ir.interpret(_graph(size=2), x, w, e)


@dataclasses.dataclass
class _Mirror:
    """A fake 2-rank axis on which both ranks hold the same tensor (for single-process tests)."""

    size: int = 2
    rank: int = 1

    def all_reduce(self, t):
        return t * 2

    def all_gather(self, t, dim):
        return torch.cat([t, t], dim)

    def reduce_scatter(self, t, dim):
        return (t * 2).chunk(2, dim)[self.rank]

    def all_to_all(self, t, dim):
        mine = t.chunk(2, dim)[self.rank]
        return torch.cat([mine, mine], dim)


def test_bound_group_is_called_and_size_mismatch_caught() -> None:
    x, w, e = _inputs()
    with bind_groups({"tp": _Mirror(), "ep": _Mirror(size=1, rank=0)}):
        a, _, i, _ = ir.interpret(_graph(size=2), x, w, e)
    full = torch.cat([2 * x, 2 * x], 1)
    half = (2 * full).chunk(2, 1)[1]
    assert torch.equal(a, torch.cat([half.chunk(2, 1)[1]] * 2, 1)) and int(i) == 0
    with bind_groups({"tp": _Mirror(size=4)}):
        with pytest.raises(RuntimeError, match="compiled for 2 ranks but the bound group has 4"):
            ir.interpret(_graph(size=2), x, w, e)
    with pytest.raises(ValueError, match="unknown mesh axis 'pp'"):
        with bind_groups({"pp": _Mirror()}):
            pass


def _broken(g: ir.Graph, index: int, **changes) -> ir.Graph:
    n = g.ops[index]
    op = dataclasses.replace(n.op, **changes)
    g.ops[index] = Node(op, n.operands, n.results, n.loc)
    return g


@pytest.mark.parametrize(
    "index, changes, fragment",
    [
        (0, {"group": "pp"}, "group must be a mesh axis ('tp', 'ep', 'dp'), got 'pp'"),
        (0, {"size": 0}, "size (ranks on axis 'tp') must be >= 1"),
        (1, {"size": 4}, "recorded"),  # all_gather result type no longer matches
        (4, {"n_experts": 3, "size": 2}, "n_experts must divide by size"),
    ],
)
def test_verifier_rejects_broken_collectives(index: int, changes: dict, fragment: str) -> None:
    g = _broken(_graph(size=2), index, **changes)
    with pytest.raises(ir.VerifyError) as err:
        ir.verify(g)
    assert fragment in str(err.value), str(err.value)


def test_reduce_scatter_needs_divisible_dim() -> None:
    b = ir.Builder(name="bad")
    x = b.input("x", TensorType((3, 8), f32))
    with pytest.raises(ir.IRTypeError, match=r"dim 0 \(3\) must divide by the axis size 2"):
        b.op("dist.reduce_scatter", [x], group="tp", size=2, dim=0)
