"""The memory roofline of a `dsv4c bench` row: the bytes a step must read over the machine's read
bandwidth, measured in the same run.

    roofline_s        = must_read_bytes / read_bandwidth
    roofline_fraction = roofline_s / latency_s          (1.0: the step runs at the bandwidth)

must_read_bytes = weights touched + KV read, for N tokens in the step (decode: N = batch;
prefill: N = batch · prompt length):

- weights: every parameter the method uses, at its dtype's size, except
  * `mtp.*` (not part of prefill/decode),
  * the embedding table: only N rows are read,
  * routed experts (`*.ffn.experts.*`, E experts per layer, k active per token): the expected
    number of distinct experts N tokens touch under uniform routing, E·(1 − (1 − k/E)^N), of
    the E (k at N = 1; about E in a prefill);
  buffers (rotary tables, hash-routing tables) are left out (small next to the weights).
- KV (decode only; a prefill starts from an empty cache): every cache entry as allocated for
  `max_len` positions (context + 8: within 1 % of the visible part at 4K), except the sparse
  layers' `compressed_kv`, of which each token reads only its `index_topk` selected rows.

read_bandwidth: bytes / the fastest of 5 `x.sum()` calls over a 256 MiB fp32 tensor (after
one warm-up) on the same threads as the benchmark: a read-only stream, no writes. On a loaded
machine it is low and noisy, like every other figure of that run.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["BANDWIDTH_BYTES", "must_read_bytes", "read_bandwidth"]

BANDWIDTH_BYTES = 256 * 2**20


def read_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeat: int = 5, device: str = "cpu") -> float:
    """Bytes per second of a streaming read (`sum`) of `nbytes` on `device`."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    times = []
    for _ in range(repeat):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del x
    return nbytes / min(times)  # the best call: a capacity, like STREAM reports


def _experts_touched(n_experts: int, k: int, tokens: int) -> float:
    """Expected distinct experts `tokens` tokens pick, k each of n_experts, uniformly."""
    return n_experts * (1.0 - (1.0 - k / n_experts) ** tokens)


def weight_bytes(model: Any, tokens: int) -> int:
    cfg = model.cfg
    share = _experts_touched(cfg.n_routed_experts, cfg.n_activated_experts, tokens)
    share /= cfg.n_routed_experts
    total = 0.0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.startswith("mtp."):
            continue
        if name == "embed.weight":
            total += min(tokens, p.shape[0]) * p[0].numel() * p.element_size()
        elif ".ffn.experts." in name:
            total += nbytes * share
        else:
            total += nbytes
    return int(total)


def kv_bytes(model: Any, cache: dict[str, torch.Tensor]) -> int:
    topk = model.cfg.index_topk
    total = 0
    for name, t in cache.items():
        nbytes = t.numel() * t.element_size()
        prefix = name.rsplit(".", 1)[0] + "."
        sparse = name.endswith(".compressed_kv") and f"{prefix}indexer.keys" in cache
        if sparse and t.dim() >= 2 and t.shape[1] > topk:
            nbytes = nbytes * topk // t.shape[1]
        total += nbytes
    return total


def must_read_bytes(model: Any, workload: Any) -> dict[str, int]:
    """{"weights", "kv", "total"} bytes for one call of `workload` (see the module docstring)."""
    if workload.method == "prefill":
        batch, length = workload.args[0].shape
        weights = weight_bytes(model, batch * length)
        return {"weights": weights, "kv": 0, "total": weights}
    token, _, cache = workload.args
    weights = weight_bytes(model, token.shape[0])
    kv = kv_bytes(model, cache)
    return {"weights": weights, "kv": kv, "total": weights + kv}
