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

__all__ = ["pipeline"]


def pipeline(
    graph: Graph, *, target: str | None = None, ctx: PassContext | None = None, **options: Any
) -> Graph:
    """Compile `graph` down to kernel ops for `target` (None: target-independent passes only).

    `ctx` (optional) receives counters and times; by default one is made from the environment.
    """
    if ctx is None:
        ctx = PassContext.from_env(target=target, options=options)
    g = graph
    # one spelling per computation: CSE, constant folding, identities, view chains, DCE
    g = ctx.run("canonicalize", canonicalize, g)
    # --- semantic fusions (named ops with reference semantics in ir/) -------------------------
    # TODO(issue 4): fuse_attention — indexer, KV compressors, sparse/window MQA
    # TODO(issue 4): fuse_moe — routing; dispatch + grouped SwiGLU + combine
    # TODO(issue 4): fuse_hc — mHC pre (Sinkhorn kept as a loop) and post
    # --- generic fusion and scheduling ---------------------------------------------------------
    # TODO(issue 4): fuse_elementwise — remaining elementwise/reduction chains -> fused.kernel
    # TODO(issue 4): schedule — order kernel ops; cost model per kernel
    # TODO(issue 4): plan_memory — liveness-based buffer reuse, peak activation bytes
    if ctx.stats:
        ctx.log(ctx.report())
    return g
