"""Decode GEMV/GEMM y[M, N] = x[M, K] @ Wᵀ on TVM CPU with the weight in three formats, side by
side in one run: block-scaled FP8 decoded in the kernel (`linalg.matmul_fp8`, the hand-written
`fp8_gemv_cpu` when K is a multiple of 128), bf16 and f32 (`matmul` on `permute(w)`: the "nt"
kernel). All TVM kernels (blas="never"); eager torch `F.linear` on the bf16 and f32 weights is
printed for scale. The same weight values in every format (e4m3·2^e is exact in bf16 and f32).

    .venv/bin/python benchmarks/quant_fp8_gemv.py            # K = N in 512..4096, M = 1, 8
    .venv/bin/python benchmarks/quant_fp8_gemv.py --sizes 4096x4096 --rows 1 2 4 --threads 2

Per row: weight bytes, then each kernel's least and median time over --rounds interleaved rounds
(every variant 5 calls per round, so a burst of load from other processes hits all of them; with
one thread the clock is this thread's CPU time, which leaves out time given to other processes;
wall clock otherwise), and
the ratios fp8/bf16 and fp8/f32 of the least times (< 1: FP8 is faster). The same weight is read
on every call, so it may be cache-resident (the box's L2 is 2 MiB a core): at 512 and 1024 the
kernels run from cache and the ratio measures compute per weight, at 4096 mostly memory. On a
shared, loaded machine treat ratios, not absolute numbers, as the result; the JSON (--json,
default benchmarks/results/quant_fp8_gemv.json) records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ir  # noqa: E402
from models.weights import dequantize_fp8, quantize_fp8  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quant_fp8_gemv.json"
CALLS = 5  # calls per timed sample


def fp8_graph(n: int, k: int) -> ir.Graph:
    b = ir.Builder(name="gemv_fp8")
    x = b.input("x", ir.TensorType((ir.sym("M"), k), ir.DType.bf16))
    w = b.input("w", ir.TensorType((n, k), ir.DType.f8e4m3), role="parameter")
    s = b.input("s", ir.TensorType((-(-n // 128), -(-k // 128)), ir.DType.f32), "parameter")
    b.output(b.op("linalg.matmul_fp8", [x, w, s]))
    return b.build()


def dense_graph(n: int, k: int, dtype: ir.DType) -> ir.Graph:
    b = ir.Builder(name=f"gemv_{dtype}")
    x = b.input("x", ir.TensorType((ir.sym("M"), k), dtype))
    w = b.input("w", ir.TensorType((n, k), dtype), role="parameter")
    b.output(b.op("matmul", [x, b.op("permute", [w], dims=(1, 0))]))
    return b.build()


def timings(fns: dict, rounds: int, clock) -> dict[str, list[float]]:
    """ms per call of each function by `clock`, `rounds` interleaved rounds after two warm-up
    calls each; a round times `CALLS` calls of each, back to back (sub-ms kernels)."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(CALLS):
                fn()
            times[name].append((clock() - t0) * 1e3 / CALLS)
    return times


def size_rows(n: int, k: int, rows: list[int], rounds: int, clock) -> list[dict]:
    from backends.tvm import TVMBackend

    gen = torch.Generator().manual_seed(0)
    q, scale = quantize_fp8(torch.randn(n, k, generator=gen) * 0.02)
    scale = scale.float()
    w32 = dequantize_fp8(q, scale)
    w16 = w32.bfloat16()
    assert torch.equal(w16.float(), w32)  # the same values in every format
    exes = {
        "fp8": (TVMBackend().compile(fp8_graph(n, k), "cpu", blas="never"), {"w": q, "s": scale}),
        "bf16": (TVMBackend().compile(dense_graph(n, k, ir.DType.bf16), "cpu", blas="never"),
                 {"w": w16}),
        "f32": (TVMBackend().compile(dense_graph(n, k, ir.DType.f32), "cpu", blas="never"),
                {"w": w32}),
    }  # fmt: skip
    out = []
    for m in rows:
        x16 = torch.randn(m, k, generator=gen).bfloat16()
        x32 = x16.float()
        xs = {"fp8": x16, "bf16": x16, "f32": x32}
        ys = {name: exe(xs[name], params=p)[0].float() for name, (exe, p) in exes.items()}
        want = x32.double() @ w32.double().T
        err = {name: ((y.double() - want).abs().max() / want.abs().max()).item()
               for name, y in ys.items()}  # fmt: skip
        fns = {
            f"tvm_{name}": (lambda e=exe, x=xs[name], p=p: e(x, params=p))
            for name, (exe, p) in exes.items()
        }
        fns["eager_bf16"] = lambda x=x16: torch.nn.functional.linear(x, w16)
        fns["eager_f32"] = lambda x=x32: torch.nn.functional.linear(x, w32)
        t = timings(fns, rounds, clock)
        least = {name: min(v) for name, v in t.items()}
        out.append({
            "n": n, "k": k, "m": m,
            "bytes": {"fp8": q.numel() + scale.numel() * 4, "bf16": 2 * n * k, "f32": 4 * n * k},
            "min_ms": least,
            "median_ms": {name: statistics.median(v) for name, v in t.items()},
            "fp8_over_bf16": least["tvm_fp8"] / least["tvm_bf16"],
            "fp8_over_f32": least["tvm_fp8"] / least["tvm_f32"],
            "rel_err_vs_f64": err,
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024", "2048x2048",
                                                   "4096x4096"], help="NxK")  # fmt: skip
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8], help="M (decode batch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    load = os.getloadavg()
    # one thread: everything runs on this thread, and its CPU time leaves out the time the
    # scheduler gives other processes (the wall clock does not, on a shared box)
    clock, clock_name = ((time.thread_time, "thread CPU time") if args.threads == 1
                         else (time.perf_counter, "wall clock"))  # fmt: skip
    print(f"threads {args.threads}, load average {load[0]:.1f} (shared machine); ms = least "
          f"(median) of {args.rounds} interleaved rounds of {CALLS} calls, {clock_name}")
    print("   N x K    M | fp8 MiB | TVM fp8        | TVM bf16       | TVM f32        | "
          "fp8/bf16 | fp8/f32 | eager bf16 | eager f32")
    rows = []
    for size in args.sizes:
        n, k = map(int, size.split("x"))
        for r in size_rows(n, k, args.rows, args.rounds, clock):
            rows.append(r)
            a, b = r["min_ms"], r["median_ms"]
            cell = lambda key: f"{a[key]:6.3f} ({b[key]:6.3f})"  # noqa: E731
            print(f"{n:5d}x{k:5d} {r['m']:2d} | {r['bytes']['fp8'] / 2**20:7.2f} | "
                  f"{cell('tvm_fp8')} | {cell('tvm_bf16')} | {cell('tvm_f32')} | "
                  f"{r['fp8_over_bf16']:8.2f} | {r['fp8_over_f32']:7.2f} | "
                  f"{a['eager_bf16']:10.3f} | {a['eager_f32']:9.3f}")  # fmt: skip
    doc = {
        "benchmark": "quant_fp8_gemv", "threads": args.threads, "rounds": args.rounds,
        "calls_per_round": CALLS, "clock": clock_name,
        "load_average_start": load, "load_average_end": os.getloadavg(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "rows": rows,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
