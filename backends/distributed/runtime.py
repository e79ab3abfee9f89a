"""Run one rank's program: bind the mesh's axis groups, slice the parameters, interpret."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist

import ir
from backends.distributed.groups import init_mesh
from backends.distributed.mesh import Mesh
from backends.distributed.params import local_params
from ir.ops.collective import bind_groups
from passes.shard_rules import Rule


def run_rank_program(
    graph: ir.Graph,
    mesh: Mesh,
    rules: list[Rule],
    state: Mapping[str, Any],
    inputs: Sequence[Any],
    groups: dict | None = None,
    batch_axis: str | None = None,
) -> tuple[Any, ...]:
    """Interpret this rank's program (from `passes.shard.shard`) on its parameter slices.

    `state` holds the *global* parameters (state_dict names) and `inputs` the global activations
    and caches; with `batch_axis` (the program was sharded with it) each rank takes its block of
    their batch dim. `groups` (from `init_mesh`) may be passed to reuse process groups."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    groups = init_mesh(mesh) if groups is None else groups
    params = local_params(state, rules, mesh, rank)
    if batch_axis is not None and mesh.size(batch_axis) > 1:
        size, coord = mesh.size(batch_axis), mesh.coords(rank)[batch_axis]
        inputs = [t.chunk(size, 0)[coord] if t.dim() else t for t in inputs]
    names = {v.name for v in graph.params}
    with bind_groups(groups):
        mine = {k: v for k, v in params.items() if k in names}
        return ir.interpret(graph, *inputs, params=mine)
