"""`dsv4c bench`: a model preset's prefill and decode under several backends, side by side in one
process, on the same weights and inputs.

Per (workload, backend) row: compile seconds, the median latency of `repeat` calls after a
warm-up, tokens/s, the peak resident memory above the pre-call level during the first call
(sampled every millisecond; CUDA: peak allocated bytes), and the check against eager (max relative error, same
argmax). A backend that cannot run a workload gets a row with its error instead of numbers.

Backends:
    eager      the PyTorch module: the oracle and the baseline of every ratio
    inductor   torch.compile of the same method (Inductor, default mode)
    tvm        dsv4c, TVM backend       triton     dsv4c, Triton backend (a GPU, or --interpret)
    reference  dsv4c, reference backend (one torch call per IR op)
    tvm-relax  TVM's own importer and pipeline without dsv4c: torch.export ->
               relax.frontend.torch.from_exported_program -> relax.build (llvm) -> VirtualMachine

Workloads: `prefill` (batch 1, `prompt_len` tokens into an empty cache) and `decode` (one step
per batch size at position `context`, the cache filled with random values: a step's cost does not
depend on them). Results go to JSON (written after every row) and an SVG bar chart beside it.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv4c.artifact import atomic_write

__all__ = ["BACKENDS", "Workload", "bench", "bench_svg"]

BACKENDS = ("eager", "inductor", "tvm", "triton", "reference", "tvm-relax")
DSV4C_BACKENDS = ("tvm", "triton", "reference")


@dataclass
class Workload:
    """One call to time: `method` of the model on `args`; `tokens` per call for tokens/s."""

    name: str
    method: str
    args: tuple[Any, ...]
    tokens: int
    info: dict[str, Any] = field(default_factory=dict)


def timed(fn: Callable[[], Any], repeat: int, warmup: bool = True) -> float:
    """Median seconds per call (after one warm-up call unless the caller made one)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc), so the resident set
    before a measurement is what is live, not what earlier backends freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, int | None]]:
    """Peak bytes above the starting level while the block runs: CUDA peak allocated bytes, or
    the process's resident set sampled every millisecond (None where /proc is missing)."""
    out: dict[str, int | None] = {"bytes": None}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["bytes"] = torch.cuda.max_memory_allocated() - base
        return
    _release_free_memory()
    base = _rss()
    if base is None:
        yield out
        return
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _rss() or 0)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        done.set()
        t.join()
        out["bytes"] = max(peak[0], _rss() or 0) - base


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    got, want = got.float().cpu(), want.float().cpu()
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    return {"max_rel_err": rel, "same_argmax": same, "ok": rel <= 1e-3 and same}


def workloads(model: Any, prompt_len: int, context: int, batches: Sequence[int]) -> list[Workload]:
    """The prefill and decode calls, with seeded inputs on the model's device."""
    dev = next(model.parameters()).device
    max_len = max(prompt_len, context) + 8
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    out = []
    if prompt_len:
        prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(dev)
        info = {"batch": 1, "tokens": prompt_len, "max_len": max_len}
        out.append(
            Workload("prefill", "prefill", (prompt, model.init_cache(1, max_len)), prompt_len, info)
        )
    for b in batches:
        cache = model.init_cache(b, max_len)
        for t in cache.values():
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype) * 0.1)
        token = torch.randint(0, vocab, (b, 1), generator=gen).to(dev)
        info = {"batch": b, "context": context, "max_len": max_len}
        args = (token, torch.tensor(context, device=dev), cache)
        out.append(Workload(f"decode b{b}", "decode", args, b, info))
    return out


# --- backends: each returns (compile seconds, call) or raises ----------------------------------


def _eager(model: Any, w: Workload, target: str) -> tuple[float, Callable[[], Any]]:
    fn = getattr(model, w.method)
    return 0.0, lambda: fn(*w.args)


def _inductor(model: Any, w: Workload, target: str) -> tuple[float, Callable[[], Any]]:
    torch._dynamo.reset()
    fn = torch.compile(getattr(model, w.method))
    start = time.perf_counter()
    fn(*w.args)
    return time.perf_counter() - start, lambda: fn(*w.args)


def _dsv4c(backend: str) -> Callable[..., tuple[float, Callable[[], Any]]]:
    def run(model: Any, w: Workload, target: str) -> tuple[float, Callable[[], Any]]:
        import dsv4c
        from dsv4c.cli import model_methods

        spec = model_methods(model, w.info["max_len"])[w.method]
        start = time.perf_counter()
        compiled = dsv4c.compile_methods(model, {w.method: spec}, backend=backend, target=target)
        entry = compiled.entry(w.method)
        return time.perf_counter() - start, lambda: entry(*w.args)

    return run


