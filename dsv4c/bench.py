"""`dsv4c bench`: a model preset's prefill and decode under several backends, side by side in one
process, on the same weights and inputs.

Per (workload, backend) row: compile seconds, the median (and min) latency of `repeat` calls,
tokens/s, the peak resident memory above the pre-call level during the first call (sampled every
millisecond; CUDA: peak allocated bytes), and the check against eager (max relative error, same
argmax). A backend that cannot run a workload gets a row with its error instead of numbers.

How it times (per workload): every backend is compiled and called once (memory, check), then one
untimed warm-up round and `repeat` timed rounds call the backends in turn, so load on a shared
machine falls on all of them alike and any lazy recompile lands in the warm-up; in a timed round
each backend is called twice in a row and the second call is timed (`back_to_back`, see Threads
below). The Inductor row carries Dynamo's counters (graphs, graph breaks, recompiles while timed).

Why (issue 19: Inductor decode b1 16x slower than eager, prefill a MISMATCH of 2.1e-2 on `small`):
- recompiles are not the cause: Dynamo captures `decode` as one graph with no graph break, and
  positions 12..14 (a 0-d tensor) reuse it (tests/dsv4c/test_bench_measure.py); no guard on the
  position value;
- each backend used to be timed in its own window, one after the other. On the shared 2-core box
  the same call swings 20x within a minute (tiny prefill under Inductor: 0.78 s, 0.33 s, 6.7 s in
  three consecutive calls), and with 2 threads a descheduled OpenMP worker costs every parallel
  region a time slice (tiny eager decode: 2.3-3.2 s on 2 threads, 0.22-0.28 s on 1, same run;
  once the box was quiet, 2 threads = 1: tiny eager prefill 20.3 vs 20.7 ms): a load burst in
  one backend's window makes its ratio meaningless. Interleaved rounds fix that.
  The pattern did reproduce on `small` decode b1 at 4K (2 threads, other engineers' jobs
  running): Inductor median 1,610 ms but min 43 ms, eager 613 / 57 ms, TVM 69 / 50 ms; in a
  process holding all three, eager and Inductor calls swing between ~30 ms and ~930 ms from one
  call to the next (a 0.5 s pause before each call does not help) while TVM's stay at 40-120
  ms: torch's OpenMP barriers stall whenever another process takes one of the 2 cores, TVM's
  thread pool much less. So the issue's Inductor row measured the load, not Inductor. Rows keep
  every call's time (`times_s`), report the min beside the median, and are flagged UNSTABLE
  when the median is over 2x the min: compare mins, or rerun on a quiet machine. With one
  thread (OMP_NUM_THREADS=1 TVM_NUM_THREADS=1) the same rows were stable minutes later: eager
  43.3 / 38.5 ms, Inductor 26.1 / 21.2, TVM 22.5 / 19.9 (TVM 1.16x Inductor, 32 % of roofline);
- the prefill mismatch: `small`'s 4096-token prefill routes through top-k choices with near ties
  (MoE top-6 of 32 and indexer top-128: 14 rows with a gap under 1e-5 relative, the smallest
  3.2e-7; no exact ties), which fp32 sums in another order may flip: eager itself, its weights
  scaled by 1 + 1e-6·z, moves by 4.4e-2 with other argmaxes (other picks in 137 top-k rows,
  230 of 4096 tokens beyond 1e-3, the first at token 1766), while eager in fp64 agrees with
  fp32 to 7.8e-7. A row that fails the strict check is judged against that sensitivity
  (`eager_sensitivity`): within 2x of it, it is `ok` and marked `near_tie`; beyond, a MISMATCH.

Threads (issue 19: "2 threads slower than 1"; 2-vCPU Xeon, AVX-512, torch 2.13 on libgomp):
- TVM's pool had 1 thread: without $TVM_NUM_THREADS, TVM sizes it to half of
  `hardware_concurrency()` on x86 (assumed hyper-threads), while torch runs 2. Every TVM figure
  above and before 2026-12-07 is single-threaded against 2-thread eager/Inductor. Now each call
  sizes the pool to torch's count (`backends.tvm.runtime.use_threads`, through TVM's
  `runtime.config_threadpool`; `threads=` or $TVM_NUM_THREADS override); rows record
  `threads` (torch's, TVM's, and torch's inside a TVM call).
- Why 2 TVM threads were slower than 1: torch runs parallel regions inside a TVM step, and after
  each one libgomp's workers spin (~300k pause loops, GOMP_SPINCOUNT's default) on the other
  core. Counted with an LD_PRELOAD wrapper of GOMP_parallel: small decode b1 opened 1 region per
  step (the head GEMV through BLAS; 4 more from the compressor-state copies of the in-place
  writer at HEAD fa49328), b8 20 (18 BLAS GEMMs, the embedding reference); torch's worker thread
  then ran 17 ms of CPU per b1 step (/proc schedstat) while TVM's second thread waited for that
  core, so every parallel launch after a torch region waited for a time slice (an 8x512 rmsnorm
  0.5-1 ms). OMP_WAIT_POLICY=PASSIVE removes the spin (tvm-inplace b1 19.4 -> 14.6 ms on a
  quiet box) but halves eager and Inductor, so it is no benchmark setting.
- Fix 1, torch quiet inside a TVM call: the runtime holds torch at 1 thread during the call and
  gives it its threads back only around steps with the work to pay for the spin (at least
  2^30 flops or 256 MiB by the cost model: prefill GEMMs, no decode step): 0 regions per decode
  step at b1 and b8 (same counter, HEAD b5dca25 + these changes), torch's worker idle.
- Fix 2, no pool launch for small work: a parallel loop nest over symbolic B runs serially when
  B x its static per-row iterations is at most 2^15 (a runtime guard in the kernel,
  `schedule_cpu.serial_when_small`), so decode-sized norms, gates and other small stages stay
  on the calling thread (the matmul schedules, backends/tvm/matmul.py, are not guarded);
  outputs are bit-identical to the unguarded kernels (b1 and b8).
- Measured side by side in one process (small, context 4096, 5 rounds x 3 back-to-back steps
  per configuration, the shared box at load 5-6, median / min ms):
      configuration                            b1              b8
      before: TVM 1 thread, torch always 2     154.2 / 121.7   526.1 / 373.1
      TVM 2, torch always 2, no guard          166.2 / 144.1   676.0 / 453.4  (2 slower than 1)
      TVM 2, torch held at 1, no guard         123.0 /  59.9   316.2 / 205.3
      TVM 1, torch held at 1, guard             64.1 /  58.5   180.8 / 127.7
      after: TVM 2, torch held at 1, guard      67.3 /  48.6   181.5 / 134.3
  At that load the second core is mostly taken by other jobs, so 2 TVM threads ~ 1; what the
  fixes remove is the cost of torch's regions (their barriers wait for a descheduled worker)
  and of pool launches for small work. The bench itself, HEAD b5dca25 without / with these
  changes, one run after the other (load 5-7): tvm-inplace b1 118.2 / 64.4 -> 45.8 / 39.8 ms,
  b8 427.9 / 186.8 -> 123.9 / 49.8 (eager and Inductor swung 2-5x between the runs with the
  load; docs/benchmarks.md has the tables). In a quieter window (HEAD af27ae2, load 2.1-3.1)
  b1 did not change (20.7 / 19.2 -> 21.9 / 21.3) and b8 went 45.5 / 42.9 -> 37.2 / 36.2: the
  fixes matter most when other processes hold cores.
- Interleaving and fairness: one backend's pools spill into the next backend's call (libgomp's
  workers spin ~15 ms after an eager or Inductor call; TVM's workers yield-spin after a TVM
  call, and torch's pool is asleep by then, so Inductor's first regions must wake it). Timed
  rounds therefore call each backend twice in a row and time the second call (`back_to_back`,
  the default), so each starts from its own previous call, as in a decode loop. Both ways in one
  process (14 timed calls per cell, load 5.8-6.8, median / min ms), alternating -> back to back:
  b1 eager 549 / 245 -> 877 / 292, Inductor 592 / 122 -> 478 / 125, TVM 76.1 / 53.4 -> 77.8 /
  45.3; b8 eager 1,667 / 529 -> 1,387 / 549, Inductor 1,505 / 544 -> 735 / 378, TVM 153.5 /
  109.3 -> 145.6 / 76.7. Pairs help Inductor as much as TVM; the load dominates the rest.

Backends:
    eager      the PyTorch module: the oracle and the baseline of every ratio
    inductor   torch.compile of the same method (Inductor, default mode)
    tvm        dsv4c, TVM backend       triton     dsv4c, Triton backend (a GPU, or --interpret)
    reference  dsv4c, reference backend (one torch call per IR op)
    tvm-inplace, triton-inplace, reference-inplace
               the same compiled entry point run in place (`inplace=True`: the cache updates are
               written into the caller's tensors; each such row decodes into its own copy of
               the workload's cache, so the other rows see the original)
    tvm-relax  TVM's own importer and pipeline without dsv4c: torch.export ->
               relax.frontend.torch.from_exported_program -> relax.build (llvm) -> VirtualMachine

Workloads: `prefill` (batch 1, `prompt_len` tokens into an empty cache) and `decode` (one step
per batch size at position `context`, the cache filled with random values: a step's cost does not
depend on them). Results go to JSON (written after every workload) and an SVG bar chart.

Cache bytes: every dsv4c row carries `update_bytes` (`passes.memory_plan.update_bytes`): the
bytes its cache and compressor-state updates move per call, in place (the rows written, the
states rewritten) and functional (plus a copy of every updated cache: read and written whole).

Measured (issue 19, `--backends eager,tvm,tvm-inplace --prompt-len 0 --context 4096 --batches
1 8`, OMP_NUM_THREADS=1 TVM_NUM_THREADS=1, the shared 2-core box at load 7-8, 15 rounds): the
cache updates of `small` move 16.5 MB per step functional vs 1.2 MB in place at b1 (132 MB vs
9.8 MB at b8; in place the ratio-128 compressor states, 2 x 256 KB per layer at b1, dominate);
TVM decode b8 median 301 -> 224 ms (min 256 -> 172; in place faster in 15 of 15 rounds), b1
70 -> 60 ms (min 38 vs 42; faster in 10 of 15 rounds: within the noise of this load); peak
memory above the call's start +67 -> +5 MiB at b8. Minutes later, the box at load 3.7, the same
compiled step alone in a process (no eager rows between calls), 30 interleaved rounds: b1 12.0 ->
11.6 ms median (in place faster in 23 of 30 rounds), b8 55.1 -> 51.3 ms (24 of 30): on a quieter
machine the copies cost a few ms; the 77 ms of the loaded run are copies plus the page faults
and bandwidth contention of 132 MB of fresh buffers per step. (Profiled at b8, `attn.compress_step`
is still ~30 ms of the step in place: its TVM kernel's compute, not its bytes.)

Profile (`--profile`, `bench(..., profile=True)`): after the timed rounds every TVM row makes 5
more calls with the runtime's timing hook on (`TVMExecutable.profile`; off, a call runs untimed
closures) and gets `kernel_profile`: per kernel (its name and key as in the kernel records, or
`<op> (reference)`) the calls, ms and share of one step, the bytes its ops must move (cost model)
and the GB/s achieved (`dsv4c.bench_profile`); the top 10 per row are printed under the table.

Roofline: the run first measures the machine's read bandwidth; each row gets `roofline_fraction`
= (bytes the step must read: weights touched + KV) / bandwidth / latency — see bench_roofline.py
for the formula. 1.0 means the step streams its bytes at the measured bandwidth.
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
from dsv4c.bench_profile import kernel_profile, profile_table
from dsv4c.bench_roofline import must_read_bytes, read_bandwidth

__all__ = ["BACKENDS", "Workload", "bench", "bench_svg", "bench_table"]

BACKENDS = (
    "eager",
    "inductor",
    "tvm",
    "tvm-inplace",
    "triton",
    "triton-inplace",
    "reference",
    "reference-inplace",
    "tvm-relax",
)
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


TOLERANCE = 1e-3  # max relative error against eager (fp32) for a row to be "ok"
NOISE = 1e-6  # relative weight perturbation of the same size as fp32 reassociation differences
NEAR_TIE_FACTOR = 2.0
UNSTABLE = 2.0  # median / min latency above which a row is flagged (load on the machine)


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    got, want = got.float().cpu(), want.float().cpu()
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    return {"max_rel_err": rel, "same_argmax": same, "ok": rel <= TOLERANCE and same}


def eager_sensitivity(model: Any, w: Workload, want: torch.Tensor) -> float:
    """How far eager's own logits move (max relative error) when every weight is scaled by
    1 + NOISE·z (z standard normal, seeded): what an equally valid fp32 evaluation order can do
    to this workload. Top-k routing and index selection amplify it where two candidates are
    nearly tied (small, 4096-token prefill: gaps down to 3e-7 relative), so a backend that
    sums in another order may legitimately differ from eager by far more than TOLERANCE."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            if p.is_floating_point():
                z = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
                p.mul_(1 + NOISE * z)
        got = _logits(getattr(other, w.method)(*w.args))
    return compare(got, want)["max_rel_err"]


