"""`dsv4c plan`: what a mesh of GPUs holds and how fast it could decode — pure arithmetic from a
`models.config.Config` preset and the placement rules of the `shard` pass (no weights, no
graph).

Per rank: weight bytes at checkpoint precision (FP4 routed experts, FP8 attention projections and
shared experts, bf16 norms/compressors/gate/embedding/head, fp32 mHC, sinks, APE and gate bias;
v4-architecture.md §2.2), KV bytes at a context length, communication bytes per token per layer,
and a roofline decode estimate (HBM bytes / bandwidth + collective bytes / link bandwidth, no
overlap, no latency term: a floor, not a promise). Figures: `GPUS` below, each with its source.

Mesh semantics: one rank per mesh point (torch DeviceMesh), world = dp·tp·ep. `gpus=` may fold
the ep axis onto the dp×tp ranks instead (vLLM's EP = DP×TP): then world = dp·tp and ep must
equal it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from backends.distributed.mesh import Mesh
from models.config import Config
from passes.shard_rules import Shard, placement_of, rules_for_mesh

__all__ = ["GPU", "GPUS", "Plan", "param_specs", "make_plan", "format_plan"]

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """Per-GPU figures: HBM bytes and bandwidth, interconnect bandwidth per direction (scale-up
    within a node, scale-out between nodes), dense FP8 FLOP/s, GPUs per node, and the source."""

    name: str
    hbm_bytes: float
    hbm_bw: float
    link_bw: float
    net_bw: float
    fp8_flops: float
    per_node: int
    source: str


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM", 80e9, 3.35e12, 450e9, 50e9, 1979e12, 8,
                "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): 80 GB HBM3, 3.35 TB/s, "
                "NVLink 900 GB/s bidirectional, FP8 3,958 TFLOPS with sparsity (1,979 dense); "
                "400 Gb/s NDR InfiniBand per GPU between nodes"),
    "h200": GPU("H200 SXM", 141e9, 4.8e12, 450e9, 50e9, 1979e12, 8,
                "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): 141 GB HBM3e, "
                "4.8 TB/s, NVLink 900 GB/s bidirectional, FP8 3,958 TFLOPS with sparsity; "
                "400 Gb/s InfiniBand per GPU between nodes"),
    "b200": GPU("B200", 180e9, 8.0e12, 900e9, 50e9, 4500e12, 8,
                "NVIDIA DGX/HGX B200 datasheet (nvidia.com/en-us/data-center/dgx-b200): 1,440 GB "
                "HBM3e per 8 GPUs, 8 TB/s per GPU, NVLink 5 1.8 TB/s bidirectional, FP8 9 PFLOPS "
                "sparse (4.5 dense); 400 Gb/s ConnectX-7 per GPU between nodes"),
    "mi300x": GPU("MI300X", 192e9, 5.3e12, 448e9, 50e9, 2615e12, 8,
                  "AMD Instinct MI300X datasheet (amd.com/en/products/accelerators/instinct/mi300/"
                  "mi300x.html): 192 GB HBM3, 5.3 TB/s, 7 Infinity Fabric links x 64 GB/s per "
                  "direction, FP8 2,614.9 TFLOPS dense; 400 Gb/s NIC per GPU between nodes"),
}

FP4 = 0.5 + 1 / 32  # e2m1 two per byte + one ue8m0 scale byte per 32 values
RESERVE = 0.10  # share of HBM kept for activations, comm buffers, graphs, allocator slack


def param_specs(cfg: Config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of `models.deepseek_v4.Transformer(cfg)`, in its order,
    computed from the config alone (a test checks it against the meta-device model)."""
    d, hc = cfg.dim, cfg.hc_mult
    top = [("hc_head_fn", (hc, hc * d)), ("hc_head_base", (hc,)), ("hc_head_scale", (1,)),
           ("embed.weight", (cfg.vocab_size, d))]
    out = list(top)
    for i in range(cfg.n_layers):
        out += _block(cfg, f"layers.{i}.", cfg.compress_ratios[i], hashed=i < cfg.n_hash_layers)
    out += [("norm.weight", (d,)), ("head.weight", (cfg.vocab_size, d))]
    for j in range(cfg.n_mtp_layers):
        p = f"mtp.{j}."
        block = _block(cfg, p, cfg.compress_ratios[cfg.n_layers + j], hashed=False)
        out += block[:6] + [(p + n, s) for n, s in top[:3]] + block[6:]
        out += [(p + "e_proj.weight", (d, d)), (p + "h_proj.weight", (d, d))]
        out += [(p + n, (d,)) for n in ("enorm.weight", "hnorm.weight", "norm.weight")]
    return out


