"""Placement vocabulary and the parameter-placement rule lists for the `shard` pass and the
`dsv4c plan` planner (one source of truth for what each rank holds).

Placements follow DTensor: `Shard(dim)` (each rank of the axis holds one contiguous block of
`dim`), `REPLICATE` (every rank holds all of it), `PARTIAL` (every rank holds a summand; the value
is their sum). A rule maps a parameter-name glob to a placement on one mesh axis; the first
matching rule per axis wins, no match means replicated.

Strategies (the brief, shared/scale-out.md §3, §5):
- `tp_attention(axis)`: query heads split (`wq_b` rows, `attn_sink`), output groups split
  (`wo_a` rows: whole groups per rank), `wo_b` row-parallel (columns split -> partial sums). The
  single K=V head (`wkv`), `wq_a`, compressors, the indexer and the KV cache stay replicated.
- `vocab_head(axis)`: `head.weight` rows split (each rank computes its vocabulary slice).
- `vocab_embedding(axis)`: `embed.weight` rows split (ids outside a rank's block read zeros;
  the lookups add up in one all_reduce).
- `expert_parallel(axis)`: routed experts split along the expert dim; gate and shared expert
  replicated.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

__all__ = [
    "Shard",
    "Replicate",
    "Partial",
    "Placement",
    "REPLICATE",
    "PARTIAL",
    "Rule",
    "tp_attention",
    "vocab_head",
    "vocab_embedding",
    "expert_parallel",
    "rules_for_mesh",
    "placement_of",
]


@dataclass(frozen=True)
class Shard:
    """Each rank of the axis holds block `rank` of dim `dim` (size / axis size elements)."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a summand; an all_reduce makes it Replicate."""

    def __str__(self) -> str:
        return "P(sum)"


Placement = Shard | Replicate | Partial
REPLICATE = Replicate()
PARTIAL = Partial()


@dataclass(frozen=True)
class Rule:
    """Parameters whose name matches `pattern` (fnmatch glob) get `placement` on mesh `axis`."""

    pattern: str
    axis: str
    placement: Placement


def tp_attention(axis: str = "tp") -> list[Rule]:
    return [
        Rule("*attn.wq_b.weight", axis, Shard(0)),  # column-parallel: H/tp query heads
        Rule("*attn.attn_sink", axis, Shard(0)),  # one sink per local head
        Rule("*attn.wo_a.weight", axis, Shard(0)),  # whole output groups: g/tp per rank
        Rule("*attn.wo_b.weight", axis, Shard(1)),  # row-parallel -> partial sums, all_reduce
    ]


def vocab_head(axis: str = "tp") -> list[Rule]:
    return [Rule("head.weight", axis, Shard(0))]


def vocab_embedding(axis: str = "tp") -> list[Rule]:
    """Embedding rows split: each rank looks up the ids in its vocabulary block (a partial
    sum, one all_reduce of [tokens, dim])."""
    return [Rule("embed.weight", axis, Shard(0))]


def expert_parallel(axis: str = "ep", split_shared: bool = False) -> list[Rule]:
    """Routed experts: E/size per rank. `split_shared` also splits the shared expert's hidden
    units (s1/s3 rows, s2 columns) so the MoE output is one partial sum (all_reduce layout)."""
    rules = [Rule("*ffn.experts.w[123]", axis, Shard(0))]
    if split_shared:
        rules += [
            Rule("*ffn.shared_experts.w1.weight", axis, Shard(0)),
            Rule("*ffn.shared_experts.w3.weight", axis, Shard(0)),
            Rule("*ffn.shared_experts.w2.weight", axis, Shard(1)),
        ]
    return rules


def rules_for_mesh(sizes: dict[str, int], moe: str = "all_reduce") -> list[Rule]:
    """Default rules for a mesh: TP attention, vocabulary-parallel embedding and head over `tp`;
    routed experts over `ep` (or over `tp` when there is no ep axis — the reference code's "EP
    inside TP"); with `moe="all_reduce"` the shared expert is split on the same axis."""
    rules: list[Rule] = []
    if sizes.get("tp", 1) > 1:
        rules += tp_attention("tp") + vocab_head("tp") + vocab_embedding("tp")
    expert_axis = "ep" if sizes.get("ep", 1) > 1 else "tp" if sizes.get("tp", 1) > 1 else None
    if expert_axis:
        rules += expert_parallel(expert_axis, split_shared=moe == "all_reduce")
    return rules


def placement_of(name: str, rules: list[Rule]) -> dict[str, Placement]:
    """Axis -> placement of parameter `name` (axes without a matching rule: replicated)."""
    out: dict[str, Placement] = {}
    for rule in rules:
        if rule.axis not in out and fnmatch.fnmatchcase(name, rule.pattern):
            out[rule.axis] = rule.placement
    return out
