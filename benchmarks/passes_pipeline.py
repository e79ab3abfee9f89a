"""Run `passes.pipeline` on a captured preset (meta device) and report op counts, kernel signatures,
time and peak memory.

    .venv/bin/python benchmarks/passes_pipeline.py                    # v4-pro prefill
    .venv/bin/python benchmarks/passes_pipeline.py --preset tiny --preset v4-flash

Per preset: ops before and after the pipeline, the distinct structural signatures of the ops left
(`passes.kernel_signatures`: how many different kernels a backend must compile; identical layers
share them), the launches of the schedule (views and scalars are not launches) and their distinct
signatures, the fused kernels, the activation memory plan and the launches' flops and bytes
(B=1, T=4096), the pipeline's per-pass times and rule hits (`STATS`), and the peak RSS of the
process. Goal (issue 4): v4-pro through the pipeline in under 60 s. Results go to `benchmarks/results/passes_pipeline.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results", "passes_pipeline.json")


def run_one(preset: str) -> dict:
    """Runs in the child: build on meta, capture prefill, run the pipeline, return figures."""
    import torch

    import passes
    from frontend import capture
    from models.deepseek_v4 import Config, Transformer

    cfg = Config.preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    start = time.perf_counter()
    graph = capture(
        model,
        (torch.zeros(2, 256, dtype=torch.long, device="meta"),),
        dynamic={"tokens": {0: "B", 1: "T"}},
        method="prefill",
    )
    capture_s = time.perf_counter() - start
    ctx = passes.PassContext()
    start = time.perf_counter()
    out = passes.pipeline(graph, ctx=ctx)
    pipeline_s = time.perf_counter() - start
    kernels = passes.kernel_signatures(out)
    schedule, memory = ctx.products["schedule"], ctx.products["memory_plan"]
    launched = {id(launch.node) for launch in schedule.launches}
    distinct = {passes.op_signature(n) for n in out.ops if id(n) in launched}
    fused = {passes.op_signature(n) for n in out.ops if n.name == "fused.kernel"}
    mib = 1 << 20
    start = time.perf_counter()
    flops, nbytes = schedule.totals(memory.bindings)
    cost_s = time.perf_counter() - start
    return {
        "preset": preset,
        "layers": cfg.n_layers,
        "ops_before": len(graph.ops),
        "ops_after": len(out.ops),
        "distinct_signatures": len(kernels),
        "launches": schedule.count,
        "launches_by_category": dict(schedule.by_category()),
        "distinct_kernels": len(distinct),
        "fused_kernels": sum(n.name == "fused.kernel" for n in out.ops),
        "distinct_fused_kernels": len(fused),
        "memory_bindings": memory.bindings,
        "activation_mib_no_reuse": round(memory.no_reuse_bytes / mib, 1),
        "activation_mib_planned": round(memory.peak_bytes / mib, 1),
        "activation_mib_live": round(memory.live_bytes / mib, 1),
        "tflop": round(flops / 1e12, 2),
        "gib_moved": round(nbytes / (1 << 30), 2),
        "cost_s": round(cost_s, 2),
        "capture_s": round(capture_s, 2),
        "pipeline_s": round(pipeline_s, 2),
        "pass_s": {k: round(v, 2) for k, v in ctx.times.items()},
        "rule_hits": dict(ctx.counters.most_common()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "most_repeated": [
            (k.count, k.example[:120]) for k in sorted(kernels, key=lambda k: -k.count)[:5]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="preset(s) to run (default: v4-pro)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child)))
        return
    rows = []
    for preset in args.preset or ["v4-pro"]:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", preset],
            capture_output=True,
            text=True,
            check=False,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        if proc.returncode != 0:
            print(f"{preset}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            raise SystemExit(1)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['preset']:>9} layers {row['layers']:>3}  ops {row['ops_before']:>6} -> "
            f"{row['ops_after']:>6}  distinct signatures {row['distinct_signatures']:>5}  "
            f"capture {row['capture_s']:>6.1f} s  pipeline {row['pipeline_s']:>6.1f} s  "
            f"peak RSS {row['peak_rss_mb']:>6} MB"
        )
        print(
            f"{'':>9} launches {row['launches']:>6} ({row['distinct_kernels']} distinct; "
            f"{row['fused_kernels']} fused.kernel, {row['distinct_fused_kernels']} distinct)  "
            f"activations at {row['memory_bindings']}: {row['activation_mib_no_reuse']} MiB "
            f"unplanned -> {row['activation_mib_planned']} MiB planned "
            f"(live peak {row['activation_mib_live']} MiB)"
        )
        print(
            f"{'':>9} launches at those sizes: {row['tflop']} TFLOP, {row['gib_moved']} GiB "
            f"moved (cost model {row['cost_s']} s)"
        )
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(RESULTS), delete=False) as f:
        json.dump(rows, f, indent=2)
    os.replace(f.name, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
