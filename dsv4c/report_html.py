"""`report.json` -> one self-contained `report.html` (inline SVG roofline, no scripts, no network).

Sections: summary, compile time per phase, per entry point the fusion summary, a picture of one
layer before and after fusion, memory plan, per-kernel flops/bytes table and roofline plot, then
the AOT metadata of each kernel.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["bars_svg", "dag_svg", "render", "roofline_svg"]

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
h2{border-bottom:2px solid #444;margin-top:2em}code{background:#f6f6f6}
.pics{display:flex;gap:2em;align-items:flex-start;overflow-x:auto}
"""

COLORS = {"semantic": "#f4a261", "fused": "#8ecae6", "gemm": "#90be6d", "other": "#e6e6e6"}


def _e(x: Any) -> str:
    return html.escape(str(x))


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _pairs(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if v is not None)


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [
            f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def roofline_svg(kernels: Sequence[Mapping[str, Any]], target: Mapping[str, Any]) -> str:
    """Log-log roofline of the target with one dot per kernel at (FLOP/byte, attainable FLOP/s)."""
    w, h, pad = 640, 360, 50
    peak, bw = target["peak_bf16_flops"], target["hbm_bandwidth"]
    x0, x1 = -2.0, 4.0  # log10 FLOP/byte
    y1 = math.log10(peak) + 0.3
    y0 = y1 - 6.5

    def px(i: float) -> float:
        return pad + (math.log10(i) - x0) / (x1 - x0) * (w - 2 * pad)

    def py(p: float) -> float:
        return h - pad - (math.log10(max(p, 10**y0)) - y0) / (y1 - y0) * (h - 2 * pad)

    ridge = peak / bw
    roof = [(10**x0, bw * 10**x0), (ridge, peak), (10**x1, peak)]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" class="roofline">',
        (
            f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" '
            'fill="none" stroke="#999"/>'
        ),
        '<polyline fill="none" stroke="#c33" stroke-width="2" points="'
        + " ".join(f"{px(i):.1f},{py(p):.1f}" for i, p in roof)
        + '"/>',
    ]
    for k in range(int(x0), int(x1) + 1):
        parts.append(
            f'<text x="{px(10**k):.0f}" y="{h - pad + 16}" font-size="11" '
            f'text-anchor="middle">1e{k}</text>'
        )
    parts.append(
        f'<text x="{w / 2}" y="{h - 10}" font-size="12" text-anchor="middle">FLOP/byte</text>'
        f'<text x="{pad}" y="{pad - 8}" font-size="12">attainable FLOP/s (peak '
        f"{_si(peak, 'FLOP/s')}, {_si(bw, 'B/s')})</text>"
    )
    for r in kernels:
        i = r.get("intensity")
        if not i or i <= 0:
            continue
        i = min(max(i, 10**x0), 10**x1)
        color = "#36c" if r.get("runs") == "kernel" else "#999"
        parts.append(
            f'<circle cx="{px(i):.1f}" cy="{py(min(peak, bw * i)):.1f}" r="4" fill="{color}" '
            f'fill-opacity=".6"><title>{_e(r["name"])}: {i:.2f} FLOP/B</title></circle>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def bars_svg(items: Sequence[tuple[str, float]], unit: str = "s") -> str:
    """Horizontal bars, one per (label, value), scaled to the largest."""
    w, row, label_w = 640, 20, 220
    top = max((v for _, v in items), default=0.0) or 1.0
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{row * len(items) + 8}" '
            'class="bars">'
        )
    ]
    for i, (label, v) in enumerate(items):
        y = 4 + i * row
        length = (w - label_w - 80) * v / top
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" font-size="12" text-anchor="end">{_e(label)}'
            f'</text><rect x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{row - 6}" '
            f'fill="#36c"/><text x="{label_w + length + 4:.1f}" y="{y + 14}" font-size="12">'
            f"{v:.2f} {unit}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def dag_svg(view: Mapping[str, Any], title: str) -> str:
    """A layered DAG from `ir.region_view`: one row per rank, boxes coloured by category
    (semantic op, fused kernel, GEMM, other), edges from the bottom of a box to the top of the
    next."""
    bw, bh, gx, gy, top = 168, 34, 10, 26, 30
    rows: dict[int, list[int]] = {}
    for i, n in enumerate(view["nodes"]):
        rows.setdefault(n["rank"], []).append(i)
    width = max((len(r) for r in rows.values()), default=1) * (bw + gx) + gx
    height = top + len(rows) * (bh + gy) + gy
    pos: dict[int, tuple[float, float]] = {}
    for r, (_, members) in enumerate(sorted(rows.items())):
        for c, i in enumerate(members):
            pos[i] = (gx + c * (bw + gx), top + r * (bh + gy))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="dag">',
        f'<text x="{gx}" y="18" font-size="13" font-weight="bold">{_e(title)}</text>',
    ]
    for a, b in view["edges"]:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        parts.append(
            f'<line x1="{xa + bw / 2:.0f}" y1="{ya + bh}" x2="{xb + bw / 2:.0f}" y2="{yb}" '
            'stroke="#999" stroke-width="0.8"/>'
        )
    for i, n in enumerate(view["nodes"]):
        x, y = pos[i]
        label = n["label"] if n["ops"] == 1 else f"{n['label']} ({n['ops']})"
        parts.append(
            f"<g><title>{_e(label)}: {_e(n['detail'])}</title>"
            f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="4" '
            f'fill="{COLORS.get(n["category"], COLORS["other"])}" stroke="#666"/>'
            f'<text x="{x + 4}" y="{y + 14}" font-size="11">{_e(label[:30])}</text>'
            f'<text x="{x + 4}" y="{y + 28}" font-size="10" fill="#444">{_e(n["detail"][:34])}</text>'
            "</g>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _picture(p: Mapping[str, Any]) -> str:
    before, after = p["before"], p["after"]
    where = f"<code>{_e(p['module'])}</code>" if p["module"] else "the whole graph"
    legend = ", ".join(
        f'<span style="background:{c};padding:0 4px">{k}</span>' for k, c in COLORS.items()
    )
    return (
        f"<h3>One layer before and after fusion</h3><p>{where}: {before['ops']} captured ops "
        f"in {len(before['nodes'])} source lines (left; a box is one line, with its op count) "
        f"become {len(after['nodes'])} kernel launches (right). Colours: {legend}.</p>"
        f'<div class="pics">{dag_svg(before, "captured, by source line")}'
        f"{dag_svg(after, 'after the pipeline: launches')}</div>"
    )


def _entry(name: str, e: Mapping[str, Any], target: Mapping[str, Any]) -> str:
    f = e["fusion"]
    out = [f"<h2>Entry point <code>{_e(name)}</code></h2>"]
    out.append(
        f"<p>{e['ops_captured']} ops captured → {e['ops_final']} ops after the pipeline → "
        f"<b>{_e(e['launches'])} kernel launches</b> ({_e(e['launches_by_category'])}); "
        f"{f['fused_kernels']} fused kernels hold {f['ops_in_fused_kernels']} ops. "
        f"Costs at {_e(e['bindings'])}.</p>"
    )
    out.append("<h3>Fusion summary</h3>")
    rows = [(k, v) for k, v in f["semantic_ops"].items()] + [("fused.kernel", f["fused_kernels"])]
    out.append(_table(("fused op", "count"), rows, numeric=(1,)))
    hits = sorted(f["rule_hits"].items(), key=lambda kv: -kv[1])[:30]
    out.append(_table(("rule / counter", "hits"), hits, numeric=(1,)))
    cap, fin = f["captured_by_op"], f["final_by_op"]
    ops = sorted(set(cap) | set(fin), key=lambda k: -cap.get(k, 0))[:30]
    out.append(
        _table(
            ("op", "captured", "after"), [(k, cap.get(k, 0), fin.get(k, 0)) for k in ops], (1, 2)
        )
    )
    if e.get("picture"):
        out.append(_picture(e["picture"]))
    if e.get("memory_plan"):
        out.append(f"<h3>Memory plan</h3><p>{_e(e['memory_plan']['summary'])}</p>")
    out.append("<h3>Kernels (flops and bytes of one call, summed over each kernel's uses)</h3>")
    out.append(roofline_svg(e["kernels"], target))
    rows = [
        (
            k["name"],
            k["op"],
            k["runs"],
            k["uses"],
            _si(k["flops"]),
            _si(k["bytes"], "B"),
            "–" if k["intensity"] is None else f"{k['intensity']:.2f}",
            "–" if k["roofline_s"] is None else f"{k['roofline_s'] * 1e6:.2f}",
            k["bound"] or "–",
        )
        for k in e["kernels"]
    ]
    head = ("kernel", "op", "runs as", "uses", "flops", "bytes", "FLOP/B", "roofline µs", "bound")
    out.append(_table(head, rows, numeric=(3, 4, 5, 6, 7)))
    if e.get("fallbacks"):
        rows = [(x.get("op"), x.get("reason"), x.get("count")) for x in e["fallbacks"]]
        out.append("<h3>Reference fallbacks</h3>" + _table(("op", "reason", "count"), rows, (2,)))
    if e.get("not_compiled"):  # custom ops kept whole: they run eagerly, never compiled
        rows = [
            (op, row.get("count"), "; ".join(row.get("locations", [])))
            for op, row in e["not_compiled"].items()
        ]
        head = ("custom op", "calls", "where")
        out.append("<h3>Not compiled (run eagerly)</h3>" + _table(head, rows, (1,)))
    return "\n".join(out)


def _tiles(tiles: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in tiles.items() if k.startswith("BLOCK"))


def _comparison(report: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    """Side by side with another backend's report for the same target: totals per entry point
    (`compare_backends`), then kernel by kernel (`compare_kernels`)."""
    from dsv4c.report import compare_backends, compare_kernels

    rows = [
        (
            r["entry"],
            r["backend"],
            r["kernels"],
            r["launches"],
            r["compiled"],
            "–" if r["max_registers"] is None else r["max_registers"],
            "–" if r["max_shared"] is None else r["max_shared"],
            r["spills"],
            f"{r['estimated_s'] * 1e6:.3f}",
        )
        for r in compare_backends(report, other)
    ]
    head = ("entry", "backend", "kernels", "launches", "compiled", "max regs", "max shared B")
    head += ("spill B", "estimated µs")
    a, b = report["backend"], other["backend"]
    title = f"<h2>{_e(a)} and {_e(b)} side by side</h2>"
    note = (
        "<p>estimated: the cost model's roofline time of each backend's own kernels (their "
        "launches, intermediates through device memory, GEMM tiles), summed over the kernels "
        "below.</p>"
    )
    pairs = [
        (r["entry"], r["op"], r["uses"], r["a_kernel"], r["a_launches"], _us(r["a_s"]),
         r["b_kernel"], r["b_launches"], _us(r["b_s"]))
        for r in compare_kernels(report, other)
    ]  # fmt: skip
    head2 = ("entry", "op", "uses", f"{a} kernel", "launches", "µs", f"{b} kernel", "launches")
    head2 += ("µs",)
    per_kernel = "<h3>Kernel by kernel (paired by the graph ops they run)</h3>"
    per_kernel += _table(head2, pairs, numeric=(2, 4, 5, 7, 8))
    return title + _table(head, rows, numeric=(2, 3, 4, 5, 6, 7, 8)) + note + per_kernel


def _us(seconds: float | None) -> str:
    return "reference" if seconds is None else f"{seconds * 1e6:.3f}"


def render(
    manifest: Mapping[str, Any],
    report: Mapping[str, Any],
    other: Mapping[str, Any] | None = None,
) -> str:
    """The HTML page of an artifact's report; `other`: another backend's report for the same
    target, compared side by side at the top."""
    t = report["target"]
    title = f"dsv4c report — {report.get('model', {}).get('preset') or 'module'} for {t['name']}"
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>",
        (
            f"<p>backend <b>{_e(report['backend'])}</b>, target <b>{_e(t['name'])}</b> "
            f"({_e(t['description'])}; ridge point {t['ridge_point']:.0f} FLOP/B); "
            f"versions {_e(_pairs(report['versions']))}; created {_e(manifest.get('created'))}.</p>"
        ),
        "<h2>Compile time</h2>",
        bars_svg([(k, v) for k, v in report["compile_times_s"].items() if k != "total"]),
        _table(
            ("phase", "seconds"),
            [(k, f"{v:.2f}") for k, v in report["compile_times_s"].items()],
            numeric=(1,),
        ),
        f"<p>kernel cache: {_e(_pairs(report['kernel_cache']))}</p>",
    ]
    if other is not None:
        out.append(_comparison(report, other))
    if any(k.endswith("(worker)") for k in report["compile_times_s"]):
        out.append(
            "<p>Phases marked (worker) ran in a forked process at the same time as this "
            "process's phases; the total is wall time.</p>"
        )
    kv = report.get("model", {}).get("kv_cache")
    if kv:
        out.append("<h2>KV cache and state per sequence</h2>")
        rows = [
            (
                label,
                f"{kv[label]['bytes_per_token']:,.0f}",
                f"{kv[label]['fixed_bytes'] / 2**20:,.2f}",
                f"{kv[label]['gib_at_1m_tokens']:.2f}",
            )
            for label in ("bf16", "model_dtype")
        ]
        head = ("dtype", "bytes/token", "fixed MiB (window, state)", "GiB at 1M tokens (growing)")
        out.append(_table(head, rows, numeric=(1, 2, 3)))
        out.append(f"<p>model dtype: {_e(kv['dtype'])}</p>")
    for name, entry in report["entries"].items():
        out.append(_entry(name, entry, t))
    if report.get("aot"):
        rows = [
            (
                r["kernel"],
                r["target"],
                r.get("registers"),
                r.get("shared"),
                r.get("spills"),
                r.get("variant", ""),
                _tiles(r.get("tiles", {})),
                r.get("error") or "",
            )
            for r in report["aot"]
        ]
        out.append("<h2>Ahead-of-time kernels</h2>")
        head = ("kernel", "target", "registers", "shared B", "spills", "variant", "tiles", "error")
        out.append(_table(head, rows, numeric=(2, 3, 4)))
    out.append("</body></html>")
    return "\n".join(out)
