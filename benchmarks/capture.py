"""Capture the full-size presets on the meta device and report op counts, time and peak memory.

    .venv/bin/python benchmarks/capture.py                 # v4-flash and v4-pro, prefill and decode
    .venv/bin/python benchmarks/capture.py --preset tiny   # any preset
    .venv/bin/python benchmarks/capture.py --preset tiny --frontend export --frontend mlir

Each capture runs in a fresh subprocess so its peak RSS is its own. Goal (issue 3): `v4-pro`
captures in under 60 s and 4 GB on a 2-core machine. Results go to
`benchmarks/results/capture.json`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results", "capture.json")


def capture_one(preset: str, method: str, frontend_name: str) -> dict:
    """Runs in the child: build on meta, capture, return figures."""
    import torch

    from frontend import capture, capture_mlir
    from models.deepseek_v4 import Config, Transformer

    cfg = Config.preset(preset)
    start = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg)
        if method == "prefill":
            inputs = (torch.zeros(2, 256, dtype=torch.long),)
            dynamic = {"tokens": {0: "B", 1: "T"}}
        else:
            cache = model.init_cache(2, 1024)
            inputs = (torch.zeros(2, 1, dtype=torch.long), torch.tensor(300), cache)
            dynamic = {"token": {0: "B"}, "cache": {0: "B"}}
    build_s = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    fn = capture_mlir if frontend_name == "mlir" else capture
    graph = fn(model, inputs, dynamic=dynamic, method=method)
    capture_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    histogram = collections.Counter(node.name for node in graph.ops)
    return {
        "preset": preset,
        "frontend": frontend_name,
        "method": method,
        "layers": cfg.n_layers,
        "ops": len(graph.ops),
        "inputs": len(graph.inputs),
        "build_s": round(build_s, 2),
        "capture_s": round(capture_s, 2),
        "capture_cpu_s": round(cpu_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "top_ops": dict(histogram.most_common(8)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", action="append", help="preset(s) to capture (default: v4-flash, v4-pro)"
    )
    parser.add_argument("--method", action="append", choices=["prefill", "decode"])
    parser.add_argument(
        "--frontend",
        action="append",
        choices=["export", "mlir"],
        help="torch.export (default) and/or torch-mlir (no layer reuse: use small presets)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(capture_one(*args.child)))
        return

    rows = []
    runs = [
        (preset, method, frontend_name)
        for frontend_name in args.frontend or ["export"]
        for preset in args.preset or ["v4-flash", "v4-pro"]
        for method in args.method or ["prefill", "decode"]
    ]
    for preset, method, frontend_name in runs:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", preset, method, frontend_name],
            capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)),
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"{preset} {method}: capture failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            raise SystemExit(1)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['frontend']:>6} {row['preset']:>9} {row['method']:<8} layers {row['layers']:>3}  ops {row['ops']:>6}  "
            f"capture {row['capture_s']:>6.1f} s (CPU {row['capture_cpu_s']:>6.1f} s)  "
            f"peak RSS {row['peak_rss_mb']:>6} MB"
        )
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(RESULTS), delete=False) as f:
        json.dump(rows, f, indent=2)
    os.replace(f.name, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
