"""Per-kernel profile of a compiled TVM step (`dsv4c bench --profile`): where the time goes.

`kernel_profile(exe, call, runs)` turns the runtime's timing hook on (`TVMExecutable.profile`:
each step of the plan timed into `step_times`), makes `runs` calls, turns it off, and sums the
steps per kernel: a row per distinct kernel (`name`, `key` as in the executable's kernel
records and `report()["kernels"]`), or per op that ran its torch reference (`<op> (reference)`,
no key). Per step (each step's least seconds over `runs` calls, as benchmarks/sparse_scaling.py):

    impl        what ran: "tvm" (its TVM kernel), "blas" (a matmul that called torch.matmul,
                `blas="auto"`), "reference", or "kernel" (a launch that does not count)

    calls       launches of the kernel in one step (the ops that use it)
    ms          its summed seconds, in ms
    share       ms / the step's summed ms over every timed step (the shares sum to 1)
    bytes       what its ops must move in one step (`passes.cost.kernel_cost`, bound to the
                call's symbols): inputs read plus outputs written; None where the op has no cost
    GBps        bytes / seconds: the bandwidth it achieved

The step's total is the sum of its timed steps, not the wall time of the call (the input checks
and the Python between launches are outside it).

Measured (issue 19, `small` decode at 4K, 1 thread, the shared 2-core box at load 5-7): in place
at B=8 `moe_experts` was 85 of the 122 profiled ms (70 %, 2.4 GB/s against 14 GB/s measured read
bandwidth); `attn_compress_step` 5.6 ms for the ratio-128 pair, 2.3 ms the ratio-4 pair. Since
the grouped experts kernel (each touched expert read once) that row is 16.2 ms at B=8 and 3.55
ms at B=1, and the op's bytes count the min(E, N·k) experts a call can touch, not all E
(docs/benchmarks.md). The functional row's compress steps take 44-50 ms
(clones of the caches and states, fresh pages) of the same kernels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["kernel_profile", "profile_table"]


def kernel_profile(exe: Any, call: Callable[[], Any], runs: int = 5) -> list[dict[str, Any]]:
    """Rows per kernel (module doc), most time first, from `runs` profiled calls of `call`
    (which must run `exe`); each step counts its least time over the runs (the one least
    disturbed by other processes on a shared machine)."""
    before = [Counter(s.launch.calls) if s.launch is not None else Counter() for s in exe.steps]
    least: dict[int, list[float]] = {}  # step -> [least seconds over the runs, calls per run]
    exe.profile = True
    try:
        for _ in range(runs):
            exe.step_times.clear()
            call()
            for i, (seconds, calls) in exe.step_times.items():
                got = least.setdefault(i, [seconds, calls])
                got[0] = min(got[0], seconds)
    finally:
        exe.profile = False
    rows: dict[tuple[str, str | None], dict[str, Any]] = {}
    for i, (seconds, calls) in least.items():
        step = exe.steps[i]
        name, key = _kernel_of(step)
        row = rows.setdefault(
            (name, key),
            {"kernel": name, "key": key, "impl": set(), "calls": 0, "s": 0.0, "bytes": 0},
        )
        if step.launch is None:
            row["impl"].add("reference")
        else:  # the launch counts its calls per implementation (tvm, blas)
            row["impl"].update(Counter(step.launch.calls) - before[i] or ["kernel"])
        row["calls"] += calls
        row["s"] += seconds
        moved = _bytes(step.node, exe.profile_env)
        row["bytes"] = None if moved is None or row["bytes"] is None else row["bytes"] + moved
    total = sum(r["s"] for r in rows.values()) or 1.0
    out = []
    for r in sorted(rows.values(), key=lambda r: -r["s"]):
        nbytes, seconds = r["bytes"], r["s"]
        out.append(
            {
                "kernel": r["kernel"],
                "key": r["key"],
                "impl": "+".join(sorted(r["impl"])),
                "calls": round(r["calls"], 3),
                "ms": seconds * 1e3,
                "share": seconds / total,
                "bytes": nbytes,
                "GBps": nbytes / seconds / 1e9 if nbytes is not None and seconds > 0 else None,
            }
        )
    return out


def _kernel_of(step: Any) -> tuple[str, str | None]:
    """(kernel name, key) of a step: its launch's first kernel (the one its op is a site of
    in the kernel records), or `<op> (reference)` for a fallback."""
    if step.launch is None or not step.launch.kernels:
        return f"{step.node.name} (reference)", None
    k = step.launch.kernels[0]
    return k.name, k.key


def _bytes(node: Any, env: dict) -> int | None:
    """Bytes `node` must move in one call at `env`, or None where the cost model has none."""
    from passes.cost import evaluate, kernel_cost

    try:
        return evaluate(kernel_cost(node).bytes, env)
    except (ValueError, NotImplementedError, TypeError, KeyError, AttributeError):
        return None


def profile_table(workload: str, backend: str, rows: list[dict[str, Any]], top: int = 10) -> str:
    """The `top` kernels of one bench row as a Markdown table."""
    lines = [
        f"{workload} / {backend}: top {min(top, len(rows))} of {len(rows)} kernels (one step)",
        "| kernel | impl | calls | ms | share | MB moved | GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows[:top]:  # a short key tells apart kernels of one name (other shapes)
        name = r["kernel"] if r["key"] is None else f"{r['kernel']} ({r['key'][:6]})"
        mb = "—" if r["bytes"] is None else f"{r['bytes'] / 1e6:,.2f}"
        gbps = "—" if r["GBps"] is None else f"{r['GBps']:,.1f}"
        lines.append(
            f"| {name} | {r['impl']} | {r['calls']:g} | {r['ms']:,.2f} | {r['share']:.1%} | {mb} | "
            f"{gbps} |"
        )
    return "\n".join(lines)
