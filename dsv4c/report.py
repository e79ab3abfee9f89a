"""`report.json` of an artifact: compile time per phase, the fusion summary (captured ops ->
kernel launches, per fusion), a picture of one layer before and after fusion, per-kernel
flops/bytes against the target's roofline, the memory plan and the AOT metadata of each kernel.
`dsv4c report DIR` renders it as HTML (report_html.py); `--compare OTHER` puts another
backend's artifact for the same target side by side (`compare_backends`, `compare_kernels`).

Kernel costs come from `passes.cost.backend_cost`, evaluated at the entry point's bindings (the
example inputs' sizes unless the compile said otherwise) for each backend's own kernels: the
kernel op's traffic plus what the kernel's `CostHints` add (a TVM GPU kernel's stages passing
intermediates through device memory, the GEMM tile of either backend).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import ir
from backends.base import CostHints, Executable, KernelRecord
from backends.targets import Target

__all__ = [
    "aot_rows", "build_report", "code_summary", "compare_backends", "compare_kernels", "cost_hints",
    "dynamo_report", "entry_report", "kernel_rows", "pipeline_summary",
]  # fmt: skip


def _kernel_names(g: ir.Graph, records: Sequence[KernelRecord]) -> dict[int, tuple[str, str]]:
    """id(node) -> (kernel name, key) of the op's (first) kernel, from the records' sites."""
    out: dict[int, tuple[str, str]] = {}
    for k in records:
        for i in k.sites:
            out.setdefault(id(g.ops[i]), (k.name, k.key))
    return out


def kernel_rows(
    g: ir.Graph, records: Sequence[KernelRecord], env: Mapping[str, int], tgt: Target
) -> list[dict]:
    """One row per distinct kernel: name, ops, uses, the summed flops/bytes of its launches and
    their roofline time, with the registers, shared memory and spills of its largest compiled
    variant when known. Costs are the backend's own (`passes.cost.backend_cost` with the
    record's `CostHints`): its device functions (`launches`), intermediates through device
    memory and GEMM tiles. `sites` are the graph op indices it runs for, `site_s` the roofline
    time of each (the side-by-side comparison pairs kernels by site)."""
    from passes.cost import is_free
    from passes.structural_hash import op_signature

    names = _kernel_names(g, records)
    by_key = {k.key: k for k in records}
    rows: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(g.ops):
        if is_free(node):
            continue
        name, key = names.get(id(node)) or (node.name, op_signature(node))
        record = by_key.get(key)
        hints = cost_hints(record)
        row = rows.setdefault(key, _new_row(name, key, node, id(node) in names, hints))
        row["uses"] += 1
        row["launches"] += hints.launches
        flops, nbytes = _site_cost(node, env, hints, row)
        row["flops"] = None if flops is None or row["flops"] is None else row["flops"] + flops
        row["bytes"] = None if nbytes is None or row["bytes"] is None else row["bytes"] + nbytes
        row["sites"].append(i)
        row["site_s"].append(_seconds(flops, nbytes, tgt))
    out = list(rows.values())
    for row in out:
        _roofline(row, tgt)
        row |= _resources(by_key.get(row["key"]))
    return sorted(out, key=lambda r: -(r["roofline_s"] or 0.0))


def _new_row(name: str, key: str, node: ir.Node, kernel: bool, hints: CostHints) -> dict:
    return {
        "name": name,
        "key": key,
        "op": node.name,
        "runs": "kernel" if kernel else "reference",
        "uses": 0,
        "launches": 0,
        "flops": 0,
        "bytes": 0,
        "gemm_tile": list(hints.gemm_tile) if hints.gemm_tile else None,
        "sites": [],
        "site_s": [],
    }


def cost_hints(record: KernelRecord | None) -> CostHints:
    """The record's `CostHints`; a kernel fusing a matmul whose compiled variants have
    BLOCK_M x BLOCK_N tiles (Triton's GEMM template) gets its first variant's as the GEMM
    tile."""
    if record is None:
        return CostHints()
    if record.cost.gemm_tile is not None or "matmul" not in record.fused_ops:
        return record.cost
    for b in record.binaries:
        if b.error is None and "BLOCK_M" in b.tiles and "BLOCK_N" in b.tiles:
            tile = (int(b.tiles["BLOCK_M"]), int(b.tiles["BLOCK_N"]))
            return replace(record.cost, gemm_tile=tile)
    return record.cost


def _site_cost(
    node: ir.Node, env: Mapping[str, int], hints: CostHints, row: dict[str, Any]
) -> tuple[int | None, int | None]:
    """One call's (flops, bytes); the kernel op's own cost, noted in `row["cost_note"]`, when
    the hints name a dim the bindings leave unknown; (None, None) when the op's do."""
    from passes.cost import backend_cost

    try:
        return backend_cost(
            node, env, materialised=hints.materialised_bytes, gemm_tile=hints.gemm_tile
        )
    except (ValueError, TypeError) as e:
        row["cost_note"] = f"the kernel op's cost only: {e}"
    try:
        return backend_cost(node, env)
    except (ValueError, TypeError):  # a dim the bindings leave unknown
        return None, None


def _seconds(flops: int | None, nbytes: int | None, tgt: Target) -> float | None:
    if flops is None or nbytes is None:
        return None
    return max(flops / tgt.peak_bf16_flops, nbytes / tgt.hbm_bandwidth)


def _resources(record: KernelRecord | None) -> dict[str, Any]:
    """Registers, shared memory and spills of a kernel: the maximum over its variants."""
    bins = [b for b in (record.binaries if record else ()) if b.error is None]

    def most(field: str) -> int | None:
        vals = [getattr(b, field) for b in bins if getattr(b, field) is not None]
        return max(vals) if vals else None

    return {"registers": most("registers"), "shared": most("shared"), "spills": most("spills")}


def _roofline(row: dict[str, Any], tgt: Target) -> None:
    flops, nbytes = row["flops"], row["bytes"]
    if flops is None or nbytes is None:
        row |= {"intensity": None, "roofline_s": None, "bound": None}
        return
    intensity = flops / nbytes if nbytes else None
    t_compute, t_memory = flops / tgt.peak_bf16_flops, nbytes / tgt.hbm_bandwidth
    row |= {
        "intensity": intensity,
        "roofline_s": sum(row["site_s"]),  # each call's bound, added up
        "bound": "compute" if t_compute > t_memory else "memory",
    }


def picture_module(g: ir.Graph) -> str:
    """The module the report draws: the first layer with an indexer (a CSA layer shows every
    kind of fusion), else the first `layers.N`, else the whole graph ("")."""
    first = None
    for n in g.ops:
        parts = n.loc.module.split(".") if n.loc else []
        if len(parts) >= 2 and parts[0] == "layers" and parts[1].isdigit():
            if "indexer" in parts:
                return f"layers.{parts[1]}"
            first = first or f"layers.{parts[1]}"
    return first or ""


def pipeline_summary(g0: ir.Graph, ctx: Any) -> dict[str, Any]:
    """What the report keeps of the capture and the pass pipeline (JSON; cacheable)."""
    sched = ctx.products.get("schedule")
    module = picture_module(g0)
    return {
        "picture_module": module,
        "picture_before": ir.region_view(g0, module, by_line=True),
        "ops_captured": len(g0.ops),
        "captured_by_op": dict(Counter(n.name for n in g0.ops).most_common()),
        "launches": sched.count if sched is not None else None,
        "launches_by_category": dict(sched.by_category()) if sched is not None else {},
        "rule_hits": dict(ctx.counters.most_common()),
        "pass_times_s": dict(ctx.times),
        "memory_plan": _plan(ctx.products.get("memory_plan")),
    }


def entry_report(
    summary: Mapping[str, Any],
    g: ir.Graph,
    exe: Executable,
    env: Mapping[str, int],
    tgt: Target,
    records: Sequence[KernelRecord],
) -> dict[str, Any]:
    """The report section of one entry point (`summary` from `pipeline_summary`, `g` final,
    `records` the executable's kernels with their binaries)."""
    from frontend.custom_ops import opaque_calls
    from passes.schedule import category

    final = Counter(n.name for n in g.ops)
    fused_bodies = [len(n.attrs["body"].ops) for n in g.ops if n.name == "fused.kernel"]
    semantic = {k: v for k, v in final.items() if k.startswith(("attn.", "moe.", "hc."))}
    backend_report = exe.report()
    return {
        "bindings": dict(env),
        "ops_captured": summary["ops_captured"],
        "ops_final": len(g.ops),
        "launches": summary["launches"],
        "launches_by_category": summary["launches_by_category"],
        "fusion": {
            "semantic_ops": semantic,
            "fused_kernels": len(fused_bodies),
            "ops_in_fused_kernels": sum(fused_bodies),
            "captured_by_op": summary["captured_by_op"],
            "final_by_op": dict(final.most_common()),
            "rule_hits": summary["rule_hits"],
        },
        "pass_times_s": summary["pass_times_s"],
        "graph_cached": summary.get("cached", False),
        "memory_plan": summary["memory_plan"],
        "kernels": kernel_rows(g, records, env, tgt),
        "code": code_summary(records, backend_report.get("skipped", {})),
        "aot": aot_rows(records),
        "picture": _picture(summary, g, lambda n: category(n) != "free"),
        "fallbacks": backend_report.get("fallbacks", []),
        "not_compiled": opaque_calls(g),  # custom ops kept whole: run eagerly, never compiled
    }


def code_summary(records: Sequence[KernelRecord], skipped: Mapping[str, str]) -> dict[str, Any]:
    """What an entry point's kernel records hold: `kernels` with code (one record each) by
    `languages`, and the kernels the backend wrote no code for on this target (`skipped`:
    kernel -> why, e.g. WGSL has no 64-bit integers). The `kernels` rows count ops instead:
    every op with a cost, whether a kernel runs it or not."""
    return {
        "kernels": len(records),
        "languages": dict(Counter(r.language for r in records)),
        "skipped": dict(skipped),
    }


def _picture(summary: Mapping[str, Any], g: ir.Graph, launches) -> dict[str, Any] | None:
    """One layer before fusion (ops grouped by source line) and after (its kernel launches)."""
    if "picture_module" not in summary:  # a graph cached by an older dsv4c
        return None
    module = summary["picture_module"]
    after = ir.region_view(g, module, keep=launches)
    return {"module": module, "before": summary["picture_before"], "after": after}


def _plan(plan: Any) -> dict[str, Any] | None:
    if plan is None:
        return None
    return {
        "bindings": dict(plan.bindings),
        "assumed": list(plan.assumed),
        "buffers": len(plan.buffers),
        "peak_bytes": plan.peak_bytes,
        "no_reuse_bytes": plan.no_reuse_bytes,
        "live_bytes": plan.live_bytes,
        "summary": plan.summary(),
    }


def aot_rows(records: Sequence[KernelRecord]) -> list[dict[str, Any]]:
    """One row per compiled kernel variant: the kernel's name and key, then `KernelBinary.row`."""
    return [{"kernel": k.name, "key": k.key} | b.row() for k in records for b in k.binaries]


def build_report(
    manifest: Mapping[str, Any],
    entries: Mapping[str, Any],
    times: Mapping[str, float],
    cache: Mapping[str, int],
) -> dict[str, Any]:
    from backends.targets import get_target

    tgt = get_target(manifest["target"])
    return {
        "backend": manifest["backend"],
        "target": {
            "name": tgt.name,
            "description": tgt.description,
            "peak_bf16_flops": tgt.peak_bf16_flops,
            "hbm_bandwidth": tgt.hbm_bandwidth,
            "ridge_point": tgt.ridge_point,
        },
        "model": manifest.get("model", {}),
        "versions": manifest["versions"],
        "compile_times_s": dict(times),
        "kernel_cache": dict(cache),
        "entries": dict(entries),
        "aot": _distinct_aot(entries),
    }


def _distinct_aot(entries: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every entry point's AOT rows, a variant two entry points share listed once."""
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in entries.values():
        for r in e.get("aot", []):
            seen.setdefault((r["key"], r["target"], r["variant"]), r)
    return list(seen.values())


def compare_backends(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Two reports (say Triton and TVM for one target) side by side, one row per entry point and
    backend: distinct kernels, their launches per call of the entry point, kernels with
    compiled binaries, the largest register count and shared memory of any kernel, total
    spills, and the cost model's estimated time (the sum of the kernels' roofline times at the
    entry point's bindings, each backend's kernels costed on their own: `kernel_rows`). Raises
    ValueError when the two reports are for different targets (their resources would not
    compare)."""
    _same_target(a, b)
    rows = []
    for name in [n for n in a["entries"] if n in b["entries"]]:
        for report in (a, b):
            kernels = [k for k in report["entries"][name]["kernels"] if k["runs"] == "kernel"]
            rows.append(
                {
                    "entry": name,
                    "backend": report["backend"],
                    "kernels": len(kernels),
                    "launches": sum(k.get("launches", k["uses"]) for k in kernels),
                    "compiled": sum(1 for k in kernels if k.get("registers") is not None),
                    "max_registers": _most(kernels, "registers"),
                    "max_shared": _most(kernels, "shared"),
                    "spills": sum(k.get("spills") or 0 for k in kernels),
                    "estimated_s": sum(k["roofline_s"] or 0.0 for k in kernels),
                }
            )
    return rows


def compare_kernels(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The kernels of two reports for one target side by side: per entry point, one row per
    pair of kernels (a's, b's) that run the same graph ops, paired by op index (a kernel that
    several ops share may pair with different kernels of the other backend: one row per
    partner). A row has the op, its uses, and per side (`a_*`, `b_*`) the kernel's name, its
    launches and estimated seconds over those uses (None where that side runs the op's
    reference). Each side's seconds add up to its `estimated_s` in `compare_backends`.
    Raises ValueError for reports of different targets."""
    _same_target(a, b)
    out: list[dict[str, Any]] = []
    for name in [n for n in a["entries"] if n in b["entries"]]:
        sides = [_by_site(r["entries"][name]["kernels"]) for r in (a, b)]
        pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for site in sorted(set(sides[0]) & set(sides[1])):
            (ra, sa), (rb, sb) = sides[0][site], sides[1][site]
            if ra["runs"] != "kernel" and rb["runs"] != "kernel":
                continue
            row = pairs.setdefault((ra["key"], rb["key"]), _pair(name, ra, rb))
            row["uses"] += 1
            for side, r, sec in (("a", ra, sa), ("b", rb, sb)):
                if r["runs"] == "kernel":
                    row[f"{side}_launches"] += r.get("launches", r["uses"]) // r["uses"]
                    row[f"{side}_s"] += sec or 0.0
        out += list(pairs.values())
    return out


def _by_site(kernels: Sequence[Mapping[str, Any]]) -> dict[int, tuple[Mapping, float | None]]:
    """op index -> (its kernel row, that call's roofline seconds)."""
    return {i: (k, t) for k in kernels for i, t in zip(k.get("sites", []), k.get("site_s", []))}


def _pair(entry: str, ra: Mapping[str, Any], rb: Mapping[str, Any]) -> dict[str, Any]:
    def side(tag: str, r: Mapping[str, Any]) -> dict[str, Any]:
        kernel = r["runs"] == "kernel"
        return {
            f"{tag}_kernel": r["name"] if kernel else f"{r['op']} (reference)",
            f"{tag}_launches": 0,
            f"{tag}_s": 0.0 if kernel else None,
        }

    return {"entry": entry, "op": ra["op"], "uses": 0} | side("a", ra) | side("b", rb)


def _same_target(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    if a["target"]["name"] != b["target"]["name"]:
        raise ValueError(
            f"reports for different targets ({a['target']['name']}, {b['target']['name']}): "
            "compare artifacts compiled for one target"
        )


def _most(rows: Sequence[Mapping[str, Any]], field: str) -> int | None:
    vals = [r[field] for r in rows if r.get(field) is not None]
    return max(vals) if vals else None


def dynamo_report(compiled: Sequence[Mapping], fallbacks: Sequence[str]) -> dict[str, Any]:
    """torch.compile(backend="dsv4c") summed up: `compiled` the `report()` of each graph dsv4c
    took (or just its "entries"), `fallbacks` one reason per graph that ran eagerly. Launches and
    the custom ops left uncompiled are added up over the compiled graphs' entry points."""
    launches, not_compiled = 0, {}
    for report in compiled:
        for entry in report["entries"].values():
            launches += entry.get("launches") or 0
            for op, row in (entry.get("not_compiled") or {}).items():
                merged = not_compiled.setdefault(op, {"count": 0, "locations": []})
                merged["count"] += row["count"]
                merged["locations"] += [w for w in row["locations"] if w not in merged["locations"]]
    return {
        "graphs": len(compiled) + len(fallbacks),
        "compiled": len(compiled),
        "eager_fallbacks": len(fallbacks),
        "fallback_reasons": [
            {"reason": r, "graphs": n} for r, n in Counter(fallbacks).most_common()
        ],
        "launches": launches,
        "not_compiled": not_compiled,
    }
