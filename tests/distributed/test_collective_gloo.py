"""Collective IR ops on real gloo ranks (spawned once per test; 2 and 4 processes)."""

from __future__ import annotations

import time

import pytest
import torch

import dist_workers
import ir
from backends.distributed import Mesh, RankFailed, run_ranks
from ir import DType, TensorType

f32, i64 = DType.f32, DType.i64


def _graph(size: int, n: int, n_experts: int, layout: str = "padded") -> str:
    b = ir.Builder(name="collectives")
    x = b.input("x", TensorType((n, 8), f32))
    w = b.input("w", TensorType((n, 2), f32))
    e = b.input("e", TensorType((n, 2), i64))
    r = b.op("dist.all_reduce", [x], group="ep", size=size)
    g = b.op("dist.all_gather", [x], group="ep", size=size, dim=1)
    s = b.op("dist.reduce_scatter", [x], group="ep", size=size, dim=0)
    a = b.op("dist.all_to_all", [x], group="ep", size=size, dim=0)
    rx, rw, sl = b.op("moe.dispatch", [x, w, e], group="ep", size=size,
                      n_experts=n_experts, capacity=n, layout=layout)
    scaled = b.op("mul", [rx, b.op("reshape", [rw], shape=[n_experts // size, size * n, 1])])
    y = b.op("moe.combine", [scaled, e, sl], group="ep", size=size, n_experts=n_experts,
             layout=layout)
    b.output(r, g, s, a, y, b.op("dist.axis_index", [], group="ep", size=size))
    return ir.to_text(b.build())


@pytest.mark.parametrize("world, layout", [(2, "ragged"), (4, "padded")])
def test_collectives_match_torch_semantics(world: int, layout: str) -> None:
    n, n_experts = 8, 8
    torch.manual_seed(world)
    inputs = []
    for _ in range(world):
        e = torch.stack([torch.randperm(n_experts)[:2] for _ in range(n)])
        inputs.append((torch.randn(n, 8), torch.rand(n, 2), e))
    outs = run_ranks(dist_workers.collectives, world,
                     (f"ep={world}", _graph(world, n, n_experts, layout), inputs), timeout_s=60)
    xs = [x for x, _, _ in inputs]
    total = sum(xs)
    for r, (red, gat, sca, a2a, y, idx) in enumerate(outs):
        assert torch.allclose(red, total, atol=1e-6) and int(idx) == r
        assert torch.equal(gat, torch.cat(xs, 1))
        assert torch.allclose(sca, total.chunk(world, 0)[r], atol=1e-6)
        assert torch.equal(a2a, torch.cat([x.chunk(world, 0)[r] for x in xs], 0))
        x, w, _ = inputs[r]  # identity experts: combine(dispatch) = sum_j w_j x, exactly
        assert torch.allclose(y, (w[..., None] * x[:, None]).sum(1), atol=1e-6)


def test_dead_rank_fails_the_others_fast(tmp_path) -> None:
    """Measured from the death (spawning ranks may take long on a loaded machine): the run
    fails within the grace period plus slack, far inside the collective timeout."""
    stamp = str(tmp_path / "died_at")
    with pytest.raises(RankFailed) as err:
        run_ranks(dist_workers.die_or_reduce, 2, (stamp,), timeout_s=120, grace_s=5)
    after = time.time() - float((tmp_path / "died_at").read_text())
    msg = str(err.value)
    assert after < 30, f"failed {after:.1f} s after rank 1 died (timeout 120 s)"
    assert "rank 1 died: exit code 3 before reporting" in msg, msg
    assert msg.startswith("2 of 2 ranks failed; cause: rank 1 died (exit code 3 before "
                          "reporting):"), msg


def test_the_cause_is_the_dead_rank_whatever_order_reports_arrive() -> None:
    from backends.distributed.launch import _culprit

    lost = ("error", "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:8118")
    bad = {0: lost, 1: ("died", "exit code 3 before reporting"), 2: lost}
    assert _culprit(bad, [0, 2, 1]) == 1 and _culprit(bad, [1, 0, 2]) == 1
    bad[1] = ("error", "ValueError: bad shape")  # an error of its own beats a lost peer
    assert _culprit(bad, [0, 2, 1]) == 1
    assert _culprit({0: lost, 1: lost}, [1, 0]) == 1  # only lost peers: the first seen
