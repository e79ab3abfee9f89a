"""Functions run inside spawned gloo ranks (importable by module name, as spawn needs)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import ir
from backends.distributed import Mesh, init_mesh
from ir.ops.collective import bind_groups


def collectives(rank: int, mesh_text: str, graph_text: str, inputs: list) -> list:
    """Run a graph of collectives with this rank's inputs; returns its outputs."""
    groups = init_mesh(Mesh.parse(mesh_text))
    with bind_groups(groups):
        return list(ir.interpret(ir.parse(graph_text), *inputs[rank]))


def die_or_reduce(rank: int, stamp: str | None = None) -> float:
    """Rank 1 dies before the collective (writing the time it dies to `stamp`); rank 0 must
    fail (not hang)."""
    if rank == 1:
        if stamp:
            import time

            with open(stamp, "w") as f:
                f.write(repr(time.time()))
        os._exit(3)
    t = torch.ones(4)
    dist.all_reduce(t)
    return float(t[0])


def sharded_model(rank: int, cases: list, graph_text: str, state: dict, inputs: list) -> dict:
    """Shard the global graph for each (name, mesh, moe, batch axis) case on this rank and run it;
    returns
    name -> (outputs, op counts of this rank's program)."""
    from collections import Counter

    from backends.distributed import run_rank_program
    from passes.shard import shard
    from passes.shard_rules import rules_for_mesh

    g = ir.parse(graph_text)
    out = {}
    for name, mesh_text, moe, batch_axis in cases:
        mesh = Mesh.parse(mesh_text)
        rules = rules_for_mesh(mesh.to_json(), moe=moe)
        program = shard(g, mesh.to_json(), rules=rules, moe=moe, batch_axis=batch_axis)
        ir.verify(program)
        res = run_rank_program(program, mesh, rules, state, inputs, batch_axis=batch_axis)
        out[name] = (list(res), dict(Counter(n.name for n in program.ops)))
    return out


def tvm_rank(rank: int, graph_text: str, state: dict, tokens) -> list:
    """dp attention + ep=2 dispatch, fused and compiled by the TVM backend on this rank."""
    import backends
    from backends.distributed import local_params
    from passes.fuse_elementwise import fuse_elementwise
    from passes.shard import shard
    from passes.shard_rules import rules_for_mesh

    mesh = Mesh.parse("ep=2")
    rules = rules_for_mesh(mesh.to_json(), moe="dispatch")
    program = shard(ir.parse(graph_text), mesh.to_json(), rules=rules, moe="dispatch",
                    batch_axis="ep")
    exe = backends.get_backend("tvm").compile(fuse_elementwise(program), "cpu")
    names = {v.name for v in program.params}
    params = {k: v for k, v in local_params(state, rules, mesh, rank).items() if k in names}
    with bind_groups(init_mesh(mesh)):
        return list(exe(tokens.chunk(2, 0)[rank], params=params))
