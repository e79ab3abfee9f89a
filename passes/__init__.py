"""Graph passes: the pass manager, the pattern language and rewrite driver, canonicalisation,
structural hashing, generic fusion (`fuse_elementwise`), `schedule`, `plan_memory` and the
per-kernel cost model (and, as they land, the semantic fusion passes).

    import passes
    g2 = passes.pipeline(g)      # the whole pipeline (env: DEBUG_IR, VERIFY_EACH, STATS)
    g3 = passes.canonicalize(g)  # one pass, Graph -> Graph
    ctx = passes.PassContext(); passes.canonicalize(g, ctx); ctx.counters["mul_one"]
"""

from passes.canonicalize import RULES as CANONICAL_RULES
from passes.canonicalize import canonicalize
from passes.cleanup import common_subexpression_elimination, dead_code_elimination
from passes.context import Pass, PassContext
from passes.cost import kernel_cost
from passes.explain import Explanation, explain
from passes.fuse_elementwise import FusionPolicy, fuse_elementwise
from passes.memory_plan import MemoryPlan, plan_memory
from passes.pattern import COMMUTATIVE, Fail, Match, Pat, Rule, const, either, op, var
from passes.rewrite import GraphView, RewriteError, Rewriter, rewrite
from passes.schedule import Schedule, build_schedule, schedule
from passes.structural_hash import (
    KernelSignature,
    graph_signature,
    kernel_signatures,
    op_signature,
)


def __getattr__(name: str) -> object:
    """`pipeline` imports every fusion pass (`passes.manager`): only on first use, so a process
    that only loads an artifact (the backends ask for `op_signature`) does not pay for them."""
    if name == "pipeline":
        from passes.manager import pipeline

        return pipeline
    raise AttributeError(f"module 'passes' has no attribute {name!r}")


__all__ = [
    "CANONICAL_RULES",
    "COMMUTATIVE",
    "Explanation",
    "Fail",
    "FusionPolicy",
    "GraphView",
    "KernelSignature",
    "Match",
    "MemoryPlan",
    "Pass",
    "PassContext",
    "Pat",
    "RewriteError",
    "Rewriter",
    "Rule",
    "Schedule",
    "build_schedule",
    "canonicalize",
    "common_subexpression_elimination",
    "const",
    "dead_code_elimination",
    "either",
    "explain",
    "fuse_elementwise",
    "graph_signature",
    "kernel_cost",
    "kernel_signatures",
    "op",
    "op_signature",
    "pipeline",
    "plan_memory",
    "rewrite",
    "schedule",
    "var",
]
