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
) -> tuple[Any, ...]:
    """Interpret this rank's program (from `passes.shard.shard`) on its parameter slices.

    `state` holds the *global* parameters (state_dict names); `groups` (from `init_mesh`) may be
    passed to reuse process groups across calls."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    groups = init_mesh(mesh) if groups is None else groups
    params = local_params(state, rules, mesh, rank)
    names = {v.name for v in graph.params}
    with bind_groups(groups):
        return ir.interpret(graph, *inputs, params={k: v for k, v in params.items() if k in names})