def judge_near_ties(rows: list[dict[str, Any]], sensitivity: Callable[[], float]) -> None:
    """Rows whose check failed the strict TOLERANCE: `ok` again when their error is at most
    NEAR_TIE_FACTOR x eager's own sensitivity (measured once, only when needed), marked
    `near_tie`; else they stay a MISMATCH."""
    failed = [r["check"] for r in rows if "check" in r and not r["check"]["ok"]]
    if not failed:
        return
    s = sensitivity()
    for check in failed:
        check["eager_sensitivity"] = s
        check["near_tie"] = check["ok"] = check["max_rel_err"] <= NEAR_TIE_FACTOR * s


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
    """torch.compile of the method, default mode, one workload at a time (Dynamo reset before
    it, so no earlier workload's graphs or dynamic-shape decisions carry over). Its Dynamo
    counters are cleared: the row reports graphs, graph breaks and recompiles (dsv4c bench
    checks that the timed calls compiled nothing)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(getattr(model, w.method))
    start = time.perf_counter()
    fn(*w.args)
    return time.perf_counter() - start, lambda: fn(*w.args)


_COMPILED: dict[tuple[int, str, str, int, str], Any] = {}  # one compile per model and workload
_MOVED: dict[tuple[int, str], int] = {}  # (workload, backend) -> cache update bytes per call
_EXES: dict[tuple[int, str], Any] = {}  # (workload, backend) -> its executable (--profile)


def _dsv4c(backend: str, inplace: bool = False) -> Callable[..., tuple[float, Callable[[], Any]]]:
    def run(model: Any, w: Workload, target: str) -> tuple[float, Callable[[], Any]]:
        import dataclasses

        import dsv4c
        from dsv4c.cli import model_methods
        from passes.memory_plan import update_bytes

        key = (id(model), w.method, backend, w.info["max_len"], target)
        start = time.perf_counter()
        if key not in _COMPILED:  # the -inplace row shares the functional row's compile
            spec = model_methods(model, w.info["max_len"])[w.method]
            _COMPILED[key] = dsv4c.compile_methods(
                model, {w.method: spec}, backend=backend, target=target
            )
        entry = dataclasses.replace(_COMPILED[key].entry(w.method), inplace=inplace)
        mode = "inplace" if inplace else "functional"
        row = backend + ("-inplace" if inplace else "")
        _MOVED[id(w), row] = update_bytes(entry.graph, {"B": w.info["batch"]})[mode]
        _EXES[id(w), row] = entry.executable
        args = _own_cache(w.args) if inplace else w.args
        return time.perf_counter() - start, lambda: entry(*args)

    return run


def _own_cache(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`args` with every dict of tensors (the cache) copied: an in-place row writes its own."""
    return tuple({k: v.clone() for k, v in a.items()} if isinstance(a, dict) else a for a in args)


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
    "tvm-inplace": _dsv4c("tvm", inplace=True),
    "triton": _dsv4c("triton"),
    "triton-inplace": _dsv4c("triton", inplace=True),
    "reference": _dsv4c("reference"),
    "reference-inplace": _dsv4c("reference", inplace=True),
    "tvm-relax": _tvm_relax,
}