def _tvm_relax(model: Any, w: Workload, target: str) -> tuple[float, Callable[[], Any]]:
    """TVM's own path: export the method, import with relax's torch frontend, build for llvm."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    if target != "cpu":
        raise ValueError("the tvm-relax peer is measured on the CPU only (--target cpu)")

    class Method(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            return getattr(self.model, w.method)(*args)

    start = time.perf_counter()
    ep = torch.export.export(Method(), w.args)
    mod = from_exported_program(ep, keep_params_as_input=False)
    ex = relax.build(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    flat = [tvm.runtime.tensor(t.numpy()) for t in torch.utils._pytree.tree_leaves(w.args)]
    seconds = time.perf_counter() - start
    return seconds, lambda: vm["main"](*flat)


RUNNERS: dict[str, Callable[..., tuple[float, Callable[[], Any]]]] = {
    "eager": _eager,
    "inductor": _inductor,
    "tvm": _dsv4c("tvm"),
    "triton": _dsv4c("triton"),
    "reference": _dsv4c("reference"),
    "tvm-relax": _tvm_relax,
}


def _logits(out: Any) -> torch.Tensor:
    first = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(first, torch.Tensor):  # a TVM tensor (or a tuple of them)
        first = first[0] if not hasattr(first, "numpy") else first
        first = torch.from_numpy(first.numpy())
    return first


def _skip_reason(backend: str, target: str, interpret: bool) -> str | None:
    if backend == "triton" and target == "cpu" and not interpret:
        return "no GPU here: Triton would run under its interpreter (hours); pass --interpret"
    return None


def bench_row(
    model: Any, w: Workload, backend: str, target: str, repeat: int, eager: Any, interpret: bool
) -> dict[str, Any]:
    row: dict[str, Any] = {"workload": w.name, "backend": backend, **w.info}
    reason = _skip_reason(backend, target, interpret)
    if reason:
        return row | {"skipped": reason}
    device = "cuda" if target != "cpu" else "cpu"
    try:
        with torch.no_grad():
            row["compile_s"], call = RUNNERS[backend](model, w, target)
            with peak_memory(device) as mem:  # the first call allocates the working set
                first = call()
            # timed without the sampler: its thread would take the GIL from Python launch loops
            row["latency_s"] = timed(call, repeat, warmup=False)
            if eager is not None:
                row["check"] = compare(_logits(first), eager)
    except Exception as e:  # noqa: BLE001 - a backend that cannot run a workload is a result
        first = (str(e).strip().splitlines() or [""])[0]
        return row | {"error": f"{type(e).__name__}: {first[:300]}"}
    row["peak_bytes"] = mem["bytes"]
    row["tokens_per_s"] = w.tokens / row["latency_s"]
    return row


def bench(
    preset: str,
    backends: Sequence[str],
    *,
    target: str = "cpu",
    prompt_len: int = 128,
    context: int = 4096,
    batches: Sequence[int] = (1,),
    repeat: int = 3,
    interpret: bool = False,
    json_path: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every workload under every backend; returns (and writes) the JSON document."""
    from models.deepseek_v4 import Config, Transformer

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    if target != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"target {target} needs a GPU and this machine has none; use --target cpu")
    torch.manual_seed(0)
    model = Transformer(Config.preset(preset)).eval().to("cpu" if target == "cpu" else "cuda")
    doc: dict[str, Any] = {
        "preset": preset,
        "target": target,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "repeat": repeat,
        "rows": [],
    }
    for w in workloads(model, prompt_len, context, batches):
        with torch.no_grad():
            want = _logits(getattr(model, w.method)(*w.args))
        for backend in backends:
            say(f"  [{w.name}] {backend} ...")
            row = bench_row(model, w, backend, target, repeat, want, interpret)
            doc["rows"].append(row)
            say(f"  [{w.name}] {backend}: {_row_text(row)}")
            if json_path is not None:
                _write(Path(json_path), doc)
    _ratios(doc["rows"])
    if json_path is not None:
        _write(Path(json_path), doc)
        atomic_write(Path(json_path).with_suffix(".svg"), bench_svg(doc).encode())
    return doc


def _ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_<peer> = peer latency / this latency, for eager and inductor, per workload."""
    by = {(r["workload"], r["backend"]): r for r in rows if "latency_s" in r}
    for r in rows:
        for peer in ("eager", "inductor"):
            p = by.get((r["workload"], peer))
            if p is not None and "latency_s" in r and r["backend"] != peer:
                r[f"speedup_vs_{peer}"] = p["latency_s"] / r["latency_s"]


def _row_text(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    if "error" in row:
        return f"error: {row['error']}"
    mem = "–" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:,.0f} MiB"
    check = row.get("check", {})
    ok = "ok" if check.get("ok") else f"MISMATCH rel {check.get('max_rel_err', float('nan')):.1e}"
    return (
        f"{row['latency_s'] * 1e3:,.1f} ms, {row['tokens_per_s']:,.1f} tok/s, peak +{mem}, "
        f"compile {row['compile_s']:.1f} s, vs eager {ok}"
    )


def _write(path: Path, doc: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(doc, indent=1).encode())


def bench_svg(doc: dict[str, Any]) -> str:
    """Latency bars per workload (each workload on its own scale; a failed run has no bar)."""
    from dsv4c.report_html import bars_svg

    blocks, y = [], 0
    for name in dict.fromkeys(r["workload"] for r in doc["rows"]):
        items = [
            (r["backend"], r["latency_s"] * 1e3)
            for r in doc["rows"]
            if r["workload"] == name and "latency_s" in r
        ]
        blocks.append(
            f'<text x="4" y="{y + 16}" font-size="13" font-weight="bold">{name} (ms)</text>'
        )
        bars = bars_svg(items, unit="ms")
        blocks.append(bars.replace("<svg ", f'<svg y="{y + 22}" ', 1))
        y += 22 + 20 * len(items) + 8 + 10
    title = f"dsv4c bench: {doc['preset']} on {doc['target']}, median latency"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{y + 24}">'
        f'<text x="4" y="14" font-size="14">{title}</text><g transform="translate(0, 24)">'
        + "\n".join(blocks)
        + "</g></svg>\n"
    )
