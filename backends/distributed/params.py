"""Per-rank parameter slices: block `coord[axis]` of every dim a rule shards (the loader's half of
the `shard` pass's contract: the rank program's parameter types are these slices' shapes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.distributed.mesh import Mesh
from passes.shard_rules import Rule, Shard, placement_of


def local_params(state: Mapping[str, Any], rules: list[Rule], mesh: Mesh, rank: int) -> dict:
    """name -> this rank's slice of `state[name]` (contiguous copies; replicated ones shared)."""
    coords = mesh.coords(rank)
    out = {}
    for name, t in state.items():
        for axis, p in placement_of(name, rules).items():
            if not isinstance(p, Shard):
                continue
            size = mesh.size(axis)
            if t.shape[p.dim] % size:
                raise ValueError(
                    f"parameter {name} dim {p.dim} ({t.shape[p.dim]}) does not divide by "
                    f"{axis}={size}"
                )
            t = t.chunk(size, p.dim)[coords[axis]]
        out[name] = t.contiguous()
    return out
