"""Vocabulary-parallel embedding in the `shard` pass, in one process: each simulated rank's
program (its all_reduce left as the identity) yields its partial lookup; the partials add up to
the whole table's lookup exactly, and every rank reads only in-range rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ir
from backends.distributed import Mesh, local_params
from ir import DType, TensorType
from ir.ops.collective import bind_groups
from passes.shard import shard
from passes.shard_rules import rules_for_mesh


@dataclasses.dataclass
class _Identity:
    """A rank of a size-`size` axis whose all_reduce returns this rank's summand unchanged."""

    size: int
    rank: int

    def all_reduce(self, t):
        return t


def _lookup(vocab: int, dim: int) -> ir.Graph:
    b = ir.Builder(name="embed")
    w = b.input("embed.weight", TensorType((vocab, dim), DType.f32), role="parameter")
    ids = b.input("ids", TensorType((3, 5), DType.i64))
    b.output(b.op("mul", [b.op("embedding", [w, ids]), b.op("constant", [], value=2.0,
                                                             dtype=DType.f32)]))
    return b.build()


@pytest.mark.parametrize("tp", [2, 4])
def test_partial_lookups_add_up_to_the_table_lookup(tp: int) -> None:
    vocab, dim = 16, 8
    g = _lookup(vocab, dim)
    mesh = Mesh.parse(f"tp={tp}")
    rules = rules_for_mesh(mesh.to_json())
    program = ir.verify(shard(g, mesh.to_json(), rules=rules))
    names = [n.name for n in program.ops]
    assert names.count("embedding") == 1 and names.count("dist.all_reduce") == 1
    assert program.params[0].type.shape == (vocab // tp, dim)  # each rank holds its block
    torch.manual_seed(0)
    table = torch.randn(vocab, dim)
    ids = torch.randint(0, vocab, (3, 5))
    ids[0, :2] = torch.tensor([0, vocab - 1])  # both ends of the vocabulary
    total = torch.zeros(3, 5, dim)
    for rank in range(tp):
        params = local_params({"embed.weight": table}, rules, mesh, rank)
        with bind_groups({"tp": _Identity(tp, rank)}):
            (part,) = ir.interpret(program, ids, params=params)
        mine = (ids // (vocab // tp)) == rank
        assert torch.equal(part[~mine], torch.zeros_like(part[~mine]))  # others' ids read 0
        total += part
    assert torch.equal(total, 2 * table[ids])
