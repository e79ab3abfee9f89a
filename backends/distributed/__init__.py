"""Scale-out runtime: mesh-axis names bound to `torch.distributed` process groups.

    from backends.distributed import Mesh, run_ranks, init_mesh
    mesh = Mesh.parse("tp=2,ep=2")
    outs = run_ranks(worker, mesh.world_size, args=(...,), timeout_s=60)   # spawns gloo ranks
    # inside a worker:  groups = init_mesh(mesh); with bind_groups(groups): ir.interpret(g, ...)

Collectives run through the traceable functional collectives (`_c10d_functional` + `wait_tensor`):
gloo on CPUs, NCCL on GPUs. No transport of our own.
"""

from backends.distributed.groups import TorchAxisGroup, init_mesh
from backends.distributed.launch import RankFailed, run_ranks
from backends.distributed.mesh import Mesh
from backends.distributed.params import local_params
from backends.distributed.runtime import run_rank_program

__all__ = [
    "Mesh",
    "RankFailed",
    "TorchAxisGroup",
    "init_mesh",
    "local_params",
    "run_rank_program",
    "run_ranks",
]
