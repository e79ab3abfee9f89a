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

        check_weights(model, weights)
        load_safetensors(model, weights)
    return model.to(device)


def check_weights(model: Any, path: str) -> None:
    """Raise `DsvError` naming `path` unless it is a safetensors checkpoint (one file, or a folder
    with an index) whose tensor names, shapes and dtypes fit `model` (which may be on the meta
    device). Reads the headers only: this is the check `load_safetensors` makes before it reads a
    tensor, run where the path enters dsv4c (compile, run) instead of when it is first used."""
    from pathlib import Path

    from safetensors import SafetensorError

    from models import weights as w

    fix = "pass a .safetensors file or a directory with model.safetensors.index.json"
    p = Path(path)
    if not p.exists():
        raise DsvError(f"--weights {path}: no such file or directory; {fix}")
    try:  # the header checks of models.weights.load_safetensors (it has no public header check)
        w._plan(w._checkpoint_slots(model), w._read_headers(w._resolve_shards(p)))
    except w.WeightsError as e:
        raise DsvError(f"--weights {path}: {e}") from None
    except (SafetensorError, ValueError, OSError) as e:  # not a safetensors file at all
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise DsvError(
            f"--weights {path}: not a readable safetensors checkpoint ({detail}); {fix}"
        ) from None


def cache_key_orders(model: Any, batch: int, max_len: int) -> dict[str, list[str]]:
    """Key orders of the cache dicts the compiled entry points take and return: "in", init_cache's
    order, on which prefill and decode are captured (decode returns its input's order), and
    "out", the order prefill returns, which need not be the same (NSA's prefill builds its dict
    in another). Run `model` on the meta device: no compute."""
    cache = model.init_cache(batch, max_len)
    _, out = model.prefill(torch.zeros(batch, 2, dtype=torch.long), cache)
    return {"in": list(cache), "out": list(out)}


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
    from models.deepseek_v4 import Config, Transformer

    with torch.device("meta"):
        keys = cache_key_orders(Transformer(Config.preset(info["preset"])).eval(), 1, max_len)
    prompt = torch.randint(
        0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(args.seed)
    ).to(device)
    prefill, decode = compiled.entry("prefill"), compiled.entry("decode")
    with torch.no_grad():
        start = time.perf_counter()
        logits, *flat = prefill(prompt, model.init_cache(1, max_len), params=params)
        prefill_s = time.perf_counter() - start
        cache = dict(zip(keys["out"], flat))
        tokens, steps = [logits[:, -1:].argmax(-1)], [logits]
        start = time.perf_counter()
        for i in range(m):
            pos = torch.tensor(n + i, device=device)
            logits, *flat = decode(tokens[-1], pos, cache, params=params)
            cache = dict(zip(keys["in"], flat))
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
        out |= _check(model, prompt, steps, keys, max_len, tokens)
    return out


# relative tolerance of the logits vs eager, by the model's dtype: a few ulps of accumulated
# rounding pass, a changed constant (RoPE base 10000 -> 20000: 3.7e-3 absolute on tiny) does not
RTOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _check(
    model: Any, prompt: Any, steps: list, keys: list[str], max_len: int, tokens: list
) -> dict[str, float]:
    """The same generation eagerly (fed the compiled run's tokens). Prints and returns the
    largest logit difference, absolute and relative to the largest eager logit; raises
    `DsvError` when the relative one exceeds the dtype's `RTOL`."""
    n = prompt.shape[1]
    with torch.no_grad():
        logits, cache = model.prefill(prompt, model.init_cache(1, max_len))
        pairs = [(logits, steps[0])]
        for i, got in enumerate(steps[1:]):
            logits, cache = model.decode(tokens[i], torch.tensor(n + i), cache)
            pairs.append((logits, got))
    worst = max((want.double() - got.double()).abs().max().item() for want, got in pairs)
    scale = max(want.double().abs().max().item() for want, _ in pairs) or 1.0
    rtol = RTOL.get(steps[0].dtype, 1e-4)
    rel = worst / scale
    print(f"vs eager max |diff| {worst:.2e}, relative {rel:.2e} (tolerance {rtol:.0e})")
    if not rel <= rtol:  # also catches NaN
        raise DsvError(
            f"compiled logits differ from eager by {worst:.2e} ({rel:.2e} of the largest "
            f"logit {scale:.3g}; tolerance {rtol:.0e} for {str(steps[0].dtype)[6:]}): the "
            "artifact does not compute the model; recompile it"
        )
    return {"max_abs_diff": worst, "max_rel_diff": rel}
