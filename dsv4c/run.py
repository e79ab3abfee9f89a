"""`dsv4c run`: greedy generation with a compiled model artifact, timed, checked against eager.

The artifact holds the `prefill` (tokens + cache -> logits + cache) and `decode` (token, position,
cache -> logits + cache) entry points of a model preset; the weights are random (seeded) unless
a safetensors checkpoint is given. Entry points take and return the cache flattened, in the
order of the dicts the model builds, so cache dicts are rebuilt by key between calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from dsv4c.compiled import Compiled
from dsv4c.errors import DsvError

__all__ = ["generate"]


def _model(preset: str, seed: int, weights: str | None, device: str) -> Any:
    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(seed)
    model = Transformer(Config.preset(preset)).eval()
    if weights:
        from models.weights import load_safetensors

        load_safetensors(model, weights)
    return model.to(device)


def _cache_keys(preset: str, max_len: int) -> list[str]:
    """The key order of the cache prefill returns (a meta-device run: no compute)."""
    from models.deepseek_v4 import Config, Transformer

    with torch.device("meta"):
        model = Transformer(Config.preset(preset)).eval()
        tokens = torch.zeros(1, 2, dtype=torch.long)
        _, cache = model.prefill(tokens, model.init_cache(1, max_len))
    return list(cache)


def generate(compiled: Compiled, args: Any, say: Callable[[str], None]) -> dict[str, Any]:
    info = compiled.manifest.get("model") or {}
    if "preset" not in info:
        raise DsvError(f"{args.dir} was not compiled from a model preset; `run` needs one")
    if not {"prefill", "decode"} <= set(compiled.entries):
        raise DsvError(f"{args.dir} lacks the prefill and decode entry points `run` needs")
    n, m, max_len = args.prompt_len, args.gen, int(info["max_len"])
    if n < 1 or m < 0 or n + m > max_len:
        raise DsvError(
            f"--prompt-len {n} + --gen {m} must fit the compiled cache of {max_len} positions "
            "(recompile with a larger --max-len)"
        )
    device = "cuda" if compiled.target.is_gpu else "cpu"
    model = _model(info["preset"], args.seed, args.weights or info.get("weights"), device)
    params = model.state_dict()
    keys = _cache_keys(info["preset"], max_len)
    prompt = torch.randint(
        0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(args.seed)
    ).to(device)
    prefill, decode = compiled.entry("prefill"), compiled.entry("decode")
    with torch.no_grad():
        start = time.perf_counter()
        logits, *flat = prefill(prompt, model.init_cache(1, max_len), params=params)
        prefill_s = time.perf_counter() - start
        cache = dict(zip(keys, flat))
        tokens, steps = [logits[:, -1:].argmax(-1)], [logits]
        start = time.perf_counter()
        for i in range(m):
            pos = torch.tensor(n + i, device=device)
            logits, *flat = decode(tokens[-1], pos, cache, params=params)
            cache = dict(zip(keys, flat))
            tokens.append(logits[:, -1:].argmax(-1))
            steps.append(logits)
        decode_s = time.perf_counter() - start
    out = {
        "prefill_tokens_per_s": n / prefill_s,
        "decode_tokens_per_s": m / decode_s if m else None,
        "tokens": torch.cat(tokens, 1)[0].tolist(),
    }
    say(
        f"{info['preset']} on {compiled.target.name} ({compiled.backend}), random weights"
        if not (args.weights or info.get("weights"))
        else f"{info['preset']} on {device}"
    )
    print(f"prefill  {n} tokens  {out['prefill_tokens_per_s']:,.1f} tokens/s")
    if m:
        print(f"decode   {m} tokens  {out['decode_tokens_per_s']:,.2f} tokens/s")
    print(f"tokens   {out['tokens']}")
    if not args.no_check:
        out["max_abs_diff"] = _check(model, prompt, steps, keys, max_len, tokens)
        print(f"vs eager max |diff| {out['max_abs_diff']:.2e}")
    return out


def _check(model: Any, prompt: Any, steps: list, keys: list[str], max_len: int, tokens: list):
    """The same generation eagerly: the largest logit difference; raise if tokens differ."""
    n = prompt.shape[1]
    with torch.no_grad():
        logits, cache = model.prefill(prompt, model.init_cache(1, max_len))
        diffs = [(logits - steps[0]).abs().max().item()]
        for i, got in enumerate(steps[1:]):
            logits, cache = model.decode(tokens[i], torch.tensor(n + i), cache)
            diffs.append((logits - got).abs().max().item())
    worst = max(diffs)
    if worst > 1e-2:
        raise DsvError(f"compiled logits differ from eager by {worst:.2e} (expected < 1e-2)")
    return worst
