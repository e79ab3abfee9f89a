"""The CSA sparse-attention op alone (`attn.sparse_mqa`, variant csa) through the TVM backend on
this CPU at growing sequence lengths: each query attends to its 128-entry window plus its 128
indexer picks, so time must grow linearly in T. Checks the kernel against the op's reference at
the smallest length. Writes JSON and an SVG plot (seconds and µs per query against T).

    .venv/bin/python benchmarks/sparse_attention_scaling.py                  # 4K, 16K, 64K
    .venv/bin/python benchmarks/sparse_attention_scaling.py --lengths 1024 4096

Shapes are `small`'s (8 heads of 512 channels, 64 RoPE dims, ratio 4, window 128, top-128);
batch 1, fp32. Picks are random visible compressed entries (-1 where fewer are visible).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import ir

H, C, ROPE, RATIO, WINDOW, TOPK = 8, 512, 64, 4, 128, 128


def graph() -> ir.Graph:
    """One csa sparse_mqa with symbolic T (one build serves every length)."""
    t, s = ir.sym("T"), ir.sym("S")
    f32 = ir.DType.f32
    b = ir.Builder(name="sparse_mqa")
    q = b.input("q", ir.TensorType((1, t, H, C), f32))
    kv = b.input("kv", ir.TensorType((1, t, C), f32))
    sink = b.input("sink", ir.TensorType((H,), f32))
    cos = b.input("cos", ir.TensorType((t, ROPE // 2), f32))
    sin = b.input("sin", ir.TensorType((t, ROPE // 2), f32))
    comp = b.input("comp", ir.TensorType((1, s, C), f32))
    picks = b.input("picks", ir.TensorType((1, t, TOPK), ir.DType.i64))
    attrs = {"variant": "csa", "window": WINDOW, "ratio": RATIO, "scale": C**-0.5}
    b.output(
        b.op("attn.sparse_mqa", [q, kv, sink, cos, sin, comp, picks], q_norm_eps=1e-6, **attrs)
    )
    return b.build()


def inputs(t: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(t)
    s = t // RATIO
    angle = torch.arange(t).float()[:, None] * torch.rand(ROPE // 2, generator=gen)
    visible = (torch.arange(t) + 1) // RATIO  # entries query t may pick
    picks = (torch.rand(1, t, TOPK, generator=gen) * visible[None, :, None]).long()
    picks = torch.where(torch.arange(TOPK)[None, None, :] < visible[None, :, None], picks, -1)
    return [
        torch.randn(1, t, H, C, generator=gen),
        torch.randn(1, t, C, generator=gen) * 0.1,
        torch.randn(H, generator=gen),
        angle.cos(),
        angle.sin(),
        torch.randn(1, s, C, generator=gen) * 0.1,
        picks,
    ]


def svg(rows: list[dict]) -> str:
    from dsv4c.report_html import bars_svg

    return bars_svg([(f"T = {r['T']:,}", r["us_per_query"]) for r in rows], unit="µs/query")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/sparse_attention_scaling.json")
    args = ap.parse_args(argv)

    from backends.tvm import TVMBackend

    g = graph()
    start = time.perf_counter()
    exe = TVMBackend().compile(g, "cpu")
    compile_s = time.perf_counter() - start
    assert not exe.fallbacks(), exe.fallbacks()
    rows = []
    for i, t in enumerate(sorted(args.lengths)):
        x = inputs(t)
        with torch.no_grad():
            (out,) = exe(*x)
            if i == 0:  # the kernel against the op's reference
                (want,) = ir.interpret(g, *x)
                err = ((out - want).abs().max() / want.abs().max()).item()
                assert err <= 1e-4, err
            times = []
            for _ in range(args.repeat):
                begin = time.perf_counter()
                exe(*x)
                times.append(time.perf_counter() - begin)
        sec = sorted(times)[len(times) // 2]
        flops = 4 * t * H * (WINDOW + TOPK) * C  # q·e and p·e
        row = {"T": t, "seconds": sec, "us_per_query": sec / t * 1e6, "gflops": flops / sec / 1e9}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["length_ratio"] = r["T"] / base["T"]
    doc = {"op": "attn.sparse_mqa csa", "compile_s": compile_s, "rows": rows}
    if rows:
        doc["reference_check"] = {"T": base["T"], "max_rel_err_le": 1e-4}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".svg").write_text(svg(rows))
    print(f"wrote {out} and {out.with_suffix('.svg')}")
    for r in rows:
        print(
            f"T {r['T']:>7,}  {r['seconds']:8.3f} s  {r['us_per_query']:7.1f} µs/query  "
            f"x{r['time_ratio']:.1f} time for x{r['length_ratio']:.0f} length  {r['gflops']:.1f} GFLOP/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