def _block(cfg: Config, p: str, ratio: int, hashed: bool) -> list[tuple[str, tuple[int, ...]]]:
    d, hc, hd, q, g = cfg.dim, cfg.hc_mult, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups
    mix = (2 + hc) * hc
    out = [(p + f"hc_{s}_{n}", shape) for s in ("attn", "ffn")
           for n, shape in (("fn", (mix, hc * d)), ("base", (mix,)), ("scale", (3,)))]
    out += [(p + "attn_norm.weight", (d,)), (p + "ffn_norm.weight", (d,))]
    a = p + "attn."
    out += [(a + "attn_sink", (cfg.n_heads,)), (a + "wq_a.weight", (q, d)),
            (a + "q_norm.weight", (q,)), (a + "wq_b.weight", (cfg.n_heads * hd, q)),
            (a + "wkv.weight", (hd, d)), (a + "kv_norm.weight", (hd,)),
            (a + "wo_a.weight", (cfg.o_groups * cfg.o_lora_rank, cfg.n_heads * hd // g)),
            (a + "wo_b.weight", (d, cfg.o_groups * cfg.o_lora_rank))]
    if ratio:
        out += _compressor(a + "compressor.", d, hd, ratio)
    if ratio == 4:
        ih, ihd = cfg.index_n_heads, cfg.index_head_dim
        out += [(a + "indexer.wq_b.weight", (ih * ihd, q)),
                (a + "indexer.weights_proj.weight", (ih, d))]
        out += _compressor(a + "indexer.compressor.", d, ihd, ratio)
    f, e, i = p + "ffn.", cfg.n_routed_experts, cfg.moe_inter_dim
    out += [(f + "gate.weight", (e, d))] + ([] if hashed else [(f + "gate.bias", (e,))])
    out += [(f + f"experts.{w}", s) for w, s in (("w1", (e, i, d)), ("w3", (e, i, d)),
                                                    ("w2", (e, d, i)))]
    out += [(f + f"shared_experts.{w}.weight", s) for w, s in (("w1", (i, d)), ("w3", (i, d)),
                                                                  ("w2", (d, i)))]
    return out


def _compressor(p: str, d: int, width: int, ratio: int) -> list[tuple[str, tuple[int, ...]]]:
    out_dim = width * (2 if ratio == 4 else 1)  # CSA's overlapping compressor emits two halves
    return [(p + "ape", (ratio, out_dim)), (p + "wkv.weight", (out_dim, d)),
            (p + "wgate.weight", (out_dim, d)), (p + "norm.weight", (width,))]


_FP8 = ("attn.wq_a.", "attn.wq_b.", "attn.wkv.", "attn.wo_a.", "attn.wo_b.", "indexer.wq_b.",
        "shared_experts.", "e_proj.", "h_proj.")
_FP32 = ("hc_", "attn_sink", ".ape", "gate.bias")


def checkpoint_bytes_per_param(name: str) -> float:
    """Stored bytes per parameter in the released checkpoint (v4-architecture.md §2.2)."""
    if ".experts.w" in name:
        return FP4
    if any(s in name for s in _FP8):
        return 1.0
    if any(s in name for s in _FP32):
        return 4.0
    return 2.0


@dataclass
class Plan:
    """Everything `format_plan` prints; bytes are per rank unless named otherwise."""

    model: str
    mesh: Mesh
    gpu: GPU
    world: int
    folded: bool
    context: int
    weights: dict[str, float] = field(default_factory=dict)  # group -> bytes per rank
    kv_per_seq: float = 0.0  # bytes per sequence at `context`, on each rank holding it
    comm: dict[str, float] = field(default_factory=dict)  # per decode token per layer, per rank
    comm_prefill: dict[str, float] = field(default_factory=dict)  # per prefill token per layer
    comm_once: dict[str, float] = field(default_factory=dict)  # per token, once (not per layer)
    decode_ms: dict[int, float] = field(default_factory=dict)  # sequences -> ms/token
    fits: dict[int, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> float:
        return sum(self.weights.values())


def _group(name: str) -> str:
    if ".experts.w" in name:
        return "routed experts"
    if "shared_experts" in name:
        return "shared experts"
    if ".attn." in name:
        return "attention"
    if name == "embed.weight":
        return "embedding"
    if name == "head.weight":
        return "head"
    return "mHC, norms, gate"


def weight_bytes(cfg: Config, sizes: dict[str, int]) -> dict[str, float]:
    """Group -> checkpoint bytes one rank holds under the mesh's default placement rules
    (MTP included, since serving with speculative decoding keeps it; tid2eid tables included)."""
    rules = rules_for_mesh(sizes, moe="all_reduce" if sizes.get("dp", 1) == 1 else "dispatch")
    out: dict[str, float] = {}
    for name, shape in param_specs(cfg):
        n = math.prod(shape)
        for axis, pl in placement_of(name, rules).items():
            if isinstance(pl, Shard):
                n /= sizes[axis]
        g = _group(name)
        out[g] = out.get(g, 0.0) + n * checkpoint_bytes_per_param(name)
    out["mHC, norms, gate"] += cfg.n_hash_layers * cfg.vocab_size * cfg.n_activated_experts * 8
    return out


def kv_bytes_per_token(cfg: Config) -> float:
    """FP8 KV layout (FlashMLA "MODEL1"): an entry = NoPE fp8 + RoPE bf16 + 8 scale bytes;
    CSA adds an FP4 indexer key per compressed entry; entries per token = 1/ratio."""
    entry = (cfg.head_dim - cfg.rope_head_dim) + 2 * cfg.rope_head_dim + 8
    idx_key = cfg.index_head_dim * FP4
    total = 0.0
    for r in cfg.compress_ratios[: cfg.n_layers]:
        if r:
            total += (entry + (idx_key if r == 4 else 0)) / r
    return total


def _window_bytes(cfg: Config) -> float:
    entry = (cfg.head_dim - cfg.rope_head_dim) + 2 * cfg.rope_head_dim + 8
    return cfg.window_size * entry * (cfg.n_layers + cfg.n_mtp_layers)


def _remote_ranks(cfg: Config, ranks: int, per_expert: bool) -> float:
    """Expected remote destinations of a token under uniform top-k routing: one copy per rank
    (normal mode) or one per expert (low-latency mode)."""
    e, k = cfg.n_routed_experts, cfg.n_activated_experts
    if ranks <= 1:
        return 0.0
    if per_expert:
        return k * (ranks - 1) / ranks
    miss = math.comb(e - e // ranks, k) / math.comb(e, k)
    return (ranks - 1) * (1 - miss)


def comm_per_token(
    cfg: Config, sizes: dict[str, int], world: int, decode: bool
) -> dict[str, float]:
    """Bytes one rank sends per token per layer: the TP all_reduces ([d] bf16 after wo_b and after
    the MoE when tokens are replicated) and the EP exchange (FP8 dispatch with scales and routing,
    bf16 combine) — one copy per expert in decode (low-latency mode), one per rank in prefill."""
    d, tp, ep = cfg.dim, sizes.get("tp", 1), sizes.get("ep", 1)
    ring = 2 * (tp - 1) / tp * 2 * d
    out = {"attention all_reduce (tp)": ring}
    experts = ep if ep > 1 else tp  # no ep axis: experts split over tp (the reference layout)
    if experts > 1 and sizes.get("dp", 1) == 1:  # tokens replicated: local experts + all_reduce
        out["MoE all_reduce (experts)"] = 2 * (experts - 1) / experts * 2 * d
    elif ep > 1:
        dispatch = d + 4 * d / 128 + 8 * cfg.n_activated_experts
        m = _remote_ranks(cfg, ep, per_expert=decode)
        out["MoE dispatch (ep)"] = m * dispatch / tp
        out["MoE combine (ep)"] = m * 2 * d / tp
    return out


def comm_once_per_token(cfg: Config, sizes: dict[str, int]) -> dict[str, float]:
    """Bytes one rank sends per token outside the layers, under tp: the vocabulary-parallel
    embedding's all_reduce ([d] bf16, ring) and the head's all_gather of fp32 logits."""
    tp = sizes.get("tp", 1)
    if tp == 1:
        return {}
    return {"embedding all_reduce (tp)": 2 * (tp - 1) / tp * 2 * cfg.dim,
            "head all_gather (tp)": (tp - 1) / tp * cfg.vocab_size * 4}


def make_plan(model: str, mesh: Mesh, gpu: str, *, gpus: int | None = None,
              context: int = 1 << 20, batches: tuple[int, ...] = (1, 64)) -> Plan:
    """Arithmetic for `model` on `mesh` of `gpu`s (see module docstring for `gpus`)."""
    cfg = Config.preset(model)
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r} unknown; expected one of {sorted(GPUS)}")
    sizes = mesh.to_json()
    world, folded = _world(mesh, gpus)
    plan = Plan(model, mesh, GPUS[gpu], world, folded, context)
    moe = "all_reduce" if sizes.get("dp", 1) == 1 else "dispatch"  # as weight_bytes assumes
    check_divisible(cfg, sizes, moe=moe, model=model)
    plan.weights = weight_bytes(cfg, sizes)
    plan.kv_per_seq = kv_bytes_per_token(cfg) * context + _window_bytes(cfg)
    plan.comm = comm_per_token(cfg, sizes, world, decode=True)
    plan.comm_prefill = comm_per_token(cfg, sizes, world, decode=False)
    plan.comm_once = comm_once_per_token(cfg, sizes)
    for b in batches:
        plan.decode_ms[b], plan.fits[b] = _decode(cfg, plan, sizes, b)
    return plan


def _world(mesh: Mesh, gpus: int | None) -> tuple[int, bool]:
    if gpus is None or gpus == mesh.world_size:
        return mesh.world_size, False
    attn = mesh.size("dp") * mesh.size("tp")
    if gpus == attn and mesh.size("ep") == attn:
        return gpus, True
    raise ValueError(
        f"--gpus {gpus} does not fit mesh {mesh}: use the product ({mesh.world_size}), or fold ep "
        f"onto the dp x tp ranks with ep = dp*tp = {attn} and --gpus {attn}"
    )


def check_divisible(cfg: Config, sizes: dict[str, int], *, moe: str = "all_reduce",
                    model: str = "the model") -> None:
    """Raise ValueError when a mesh axis does not divide what the default placement rules split
    over it, naming the axis, the config field, why it is split and the sizes that work."""
    tp, ep = sizes.get("tp", 1), sizes.get("ep", 1)
    needs: list[tuple[str, int, str, int, str]] = []  # axis, size, field, value, why
    if tp > 1:
        needs += [("tp", tp, "o_groups", cfg.o_groups, "whole output groups per rank"),
                  ("tp", tp, "n_heads", cfg.n_heads, "query heads are split over tp"),
                  ("tp", tp, "vocab_size", cfg.vocab_size, "vocabulary-parallel embedding/head")]
    axis = "ep" if ep > 1 else "tp" if tp > 1 else None
    if axis:
        size = sizes[axis]
        needs.append((axis, size, "n_routed_experts", cfg.n_routed_experts, "experts per rank"))
        if moe == "all_reduce":
            needs.append((axis, size, "moe_inter_dim", cfg.moe_inter_dim,
                           "the shared expert's hidden units are split with --moe all_reduce"))
    for name, size, field_, value, why in needs:
        if value % size:
            ok = [d for d in range(1, value + 1)
                  if all(v % d == 0 for a, _, _, v, _ in needs if a == name)]
            raise ValueError(
                f"{name}={size} must divide {field_}={value} of {model} ({why}); "
                f"{name} can be {', '.join(map(str, ok[:8]))}{' ...' if len(ok) > 8 else ''}"
            )
    rules = rules_for_mesh(sizes, moe=moe)
    for pname, shape in param_specs(cfg):  # anything else a rule splits
        for a, pl in placement_of(pname, rules).items():
            if isinstance(pl, Shard) and shape[pl.dim] % sizes[a]:
                raise ValueError(f"{a}={sizes[a]} must divide dim {pl.dim} ({shape[pl.dim]}) "
                                 f"of parameter {pname} of {model}; pick another {a} size")


def _decode(cfg: Config, plan: Plan, sizes: dict[str, int], seqs: int) -> tuple[float, bool]:
    """ms per decode step with `seqs` sequences at `plan.context`, and whether it fits."""
    dp, ep, layers = sizes.get("dp", 1), sizes.get("ep", 1), cfg.n_layers
    local_seqs = math.ceil(seqs / dp)  # DP attention: each replica holds its own sequences
    routed = plan.weights["routed experts"]
    e, k = cfg.n_routed_experts, cfg.n_activated_experts
    touched = 1 - (1 - k / e) ** seqs  # share of a rank's experts some token picks
    # every weight is read once per step except unpicked experts and the embedding (one row/token)
    dense = plan.weight_bytes - routed - plan.weights["embedding"]
    hbm = dense + routed * touched + local_seqs * _kv_read(cfg, plan.context)
    flops = 2 * activated_params(cfg) * seqs / plan.world
    compute = max(hbm / plan.gpu.hbm_bw, flops / plan.gpu.fp8_flops)
    per_token = sum(plan.comm.values()) * layers + sum(plan.comm_once.values())
    comm_t = local_seqs * per_token * _link_time(plan, max(ep, sizes.get("tp", 1)))
    fits = plan.weight_bytes + local_seqs * plan.kv_per_seq <= (1 - RESERVE) * plan.gpu.hbm_bytes
    return 1e3 * (compute + comm_t), fits


def activated_params(cfg: Config) -> float:
    """Parameters one token uses (main model, embedding excluded: count_params' convention)."""
    n = 0.0
    for name, shape in param_specs(cfg):
        if name.startswith("mtp.") or name == "embed.weight":
            continue
        share = cfg.n_activated_experts / cfg.n_routed_experts if ".experts.w" in name else 1
        n += math.prod(shape) * share
    return n


def _kv_read(cfg: Config, ctx: int) -> float:
    """KV bytes one decode step reads per sequence: windows, CSA top-k entries plus every
    indexer key, HCA every compressed entry."""
    entry = (cfg.head_dim - cfg.rope_head_dim) + 2 * cfg.rope_head_dim + 8
    total = _window_bytes(cfg)
    for r in cfg.compress_ratios[: cfg.n_layers]:
        if r == 4:
            total += min(cfg.index_topk, ctx // 4) * entry + ctx / 4 * cfg.index_head_dim * FP4
        elif r:
            total += ctx / r * entry
    return total


def _link_time(plan: Plan, ranks: int) -> float:
    """Seconds per byte sent to peers spread over `ranks`: NVLink inside a node, the network for
    the share of peers in other nodes."""
    node = plan.gpu.per_node
    if ranks <= node:
        return 1 / plan.gpu.link_bw
    remote = (ranks - node) / (ranks - 1)
    return (1 - remote) / plan.gpu.link_bw + remote / plan.gpu.net_bw


def format_plan(plan: Plan) -> str:
    """The tables `dsv4c plan` prints."""
    g = plan.gpu
    fold = " (ep folded onto the dp x tp ranks)" if plan.folded else ""
    lines = [f"{plan.model} on {plan.world} x {g.name}, mesh {plan.mesh}{fold}", "",
             "weights per rank (checkpoint precision)          GB"]
    for name, b in sorted(plan.weights.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<46} {b / GB:8.2f}")
    total = plan.weight_bytes / GB
    lines.append(f"  {'total':<46} {total:8.2f}   of {g.hbm_bytes / GB:.0f} GB HBM")
    free = (1 - RESERVE) * g.hbm_bytes - plan.weight_bytes
    lines += ["", f"KV cache, one sequence at {plan.context:,} tokens (FP8 layout): "
              f"{plan.kv_per_seq / GIB:.2f} GiB per rank holding it"
              + (" (replicated on every tp rank)" if plan.mesh.size("tp") > 1 else "")]
    seqs = max(0, math.floor(free / plan.kv_per_seq)) * plan.mesh.size("dp") if free > 0 else 0
    lines.append(f"  left after weights and a {RESERVE:.0%} reserve: {free / GB:.1f} GB -> "
                 f"{seqs} sequence(s) at this context")
    lines += ["", "communication per token per layer, bytes one rank sends      decode    prefill"]
    for name, b in plan.comm.items():
        lines.append(f"  {name:<56} {b:10,.0f} {plan.comm_prefill[name]:10,.0f}")
    for name, b in plan.comm_once.items():
        lines.append(f"  {name + ', once per token':<56} {b:10,.0f} {b:10,.0f}")
    lines += ["", "decode estimate (roofline floor: HBM + links, no overlap)"]
    for b, ms in plan.decode_ms.items():
        verdict = "fits" if plan.fits[b] else "DOES NOT FIT"
        lines.append(f"  {b:>3} sequence(s): {ms:8.2f} ms/token   {verdict}")
    if free <= 0:
        lines.append(f"verdict: DOES NOT FIT — weights alone need {total:.1f} GB per rank; "
                     f"{g.name} has {g.hbm_bytes / GB:.0f} GB. Use more GPUs or shard more.")
    else:
        lines.append(f"verdict: weights fit, {free / GB:.1f} GB per rank left for KV")
    lines += ["", f"source: {g.source}"]
    return "\n".join(lines)


def plan_to_json(plan: Plan) -> dict:
    """The plan as plain JSON (bytes and ms; the GPU's figures and source)."""
    return {
        "model": plan.model, "mesh": plan.mesh.to_json(), "gpu": plan.gpu.name,
        "world": plan.world, "ep_folded": plan.folded, "context": plan.context,
        "weights_bytes_per_rank": plan.weights, "weight_bytes_per_rank": plan.weight_bytes,
        "kv_bytes_per_sequence": plan.kv_per_seq,
        "comm_bytes_per_decode_token_per_layer": plan.comm,
        "comm_bytes_per_prefill_token_per_layer": plan.comm_prefill,
        "comm_bytes_per_token_once": plan.comm_once,
        "decode_ms_per_token": {str(b): ms for b, ms in plan.decode_ms.items()},
        "fits": {str(b): ok for b, ok in plan.fits.items()}, "gpu_source": plan.gpu.source,
    }


def add_parser(sub) -> None:
    """Register `dsv4c plan` on the CLI's subparsers."""
    p = sub.add_parser("plan", help="per-rank memory, communication and decode estimate of a mesh")
    p.add_argument("--model", required=True, help="model preset: v4-flash, v4-pro, tiny, ...")
    p.add_argument("--mesh", default="tp=1", help="axis=size pairs, e.g. tp=8,ep=8")
    p.add_argument("--gpu", default="h200", help=f"one of {', '.join(GPUS)}")
    p.add_argument("--gpus", type=int, help="GPUs in all (default: the mesh's product; dp*tp "
                   "folds ep onto the attention ranks)")
    p.add_argument("--context", type=int, default=1 << 20, help="tokens per sequence (1M)")
    p.add_argument("--json", help="also write the plan as JSON to this file")
    p.set_defaults(fn=cmd_plan)


def cmd_plan(args) -> int:
    plan = make_plan(args.model, Mesh.parse(args.mesh), args.gpu.lower(), gpus=args.gpus,
                     context=args.context)
    print(format_plan(plan))
    if args.json:
        import json
        import os
        import tempfile

        folder = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump(plan_to_json(plan), f, indent=1)
        os.replace(f.name, args.json)  # atomic: readers never see half a file
    return 0 if all(plan.fits.values()) else 2