def _logits(out: Any) -> torch.Tensor:
    first = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(first, torch.Tensor):  # a TVM tensor (or a tuple of them)
        first = first[0] if not hasattr(first, "numpy") else first
        first = torch.from_numpy(first.numpy())
    return first


def _skip_reason(backend: str, target: str, interpret: bool) -> str | None:
    if backend.startswith("triton") and target == "cpu" and not interpret:
        return "no GPU here: Triton would run under its interpreter (hours); pass --interpret"
    return None


def prepare_row(
    model: Any, w: Workload, backend: str, target: str, eager: Any, interpret: bool
) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """Compile `backend` for `w` and make its first call (peak memory, check against eager):
    (row, call to time), or (row with "skipped"/"error", None)."""
    row: dict[str, Any] = {"workload": w.name, "backend": backend, **w.info}
    reason = _skip_reason(backend, target, interpret)
    if reason:
        return row | {"skipped": reason}, None
    device = "cuda" if target != "cpu" else "cpu"
    try:
        with torch.no_grad():
            row["compile_s"], call = RUNNERS[backend](model, w, target)
            with peak_memory(device) as mem:  # the first call allocates the working set
                first = call()
            if eager is not None:
                row["check"] = compare(_logits(first), eager)
    except Exception as e:  # noqa: BLE001 - a backend that cannot run a workload is a result
        return row | {"error": _one_line(e)}, None
    if backend == "inductor":
        row["dynamo"] = _dynamo_stats()
    if (id(w), backend) in _MOVED:
        row["cache_update_bytes"] = _MOVED[id(w), backend]
    row["threads"] = row_threads(_EXES.get((id(w), backend)))
    row["peak_bytes"] = mem["bytes"]
    return row, call


