"""Decode GEMV y[1, N] = x[1, K] @ Wᵀ on TVM CPU: the weight as block-scaled FP8 decoded in the
kernel (`linalg.matmul_fp8`) vs the weight in bf16 (`matmul` on `permute(w)`, the "nt" kernel),
both TVM kernels (blas="never"), same schedule family. Prints weight bytes and median times side
by side; eager torch bf16 `F.linear` is a third column for scale.

    .venv/bin/python benchmarks/quant_fp8_gemv.py                 # K = N in 2048, 4096; 1 thread
    .venv/bin/python benchmarks/quant_fp8_gemv.py --sizes 4096x4096 1024x7168 --threads 2

Times are wall-clock medians of --repeat calls after 3 warm-up calls, on whatever else the
machine is running: on a shared, loaded box treat ratios, not absolute numbers, as the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ir  # noqa: E402
from models.weights import dequantize_fp8, quantize_fp8  # noqa: E402


def fp8_graph(n: int, k: int) -> ir.Graph:
    b = ir.Builder(name="gemv_fp8")
    x = b.input("x", ir.TensorType((1, k), ir.DType.bf16))
    w = b.input("w", ir.TensorType((n, k), ir.DType.f8e4m3), role="parameter")
    s = b.input("s", ir.TensorType((-(-n // 128), -(-k // 128)), ir.DType.f32), "parameter")
    b.output(b.op("linalg.matmul_fp8", [x, w, s]))
    return b.build()


def bf16_graph(n: int, k: int) -> ir.Graph:
    b = ir.Builder(name="gemv_bf16")
    x = b.input("x", ir.TensorType((1, k), ir.DType.bf16))
    w = b.input("w", ir.TensorType((n, k), ir.DType.bf16), role="parameter")
    b.output(b.op("matmul", [x, b.op("permute", [w], dims=(1, 0))]))
    return b.build()


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def row(n: int, k: int, repeat: int) -> dict:
    from backends.tvm import TVMBackend

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    q, scale = quantize_fp8(w)
    scale = scale.float()
    w_bf16 = dequantize_fp8(q, scale).bfloat16()  # the same values, exactly (e4m3·2^e fits bf16)
    x = torch.randn(1, k, generator=gen).bfloat16()
    fp8 = TVMBackend().compile(fp8_graph(n, k), "cpu", blas="never")
    bf16 = TVMBackend().compile(bf16_graph(n, k), "cpu", blas="never")
    fp8_params, bf16_params = {"w": q, "s": scale}, {"w": w_bf16}
    (y8,) = fp8(x, params=fp8_params)
    (y16,) = bf16(x, params=bf16_params)
    err = ((y8.float() - y16.float()).abs().max() / y16.float().abs().max()).item()
    return {
        "n": n, "k": k,
        "fp8_bytes": q.numel() + scale.numel() * 4, "bf16_bytes": w_bf16.numel() * 2,
        "fp8_ms": median_ms(lambda: fp8(x, params=fp8_params), repeat),
        "bf16_ms": median_ms(lambda: bf16(x, params=bf16_params), repeat),
        "eager_ms": median_ms(lambda: torch.nn.functional.linear(x, w_bf16), repeat),
        "rel_diff": err,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["2048x2048", "4096x4096"], help="NxK")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f} (shared machine)")
    print("   N x K      | fp8 MiB | bf16 MiB | TVM fp8 ms | TVM bf16 ms | fp8/bf16 | eager bf16 ms "
          "| fp8 vs bf16 rel diff")
    for size in args.sizes:
        n, k = map(int, size.split("x"))
        r = row(n, k, args.repeat)
        print(f"{n:5d} x {k:5d} | {r['fp8_bytes'] / 2**20:7.2f} | {r['bf16_bytes'] / 2**20:8.2f} | "
              f"{r['fp8_ms']:10.3f} | {r['bf16_ms']:11.3f} | {r['fp8_ms'] / r['bf16_ms']:8.2f} | "
              f"{r['eager_ms']:13.3f} | {r['rel_diff']:.1e}")


if __name__ == "__main__":
    main()
