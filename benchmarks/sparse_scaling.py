"""Sparse-attention scaling: one attention layer's DECODE step for the three variants (CSA, DSA,
NSA; `Config.attention`) at growing context, side by side — time per query and bytes read per
query — to show that each stays linear (or better) in the context length L.

    .venv/bin/python benchmarks/sparse_scaling.py                     # L = 4K, 16K, 64K
    .venv/bin/python benchmarks/sparse_scaling.py --lengths 256 512 1024 --repeat 2

Per variant and L: the layer (models/attention.py ratio-4 CSA, attention_dsa.py, attention_nsa.py
at the geometry of `GEOMETRY`, d_model 256, fp32) gets a cache of max_len = L tokens (random
values: a step's work does not depend on them) and one query at position L − 1, batch 1. It is
captured (`frontend.capture`, method "decode"; batch symbolic, NSA's static: STATIC_BATCH), run
through `passes.pipeline` (which forms the semantic ops: CSA attn.compress_step +
attn.indexer_topk + attn.sparse_mqa; DSA attn.indexer_topk + indexed attn.sdpa; NSA three
attn.sdpa + attn.block_select) and compiled by the TVM backend for this CPU (llvm). The compiled
step is checked once against eager `layer.decode` (functional call), then timed in place
(`inplace=True`: cache rows written into the caller's tensors, as a serving loop would) beside
eager PyTorch (functional: it copies every cache it updates, so its time includes O(L) copies
the compiled step does not make).

Timing: one untimed warm-up round, then `repeat` rounds; each round calls every (L, backend)
of the variant once in turn, so load on a shared machine falls on every length alike. Median
and min per row, and a per-op profile of the compiled step (each op's least time over 5 calls;
`tvm_attn_ops_s` sums the attn.* ops: the semantic ops without the step's fixed cost of ~100
launches and views, but with the copies their launches make of non-contiguous operands).
Ratios 16K/4K and 64K/16K of the times and of the bytes (benchmarks/sparse_bytes.py: analytic
key/value bytes per op, checked against the cost model). The verdict per variant says
which ops read O(L) rows per query (the indexer's keys; NSA's compressed blocks) and which O(1)
(the attention over the picks, the window), and whether time grew at most linearly.

Prefill is not measured: the models prefill from position 0 only (no chunk at an offset), and a
64K prefill is quadratic by design for the DSA indexer (a [64K, 64K] fp32 score matrix, 16 GiB,
in eager).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks.sparse_bytes import GROWS, ORDER, analytic, compare, cost_model, op_label
from models.config import Config

VARIANTS = ("csa", "dsa", "nsa")
DIM = 256
# Per-variant layer geometry: the sparse parameters of the published designs (V4's window 128,
# ratio 4, top-512 of 16 index heads x 128; V3.2's top-2048 tokens; the NSA paper's l 32, d 16,
# l' 64, n 16, w 512, dk 192, dv 128), with 8 query heads on d_model 256 so that 64K caches stay
# small. DSA's latent is V3.2's 512 (+ 64 RoPE: 576-wide key rows, values the first 512).
_COMMON: dict[str, Any] = {
    "dim": DIM, "n_heads": 8, "q_lora_rank": 128, "o_lora_rank": 128, "rope_head_dim": 64,
    "index_n_heads": 16, "index_head_dim": 128,
}  # fmt: skip
GEOMETRY: dict[str, dict[str, Any]] = {
    "csa": {"head_dim": 512, "o_groups": 2, "window_size": 128, "index_topk": 512},
    "dsa": {"head_dim": 192, "kv_lora_rank": 512, "v_head_dim": 128, "index_topk": 2048},
    "nsa": {"head_dim": 192, "v_head_dim": 128, "n_kv_heads": 2, "window_size": 512,
            "nsa_cmp_block": 32, "nsa_cmp_stride": 16, "nsa_slc_block": 64, "nsa_slc_topn": 16},
}  # fmt: skip
BASE = {"csa": "tiny", "dsa": "tiny-dsa", "nsa": "tiny-nsa"}
CHECK_RTOL = 1e-4  # compiled vs eager, max |diff| / max |eager|


def config(variant: str, max_len: int) -> Config:
    """The benchmark geometry of `variant` on its tiny preset (other fields do not matter to
    one attention layer)."""
    return Config.preset(BASE[variant]).replace(**_COMMON, **GEOMETRY[variant], max_seq_len=max_len)


def make_layer(variant: str, cfg: Config, seed: int = 0) -> nn.Module:
    """One attention layer of the variant (CSA: a ratio-4 layer with its indexer)."""
    from models.attention import Attention
    from models.attention_dsa import DSAttention
    from models.attention_nsa import NSAttention

    torch.manual_seed(seed)
    layer = {"csa": lambda: Attention(cfg, 4), "dsa": lambda: DSAttention(cfg),
             "nsa": lambda: NSAttention(cfg)}[variant]()  # fmt: skip
    return layer.eval()


def decode_args(layer: nn.Module, cfg: Config, length: int, batch: int, seed: int) -> tuple:
    """(x [batch,1,d], pos = length − 1, cache of max_len = length with random rows)."""
    gen = torch.Generator().manual_seed(seed)
    cache = layer.init_cache(batch, length, torch.float32, torch.device("cpu"))
    cache = {k: torch.randn(v.shape, generator=gen) for k, v in cache.items()}
    x = torch.randn(batch, 1, cfg.dim, generator=gen)
    return x, torch.tensor(length - 1), cache


# Captured with a static batch of 1 (else symbolic B from an example of 2). Each is what the
# passes fuse today: fuse_nsa checks the slc branch's masks at static sizes only ("keys.batch:
# symbolic shape"). (CSA's sparse_mqa now forms at a static batch of 1 too, commit 430a870;
# CSA and DSA stay symbolic here so the figures compare with the earlier runs.)
STATIC_BATCH = ("nsa",)


def compile_decode(
    variant: str, layer: nn.Module, cfg: Config, length: int
) -> tuple[Any, Any, float]:
    """(graph after the pipeline, TVM executable, seconds) for the decode step at `length`."""
    import passes
    from backends.tvm import TVMBackend
    from frontend import capture

    start = time.perf_counter()
    if variant in STATIC_BATCH:
        example, dynamic = decode_args(layer, cfg, length, 1, seed=1), None
    else:
        example = decode_args(layer, cfg, length, 2, seed=1)
        dynamic = {"x": {0: "B"}, "cache": {0: "B"}}
    g = passes.pipeline(capture(layer, example, method="decode", dynamic=dynamic))
    exe = TVMBackend().compile(g, "cpu")
    return g, exe, time.perf_counter() - start


def semantic_ops(g: Any, exe: Any) -> dict[str, Any]:
    """The attention ops the pipeline formed and whether each ran as a TVM kernel."""
    formed: dict[str, int] = {}
    for n in g.ops:
        if n.name.startswith("attn."):
            formed[n.name] = formed.get(n.name, 0) + 1
    fallen = sorted({f[0] for f in exe.fallbacks() if f[0].startswith("attn.")})
    other = sorted({f"{f[0]}: {f[1]}" for f in exe.fallbacks() if "no tvm emitter" not in f[1]})
    return {"formed": formed, "attn_fallbacks": fallen, "other_fallbacks": other}


class Case:
    """One (variant, L): the compiled step and eager, on the same layer and inputs."""

    def __init__(self, variant: str, length: int, seed: int) -> None:
        self.variant, self.length = variant, length
        self.cfg = config(variant, length)
        self.layer = make_layer(variant, self.cfg, seed)
        self.params = self.layer.state_dict()
        self.graph, self.exe, self.compile_s = compile_decode(variant, self.layer, self.cfg, length)
        self.x, self.pos, self.cache = decode_args(self.layer, self.cfg, length, 1, seed + 2)
        self.own = {k: v.clone() for k, v in self.cache.items()}  # the in-place calls' cache

    def check(self) -> dict[str, Any]:
        """Compiled (functional) vs eager on the first call, before any in-place write."""
        with torch.no_grad():
            want, _ = self.layer.decode(self.x, self.pos, self.cache)
            got = self.exe(self.x, self.pos, *self.cache.values(), params=self.params)[0]
        err = ((got - want).abs().max() / want.abs().max()).item()
        return {"max_rel_err": err, "ok": err <= CHECK_RTOL}

    def tvm(self) -> None:
        self.exe(self.x, self.pos, *self.own.values(), params=self.params, inplace=True)

    def eager(self) -> None:
        self.layer.decode(self.x, self.pos, self.cache)

    def profile(self, calls: int = 5) -> dict[str, float]:
        """Seconds per op of the compiled step, by op (NSA's three attn.sdpa apart: sparse_bytes
        labels; "(reference)": not a TVM kernel), largest first: each op's least time over
        `calls` in-place calls, so that a load burst in one call does not move an op up."""
        feed, env = self.exe.inputs.feed((self.x, self.pos, *self.own.values()), self.params)
        plan = self.exe.plan(env, inplace=True)
        window = self.cfg.window_size
        best: dict[str, float] = {}
        for _ in range(calls):
            spent: dict[str, float] = {}
            steps = self.exe.steps
            timed = plan.wrapped(lambda i, c: _timer(c, _step_label(steps[i], window), spent))
            with torch.no_grad():
                timed.run(feed)
            best = {k: min(best.get(k, v), v) for k, v in spent.items()}
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        return {op: round(sec, 6) for op, sec in ranked}


def _step_label(step: Any, window: int) -> str:
    return op_label(step.node, window) + ("" if step.launch is not None else " (reference)")


def _timer(call: Any, label: str, spent: dict[str, float]) -> Any:
    """`call`, adding its seconds to spent[label]."""

    def run(inputs: Any) -> Any:
        start = time.perf_counter()
        out = call(inputs)
        spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
        return out

    return run


def time_rounds(cases: list[Case], repeat: int) -> dict[tuple[int, str], list[float]]:
    """Seconds per call of every (L, backend): a warm-up round, then `repeat` interleaved."""
    times: dict[tuple[int, str], list[float]] = {}
    with torch.no_grad():
        for rnd in range(repeat + 1):
            for case in cases:
                for name in ("tvm", "eager"):
                    start = time.perf_counter()
                    getattr(case, name)()
                    if rnd:
                        times.setdefault((case.length, name), []).append(
                            time.perf_counter() - start
                        )
    return times


def _stats(times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    return {"median_s": ordered[len(ordered) // 2], "min_s": ordered[0], "times_s": times}


def run_variant(variant: str, lengths: list[int], repeat: int, seed: int) -> list[dict]:
    """Rows of one variant, one per length (compile, check, bytes, interleaved times)."""
    cases = []
    for length in lengths:
        case = Case(variant, length, seed)
        print(f"{variant} L={length:,}: compiled in {case.compile_s:.1f} s", flush=True)
        cases.append(case)
    times = time_rounds(cases, repeat)
    rows = []
    for case in cases:
        window = case.cfg.window_size
        profile = case.profile()
        want = analytic(variant, case.cfg, case.length)
        model = cost_model(case.graph, window)
        rows.append({
            "variant": variant, "L": case.length, "compile_s": round(case.compile_s, 2),
            "check": case.check(), "ops": semantic_ops(case.graph, case.exe),
            "tvm": _stats(times[case.length, "tvm"]), "tvm_profile_s": profile,
            "tvm_attn_ops_s": sum(v for k, v in profile.items() if k.startswith("attn.")),
            "eager": _stats(times[case.length, "eager"]),
            "bytes": {"per_op": want, "total": sum(want.values()),
                      "grows": sum(v for k, v in want.items() if k in GROWS[variant])},
            "cost_model": model, "cost_vs_analytic": compare(want, model["per_op"]),
            "cache": cache_traffic(case),
        })  # fmt: skip
        print(_row_text(rows[-1]), flush=True)
    return rows


def cache_traffic(case: Case) -> dict[str, int]:
    """The layer's cache at L (bytes), and what the compiled step's cache updates move per
    call in place vs functional (`passes.memory_plan.update_bytes`; eager PyTorch's decode is
    functional: it copies each cache it updates, read and written whole)."""
    from passes.memory_plan import update_bytes

    moved = update_bytes(case.graph, {"B": 1})
    total = sum(v.nbytes for v in case.cache.values())
    return {"cache_bytes": total, "aliased_outputs": len(case.graph.aliases), **moved}


def ratios(rows: list[dict]) -> list[dict]:
    """Consecutive-length ratios of one variant's rows (sorted by L)."""
    out = []
    for a, b in zip(rows, rows[1:]):
        out.append({
            "from": a["L"], "to": b["L"], "length": b["L"] / a["L"],
            "tvm_median": b["tvm"]["median_s"] / a["tvm"]["median_s"],
            "tvm_min": b["tvm"]["min_s"] / a["tvm"]["min_s"],
            "tvm_attn_ops": b["tvm_attn_ops_s"] / a["tvm_attn_ops_s"],
            "eager_median": b["eager"]["median_s"] / a["eager"]["median_s"],
            "eager_min": b["eager"]["min_s"] / a["eager"]["min_s"],
            "bytes": b["bytes"]["total"] / a["bytes"]["total"],
            "bytes_per_op": {k: b["bytes"]["per_op"][k] / v
                             for k, v in a["bytes"]["per_op"].items() if v},
        })  # fmt: skip
    return out


