"""`moe.experts` on TVM CPU, side by side in one process: the gather kernel (each (token, slot)
pair reads its expert's weights; the te lowering, scheduled by `schedule_cpu`, the CPU kernel
before issue 19), the grouped kernel (`backends/tvm/moe_grouped.py`: pairs sorted by expert,
each touched expert read once), and the BLAS path (`torch._grouped_mm`). Shapes of `--model`'s
MoE layer (small: 32 experts, I 256, d 512, top-6, shared expert), `--layers` weight sets used in
turn (each call reads weights another call did not just read, as a decode step's layers do).

    OMP_NUM_THREADS=1 TVM_NUM_THREADS=1 .venv/bin/python benchmarks/moe_grouped.py
    .venv/bin/python benchmarks/moe_grouped.py --tokens 1 8 64 --dtype bf16 --json out.json

Prints per token count the distinct experts touched, the bytes they hold, each implementation's
median ms (the three interleaved call by call) and GB/s (touched bytes / time), and the grouped
kernel's max relative difference from the op's reference; writes the rows as JSON. Times are
wall-clock medians on a shared machine: compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ir  # noqa: E402


def experts_graph(cfg, dtype: torch.dtype) -> ir.Graph:
    """One `moe.experts` (shared expert, clamped SwiGLU) with N symbolic."""
    n, d, inter, e = ir.sym("N"), cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts
    dt = ir.DType.from_torch(dtype)
    j = cfg.n_shared_experts * cfg.moe_inter_dim
    b = ir.Builder(name="experts")
    shapes = {
        "x": ((n, d), dt), "weights": ((n, cfg.n_activated_experts), ir.DType.f32),
        "experts": ((n, cfg.n_activated_experts), ir.DType.i64),
        "w1": ((e, inter, d), dt), "w3": ((e, inter, d), dt), "w2": ((e, d, inter), dt),
        "s1": ((j, d), dt), "s3": ((j, d), dt), "s2": ((d, j), dt),
    }  # fmt: skip
    vals = [b.input(name, ir.TensorType(shape, t)) for name, (shape, t) in shapes.items()]
    b.output(b.op("moe.experts", vals, shared=True))
    return b.build()


def gather_call(g: ir.Graph):
    """The gather kernel (the te lowering + `schedule_cpu`) as fn(*operands) -> y."""
    from backends.base import body_of_one_op
    from backends.tvm.emitters import kernel_call, signature
    from backends.tvm.kernel import build, host_target, make_kernel
    from backends.tvm.schedule_cpu import schedule_cpu

    node = g.ops[0]
    body, index = body_of_one_op(node)
    kernel = make_kernel(body, "moe_experts_gather", signature(node, "gather"), schedule_cpu)
    fn = build([kernel], host_target())[kernel.key]
    return lambda args, env: kernel_call(fn, node, env, index)(args)


def median_ms(fns: dict, sets: list, repeat: int) -> dict[str, float]:
    """Median ms of each of `fns` (name -> fn(args)), interleaved call by call (a load change on
    the shared machine hits every column alike), cycling through the argument `sets`."""
    for fn in fns.values():
        for args in sets:
            fn(args)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeat):
        args = sets[i % len(sets)]
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(args)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    from backends.tvm import TVMBackend
    from models.deepseek_v4 import Config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 40, 512])
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--layers", type=int, default=4, help="weight sets used in turn")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default="benchmarks/results/moe_grouped.json")
    args = ap.parse_args()
    cfg = Config.preset(args.model)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = experts_graph(cfg, dtype)
    grouped = TVMBackend().compile(g, "cpu", blas="never")
    blas = TVMBackend().compile(g, "cpu", blas="always")
    gather = gather_call(g)
    gen = torch.Generator().manual_seed(0)
    names = [v.name for v in g.inputs]
    e, k = cfg.n_routed_experts, cfg.n_activated_experts
    sets = []
    for _ in range(args.layers):
        ws = {}
        for v in g.inputs[3:]:
            ws[v.name] = (torch.randn(v.type.shape, generator=gen) * 0.05).to(dtype)
        sets.append(ws)
    expert_bytes = 3 * cfg.moe_inter_dim * cfg.dim * torch.finfo(dtype).bits // 8
    shared_bytes = expert_bytes * cfg.n_shared_experts
    threads = os.environ.get("TVM_NUM_THREADS", "default")
    print(f"{args.model} moe.experts, {args.dtype}, TVM threads {threads}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (shared machine)")
    print("    N | experts | MB read | gather ms | grouped ms | BLAS ms | gather GB/s | "
          "grouped GB/s | gather/grouped | grouped rel diff")
    rows = []
    for n in args.tokens:
        experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
        head = {"x": torch.randn(n, cfg.dim, generator=gen).to(dtype),
                "weights": torch.rand(n, k, generator=gen) + 0.1, "experts": experts}
        feeds = [[{**head, **ws}[name] for name in names] for ws in sets]
        touched = experts.unique().numel()
        mb = (touched * expert_bytes + shared_bytes) / 1e6
        (want,) = ir.interpret(g, *feeds[0])
        (got,) = grouped(*feeds[0])
        diff = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        env = {ir.sym("N"): n}
        fns = {"gather": lambda a: gather(a, env), "grouped": lambda a: grouped(*a),
               "blas": lambda a: blas(*a)}  # fmt: skip
        times = median_ms(fns, feeds, args.repeat)
        r = {"tokens": n, "experts_touched": touched, "mb_read": mb, "rel_diff": diff,
             **{f"{name}_ms": ms for name, ms in times.items()}}  # fmt: skip
        rows.append(r)
        print(f"{n:5d} | {touched:7d} | {mb:7.1f} | {r['gather_ms']:9.2f} | "
              f"{r['grouped_ms']:10.2f} | {r['blas_ms']:7.2f} | {mb / r['gather_ms']:11.1f} | "
              f"{mb / r['grouped_ms']:12.1f} | {r['gather_ms'] / r['grouped_ms']:14.2f} | "
              f"{diff:.1e}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": args.model, "dtype": args.dtype, "tvm_threads": threads,
           "torch_threads": torch.get_num_threads(), "layers": args.layers, "rows": rows}
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
