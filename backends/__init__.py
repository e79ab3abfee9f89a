"""Backends: the `Backend` protocol, the targets table, and one folder per backend.

    import backends
    exe = backends.get_backend("triton").compile(graph, "sm_90")   # or "reference", "tvm"
    outs = exe(*activations, params=state_dict)
    exe.report()               # kernels, and which ops fell back to the reference and why

    backends.get_target("gfx942").smem_per_block

Importing `backends` imports neither triton nor TVM; each backend loads its toolchain on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from backends.base import Backend, EmitterTable, Executable
from backends.targets import GPU_TARGETS, TARGETS, Target, UnknownTargetError, get_target

__all__ = [
    "BACKENDS",
    "Backend",
    "EmitterTable",
    "Executable",
    "GPU_TARGETS",
    "TARGETS",
    "Target",
    "UnknownTargetError",
    "get_backend",
    "get_target",
]

# name -> "module:class", imported on first use
BACKENDS: dict[str, str] = {
    "reference": "backends.reference:ReferenceBackend",
    "triton": "backends.triton:TritonBackend",
    "tvm": "backends.tvm:TVMBackend",
}


def get_backend(name: str) -> Any:
    """A new instance of the backend called `name`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"backend {name!r} is not available: {e}") from e
    return getattr(mod, cls)()
