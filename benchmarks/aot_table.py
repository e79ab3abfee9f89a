"""Compile the Triton kernels of a DeepSeek-V4 layer ahead of time for the GPU targets and print
registers, shared memory and spills per kernel and target. No GPU needed.

    .venv/bin/python benchmarks/aot_table.py                       # v4-flash sizes, six GPUs
    .venv/bin/python benchmarks/aot_table.py --preset v4-pro --targets sm_90 gfx942 --json out.json

The kernels come from `backends.triton.samples.layer_kernels` (RMSNorm, q projection, router
softmax, expert grouped GEMM, clamped SwiGLU) at the preset's sizes, or, with --model, from the
captured prefill and decode of that preset after `passes.pipeline` (every distinct kernel the
Triton backend launches for it; one they share compiles once). Symbolic dims are bound with
--tokens (tiles depend on it).

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


def _graphs(args: argparse.Namespace) -> dict[str, object]:
    """The graphs whose kernels to compile: the sample layer, or a preset's prefill and decode."""
    if not args.model:
        return {"layer": layer_kernels(*PRESETS[args.preset])}
    import passes
    from dsv4c.cli import _meta_model, model_methods
    from frontend import capture

    model = _meta_model(args.model)  # no weights needed: kernels depend on shapes only
    graphs = {}
    for method, spec in model_methods(model, max_len=256).items():
        g = capture(model, spec.inputs, dynamic=spec.dynamic, method=method)
        graphs[method] = passes.pipeline(g, target=args.targets[0])
    return graphs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="v4-flash")
    ap.add_argument("--model", help="capture this models.deepseek_v4 preset instead (e.g. tiny)")
    ap.add_argument("--targets", nargs="+", default=list(GPU_TARGETS), metavar="TARGET")
    ap.add_argument("--tokens", type=int, default=4096, help="value of the token dim T")
    ap.add_argument("--keep", help="folder for PTX/cubin and AMDGCN/hsaco of each kernel")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)

    exes = [TritonBackend().compile(g, args.targets[0]) for g in _graphs(args).values()]
    for op, reason in sorted({f for exe in exes for f in exe.fallbacks()}):
        print(f"note: {op} runs its reference: {reason}")
    start = time.perf_counter()
    bindings = {"T": args.tokens, "B": 1}
    results = aot_compile(exes, args.targets, bindings=bindings, keep_dir=args.keep)
    seconds = time.perf_counter() - start
    what = args.model or args.preset
    kernels = len({k.key for exe in exes for k in exe.kernels()})
    print(f"{what}: {kernels} kernels x {len(args.targets)} targets in {seconds:.1f} s\n")
    print(format_table(results))
    if args.json:
        rows = [dataclasses.asdict(r) for r in results]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
