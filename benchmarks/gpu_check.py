"""Run model presets through the Triton backend on a GPU, compare with eager, and time prefill and
one decode step against eager PyTorch and `torch.compile`. Writes JSON.

    .venv/bin/python benchmarks/gpu_check.py                            # tiny-512 and small, cuda
    .venv/bin/python benchmarks/gpu_check.py --presets tiny --device cpu --no-torch-compile  # smoke

On `--device cpu` the kernels run in Triton's interpreter (set here before triton loads): a check
that the script works, not a measurement. Budget: a few minutes on one GPU for both presets.
Status: checked on the CPU (tiny, interpreter); not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn: Callable[[], Any], device: str, repeat: int) -> float:
    """Median seconds per call after one warm-up call."""
    import torch

    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare(got: Any, want: Any) -> dict[str, Any]:
    got, want = got.float(), want.float()
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    return {"max_rel_err": rel, "same_argmax": same, "ok": rel <= 1e-4 and same}


def check_preset(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import passes
    from backends.triton import TritonBackend
    from frontend import capture
    from models.deepseek_v4 import Config, Transformer

    device, target = args.device, ("sm_90" if args.device == "cuda" else "cpu")
    torch.manual_seed(0)
    model = Transformer(Config.preset(preset)).to(device).eval()
    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (args.batch, args.tokens + 1), generator=gen).to(device)
    prompt, nxt = tokens[:, :-1], tokens[:, -1:]
    row: dict[str, Any] = {"preset": preset, "device": device, "batch": args.batch}
    row["tokens"] = args.tokens

    start = time.perf_counter()
    g = passes.pipeline(
        capture(model, (prompt,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")
    )
    exe = TritonBackend().compile(g, target)
    names = {v.name for v in g.params}
    params = {k: v for k, v in model.state_dict().items() if k in names}
    row["prefill_compile_s"] = time.perf_counter() - start
    with torch.no_grad():
        (logits,) = exe(prompt, params=params)
        want = model.prefill(prompt)
    row["prefill"] = compare(logits, want)
    row["prefill_kernels"] = len(exe.kernels())
    row["prefill_fallback_ops"] = len(exe.fallbacks())
    with torch.no_grad():
        row["prefill_triton_s"] = timed(lambda: exe(prompt, params=params), device, args.repeat)
        row["prefill_eager_s"] = timed(lambda: model.prefill(prompt), device, args.repeat)
        if args.torch_compile:
            compiled = torch.compile(model.prefill)
            row["prefill_torch_compile_s"] = timed(lambda: compiled(prompt), device, args.repeat)

    with torch.no_grad():
        cache = model.init_cache(args.batch, args.tokens + 8)
        _, cache = model.prefill(prompt, cache)
        pos = torch.tensor(args.tokens, device=device)
        want_logits, _ = model.decode(nxt, pos, cache)
    dyn = {"token": {0: "B"}, "cache": {0: "B"}}
    dg = passes.pipeline(capture(model, (nxt, pos, cache), dynamic=dyn, method="decode"))
    dexe = TritonBackend().compile(dg, target)
    dparams = {k: v for k, v in model.state_dict().items() if k in {v.name for v in dg.params}}
    with torch.no_grad():
        got = dexe(nxt, pos, *cache.values(), params=dparams)
        row["decode"] = compare(got[0], want_logits)
        step = lambda: dexe(nxt, pos, *cache.values(), params=dparams)  # noqa: E731
        row["decode_triton_s"] = timed(step, device, args.repeat)
        row["decode_eager_s"] = timed(lambda: model.decode(nxt, pos, cache), device, args.repeat)
    row["report"] = {"prefill": exe.report(), "decode": dexe.report()}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny-512", "small"])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tokens", type=int, default=128, help="prompt length")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    ap.add_argument("--json", default="benchmarks/results/gpu_check.json")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.repeat = 1
    rows = []
    for preset in args.presets:
        row = check_preset(preset, args)
        rows.append(row)
        summary = {k: v for k, v in row.items() if k != "report"}
        print(json.dumps(summary, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["prefill"]["ok"] and r["decode"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
