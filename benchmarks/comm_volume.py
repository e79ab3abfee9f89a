"""Communication volume of a sharded prefill on local gloo ranks against `dsv4c plan`'s model.

    .venv/bin/python benchmarks/comm_volume.py                       # tiny-512, 2 ranks
    .venv/bin/python benchmarks/comm_volume.py --preset tiny --batch 4 --tokens 16

Each rank runs its `shard`ed program through the reference interpreter with axis groups that
count, per collective, the bytes this rank hands to gloo and the bytes a ring algorithm sends
(all_reduce 2(R-1)/R·n, all_gather (R-1)·n, all_to_all (R-1)/R·n). The prediction is
`dsv4c.plan.comm_per_token` × tokens × layers, rescaled from the plan's bf16/FP8 payloads to the
fp32 tensors this CPU run moves. The static-capacity dispatch sends capacity-padded buffers
(capacity = tokens per rank), so its measured/predicted ratio is the padding overhead, not an
error. Results: benchmarks/results/comm_volume.json (written atomically). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(__file__), "results", "comm_volume.json")
CASES = [  # name, mesh, MoE lowering, batch axis
    ("tp=2: attention TP + experts over tp (all_reduce)", "tp=2", "all_reduce", None),
    ("ep=2: dp attention + static-capacity dispatch", "ep=2", "dispatch", "ep"),
    ("ep=2: dp attention + ragged dispatch", "ep=2", "dispatch_ragged", "ep"),
]


class CountingGroup:
    """Wraps an axis group; records bytes per collective kind (ring model)."""

    def __init__(self, inner, sent: Counter) -> None:
        self.inner, self.size, self.rank, self.sent = inner, inner.size, inner.rank, sent

    def _count(self, kind: str, t, factor: float) -> None:
        n = t.numel() * t.element_size()
        self.sent[kind + ".calls"] += 1
        self.sent[kind + ".bytes_in"] += n
        self.sent[kind + ".ring_bytes_sent"] += factor * n

    def all_reduce(self, t):
        self._count("all_reduce", t, 2 * (self.size - 1) / self.size)
        return self.inner.all_reduce(t)

    def all_gather(self, t, dim):
        self._count("all_gather", t, self.size - 1)
        return self.inner.all_gather(t, dim)

    def reduce_scatter(self, t, dim):
        self._count("reduce_scatter", t, (self.size - 1) / self.size)
        return self.inner.reduce_scatter(t, dim)

    def all_to_all(self, t, dim):
        self._count("all_to_all", t, (self.size - 1) / self.size)
        return self.inner.all_to_all(t, dim)

    def all_to_all_v(self, t, in_splits, out_splits):
        rank_rows = t.shape[0] or 1
        mine = in_splits[self.rank] / rank_rows  # rows a rank keeps are not sent
        self._count("all_to_all_v", t, 1 - mine)
        return self.inner.all_to_all_v(t, in_splits, out_splits)


def rank_main(rank: int, graph_text: str, state: dict, inputs: list) -> dict:
    import ir
    from backends.distributed import Mesh, init_mesh, local_params
    from ir.ops.collective import bind_groups
    from passes.shard import shard
    from passes.shard_rules import rules_for_mesh

    g = ir.parse(graph_text)
    out = {}
    for name, mesh_text, moe, batch_axis in CASES:
        mesh = Mesh.parse(mesh_text)
        rules = rules_for_mesh(mesh.to_json(), moe=moe)
        program = shard(g, mesh.to_json(), rules=rules, moe=moe, batch_axis=batch_axis)
        sent: Counter = Counter()
        groups = {a: CountingGroup(grp, sent) for a, grp in init_mesh(mesh).items()}
        params = local_params(state, rules, mesh, rank)
        names = {v.name for v in program.params}
        ins = inputs
        if batch_axis:
            ins = [t.chunk(mesh.size(batch_axis), 0)[mesh.coords(rank)[batch_axis]] for t in ins]
        start = time.perf_counter()
        with bind_groups(groups):
            ir.interpret(program, *ins, params={k: v for k, v in params.items() if k in names})
        out[name] = {"seconds": time.perf_counter() - start, **dict(sent)}
    return out


def predicted(preset: str, mesh_text: str, tokens: int, moe: str, batch_axis) -> dict:
    """Plan's bytes per rank for one prefill of `tokens` tokens, at fp32 activations."""
    from backends.distributed import Mesh
    from dsv4c.plan import comm_per_token
    from models.config import Config

    cfg = Config.preset(preset)
    mesh = Mesh.parse(mesh_text)
    sizes = mesh.to_json()
    if batch_axis:  # data-parallel attention: the plan's dp axis is the batch axis here
        sizes = {"dp": mesh.size(batch_axis), **sizes}
    per_token = comm_per_token(cfg, sizes, mesh.world_size, decode=False)
    local_tokens = tokens // (mesh.size(batch_axis) if batch_axis else 1)
    # plan payloads: bf16 all_reduce/combine (x2 for fp32), FP8 dispatch rows (x4 for fp32)
    scale = {k: (4.0 if "dispatch" in k else 2.0) for k in per_token}
    out = {k: v * scale[k] * local_tokens * cfg.n_layers for k, v in per_token.items()}
    tp = mesh.size("tp")
    if tp > 1:  # once per step: the vocabulary-parallel embedding's partial sums (fp32 [T, d])
        out["embedding all_reduce (tp)"] = 2 * (tp - 1) / tp * local_tokens * cfg.dim * 4
    # once per step: the vocabulary head's all_gather (tp) or the logits' batch gather (dp)
    shards = mesh.size("tp") if mesh.size("tp") > 1 else mesh.size(batch_axis or "tp")
    out["logits all_gather"] = (shards - 1) * local_tokens * cfg.vocab_size * 4 / (
        mesh.size("tp") if mesh.size("tp") > 1 else 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-512")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=10, help="prompt length")
    ap.add_argument("--json", default=RESULTS)
    args = ap.parse_args()

    import torch

    import frontend
    import ir
    import passes
    from backends.distributed import run_ranks
    from models.deepseek_v4 import Config, Transformer
    from passes.fuse_attention import fuse_attention
    from passes.fuse_hc import fuse_hc
    from passes.fuse_moe import fuse_moe

    torch.manual_seed(0)
    model = Transformer(Config.preset(args.preset)).eval()
    tokens = torch.randint(0, 128, (args.batch, args.tokens))
    g = frontend.capture(model, (tokens,), method="prefill")
    g = fuse_hc(fuse_moe(fuse_attention(passes.canonicalize(g))))
    got = run_ranks(rank_main, 2, (ir.to_text(g), model.state_dict(), [tokens]), timeout_s=300)
    n_tok = args.batch * args.tokens
    rows = []
    for name, mesh, moe, batch_axis in CASES:
        measured = got[0][name]
        ring = sum(v for k, v in measured.items() if k.endswith("ring_bytes_sent"))
        pred = predicted(args.preset, mesh, n_tok, moe, batch_axis)
        total = sum(pred.values())
        rows.append({"case": name, "mesh": mesh, "moe": moe, "batch_axis": batch_axis,
                     "tokens": n_tok, "measured_rank0": measured, "predicted_bytes": pred,
                     "measured_ring_bytes_sent": ring, "predicted_total": total,
                     "measured_over_predicted": ring / total if total else None})
        print(f"{name}: measured {ring:,.0f} B sent by rank 0 (ring model), predicted "
              f"{total:,.0f} B, ratio {ring / total if total else float('nan'):.2f}")
    doc = {"preset": args.preset, "batch": args.batch, "prompt": args.tokens, "ranks": 2,
           "note": "bytes counted at the collective calls (what gloo is handed), ring model for "
                   "what one rank sends; fp32 activations", "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.json)),
                                     delete=False, suffix=".tmp") as f:
        json.dump(doc, f, indent=1)
    os.replace(f.name, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
