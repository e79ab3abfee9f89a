"""`moe.experts` decode on TVM CPU with the routed weights dense (x's dtype) vs FP4 (MXFP4) vs FP8,
side by side in one process: the same grouped kernel (`backends/tvm/moe_grouped.py`, blas="never")
reading its weights through `backends.tvm.dequant.expert_weight`. Shapes of `--model`'s MoE layer
(small: 32 experts, I 256, d 512, top-6, shared expert); `--layers` weight sets used in turn (each
call reads weights another call did not just read, as a decode step's layers do). The dense
weights are the FP4 ones dequantised (same values); the FP8 ones are another quantisation.

    OMP_NUM_THREADS=1 TVM_NUM_THREADS=1 .venv/bin/python benchmarks/moe_quant_decode.py
    .venv/bin/python benchmarks/moe_quant_decode.py --tokens 1 8 --dtype bf16

Prints per token count the experts touched, the routed bytes they hold in each format, each
format's median ms (interleaved call by call) and each run's max relative difference from the
op's reference (for the quantised formats: the dense math on the dequantised weights); writes
the rows as JSON. Times are
wall-clock medians on a shared machine: compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ir  # noqa: E402
from benchmarks.moe_grouped import median_ms  # noqa: E402
from models.quant import QuantExperts  # noqa: E402

FORMATS = ("dense", "fp4_e2m1", "fp8_e4m3")


def experts_graph(cfg, dtype: torch.dtype, fmt: str, stored: dict[str, torch.Tensor]) -> ir.Graph:
    """One `moe.experts` (shared expert, clamped SwiGLU) in weight format `fmt`, N symbolic;
    the routed weights' types from `stored` (name -> tensor)."""
    n, d, e, k = ir.sym("N"), cfg.dim, cfg.n_routed_experts, cfg.n_activated_experts
    dt = ir.DType.from_torch(dtype)
    j = cfg.n_shared_experts * cfg.moe_inter_dim
    b = ir.Builder(name="experts_" + fmt)
    shapes = {"x": ((n, d), dt), "weights": ((n, k), ir.DType.f32),
              "experts": ((n, k), ir.DType.i64)}  # fmt: skip
    routed = {name: (tuple(t.shape), ir.DType.from_torch(t.dtype)) for name, t in stored.items()}
    shared = {"s1": ((j, d), dt), "s3": ((j, d), dt), "s2": ((d, j), dt)}
    names = ["w1", "w3", "w2"]
    order = {**shapes, **{w: routed[w] for w in names}, **shared}
    if fmt != "dense":
        order |= {w + "s": routed[w + "s"] for w in names}
    vals = [b.input(name, ir.TensorType(shape, t)) for name, (shape, t) in order.items()]
    b.output(b.op("moe.experts", vals, shared=True, weight_format=fmt))
    return b.build()


def weight_sets(cfg, dtype: torch.dtype, gen: torch.Generator, fmt: str,
                with_dense: bool) -> dict[str, torch.Tensor]:
    """"fmt:name" -> routed weights of one layer stored in `fmt` (+ "dense:name", the same
    values dequantised to `dtype`, when `with_dense`)."""
    from models.moe import Experts

    dense = Experts(cfg)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    quant = QuantExperts.from_experts(dense, fmt)
    out = {f"{fmt}:{w}": getattr(quant, f"{w}_q") for w in ("w1", "w3", "w2")}
    out |= {f"{fmt}:{w}s": getattr(quant, f"{w}_scale") for w in ("w1", "w3", "w2")}
    if with_dense:
        out |= {f"dense:{w}": getattr(quant, w).to(dtype) for w in ("w1", "w3", "w2")}
    return out


