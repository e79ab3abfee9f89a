"""Axis groups over `torch.distributed`: the `ir.ops.collective.AxisGroup` protocol implemented
with the traceable functional collectives (`torch.distributed._functional_collectives`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from backends.distributed.mesh import Mesh


@dataclass
class TorchAxisGroup:
    """The ranks along one mesh axis: a ProcessGroup plus this rank's index in it."""

    group: Any  # torch.distributed.ProcessGroup
    size: int
    rank: int

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return fc.wait_tensor(fc.all_reduce(t.contiguous(), "sum", self.group))

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        # gathers along dim 0; other dims go through a transpose (contiguous rank blocks)
        moved = t.movedim(dim, 0).contiguous()
        out = fc.wait_tensor(fc.all_gather_single(moved, 0, self.group))
        return out.movedim(0, dim).contiguous()

    def reduce_scatter(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        moved = t.movedim(dim, 0).contiguous()
        out = fc.wait_tensor(fc.reduce_scatter_single(moved, "sum", 0, self.group))
        return out.movedim(0, dim).contiguous()

    def all_to_all(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        moved = t.movedim(dim, 0).contiguous()
        n = moved.shape[0] // self.size
        splits = [n] * self.size
        out = fc.wait_tensor(fc.all_to_all_single(moved, splits, splits, self.group))
        return out.movedim(0, dim).contiguous()

    def all_to_all_v(self, t: torch.Tensor, in_splits: list[int], out_splits: list[int]):
        """Uneven all_to_all along dim 0: in_splits[r] rows to rank r, out_splits[r] from it."""
        out = fc.all_to_all_single(t.contiguous(), out_splits, in_splits, self.group)
        return fc.wait_tensor(out)


def init_mesh(mesh: Mesh, device: str = "cpu") -> dict[str, TorchAxisGroup]:
    """Axis name -> TorchAxisGroup for this process (the default group must be initialised).

    Uses `init_device_mesh` so sub-groups follow `Mesh.coords` (row-major over dp, ep, tp)."""
    if not dist.is_initialized():
        raise RuntimeError("init_mesh: torch.distributed is not initialised; call "
                           "init_process_group first (run_ranks does)")
    if dist.get_world_size() != mesh.world_size:
        raise RuntimeError(f"mesh {mesh} needs {mesh.world_size} ranks, the process group has "
                           f"{dist.get_world_size()}; launch with --nproc {mesh.world_size}")
    coords = mesh.coords(dist.get_rank())
    if mesh.world_size == 1:
        return {a: TorchAxisGroup(dist.group.WORLD, 1, 0) for a in mesh.names}
    from torch.distributed.device_mesh import init_device_mesh

    sizes = tuple(s for _, s in mesh.axes)
    dm = init_device_mesh(device, sizes, mesh_dim_names=mesh.names)
    return {a: TorchAxisGroup(dm[a].get_group(), mesh.size(a), coords[a]) for a in mesh.names}
