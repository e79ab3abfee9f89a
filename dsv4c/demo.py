"""`make run`: run the tiny DeepSeek-V4 model eagerly and print a short summary.

Until the compiler lands, this is the smoke test a new engineer sees first: it builds the `tiny`
preset with random weights, runs one prefill and a few decode steps, checks that decoding after a
prefill agrees with one prefill of the whole sequence, and prints what it ran.
"""

from __future__ import annotations

import time

import torch

from models.deepseek_v4 import Config, Transformer, count_params

PRESET = "tiny"
PROMPT_LEN = 40
GEN_STEPS = 8


def _layer_kinds(cfg: Config) -> str:
    names = {0: "window", 4: "CSA"}
    kinds = [names.get(r, f"HCA/{r}") for r in cfg.compress_ratios[: cfg.n_layers]]
    return ", ".join(kinds)


def main() -> None:
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