def verdict(variant: str, rows: list[dict], steps: list[dict]) -> dict[str, Any]:
    """What grows with L and what does not, and whether time stayed within linear: the whole
    step's min time (the least disturbed by load) and the attention ops' profiled time; 1.25x
    slack for noise."""
    grows = list(GROWS[variant])
    flat = [k for k in ORDER[variant] if k not in grows]
    linear = all(s["tvm_min"] <= 1.25 * s["length"] for s in steps)
    ops_linear = all(s["tvm_attn_ops"] <= 1.25 * s["length"] for s in steps)
    return {
        "grows_with_L": grows, "constant_in_L": flat, "tvm_time_within_linear": linear,
        "tvm_attn_ops_within_linear": ops_linear,
        "o_l_share_of_bytes_at_max_L": rows[-1]["bytes"]["grows"] / rows[-1]["bytes"]["total"],
    }  # fmt: skip


def machine(start_load: tuple[float, ...]) -> dict[str, Any]:
    keys = ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "MKL_NUM_THREADS")
    return {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in keys},
        "loadavg_start": start_load, "loadavg_end": os.getloadavg(),
        "shared": "shared 2-core box, other engineers' jobs running: absolute times are loaded; "
                  "compare within a round (interleaved) and prefer min times",
    }  # fmt: skip


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _mb(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def _row_text(r: dict) -> str:
    return (
        f"{r['variant']} L {r['L']:>7,}  tvm {r['tvm']['median_s'] * 1e3:8.2f} ms (min "
        f"{r['tvm']['min_s'] * 1e3:7.2f})  eager {r['eager']['median_s'] * 1e3:8.2f} ms (min "
        f"{r['eager']['min_s'] * 1e3:7.2f})  read {_mb(r['bytes']['total'])} "
        f"(O(L) {_mb(r['bytes']['grows'])})  check {r['check']['max_rel_err']:.1e}"
    )


def table(doc: dict) -> str:
    """Markdown: variant x L (time per query, bytes), then the ratios."""
    lines = ["| variant | L | TVM median (min) ms | TVM attn ops ms | eager median (min) ms | "
             "KV read MiB (O(L) part) | cost model attn MiB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in doc["variants"].values():
        for r in v["rows"]:
            attn = sum(r["cost_model"]["per_op"].values())
            lines.append(
                f"| {r['variant']} | {r['L']:,} | {r['tvm']['median_s'] * 1e3:.2f} "
                f"({r['tvm']['min_s'] * 1e3:.2f}) | {r['tvm_attn_ops_s'] * 1e3:.2f} | "
                f"{r['eager']['median_s'] * 1e3:.2f} "
                f"({r['eager']['min_s'] * 1e3:.2f}) | {r['bytes']['total'] / 2**20:.2f} "
                f"({r['bytes']['grows'] / 2**20:.2f}) | {attn / 2**20:.2f} |"
            )
    lines += ["", "| variant | step | L ratio | TVM median / min | TVM attn ops | "
              "eager median / min | bytes |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in doc["variants"].items():
        for s in v["ratios"]:
            lines.append(
                f"| {name} | {_k(s['to'])}/{_k(s['from'])} | {s['length']:.0f} | "
                f"{s['tvm_median']:.2f} / {s['tvm_min']:.2f} | {s['tvm_attn_ops']:.2f} | "
                f"{s['eager_median']:.2f} / "
                f"{s['eager_min']:.2f} | {s['bytes']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="benchmarks/results/sparse_scaling.json")
    args = ap.parse_args(argv)
    lengths = sorted(set(args.lengths))
    if lengths[0] < 64:
        ap.error(f"--lengths: {lengths[0]} is too short (>= 64: NSA needs a compressed block)")
    load = os.getloadavg()
    doc: dict[str, Any] = {"benchmark": "sparse_scaling", "workload": "decode, batch 1, fp32",
                           "lengths": lengths, "repeat": args.repeat,
                           "geometry": {v: {**_COMMON, **GEOMETRY[v]} for v in args.variants},
                           "variants": {}}  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        rows = run_variant(variant, lengths, args.repeat, args.seed)
        steps = ratios(rows)
        doc["variants"][variant] = {
            "rows": rows, "ratios": steps, "verdict": verdict(variant, rows, steps)
        }
        doc["machine"] = machine(load)
        out.write_text(json.dumps(doc, indent=1))  # after every variant: a crash keeps the rest
    print(table(doc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
