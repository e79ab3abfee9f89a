"""The TVM backend: ops lowered to TensorIR (te), scheduled for the CPU (tile, vectorise,
parallelise), built with LLVM for the host CPU and run op by op with reference fallback; CUDA,
OpenCL and WebGPU source for the GPU targets (`backends.tvm.codegen`).

    from backends.tvm import TVMBackend
    exe = TVMBackend().compile(graph, "cpu", blas="auto")
    outs = exe(x, params=weights)
    exe.report()["fallbacks"], exe.report()["blas_calls"]

Importing this package does not import TVM; it is loaded when a graph is compiled.
"""

from backends.tvm.emitters import TVM_EMITTERS, emit_node
from backends.tvm.kernel import Kernel
from backends.tvm.lower import Unsupported
from backends.tvm.runtime import TVMBackend, TVMExecutable

__all__ = ["TVM_EMITTERS", "Kernel", "TVMBackend", "TVMExecutable", "Unsupported", "emit_node"]
