"""The Triton backend: generated kernels for fused bodies, matmul/grouped_mm templates, a graph
runtime with reference fallback, and ahead-of-time compilation for the GPU targets.

    from backends.triton import TritonBackend
    exe = TritonBackend().compile(graph, "cpu")   # CPU tensors need TRITON_INTERPRET=1
    outs = exe(x, params=weights)
    exe.report()["fallbacks"]

Importing this package does not import triton; kernels are loaded on first launch.
"""

from backends.triton.body import Unsupported
from backends.triton.emitters import TRITON_EMITTERS, emit_node
from backends.triton.fused import emit_fused
from backends.triton.kernel import KernelSource
from backends.triton.runtime import TritonBackend, TritonExecutable

__all__ = [
    "TritonBackend",
    "TritonExecutable",
    "TRITON_EMITTERS",
    "KernelSource",
    "Unsupported",
    "emit_fused",
    "emit_node",
]
