"""Compile the Triton kernels of a DeepSeek-V4 layer ahead of time for the GPU targets and print
registers, shared memory and spills per kernel and target. No GPU needed.

    .venv/bin/python benchmarks/aot_table.py                       # v4-flash sizes, six GPUs
    .venv/bin/python benchmarks/aot_table.py --preset v4-pro --targets sm_90 gfx942 --json out.json

The kernels come from `backends.triton.samples.layer_kernels` (RMSNorm, q projection, router
softmax, expert grouped GEMM, clamped SwiGLU) at the preset's sizes, or, with --model, from the
captured prefill of that model preset after `passes.pipeline` (every distinct kernel the Triton
backend launches for it). Symbolic dims are bound with --tokens (GEMM tiles depend on it).

    .venv/bin/python benchmarks/aot_table.py --model tiny-512 --targets sm_90 gfx942
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.targets import GPU_TARGETS  # noqa: E402
from backends.triton import TritonBackend  # noqa: E402
from backends.triton.aot import aot_compile, format_table  # noqa: E402
from backends.triton.samples import layer_kernels  # noqa: E402

PRESETS = {  # dim, MoE intermediate dim, routed experts (models/config.py)
    "tiny-512": (512, 256, 8),
    "v4-flash": (4096, 2048, 256),
    "v4-pro": (7168, 3072, 384),
}


def _graph(args: argparse.Namespace):
    if not args.model:
        return layer_kernels(*PRESETS[args.preset])
    import torch

    import passes
    from frontend import capture
    from models.deepseek_v4 import Config, Transformer

    with torch.device("meta"):  # no weights needed: kernels depend on shapes only
        model = Transformer(Config.preset(args.model)).eval()
        tokens = torch.zeros(2, 256, dtype=torch.long)
    graph = capture(model, (tokens,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")
    return passes.pipeline(graph)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="v4-flash")
    ap.add_argument("--model", help="capture this models.deepseek_v4 preset instead (e.g. tiny)")
    ap.add_argument("--targets", nargs="+", default=list(GPU_TARGETS), metavar="TARGET")
    ap.add_argument("--tokens", type=int, default=4096, help="value of the token dim T")
    ap.add_argument("--keep", help="folder for PTX/cubin and AMDGCN/hsaco of each kernel")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)

    exe = TritonBackend().compile(_graph(args), args.targets[0])
    for op, reason in exe.fallbacks():
        print(f"note: {op} runs its reference: {reason}")
    start = time.perf_counter()
    bindings = {"T": args.tokens, "B": 1}
    results = aot_compile(exe, args.targets, bindings=bindings, keep_dir=args.keep)
    seconds = time.perf_counter() - start
    what = args.model or args.preset
    print(
        f"{what}: {len(exe.kernels())} kernels x {len(args.targets)} targets in {seconds:.1f} s\n"
    )
    print(format_table(results))
    if args.json:
        rows = [dataclasses.asdict(r) for r in results]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
