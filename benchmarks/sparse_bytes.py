"""Bytes one decode query reads, per semantic op, for the three sparse-attention variants —
from the op semantics (which cache rows the query touches) and from the cost model.

Decode at position p = L − 1 over caches of max_len = L tokens, batch 1; every row is read at its
cache dtype's size (`itemsize`). Rows per query, by variant (names from models/config.py):

    csa  attn.indexer_topk    L/m indexer keys × index_head_dim           (m = 4: O(L))
         attn.sparse_mqa      min(w, L) window + min(k, L/m) picked entries, × head_dim  (O(1))
         attn.compress_step   both compressors' kv and score states: 2 × 2m rows × 2c    (O(1))
    dsa  attn.indexer_topk    L indexer keys × index_head_dim                            (O(L))
         attn.sdpa (indexed)  min(k, L) picked latent rows × (kv_lora_rank + rope_head_dim),
                              keys and values in one row (value_dim)                      (O(1))
    nsa  attn.sdpa cmp        N = (L − l)//d + 1 visible compressed blocks × G × (dk + dv) (O(L))
         attn.block_select    the same N compressed keys again × G × dk                  (O(L))
         attn.sdpa slc        min(n, ⌈L/l'⌉)·l' selected tokens (≤ L) × G × (dk + dv)     (O(1))
         attn.sdpa win        min(w, L) window tokens × G × (dk + dv)                    (O(1))

These count the key/value rows only (not the query, the output or the picks, which are O(1) and
small), so the cost model (`passes.cost.kernel_cost`, each op's `cost`), which counts whole
operands and results, must come out at or slightly above them — `compare` says by how much, and
where an op's cost counts a whole cache it does not read (e.g. a cache it writes one row of).
"""

from __future__ import annotations

from typing import Any

import ir
from models.config import Config
from passes.cost import evaluate, kernel_cost

__all__ = ["analytic", "compare", "cost_model", "op_label", "ORDER"]

# O(L) ops first, then the O(1) ones, per variant: the rows of the JSON and of the table
ORDER = {
    "csa": ("attn.indexer_topk", "attn.sparse_mqa", "attn.compress_step"),
    "dsa": ("attn.indexer_topk", "attn.sdpa slc"),
    "nsa": ("attn.sdpa cmp", "attn.block_select", "attn.sdpa slc", "attn.sdpa win"),
}
GROWS = {  # which of ORDER's ops read O(L) rows per query (the rest read O(1))
    "csa": ("attn.indexer_topk",),
    "dsa": ("attn.indexer_topk",),
    "nsa": ("attn.sdpa cmp", "attn.block_select"),
}


def analytic(variant: str, cfg: Config, length: int, itemsize: int = 4) -> dict[str, int]:
    """Key/value bytes one decode query at position length − 1 reads, per op label (ORDER)."""
    rows = {"csa": _csa, "dsa": _dsa, "nsa": _nsa}[variant](cfg, length)
    return {label: n * itemsize for label, n in rows.items()}


def _csa(cfg: Config, length: int) -> dict[str, int]:
    m, c, w = 4, cfg.head_dim, cfg.window_size
    states = 2 * (2 * m) * (2 * c) + 2 * (2 * m) * (2 * cfg.index_head_dim)  # kv + score each
    return {
        "attn.indexer_topk": length // m * cfg.index_head_dim,
        "attn.sparse_mqa": (min(w, length) + min(cfg.index_topk, length // m)) * c,
        "attn.compress_step": states,
    }


def _dsa(cfg: Config, length: int) -> dict[str, int]:
    row = cfg.kv_lora_rank + cfg.rope_head_dim
    return {
        "attn.indexer_topk": length * cfg.index_head_dim,
        "attn.sdpa slc": min(cfg.index_topk, length) * row,
    }


def _nsa(cfg: Config, length: int) -> dict[str, int]:
    g, dk, dv = cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
    l, d, ls = cfg.nsa_cmp_block, cfg.nsa_cmp_stride, cfg.nsa_slc_block
    blocks = (length - l) // d + 1 if length >= l else 0
    selected = min(cfg.nsa_slc_topn * ls, -(-length // ls) * ls, length)
    return {
        "attn.sdpa cmp": blocks * g * (dk + dv),
        "attn.block_select": blocks * g * dk,
        "attn.sdpa slc": selected * g * (dk + dv),
        "attn.sdpa win": min(cfg.window_size, length) * g * (dk + dv),
    }


def op_label(node: ir.Node, window: int) -> str:
    """The ORDER label of an attention op: NSA's three attn.sdpa by role (indexed: slc; keys
    as many as the window: win; else cmp), DSA's indexed one is slc too."""
    if node.name != "attn.sdpa":
        return node.name
    if node.attrs["indexed"]:
        return "attn.sdpa slc"
    keys = node.operands[1].type.shape[1 if node.attrs.get("kv_layout") == "bshd" else 2]
    return "attn.sdpa win" if keys == window else "attn.sdpa cmp"


def cost_model(graph: ir.Graph, window: int, batch: int = 1) -> dict[str, Any]:
    """Cost-model bytes of one call: per attention op label (summed over ops with one label)
    and the whole graph's kernel ops (projections, cache writes and the rest included)."""
    env = {"B": batch}
    per_op: dict[str, int] = {}
    total = 0
    for node in graph.ops:
        nbytes = evaluate(kernel_cost(node).bytes, env)
        total += nbytes
        if node.name.startswith("attn."):
            label = op_label(node, window)
            per_op[label] = per_op.get(label, 0) + nbytes
    return {"per_op": per_op, "graph_total": total}


def compare(analytic_bytes: dict[str, int], model_bytes: dict[str, int]) -> dict[str, Any]:
    """Per op: cost model / analytic (≥ 1: the cost model adds q, output, picks, or counts a
    whole operand the op reads only part of), and the ops either side lacks."""
    ratio = {
        k: round(model_bytes[k] / v, 3) for k, v in analytic_bytes.items() if k in model_bytes
    }
    return {
        "cost_over_analytic": ratio,
        "missing_in_graph": sorted(set(analytic_bytes) - set(model_bytes)),
        "not_in_analytic": sorted(set(model_bytes) - set(analytic_bytes)),
    }