def main() -> None:
    from backends.tvm import TVMBackend
    from models.deepseek_v4 import Config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
    ap.add_argument("--layers", type=int, default=4, help="weight sets used in turn")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default="benchmarks/results/moe_quant_decode.json")
    args = ap.parse_args()
    cfg = Config.preset(args.model)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    e, k, d, j = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim, cfg.moe_inter_dim
    # per layer: FP4 weights, the same values dense, other FP8 weights
    layers = [weight_sets(cfg, dtype, gen, "fp4_e2m1", True)
              | weight_sets(cfg, dtype, gen, "fp8_e4m3", False) for _ in range(args.layers)]
    shared = [{n: (torch.randn(s, generator=gen) * 0.05).to(dtype)
               for n, s in (("s1", (j, d)), ("s3", (j, d)), ("s2", (d, j)))}
              for _ in layers]  # fmt: skip
    graphs, exes = {}, {}
    for fmt in FORMATS:
        stored = {name.split(":")[1]: t for name, t in layers[0].items()
                  if name.startswith(fmt + ":")}
        graphs[fmt] = experts_graph(cfg, dtype, fmt, stored)
        exes[fmt] = TVMBackend().compile(graphs[fmt], "cpu", blas="never")
    routed_elems = 3 * cfg.moe_inter_dim * d
    per_expert = {"dense": routed_elems * torch.finfo(dtype).bits // 8,
                  "fp4_e2m1": routed_elems // 2 + routed_elems // 32,
                  "fp8_e4m3": routed_elems + 4 * (3 * -(-cfg.moe_inter_dim // 128) * -(-d // 128))}
    threads = os.environ.get("TVM_NUM_THREADS", "default")
    print(f"{args.model} moe.experts decode, x {args.dtype}, TVM threads {threads}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (shared machine)")
    print("    N | experts | MB dense / fp4 / fp8 | dense ms | fp4 ms | fp8 ms | fp4/dense | "
          "fp8/dense | rel diff dense / fp4 / fp8")
    rows = []
    for n in args.tokens:
        experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
        head = {"x": torch.randn(n, d, generator=gen).to(dtype),
                "weights": torch.rand(n, k, generator=gen) + 0.1, "experts": experts}
        feeds = []
        for ws, sh in zip(layers, shared):
            feed = {}
            for fmt in FORMATS:
                mine = {name.split(":")[1]: t for name, t in ws.items()
                        if name.startswith(fmt + ":")}
                feed[fmt] = [({**head, **sh, **mine})[v.name] for v in graphs[fmt].inputs]
            feeds.append(feed)
        diffs = {}
        for fmt in FORMATS:
            (got,) = exes[fmt](*feeds[0][fmt])
            (want,) = ir.interpret(graphs[fmt], *feeds[0][fmt])  # dense math on dequantised
            err = (got.float() - want.float()).abs().max() / want.float().abs().max()
            diffs[fmt] = err.item()
        fns = {fmt: (lambda f, fmt=fmt: exes[fmt](*f[fmt])) for fmt in FORMATS}
        times = median_ms(fns, feeds, args.repeat)
        touched = experts.unique().numel()
        mb = {fmt: touched * per_expert[fmt] / 1e6 for fmt in FORMATS}
        r = {"tokens": n, "experts_touched": touched,
             **{f"{fmt}_mb": mb[fmt] for fmt in FORMATS},
             **{f"{fmt}_ms": times[fmt] for fmt in FORMATS},
             **{f"{fmt}_rel_diff": diffs[fmt] for fmt in diffs}}  # fmt: skip
        rows.append(r)
        print(f"{n:5d} | {touched:7d} | {mb['dense']:5.2f} / {mb['fp4_e2m1']:4.2f} / "
              f"{mb['fp8_e4m3']:4.2f}  | {times['dense']:8.3f} | {times['fp4_e2m1']:6.3f} | "
              f"{times['fp8_e4m3']:6.3f} | {times['fp4_e2m1'] / times['dense']:9.2f} | "
              f"{times['fp8_e4m3'] / times['dense']:9.2f} | {diffs['dense']:.1e} / "
              f"{diffs['fp4_e2m1']:.1e} / {diffs['fp8_e4m3']:.1e}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": args.model, "dtype": args.dtype, "tvm_threads": threads,
           "torch_threads": torch.get_num_threads(), "layers": args.layers, "rows": rows}
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