def row_threads(exe: Any = None) -> dict[str, Any]:
    """The threads a row ran on: torch's intra-op threads, and for a TVM CPU executable its
    pool's threads and torch's inside its calls (1 but around heavy steps, or torch's)."""
    out: dict[str, Any] = {"torch": torch.get_num_threads()}
    if exe is None or not hasattr(exe, "torch_parallel"):
        return out
    from backends.tvm.runtime import pool_threads

    out["tvm"] = pool_threads(exe.threads)
    held = exe.torch_parallel == "heavy" and out["torch"] > 1
    out["torch_in_tvm_call"] = "1 (heavy steps: torch's)" if held else out["torch"]
    return out


def time_interleaved(
    calls: dict[str, Callable[[], Any]],
    repeat: int,
    after_warmup: Callable[[], None] | None = None,
    back_to_back: bool = False,
) -> dict[str, Any]:
    """Seconds per call for every backend: one untimed warm-up round (it absorbs any lazy
    compile: an Inductor guard failure recompiles there, not in a timed call), then `repeat`
    rounds that call each backend once in turn, so that load on a shared machine falls on every
    backend alike. `back_to_back`: in a timed round each backend is called twice in a row and
    the second call is timed, so it starts from the thread pools its own previous call left (as
    in a decode loop), not the previous backend's (libgomp workers spinning for ~15 ms after an
    eager or Inductor call took the cores TVM's next call needed). A backend whose call raises
    gets its error (a string) instead of times. (Timed without the memory sampler: its thread
    would take the GIL from launch loops.)"""
    times: dict[str, Any] = {b: [] for b in calls}
    with torch.no_grad():
        for rnd in range(repeat + 1):
            if rnd == 1 and after_warmup is not None:
                after_warmup()
            for b, call in calls.items():
                if isinstance(times[b], str):
                    continue
                try:
                    if rnd and back_to_back:
                        call()
                    start = time.perf_counter()
                    call()
                except Exception as e:  # noqa: BLE001
                    times[b] = _one_line(e)
                    continue
                if rnd:
                    times[b].append(time.perf_counter() - start)
    return times


