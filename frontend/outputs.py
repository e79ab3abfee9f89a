"""Plain tensors from what a `forward` returns: Hugging Face `ModelOutput`s and cache objects.

torch.export can only return pytrees of tensors; Hugging Face models return a `ModelOutput`
(an ordered dict with attribute access) that may hold a `Cache` object (`DynamicCache`, not a
registered pytree). `plain_outputs` turns those into what the caller of `capture` asked for:

    outputs="auto"          a ModelOutput gives its `logits` (or `last_hidden_state`); anything
                            else is returned as is
    outputs="logits+cache"  the logits, then every cache tensor flattened in a fixed order: per
                            layer, its tensor attributes by name, dicts of tensors by key
                            (`DynamicCache`: keys, values per layer)

Duck-typed on purpose: the frontend never imports `transformers`.
"""

from __future__ import annotations

from typing import Any

import torch

OUTPUTS = ("auto", "logits+cache")


def is_model_output(out: Any) -> bool:
    """A transformers `ModelOutput`: an ordered dict whose class offers `to_tuple`."""
    return isinstance(out, dict) and callable(getattr(type(out), "to_tuple", None))


def is_cache(obj: Any) -> bool:
    """A transformers `Cache` (DynamicCache, StaticCache, ...): has `layers` or `get_seq_length`."""
    return not isinstance(obj, (torch.Tensor, tuple, list, dict)) and (
        hasattr(obj, "layers") or callable(getattr(obj, "get_seq_length", None))
    )


def plain_outputs(out: Any, outputs: str = "auto") -> Any:
    """What a captured method returns, with ModelOutputs and caches made plain (see module doc)."""
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs={outputs!r}; expected one of {', '.join(OUTPUTS)}")
    if not is_model_output(out):
        if outputs == "logits+cache":
            raise ValueError(
                f"outputs='logits+cache' needs a Hugging Face ModelOutput, but the method "
                f"returned {type(out).__name__}; use outputs='auto'"
            )
        return out
    main = _main_tensor(out)
    if outputs == "auto":
        return main
    cache = out.get("past_key_values")
    if cache is None:
        raise ValueError(
            "outputs='logits+cache' but the model returned no past_key_values; "
            "call it with use_cache=True (or set config.use_cache = True)"
        )
    return (main, *flat_cache(cache))


def _main_tensor(out: dict) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if isinstance(out.get(key), torch.Tensor):
            return out[key]
    raise ValueError(
        f"{type(out).__name__} has neither logits nor last_hidden_state (it has {list(out)}); "
        "return the tensor you want from a small wrapper module"
    )


def flat_cache(cache: Any) -> list[torch.Tensor]:
    """Every tensor of a cache, in a fixed order (see module doc)."""
    if not is_cache(cache):
        return [t for t in torch.utils._pytree.tree_leaves(cache) if isinstance(t, torch.Tensor)]
    tensors: list[torch.Tensor] = []
    for layer in getattr(cache, "layers", [cache]):
        for name in sorted(vars(layer)):
            if name.startswith("_"):
                continue
            value = vars(layer)[name]
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, dict):
                tensors += [value[k] for k in sorted(value) if isinstance(value[k], torch.Tensor)]
    return tensors
