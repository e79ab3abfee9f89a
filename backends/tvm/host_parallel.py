"""Block loops of the CPU BLAS paths run on Python threads, one torch thread each.

The prefill BLAS paths of the attention ops (`semantic_sparse.sparse_mqa_blas`,
`indexer_topk_blas`) loop over query blocks; each block is a few GEMMs too small for torch's
threads to share well ([256-512, 512] x [512, ~200] for small's sparse MQA) and some glue.
`parallel_blocks(blocks, fn)` runs `fn(block)` for every block: with n = torch's intra-op
threads > 1 and at least 2n blocks, n worker threads each take every n-th block (interleaved, so
causal blocks of growing work stay balanced) with torch at 1 thread, and the caller waits. Torch
releases the GIL inside its ops, so the blocks' GEMMs run side by side on the n cores. `fn` must
write disjoint outputs; results are bit-equal to the serial loop (each block runs the same ops).

Torch's thread count is per thread for OpenMP but MKL's is process-wide: the caller's count is
set to 1 for the duration and given back after. The workers are a pool per thread count, built on
first use and rebuilt in a forked child (threads do not survive a fork). An exception in a block
is raised in the caller.

Measured (small's 4096-token prefill, captured inputs, min of 5, the 2-core box with another
engineer's jobs on it): sparse MQA csa 253 -> 223 ms a call, hca 142 -> 124 ms (64-query blocks);
with torch's 2 threads on one GEMM at a time a loaded box also showed 4-8 s outliers (libgomp's
barrier waiting for a descheduled worker), which 1-thread workers do not have.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["parallel_blocks"]

_POOLS: dict[int, tuple[int, ThreadPoolExecutor]] = {}  # threads -> (pid, pool)


def parallel_blocks(blocks: Iterable[Any], fn: Callable[[Any], None]) -> None:
    """`fn(block)` for every block, on torch's threads as Python threads (module doc)."""
    import torch

    todo = list(blocks)
    n = torch.get_num_threads()
    if n == 1 or len(todo) < 2 * n:
        for block in todo:
            fn(block)
        return

    def work(i: int) -> None:
        torch.set_num_threads(1)
        for block in todo[i::n]:
            fn(block)

    pool = _pool(n)
    torch.set_num_threads(1)
    try:
        list(pool.map(work, range(n)))
    finally:
        torch.set_num_threads(n)


def _pool(n: int) -> ThreadPoolExecutor:
    pid = os.getpid()
    found = _POOLS.get(n)
    if found is None or found[0] != pid:
        found = _POOLS[n] = (pid, ThreadPoolExecutor(n, thread_name_prefix="dsv4c-blocks"))
    return found[1]
