"""`make run`: the tiny DeepSeek-V4 model, eager and compiled, end to end.

1. Eager: build `tiny` with random weights, prefill and decode, check that decoding after a
   prefill agrees with one prefill of the whole sequence, print parameters, layers, tokens/s.
2. Compiled, through the same CLI a user runs (each command is printed first):
   `dsv4c compile` for the CPU and run it against eager (`dsv4c run`), write its HTML report
   (`dsv4c report`), and compile ahead of time for an H100/H200 (`sm_90`, Triton).

The CPU build uses the TVM backend (LLVM for this machine's CPU); the GPU build uses Triton.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

import torch

from models.deepseek_v4 import Config, Transformer, count_params

PRESET = "tiny"
PROMPT_LEN = 40
GEN_STEPS = 8
OUT = "out"


def _layer_kinds(cfg: Config) -> str:
    names = {0: "window", 4: "CSA"}
    kinds = [names.get(r, f"HCA/{r}") for r in cfg.compress_ratios[: cfg.n_layers]]
    return ", ".join(kinds)


def main() -> None:
    eager()
    cpu_dir, gpu_dir = f"{OUT}/{PRESET}-cpu", f"{OUT}/{PRESET}-sm_90"
    print("\ncompiled:")
    cli("compile", "--model", PRESET, "--backend", "tvm", "--target", "cpu", "-o", cpu_dir)
    cli("run", cpu_dir, "--prompt-len", str(PROMPT_LEN), "--gen", str(GEN_STEPS))
    cli("report", cpu_dir)
    cli("compile", "--model", PRESET, "--backend", "triton", "--target", "sm_90", "-o", gpu_dir)


def cli(*args: str) -> None:
    """Run one `dsv4c` command in its own process, as a user would, and stop if it fails."""
    print(f"\n$ dsv4c {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "dsv4c.cli", *args], check=False)
    if done.returncode != 0:
        raise SystemExit(f"dsv4c {args[0]} failed (exit {done.returncode})")


def eager() -> None:
    torch.manual_seed(0)
    cfg = Config.preset(PRESET)
    model = Transformer(cfg).eval()
    counts = count_params(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN + GEN_STEPS))
    prompt = tokens[:, :PROMPT_LEN]

    with torch.no_grad():
        # Warm-up: the first calls pay for lazy initialisation, which is not the model's speed.
        _, warm = model.prefill(prompt, model.init_cache(1, PROMPT_LEN + 1))
        model.decode(tokens[:, PROMPT_LEN : PROMPT_LEN + 1], torch.tensor(PROMPT_LEN), warm)
        start = time.perf_counter()
        cache = model.init_cache(1, PROMPT_LEN + GEN_STEPS)
        logits, cache = model.prefill(prompt, cache)
        prefill_s = time.perf_counter() - start

        decoded = []
        start = time.perf_counter()
        for step in range(GEN_STEPS):
            pos = PROMPT_LEN + step
            step_logits, cache = model.decode(tokens[:, pos : pos + 1], torch.tensor(pos), cache)
            decoded.append(step_logits)
        decode_s = time.perf_counter() - start
        full = model.prefill(tokens)

    drift = (torch.cat(decoded, 1) - full[:, PROMPT_LEN:]).abs().max().item()
    print(f"dsv4c demo — preset {PRESET!r} (eager PyTorch, CPU)")
    print(f"  parameters      {counts['total']:,} total, {counts['activated']:,} activated")
    print(f"  layers          {cfg.n_layers}: {_layer_kinds(cfg)} (+ MTP)")
    print(
        f"  prefill         {tuple(prompt.shape)} -> logits {tuple(logits.shape)}, "
        f"{PROMPT_LEN / prefill_s:,.0f} tokens/s"
    )
    print(f"  decode          {GEN_STEPS} steps, {GEN_STEPS / decode_s:,.1f} tokens/s")
    print(f"  decode vs prefill max |diff| {drift:.2e}")
    if drift > 1e-3:
        raise SystemExit(f"decode drifted from prefill by {drift:.2e} (expected < 1e-3)")


if __name__ == "__main__":
    main()
