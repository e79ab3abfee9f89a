"""The targets table, shared by every backend (Triton, TVM) and the roofline report.

A `Target` names one device class: how to compile for it (backend triple: "cuda"/"hip"/"cpu",
or "opencl"/"webgpu" for portable GPU source, arch, warp size) and the three figures tile
choices and the roofline need: peak dense bf16 FLOP/s, memory bandwidth and the most shared
memory (LDS on AMD, local/workgroup memory in OpenCL/WebGPU) one block may use.

    from backends.targets import get_target
    t = get_target("sm_90")
    t.gpu_target()          # triton GPUTarget("cuda", 90, 32), for triton.compile(..., target=)
    t.peak_bf16_flops / t.hbm_bandwidth   # ridge point in FLOP/byte

Every GPU figure comes from the vendor's datasheet or programming guide, cited next to it. Dense
means without 2:4 structured sparsity (datasheets often print the sparse figure, twice as large).
`opencl` and `webgpu` name no one device: the TVM backend writes their source (no binaries: the
device's driver compiles it), and their speed figures are nominal, for an indicative roofline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GPU_TARGETS",
    "SOURCE_TARGETS",
    "TARGETS",
    "Target",
    "UnknownTargetError",
    "get_target",
    "host_cores",
    "parallel_jobs",
]

TFLOPS = 1e12
TB_S = 1e12  # bytes per second
GB_S = 1e9
KIB = 1024


@dataclass(frozen=True)
class Target:
    """One device class. `arch` is the int compute capability (cuda) or the gfx name (hip)."""

    name: str
    description: str
    backend: str  # "cpu", "cuda" or "hip"
    arch: int | str | None
    warp_size: int
    peak_bf16_flops: float  # dense bf16 tensor FLOP/s with fp32 accumulation
    hbm_bandwidth: float  # bytes/s of device memory (HBM, GDDR; DRAM for the cpu)
    smem_per_block: int  # bytes of shared memory / LDS one block (workgroup) may allocate

    @property
    def is_gpu(self) -> bool:
        return self.backend in ("cuda", "hip", "opencl", "webgpu")

    @property
    def source_only(self) -> bool:
        """Portable GPU source (OpenCL C, WGSL) that the device's own driver compiles: dsv4c
        writes no binaries and runs none of it (no torch device, no Triton target)."""
        return self.backend in ("opencl", "webgpu")

    @property
    def torch_device(self) -> str | None:
        """The torch device type of the tensors a call takes; None for source-only targets."""
        if self.source_only:
            return None
        return "cuda" if self.is_gpu else "cpu"  # ROCm torch also names its device cuda

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute bound."""
        return self.peak_bf16_flops / self.hbm_bandwidth

    def gpu_target(self) -> Any:
        """The `triton.backends.compiler.GPUTarget` for `triton.compile(..., target=)`."""
        if not self.is_gpu:
            raise ValueError(f"target {self.name!r} is not a GPU; it has no Triton GPUTarget")
        if self.source_only:
            raise ValueError(
                f"target {self.name!r} is portable {self.backend} source (TVM backend only); "
                "it has no Triton GPUTarget"
            )
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        # Nominal figures for one modern server socket, not a datasheet: the CPU path is for
        # tests and the TVM llvm backend, and the roofline there is only indicative.
        Target(
            name="cpu",
            description="host CPU (nominal figures)",
            backend="cpu",
            arch=None,
            warp_size=1,
            peak_bf16_flops=2 * TFLOPS,
            hbm_bandwidth=200 * GB_S,
            smem_per_block=2 * KIB * KIB,  # a typical per-core L2, the CPU "block" scratchpad
        ),
        # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 Tensor Core 312 TFLOPS
        # (624 with sparsity); HBM2e 2,039 GB/s. CUDA C++ Programming Guide, "Technical
        # Specifications per Compute Capability": 8.0 allows 163 KB shared memory per block.
        Target(
            name="sm_80",
            description="NVIDIA A100 SXM4 80GB",
            backend="cuda",
            arch=80,
            warp_size=32,
            peak_bf16_flops=312 * TFLOPS,
            hbm_bandwidth=2039 * GB_S,
            smem_per_block=163 * KIB,
        ),
        # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 Tensor Core 1,979 TFLOPS with
        # sparsity, i.e. 989.4 dense; HBM3 3.35 TB/s. The H200 (same GH100 compute, datasheet)
        # has 4.8 TB/s HBM3e; we keep the H100 figure as the conservative sm_90 roofline.
        # Programming Guide: compute capability 9.0 allows 227 KB shared memory per block.
        Target(
            name="sm_90",
            description="NVIDIA H100/H200 SXM",
            backend="cuda",
            arch=90,
            warp_size=32,
            peak_bf16_flops=989.4 * TFLOPS,
            hbm_bandwidth=3.35 * TB_S,
            smem_per_block=227 * KIB,
        ),
        # NVIDIA HGX B200 datasheet: FP16/BF16 Tensor Core 4.5 PFLOPS per GPU with sparsity,
        # i.e. 2.25 PFLOPS dense; HBM3e 8 TB/s per GPU. Programming Guide: compute capability
        # 10.0 allows 227 KB shared memory per block.
        Target(
            name="sm_100",
            description="NVIDIA B200",
            backend="cuda",
            arch=100,
            warp_size=32,
            peak_bf16_flops=2250 * TFLOPS,
            hbm_bandwidth=8 * TB_S,
            smem_per_block=227 * KIB,
        ),
        # NVIDIA RTX Blackwell GPU architecture whitepaper, GeForce RTX 5090: peak FP16/BF16
        # Tensor TFLOPS with FP32 accumulate 209.5 dense (419 sparse); GDDR7 1,792 GB/s.
        # Programming Guide: compute capability 12.0 allows 99 KB shared memory per block.
        Target(
            name="sm_120",
            description="NVIDIA GeForce RTX 5090 (RTX 50 series)",
            backend="cuda",
            arch=120,
            warp_size=32,
            peak_bf16_flops=209.5 * TFLOPS,
            hbm_bandwidth=1792 * GB_S,
            smem_per_block=99 * KIB,
        ),
        # AMD Instinct MI300X datasheet: peak BF16 1,307.4 TFLOPS dense (2,614.9 with
        # sparsity); HBM3 5.3 TB/s. AMD CDNA 3 ISA guide: 64 KiB LDS per workgroup.
        Target(
            name="gfx942",
            description="AMD Instinct MI300X",
            backend="hip",
            arch="gfx942",
            warp_size=64,
            peak_bf16_flops=1307.4 * TFLOPS,
            hbm_bandwidth=5.3 * TB_S,
            smem_per_block=64 * KIB,
        ),
        # AMD Instinct MI355X datasheet: peak FP16/BF16 2.5 PFLOPS dense (5.0 with sparsity);
        # HBM3E 8 TB/s. AMD CDNA 4 architecture whitepaper: LDS grown to 160 KB per CU.
        Target(
            name="gfx950",
            description="AMD Instinct MI355X",
            backend="hip",
            arch="gfx950",
            warp_size=64,
            peak_bf16_flops=2500 * TFLOPS,
            hbm_bandwidth=8 * TB_S,
            smem_per_block=160 * KIB,
        ),
        # Portable source: the TVM backend's OpenCL C and WGSL, compiled by the device's driver.
        # No one device: nominal figures of a mid-range discrete GPU (roofline only indicative).
        # Local memory: the OpenCL 1.2 spec's minimum CL_DEVICE_LOCAL_MEM_SIZE (32 KB); WebGPU's
        # default maxComputeWorkgroupStorageSize limit (16384 bytes, WebGPU spec "Limits").
        Target(
            name="opencl",
            description="any OpenCL 1.2+ GPU (source only, nominal figures)",
            backend="opencl",
            arch=None,
            warp_size=32,
            peak_bf16_flops=20 * TFLOPS,
            hbm_bandwidth=500 * GB_S,
            smem_per_block=32 * KIB,
        ),
        Target(
            name="webgpu",
            description="any WebGPU device, WGSL (source only, nominal figures)",
            backend="webgpu",
            arch=None,
            warp_size=32,
            peak_bf16_flops=10 * TFLOPS,
            hbm_bandwidth=300 * GB_S,
            smem_per_block=16 * KIB,
        ),
    ]
}

# GPU architectures compiled ahead of time to binaries (Triton's GPUTarget, nvcc)
GPU_TARGETS: tuple[str, ...] = tuple(
    n for n, t in TARGETS.items() if t.is_gpu and not t.source_only
)
# portable GPU source only (the TVM backend): OpenCL C, WGSL
SOURCE_TARGETS: tuple[str, ...] = tuple(n for n, t in TARGETS.items() if t.source_only)


class UnknownTargetError(ValueError):
    """A target name that is not in `TARGETS`."""


def get_target(target: str | Target) -> Target:
    """Look a target up by name (a `Target` passes through)."""
    if isinstance(target, Target):
        return target
    if target in TARGETS:
        return TARGETS[target]
    known = ", ".join(f"{n} ({t.description})" for n, t in TARGETS.items())
    raise UnknownTargetError(f"unknown target {target!r}; known targets: {known}")


def host_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parallel_jobs() -> int:
    """How many processes dsv4c runs side by side (kernel compiles, methods lowered at once):
    `DSV4C_JOBS`, else one per core."""
    return int(os.environ.get("DSV4C_JOBS", "0") or 0) or host_cores()