def _finish_row(row: dict[str, Any], times: list[float] | str, tokens: int) -> None:
    if isinstance(times, str):
        row["error"] = times
        return
    ordered = sorted(times)
    row["latency_s"] = ordered[len(ordered) // 2]
    row["latency_min_s"] = ordered[0]
    row["times_s"] = list(times)  # in round order: a spread says the machine was not quiet
    row["tokens_per_s"] = tokens / row["latency_s"]
    if "dynamo" in row:  # graphs compiled since the first call / the warm-up: recompiles
        graphs, dyn = _dynamo_stats()["graphs"], row["dynamo"]
        dyn["recompiles"] = graphs - dyn.pop("graphs_before_timing", dyn["graphs"])
        dyn["recompiles_in_warmup"] = graphs - dyn["graphs"] - dyn["recompiles"]


def _before_timing(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if "dynamo" in row:
            row["dynamo"]["graphs_before_timing"] = _dynamo_stats()["graphs"]


def _dynamo_stats() -> dict[str, int]:
    """Graphs Dynamo compiled and graph breaks since the counters were last cleared."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": breaks}


def _one_line(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


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
    profile: bool = False,
    back_to_back: bool = True,
) -> dict[str, Any]:
    """Run every workload under every backend; returns (and writes) the JSON document.
    `profile`: after the timed rounds, each TVM row gets `kernel_profile` (one step per kernel,
    `dsv4c.bench_profile`), printed under the bench table (top 10 per row). `back_to_back`:
    each timed call follows an untimed call of the same backend (`time_interleaved`)."""
    from models.deepseek_v4 import Config, Transformer

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    if target != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"target {target} needs a GPU and this machine has none; use --target cpu")
    torch.manual_seed(0)
    _COMPILED.clear()  # compiles are shared within this run only
    _MOVED.clear()
    _EXES.clear()
    model = Transformer(Config.preset(preset)).eval().to("cpu" if target == "cpu" else "cuda")
    doc: dict[str, Any] = {
        "preset": preset,
        "target": target,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "repeat": repeat,
        "back_to_back": back_to_back,
        "read_bandwidth_Bps": read_bandwidth(device="cpu" if target == "cpu" else "cuda"),
        "rows": [],
    }
    say(f"  read bandwidth {doc['read_bandwidth_Bps'] / 1e9:.1f} GB/s (sum over 256 MiB)")
    for w in workloads(model, prompt_len, context, batches):
        w.info["must_read_bytes"] = must_read_bytes(model, w)
        with torch.no_grad():
            want = _logits(getattr(model, w.method)(*w.args))
        rows, calls = [], {}
        for backend in backends:
            say(f"  [{w.name}] {backend}: compile and first call ...")
            row, call = prepare_row(model, w, backend, target, want, interpret)
            rows.append(row)
            if call is not None:
                calls[backend] = call
        judge_near_ties(rows, lambda: eager_sensitivity(model, w, want))
        pairs = " (each timed call after an untimed one of its own)" if back_to_back else ""
        say(f"  [{w.name}] timing {', '.join(calls)}: {repeat} interleaved rounds{pairs} ...")
        times = time_interleaved(calls, repeat, lambda: _before_timing(rows), back_to_back)
        for row in rows:
            if row["backend"] in times:
                _finish_row(row, times[row["backend"]], w.tokens)
            if profile and (id(w), row["backend"]) in _EXES and row["backend"] in calls:
                exe = _EXES[id(w), row["backend"]]
                if hasattr(exe, "step_times"):  # the TVM CPU runtime's timing hook
                    with torch.no_grad():
                        row["kernel_profile"] = kernel_profile(exe, calls[row["backend"]])
            _roofline(row, doc["read_bandwidth_Bps"])
            doc["rows"].append(row)
            say(f"  [{w.name}] {row['backend']}: {_row_text(row)}")
        if json_path is not None:
            _write(Path(json_path), doc)
    _ratios(doc["rows"])
    say(bench_table(doc))
    for r in doc["rows"]:
        if "kernel_profile" in r:
            say("\n" + profile_table(r["workload"], r["backend"], r["kernel_profile"]))
    if json_path is not None:
        _write(Path(json_path), doc)
        atomic_write(Path(json_path).with_suffix(".svg"), bench_svg(doc).encode())
    return doc


def _roofline(row: dict[str, Any], bandwidth: float) -> None:
    """roofline_s = must-read bytes / bandwidth; roofline_fraction = roofline_s / latency."""
    if "latency_s" not in row:
        return
    row["roofline_s"] = row["must_read_bytes"]["total"] / bandwidth
    row["roofline_fraction"] = row["roofline_s"] / row["latency_s"]


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
    if check.get("near_tie"):
        ok = (
            f"ok (rel {check['max_rel_err']:.1e}: near-tie top-k picks; eager itself moves "
            f"{check['eager_sensitivity']:.1e} under {NOISE:.0e} weight noise)"
        )
    roof = f", {row['roofline_fraction']:.1%} of roofline" if "roofline_fraction" in row else ""
    if "cache_update_bytes" in row:
        roof += f", cache updates move {row['cache_update_bytes'] / 1e6:,.2f} MB"
    dyn = row.get("dynamo")
    graphs = (
        f", {dyn['graphs']} graph(s), {dyn['graph_breaks']} break(s), "
        f"recompiles: {dyn.get('recompiles_in_warmup', 0)} in warm-up, "
        f"{dyn.get('recompiles', 0)} while timed"
        if dyn
        else ""
    )
    spread = row["latency_s"] / row["latency_min_s"]
    if spread > UNSTABLE:
        graphs += f" [UNSTABLE: median {spread:.1f}x min — the machine is not quiet]"
    threads = row.get("threads", {})
    if "tvm" in threads:
        roof += f", threads: tvm {threads['tvm']}, torch {threads['torch_in_tvm_call']} in calls"
    return (
        f"{row['latency_s'] * 1e3:,.1f} ms (min {row['latency_min_s'] * 1e3:,.1f}), "
        f"{row['tokens_per_s']:,.1f} tok/s{roof}, peak +{mem}, "
        f"compile {row['compile_s']:.1f} s{graphs}, vs eager {ok}"
    )


def bench_table(doc: dict[str, Any]) -> str:
    """The rows as a Markdown table: latency (median, min), ratios, roofline fraction, check."""
    head = (
        "| workload | backend | median ms | min ms | vs eager | vs Inductor | roofline "
        "| cache MB moved | check |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in doc["rows"]:
        if "latency_s" not in r:
            why = r.get("error") or r.get("skipped") or ""
            lines.append(f"| {r['workload']} | {r['backend']} | {why[:60]} | | | | | | |")
            continue
        ratio = {p: r.get(f"speedup_vs_{p}") for p in ("eager", "inductor")}
        cells = [f"{v:.2f}x" if v else "—" for v in ratio.values()]
        check = r.get("check", {})
        verdict = "near tie" if check.get("near_tie") else "ok" if check.get("ok") else "MISMATCH"
        moved = r.get("cache_update_bytes")
        lines.append(
            f"| {r['workload']} | {r['backend']} | {r['latency_s'] * 1e3:,.1f} | "
            f"{r['latency_min_s'] * 1e3:,.1f} | {cells[0]} | {cells[1]} | "
            f"{r['roofline_fraction']:.1%} | {'—' if moved is None else f'{moved / 1e6:,.2f}'} | "
            f"{verdict} (rel {check.get('max_rel_err', 0):.1e}) |"
        )
    return "\n".join(lines)


def _write(path: Path, doc: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(doc, indent=1).encode())


def bench_svg(doc: dict[str, Any]) -> str:
    """Latency bars per workload (each workload on its own scale; a failed run has no bar)."""
    from dsv4c.report_html import bars_svg

    blocks, y = [], 0
    for name in dict.fromkeys(r["workload"] for r in doc["rows"]):
        items = [
            (f"{r['backend']} ({r['roofline_fraction']:.1%} of roofline)", r["latency_s"] * 1e3)
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
