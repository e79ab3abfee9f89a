"""The `small` model through the TVM backend on this CPU against eager PyTorch and torch.compile
(Inductor, CPU), measured in one run: a decode step at a long context (batch 1 and 8) and a
prefill. Checks TVM == eager first (fp32, 1e-4 relative, same argmax). Writes JSON.

    .venv/bin/python benchmarks/tvm_cpu.py                                  # 4K context, 4K prefill
    .venv/bin/python benchmarks/tvm_cpu.py --context 4096 --batches 1 --prefill-tokens 512

The decode cache is filled with random values of the right shapes (the cost of a step does not
depend on them; prefilling 4K tokens eagerly first would dominate the run). Times are medians of
`--repeat` calls after a warm-up; ratios > 1 mean TVM is faster.

Status: superseded for side-by-side figures by `dsv4c bench` (dsv4c/bench.py), which measures
eager, Inductor, TVM and TVM's own relax pipeline in one process; this script keeps the per-op
profile of the TVM executable (`tvm_profile` in its JSON). Figures of 2026-11-29 are in the
session notes: after the BLAS path for MoE experts and fused GEMM epilogues and the vectorised
reductions, a 4K-token prefill of `small` runs in about eager's time, decode is still slower
than eager and Inductor. Goals (decode >= 2x eager and 1.3x Inductor, prefill >= 1.2x eager)
are not met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4c.bench import timed


def compare(got: Any, want: Any) -> dict[str, Any]:
    got, want = got.float(), want.float()
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    return {"max_rel_err": rel, "same_argmax": same, "ok": rel <= 1e-4 and same}


def _params(model: Any, g: Any) -> dict[str, Any]:
    names = {v.name for v in g.params}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _profile(exe: Any, call: Callable[[], Any], top: int = 12) -> dict[str, float]:
    """Seconds per op (kernel or reference) over one profiled call: where the time goes."""
    exe.step_seconds.clear()
    exe.profile = True
    call()
    exe.profile = False
    return {k: round(v, 5) for k, v in exe.step_seconds.most_common(top)}


def _summary(exe: Any) -> dict[str, Any]:
    r = exe.report()
    return {
        "kernels": len(r["kernels"]),
        "ops": r["ops"],
        "kernel_ops": sum(k["uses"] for k in r["kernels"]),
        "fallback_ops": sum(f["count"] for f in r["fallbacks"]),
        "blas_calls": r["blas_calls"],
        "llvm": r["llvm"],
    }


def compile_decode(model: Any, context: int, args: argparse.Namespace) -> tuple[Any, Any, dict]:
    """Capture one decode step (example batch 2: B stays symbolic) and compile it once."""
    import torch

    import passes
    from backends.tvm import TVMBackend
    from frontend import capture

    cache = model.init_cache(2, context + 8)
    token, pos = torch.zeros(2, 1, dtype=torch.long), torch.tensor(context)
    times: dict[str, float] = {}
    start = time.perf_counter()
    dyn = {"token": {0: "B"}, "cache": {0: "B"}}
    g = passes.pipeline(capture(model, (token, pos, cache), dynamic=dyn, method="decode"))
    times["capture_s"] = time.perf_counter() - start
    start = time.perf_counter()
    exe = TVMBackend().compile(g, "cpu", blas=args.blas)
    times["tvm_compile_s"] = time.perf_counter() - start
    return exe, _params(model, g), times


def bench_decode(model: Any, batch: int, context: int, compiled: tuple, args: Any) -> dict:
    import torch

    exe, params, times = compiled
    gen = torch.Generator().manual_seed(batch)
    cache = model.init_cache(batch, context + 8)
    for t in cache.values():
        t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    token = torch.randint(0, model.cfg.vocab_size, (batch, 1), generator=gen)
    pos = torch.tensor(context)
    row: dict[str, Any] = {"kind": "decode", "batch": batch, "context": context, **times}
    step = lambda: exe(token, pos, *cache.values(), params=params)
    with torch.no_grad():
        row["check"] = compare(step()[0], model.decode(token, pos, cache)[0])
        row["tvm_s"] = timed(step, args.repeat)
        row["eager_s"] = timed(lambda: model.decode(token, pos, cache), args.repeat)
        if args.torch_compile:
            torch._dynamo.reset()
            inductor = torch.compile(model.decode)
            start = time.perf_counter()
            inductor(token, pos, cache)
            row["inductor_compile_s"] = time.perf_counter() - start
            row["inductor_s"] = timed(lambda: inductor(token, pos, cache), args.repeat)
        row["tvm_profile"] = _profile(exe, step)
    row["tvm"] = _summary(exe)
    return _ratios(row)


def bench_prefill(model: Any, tokens: int, args: argparse.Namespace) -> dict:
    import torch

    import passes
    from backends.tvm import TVMBackend
    from frontend import capture

    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, tokens), generator=gen)
    row: dict[str, Any] = {"kind": "prefill", "batch": 1, "tokens": tokens}
    start = time.perf_counter()
    dyn = {"tokens": {0: "B", 1: "T"}}
    example = prompt[:, :64].expand(2, 64)  # batch 2: B stays symbolic
    g = passes.pipeline(capture(model, (example,), dynamic=dyn, method="prefill"))
    row["capture_s"] = time.perf_counter() - start
    start = time.perf_counter()
    exe = TVMBackend().compile(g, "cpu", blas=args.blas)
    row["tvm_compile_s"] = time.perf_counter() - start
    params = _params(model, g)
    with torch.no_grad():
        row["check"] = compare(exe(prompt, params=params)[0], model.prefill(prompt))
        row["tvm_s"] = timed(lambda: exe(prompt, params=params), args.repeat)
        row["eager_s"] = timed(lambda: model.prefill(prompt), args.repeat)
        if args.torch_compile:
            torch._dynamo.reset()
            inductor = torch.compile(model.prefill)
            start = time.perf_counter()
            inductor(prompt)
            row["inductor_compile_s"] = time.perf_counter() - start
            row["inductor_s"] = timed(lambda: inductor(prompt), args.repeat)
        row["tvm_profile"] = _profile(exe, lambda: exe(prompt, params=params))
    row["tvm"] = _summary(exe)
    return _ratios(row)


def _ratios(row: dict) -> dict:
    row["speedup_vs_eager"] = row["eager_s"] / row["tvm_s"]
    if "inductor_s" in row:
        row["speedup_vs_inductor"] = row["inductor_s"] / row["tvm_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--context", type=int, default=4096, help="decode position (cache length)")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="decode batch sizes")
    ap.add_argument("--prefill-tokens", type=int, default=4096, help="0 skips the prefill")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--blas", choices=["auto", "never", "always"], default="auto")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    ap.add_argument("--json", default="benchmarks/results/tvm_cpu.json")
    args = ap.parse_args(argv)

    import torch

    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    model = Transformer(Config.preset(args.preset)).eval()
    rows: list[dict] = []
    head = {
        "preset": args.preset,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch_threads": torch.get_num_threads(),
        "blas": args.blas,
    }

    def record(row: dict) -> None:  # written after every row: a long run keeps what it measured
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tvm"}), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**head, "rows": rows}, indent=1))

    compiled = compile_decode(model, args.context, args) if args.batches else None
    for batch in args.batches:
        record(bench_decode(model, batch, args.context, compiled, args))
    if args.prefill_tokens:
        record(bench_prefill(model, args.prefill_tokens, args))
    return 0 if all(r["check"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
