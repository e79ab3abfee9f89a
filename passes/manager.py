"""The pipeline: one readable list of passes, Graph -> Graph.

Each step is `ctx.run(name, pass, g)`: the context times it, prints the graph after it
(`DEBUG_IR=1`) and verifies it (`VERIFY_EACH=1`); `STATS=1` prints rule hits and pass times at the
end. Options are keyword arguments, kept in `ctx.options` for the passes that read them.
"""

from __future__ import annotations

from typing import Any

from ir import Graph
from passes.canonicalize import canonicalize
from passes.context import PassContext
from passes.fuse_attention import fuse_attention
from passes.fuse_elementwise import fuse_elementwise
from passes.fuse_hc import fuse_hc
from passes.fuse_moe import fuse_moe
from passes.fuse_nsa import fuse_nsa
from passes.fuse_quant import fuse_quant
from passes.fuse_sdpa import fuse_sdpa
from passes.fuse_sparse_attention import fuse_sparse_attention
from passes.memory_plan import plan_memory
from passes.schedule import schedule

__all__ = ["pipeline"]


def pipeline(
    graph: Graph, *, target: str | None = None, ctx: PassContext | None = None, **options: Any
) -> Graph:
    """Compile `graph` down to kernel ops for `target` (None: target-independent passes only).

    `ctx` (optional) receives counters and times; by default one is made from the environment.
    After the run `ctx.products` holds the `schedule` (launches, costs) and the `memory_plan`.
    Options: `bindings` (symbol values for the memory plan), `fusion_policy` (a FusionPolicy).
    """
    if ctx is None:
        ctx = PassContext.from_env(target=target, options=options)
    g = graph
    # one spelling per computation: CSE, constant folding, identities, view chains, DCE
    g = ctx.run("canonicalize", canonicalize, g)
    # --- semantic fusions (named ops with reference semantics in ir/) -------------------------
    # indexer + top-k, KV compressors (prefill and decode step), sparse/window/HCA MQA
    g = ctx.run("fuse_attention", fuse_attention, g)
    # NSA: cmp/slc/win branches -> attn.sdpa (mask / indices / window), block top-n selection
    g = ctx.run("fuse_nsa", fuse_nsa, g)
    # routing (score, biased top-k, renormalise, scale; hash form); dispatch + experts + combine
    g = ctx.run("fuse_moe", fuse_moe, g)
    # mHC pre (Sinkhorn kept as a loop inside the op), post and head
    g = ctx.run("fuse_hc", fuse_hc, g)
    # dense attention in any spelling (SDPA, softmax(QKᵀ)V; GQA, causal/band masks, sinks)
    g = ctx.run("fuse_sdpa", fuse_sdpa, g)
    # attention over index-selected keys (DSA's gathered MQA; a dense attn.sdpa under a top-k mask)
    g = ctx.run("fuse_sparse_attention", fuse_sparse_attention, g)
    # weights dequantised in the graph: FP8 linears -> linalg.matmul_fp8 (weight stays 1 B),
    # FP4/FP8 routed experts -> moe.experts(weight_format=...) (0.5 + 1/32 B for FP4)
    g = ctx.run("fuse_quant", fuse_quant, g)
    # --- generic fusion and scheduling ---------------------------------------------------------
    # remaining elementwise/reduction chains and GEMM epilogues -> fused.kernel (one launch each)
    g = ctx.run("fuse_elementwise", fuse_elementwise, g)
    # order the kernel ops (the order needing fewer activation bytes); launches and their costs
    g = ctx.run("schedule", schedule, g)
    # cache updates aliased to their inputs (written in place), then liveness-based buffer reuse
    # at ctx.options["bindings"] (default B=1, T=4096): peak bytes
    g = ctx.run("plan_memory", plan_memory, g)
    if ctx.stats:
        ctx.log(ctx.report())
    return g
