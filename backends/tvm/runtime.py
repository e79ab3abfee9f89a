"""Run a whole graph with the TVM backend on the CPU (llvm for the host's CPU).

`TVMBackend().compile(graph, "cpu", blas="auto")` lowers every op that has a TVM emitter to a
scheduled TensorIR kernel and builds all distinct kernels at once (one LLVM module, cached per
session by op signature); every other op runs its torch reference (the semantics `ir.interpret`
uses) and is listed in `report()["fallbacks"]` with the reason. Shapes stay symbolic in the
kernels: B, T are bound from the input tensors on each call, so one build serves every size.
Tensors cross into TVM by DLPack (torch tensors are passed to the packed functions directly; the
outputs are torch tensors the kernels write in place): no copies.

A call costs little Python beyond the launches (a decode step launches ~150 kernels): each
binding of the symbols gets a `Plan` once, where every step is a closure with its output
shapes, its implementation (kernel, BLAS, reference with bound attributes) and its packed
function resolved, reading and writing a list of value slots; a slot is cleared after its last
reader. Steps that only view parameters (a weight's transpose, 25 of a `small` decode step's
242) or make constants are hoisted out of the call (`Plan.invariant`): run once, kept while the
same parameter tensors come back. The inputs are checked on every call, the parameters once per
set of tensor objects (`backends.tvm.inputs`).

A plan whose kernel results fit `REUSE_MAX_BYTES` (a decode step, not a prefill) runs
`Plan.reusing`: each kernel writes buffers allocated once, and while the same tensors come back
(parameters, caches, the reused buffers themselves) a launch is one packed call on the argument
list of its last call, with no allocation or check. On the 2-core Xeon each small op of a
`small` decode step cost 2-3x its isolated time in sequence (caches cold after the weights
streamed through), so the Python and torch between the kernels weighed: with reuse a 7.6 ms
step spends 1.5 ms outside its packed functions (docs/benchmarks.md, issue 19). Only results
no caller can hold after the call are reused (`TVMExecutable._escaping`), one call runs the
buffers at a time (another thread's call meanwhile runs fresh ones), and the report gives their
bytes (`reused_bytes`).

`TVMBackend().load(graph, target, library)` puts the same executable together from a built
library (`backends.tvm.library`, what an artifact ships): the emitters run under `PREBUILT`, so
nothing is lowered or compiled and each kernel's packed function comes from the library.

`exe.profile = True` times every step; `report()["profile"]` sums the seconds per op and
whether it ran a kernel or the reference (where the time goes), and `step_times` the seconds
and calls per step index (`steps[i]`: its node, its kernels), for a per-kernel profile
(`dsv4c.bench_profile`); `profile_env` is the last profiled call's symbol binding. Off
(the default), a call runs the plan's untimed closures: no cost.

`exe(*args, params=..., inplace=True)` writes the graph's aliased outputs (`Graph.aliases`: the
cache updates) into the caller's input tensors and returns those tensors; the default
(`inplace=False`) leaves the inputs as they were (`backends.inplace`, `backends.tvm.inplace`).

Threads: a call first sizes TVM's thread pool (`use_threads`) to `exe.threads`, or when that is
None to `$TVM_NUM_THREADS` when set, else to `torch.get_num_threads()` at that call: the kernels
run on as many threads as torch would. (TVM's own default, without `$TVM_NUM_THREADS`, is half of
`std::thread::hardware_concurrency()` on x86, assuming hyper-threads: 1 thread on a 2-vCPU box
where torch runs 2.) Reconfiguring costs one packed call and only happens when the count changes;
an unchanged count costs a dict lookup per call.

Torch inside a step (issue 19): BLAS GEMMs, reference ops and the in-place writers' copies run on
torch's OpenMP pool (libgomp), whose workers spin for ~15-17 ms of CPU after every parallel region
(GOMP_SPINCOUNT's default) and so take the cores TVM's pool needs: with both pools at 2 threads on
2 cores, each TVM parallel launch after a torch region waited for a time slice (~0.5-1 ms for an
8x512 rmsnorm). So a call holds torch at 1 thread (`torch.set_num_threads`, ~0.1 us) and gives
it the caller's threads back only around steps with enough work to pay for that spin
(`torch_heavy`: a single-thread estimate from the cost model of at least `TORCH_PARALLEL_MIN_FLOPS`
or `TORCH_PARALLEL_MIN_BYTES`: prefill-sized GEMMs and the prefill BLAS paths of the attention and
MoE ops, never a decode step's); TVM kernels are not affected (their own pool). `exe.torch_parallel = "always"` keeps torch's threads throughout (the
behaviour before). The hold is per calling thread for OpenMP; MKL's thread count is global.

`blas`: "auto" (GEMMs of at least `BLAS_MIN_FLOPS` call `torch.matmul`, i.e. MKL/OpenBLAS, as
Inductor does), "never" (every matmul runs its TVM kernel) or "always". The report says which
matmuls called BLAS and how often.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ir
from backends.base import KernelRecord, Support
from backends.inplace import aliased_results, update_call
from backends.targets import Target, get_target
from backends.tvm.emitters import (
    TVM_EMITTERS,
    Call,
    GemmEpilogueLaunch,
    Launch,
    MatmulLaunch,
    emit_node,
    reference_call,
    shape_of,
)
from backends.tvm.inplace import emitted_node, writer, writes_rows
from backends.tvm.inputs import Inputs
from backends.tvm.kernel import PREBUILT, Kernel, build, host_target, kernel_records
from backends.tvm.library import Library, runtime_function
from backends.tvm.lower_shape import SHAPE_OPS
from passes.fuse_elementwise import VIEWS, FusionPolicy
from passes.memory_plan import UPDATES

if TYPE_CHECKING:
    from backends.tvm.device import DeviceExecutable

__all__ = ["CPU_FUSION", "Plan", "Step", "TVMBackend", "TVMExecutable", "pool_threads", "use_threads"]

# the generic fusion for this backend on the CPU (`dsv4c.driver.fusion_policy`): slices, selects,
# concats and permutes join the elementwise kernels around them (each lowers to a stage that
# inlines into its readers, `lower_shape`), so a RoPE spelled with them is one kernel; pad stays
# out (no model body here needs it, and its bounds guards were not tried inside these bodies);
# every elementwise op has a te lowering (no `no_body_rule` exclusions)
CPU_FUSION = FusionPolicy(no_body_rule=frozenset(), movement=frozenset(SHAPE_OPS) - VIEWS - {"pad"})
BLAS_POLICIES = ("auto", "never", "always")
TORCH_PARALLEL = ("heavy", "always")
# a step run by torch gets torch's threads when its cost is at least this (else 1 thread): ~1 s
# of single-thread GEMM or ~25 ms of single-thread streaming, well above the ~15 ms libgomp's
# workers then spin on the other cores
TORCH_PARALLEL_MIN_FLOPS = 1 << 30
TORCH_PARALLEL_MIN_BYTES = 1 << 28
_SHARE_ALL_CORES = -3  # TVM's ThreadGroup::kSpecifyThreadShareAllCore: workers float over the CPUs
_POOLS: dict[int, int] = {}  # calling thread's ident -> threads its TVM pool was set to
_FORKED: set[int] = set()  # threads whose pool was built before a fork (its workers are gone)


def _pools_lost_in_fork() -> None:
    """In a forked child: the pools built so far have no workers (threads are not forked)."""
    _FORKED.update(_POOLS)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pools_lost_in_fork)


def pool_threads(threads: int | None = None) -> int:
    """The threads a TVM call should use: `threads`, else `$TVM_NUM_THREADS` when set, else
    torch's intra-op thread count (read now: `torch.set_num_threads` later changes it)."""
    if threads is not None:
        return threads
    env = os.environ.get("TVM_NUM_THREADS")
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise ValueError(f"TVM_NUM_THREADS must be a positive integer, got {env!r}")
        return int(env)
    import torch

    return torch.get_num_threads()


def use_threads(n: int) -> None:
    """Run the calling thread's TVM parallel loops on `n` threads (TVM's pool and its concurrency
    limit are per calling thread). A no-op when already so.

    Through TVM's `runtime.config_threadpool(mode, n, cpus)`: it sets the thread's concurrency
    limit to `len(cpus)` and the pool's threads in use to `n` (a launch runs `n` tasks, the first
    on the calling thread). The pool's size is fixed when it is first built, by the first call:
    max(n, CPUs this process may use) threads; a later, larger `n` is capped there. `cpus` lists
    every CPU the process may use (cycled to that size), so TVM's thread binding (on unless
    $TVM_BIND_THREADS=0) never pins this thread, which also runs torch, to fewer CPUs. In a
    child forked after this thread's pool was built, its kernels run on 1 thread: the pool's
    workers did not survive the fork."""
    ident = threading.get_ident()
    if ident in _FORKED:  # a forked child: the pool's workers stayed in the parent
        n = 1  # a launch then runs its one task on this thread (more would wait forever)
    if _POOLS.get(ident) == n:
        return
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"TVM threads must be a positive int, got {n!r}")
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    cpus = [str(allowed[i % len(allowed)]) for i in range(max(n, len(allowed)))]
    runtime_function("runtime.config_threadpool")(_SHARE_ALL_CORES, n, cpus)
    _POOLS[ident] = n


def torch_heavy(node: ir.Node, env: dict) -> bool:
    """Whether `node` (run by torch: BLAS or its reference) has the work to use torch's threads
    at the binding `env` (the cost model's flops or bytes; no cost: not heavy)."""
    from passes.cost import evaluate, kernel_cost

    try:
        cost = kernel_cost(node)
        flops, nbytes = evaluate(cost.flops, env), evaluate(cost.bytes, env)
    except (ValueError, NotImplementedError, TypeError, KeyError, AttributeError):
        return False
    return flops >= TORCH_PARALLEL_MIN_FLOPS or nbytes >= TORCH_PARALLEL_MIN_BYTES


def _torch_threads(call: Call, held: list[int]) -> Call:
    """`call` run with torch at the caller's thread count (`held[0]`), then held at 1 again; as
    it is when torch is not held (`held[0] == 0`)."""

    def run(inputs: Any) -> tuple[Any, ...]:
        import torch

        if not held[0]:
            return call(inputs)
        torch.set_num_threads(held[0])
        try:
            return call(inputs)
        finally:
            torch.set_num_threads(1)

    return run


@dataclass
class Step:
    node: ir.Node
    launch: Launch | None
    reason: str = ""  # why it falls back (when launch is None)
    operands: tuple[int, ...] = ()  # value slot of each operand
    results: tuple[int, ...] = ()  # value slot of each result
    aliased: tuple[int, ...] = ()  # results written into their operand's buffer (graph.aliases)

    def bind(
        self, env: dict, fns: dict[str, Any], inplace: bool = False, reuse: bool = False
    ) -> Call:
        """The step's `Call`; `reuse` (`Plan.reusing`): a kernel's results in buffers of its
        own (`Launch.bind`), a reference view's result kept (`_kept_view`)."""
        if self.launch is None:
            call = reference_call(self.node, env)
            if reuse:  # only a one-operand view is bound so (`TVMExecutable._reusable`)
                call = _kept_view(call)
        else:
            call = self.launch.bind(env, fns, reuse)
        if not self.aliased:
            return call
        write = writer(self.node, call, keep=reuse)
        return update_call(self.node, self.aliased, call, write, inplace)


# reference ops whose result is a view of their operand (or made from nothing): over parameters
# alone they are the same every call (`Plan.invariant`)
VIEW_OPS = frozenset({"reshape", "permute", "expand", "squeeze", "unsqueeze", "slice", "select"})


def _kept_view(call: Call) -> Call:
    """A one-operand view op's reference, its result kept while the same operand tensor comes
    back: the same view, which follows the operand's data. A result that is not a view (reshape
    copies a non-contiguous operand) is never kept."""
    held: Any = None
    out: tuple[Any, ...] = ()

    def run(inputs: Sequence[Any]) -> tuple[Any, ...]:
        nonlocal held, out
        if held is not None and inputs[0] is held:
            return out
        result = call(inputs)
        view = _storage(result[0]) == _storage(inputs[0])
        held, out = (inputs[0], result) if view else (None, ())
        return result

    return run


# the most bytes a plan's reused results may hold (`Plan.reusing`), and all of an executable's
# plans together (`TVMExecutable.plan`): a decode step's few MB; a prefill's GBs of
# intermediates keep being freed as soon as they are dead
REUSE_MAX_BYTES = 32 << 20


@dataclass
class Plan:
    """The graph's steps for one binding of the symbols: each node's `Call` resolved once, and
    the value slots (graph inputs first) it reads and writes; `last_use` frees what no later step
    reads, so intermediates die as early as in eager.

    `reusing`: the same steps with the kernels' results in buffers allocated once
    (`reused_bytes` in all) and written again on every call, and the argument list of a launch
    kept while the same tensors come back (`emitters.kernel_call`); reference views of such
    buffers are kept too. Only results no caller can hold after the call (`TVMExecutable.
    _escaping`), and only while they fit `REUSE_MAX_BYTES`: a decode step, not a prefill. One
    call at a time runs it; a call from another thread meanwhile runs `calls`. It holds the
    tensors its last call read (to know them again) until the next call or until the plan is
    dropped (`TVMExecutable.plan`).

    `invariant`: the steps that read only parameters (or nothing) and are views or constants
    (a weight's transpose `permute(w)`, iotas): hoisted out of the step. They run on the first
    call and again only when a parameter tensor object changes; their values are kept while
    every one of them shares storage with a parameter or reads none (a view follows the
    parameter's data, also when it is updated in place); otherwise they run on every call.
    `steps`: the step index of each call in `calls` (the profile's keys)."""

    calls: list[tuple[Call, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    outputs: tuple[int, ...]
    slots: int
    invariant: list[tuple[Call, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    params: tuple[int, ...] = ()  # the parameter slots the invariant steps read
    steps: tuple[int, ...] = ()
    reusing: list[tuple[Call, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None
    reused_bytes: int = 0
    _seen: tuple[Any, ...] | None = None  # the parameter tensors the kept values come from
    _kept: list[tuple[int, Any]] = field(default_factory=list)  # (slot, value) while valid
    _busy: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def run(self, feed: list[Any]) -> tuple[Any, ...]:
        if self.reusing is not None and self._busy.acquire(blocking=False):
            try:
                return self._run(self.reusing, feed)
            finally:
                self._busy.release()
        return self._run(self.calls, feed)

    def _run(self, calls: list, feed: list[Any]) -> tuple[Any, ...]:
        values: list[Any] = feed + [None] * (self.slots - len(feed))
        if self.invariant:
            self._run_invariant(values)
        for call, ins, outs, dead in calls:
            results = call([values[i] for i in ins])
            if len(outs) == 1:
                values[outs[0]] = results[0]
            else:
                for i, t in zip(outs, results):
                    values[i] = t
            for i in dead:
                values[i] = None
        return tuple(values[i] for i in self.outputs)

    def wrapped(self, wrap: Callable[[int, Call], Call]) -> Plan:
        """This plan with each call `c` of step index `i` replaced by `wrap(i, c)` (a timer);
        the hoisted steps as they are, and their kept values with them (a profiled call runs
        what an unprofiled one does)."""
        def each(calls: list) -> list:
            return [(wrap(i, call), *rest) for i, (call, *rest) in zip(self.steps, calls)]

        reusing = None if self.reusing is None else each(self.reusing)
        return dataclasses.replace(self, calls=each(self.calls), reusing=reusing)

    def _run_invariant(self, values: list[Any]) -> None:
        params = tuple(values[i] for i in self.params)
        seen = self._seen
        if seen is not None and all(a is b for a, b in zip(params, seen)):
            for i, t in self._kept:
                values[i] = t
            return
        for call, ins, outs in self.invariant:
            for i, t in zip(outs, call([values[i] for i in ins])):
                values[i] = t
        kept = [(i, values[i]) for _, _, outs in self.invariant for i in outs]
        made = [values[i] for _, ins, outs in self.invariant if not ins for i in outs]
        owners = {_storage(t) for t in (*params, *made)}
        views = all(_storage(t) in owners for _, t in kept)
        self._seen, self._kept = (params, kept) if views else (None, [])


def _storage(t: Any) -> int | None:
    """The address of tensor `t`'s storage (None for what is not a tensor)."""
    try:
        return t.untyped_storage().data_ptr()
    except (AttributeError, RuntimeError):
        return None


class TVMExecutable:
    """`library`: the kernels already built (an artifact's, `backends.tvm.library`): nothing is
    lowered or compiled, each kernel's packed function comes from the library. `threads`: the
    TVM pool's threads for every call (None: `pool_threads()` at each call, torch's count)."""

    def __init__(
        self,
        graph: ir.Graph,
        target: Target,
        blas: str = "auto",
        library: Library | None = None,
        threads: int | None = None,
        torch_parallel: str = "heavy",
    ) -> None:
        if torch_parallel not in TORCH_PARALLEL:
            msg = f"torch_parallel must be one of {TORCH_PARALLEL}, got {torch_parallel!r}"
            raise ValueError(msg)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if blas not in BLAS_POLICIES:
            raise ValueError(f"blas must be one of {BLAS_POLICIES}, got {blas!r}")
        if target.is_gpu:
            raise ValueError(
                f"TVM executables run on the CPU (target 'cpu'); for {target.name} emit CUDA "
                "source with backends.tvm.codegen.cuda_sources(graph, target)"
            )
        self.graph = graph
        self.target = target
        self.blas = blas
        self.threads = threads
        self.torch_parallel = torch_parallel
        self._held = [0]  # while a call holds torch at 1 thread: the caller's count (else 0)
        self.slot = {v.name: i for i, v in enumerate(graph.inputs)}
        self.steps: list[Step] = []
        if library is None:
            self._emit()
            self.llvm_target = host_target()
            self.fns = build(self.kernels(), self.llvm_target)
        else:
            token = PREBUILT.set(library.prebuilt)
            try:
                self._emit()
            finally:
                PREBUILT.reset(token)
            self.llvm_target = library.llvm
            self.fns = {k.key: library.functions[k.key] for k in self.kernels()}
        self.inputs = Inputs(graph)
        self.plans: dict[tuple, Plan] = {}  # per binding of the symbols (B, T, ...)
        self.profile = False  # True: time every step (report()["profile"])
        self.step_seconds: Counter[str] = Counter()
        self.step_times: dict[int, list[float]] = {}  # step index -> [seconds, calls]
        self.profile_env: dict = {}

    def _emit(self) -> None:
        updates = aliased_results(self.graph)
        for i, original in enumerate(self.graph.ops):
            aliased = updates.get(i, ())
            node = emitted_node(original, aliased)  # the row form of an aliased compress step
            found = emit_node(node, self.target, {"blas": self.blas})
            launch, reason = (None, found) if isinstance(found, str) else (found, "")
            operands = tuple(self.slot[v.name] for v in node.operands)
            for r in node.results:
                self.slot[r.name] = len(self.slot)
            results = tuple(self.slot[r.name] for r in node.results)
            self.steps.append(Step(node, launch, reason, operands, results, aliased))

    def __call__(
        self, *args: Any, params: Mapping[str, Any] | None = None, inplace: bool = False
    ) -> tuple[Any, ...]:
        """Run the graph; `inplace`: write the aliased outputs into their input tensors."""
        feed, env = self.inputs.feed(args, params)
        plan = self.plan(env, inplace)
        import torch

        caller = torch.get_num_threads()
        use_threads(pool_threads(self.threads))
        hold = caller > 1 and self.torch_parallel == "heavy"
        if hold:
            self._held[0] = caller
            torch.set_num_threads(1)
        try:
            if self.profile:
                self.profile_env = dict(env)
                return self._profiled(plan, feed)
            return plan.run(feed)
        finally:
            if hold:
                self._held[0] = 0
                torch.set_num_threads(caller)

    def plan(self, env: dict, inplace: bool = False) -> Plan:
        """The `Plan` for this binding of the symbols and mode (built on first use). `plans`
        runs from the least to the most recently used: the plans holding reused buffers are
        dropped from the least recent on while together they would pass `REUSE_MAX_BYTES` (a
        prefill per prompt length must not pile up buffers; a dropped plan is built again)."""
        key = (*sorted((str(k), v) for k, v in env.items()), ("inplace", inplace))
        plan = self.plans.pop(key, None)
        if plan is None:
            plan = self._make_plan(env, inplace)
            held = sum(p.reused_bytes for p in self.plans.values())
            for old in [k for k, p in self.plans.items() if p.reused_bytes]:
                if held + plan.reused_bytes <= REUSE_MAX_BYTES:
                    break
                held -= self.plans.pop(old).reused_bytes
        self.plans[key] = plan  # now the most recent
        return plan

    def _make_plan(self, env: dict, inplace: bool) -> Plan:
        outputs = tuple(self.slot[v.name] for v in self.graph.outputs)
        invariant = self._invariant_steps(set(outputs))
        last: dict[int, int] = {}
        for i, step in enumerate(self.steps):
            for s in step.operands:
                last[s] = i
        keep = set(outputs) | set(range(len(self.graph.inputs)))
        keep |= {s for i in invariant for s in self.steps[i].results}  # kept across calls
        reused, nbytes = self._reusable(env, invariant, outputs)
        calls, reusing, hoisted, order = [], [], [], []
        for i, step in enumerate(self.steps):
            call = step.bind(env, self.fns, inplace)
            if i in invariant:
                hoisted.append((call, step.operands, step.results))
                continue
            dead = tuple(s for s in dict.fromkeys(step.operands) if last[s] == i and s not in keep)
            again = step.bind(env, self.fns, inplace, reuse=True) if i in reused else call
            if _runs_torch(step, call) and torch_heavy(step.node, env):
                call = _torch_threads(call, self._held)
                again = _torch_threads(again, self._held)
            calls.append((call, step.operands, step.results, dead))
            reusing.append((again, step.operands, step.results, dead))
            order.append(i)
        params = self._parameter_slots()
        read = tuple(sorted({s for i in invariant for s in self.steps[i].operands} & params))
        return Plan(calls, outputs, len(self.slot), hoisted, read, tuple(order),
                    reusing if reused else None, nbytes)

    def _reusable(
        self, env: dict, invariant: set[int], outputs: tuple[int, ...]
    ) -> tuple[set[int], int]:
        """The steps `Plan.reusing` binds with `reuse` at `env`, and the bytes their kernels'
        results hold: kernels whose results do not escape, the compressor's row writer (it
        stores its kernel's results, never returns them) and one-operand reference views whose
        results do not escape; none when those bytes pass `REUSE_MAX_BYTES`."""
        escaping = self._escaping(set(outputs))
        found, nbytes = set(), 0
        for i, step in enumerate(self.steps):
            if i in invariant:
                continue
            escapes = bool(set(step.results) & escaping)
            if step.launch is None:
                view = step.node.name in VIEW_OPS and len(step.node.operands) == 1
                if view and not step.aliased and not escapes:
                    found.add(i)
                continue
            if writes_rows(step.node) if step.aliased else not escapes:
                found.add(i)
                for v in step.node.results:
                    nbytes += math.prod(shape_of(v, env)) * v.dtype.to_torch().itemsize
        return (found, nbytes) if nbytes <= REUSE_MAX_BYTES else (set(), 0)

    def _escaping(self, outputs: set[int]) -> set[int]:
        """The slots whose tensor may outlive the call: the graph's outputs, and what a step
        whose result escapes may return: an in-place writer its updated operand (`UPDATES`), a
        step run by torch (a reference op, a GEMM epilogue by references) a view of any
        operand. A kernel's result is new memory."""
        found = set(outputs)
        for step in reversed(self.steps):
            updates = UPDATES[step.node.name] if step.aliased else {}
            by_torch = step.launch is None or isinstance(step.launch, GemmEpilogueLaunch)
            for j, r in enumerate(step.results):
                if r not in found:
                    continue
                if j in updates:
                    found.add(step.operands[updates[j]])
                elif by_torch:
                    found.update(step.operands)
        return found

    def _parameter_slots(self) -> set[int]:
        roles = self.graph.roles
        return {i for i, v in enumerate(self.graph.inputs) if roles.get(v.name) == "parameter"}

    def _invariant_steps(self, outputs: set[int]) -> set[int]:
        """Indexes of the steps `Plan.invariant` hoists: reference views of parameters (or of
        such views) and ops without operands, whose results are not graph outputs."""
        fixed = self._parameter_slots()
        found = set()
        for i, step in enumerate(self.steps):
            view = step.node.name in VIEW_OPS or not step.node.operands
            if (
                step.launch is None
                and view
                and not step.aliased
                and all(s in fixed for s in step.operands)
                and not set(step.results) & outputs
            ):
                found.add(i)
                fixed.update(step.results)
        return found

    def _profiled(self, plan: Plan, feed: list[Any]) -> tuple[Any, ...]:
        """`plan.run` timing each step into `step_seconds` (op, and kernel or reference)."""

        def timed(i: int, call: Call) -> Call:
            step = self.steps[i]
            where = "reference" if step.launch is None else "kernel"
            per_step = self.step_times.setdefault(i, [0.0, 0])
            return _timed(call, self.step_seconds, f"{step.node.name} ({where})", per_step)

        return plan.wrapped(timed).run(feed)

    def kernels(self) -> list[Kernel]:
        """The distinct kernels of the graph, in first-use order."""
        seen: dict[str, Kernel] = {}
        for step in self.steps:
            for k in step.launch.kernels if step.launch is not None else ():
                seen.setdefault(k.key, k)
        return list(seen.values())

    def kernel_records(self) -> list[KernelRecord]:
        """One `KernelRecord` per distinct kernel: TVMScript of the CPU kernel under a header."""
        uses = [(s.node, s.launch.kernels if s.launch is not None else []) for s in self.steps]
        return kernel_records(uses, lambda k: k.source())

    def fallbacks(self) -> list[tuple[str, str]]:
        """(op mnemonic, reason) for every op that runs its reference instead of a kernel."""
        return [(s.node.name, s.reason) for s in self.steps if s.launch is None]

    def report(self) -> dict[str, Any]:
        falls = Counter(self.fallbacks())
        uses: Counter[str] = Counter()
        calls: dict[str, Counter[str]] = {}
        for s in self.steps:
            if s.launch is None:
                continue
            key = s.launch.kernels[0].key
            uses[key] += 1
            calls.setdefault(key, Counter()).update(s.launch.calls)
        by_key = {k.key: k for k in self.kernels()}
        return {
            "backend": "tvm",
            "target": self.target.name,
            "llvm": str(self.llvm_target),
            "blas": self.blas,
            "threads": pool_threads(self.threads),
            "torch_parallel": self.torch_parallel,
            "ops": len(self.graph.ops),
            "kernels": [
                {
                    "name": by_key[k].name,
                    "key": k,
                    "ops": list(by_key[k].fused_ops),
                    "uses": n,
                    "calls": dict(calls[k]),
                }
                for k, n in uses.items()
            ],
            "blas_calls": {
                by_key[k].symbol: c["blas"] for k, c in calls.items() if c.get("blas", 0) > 0
            },
            "fallbacks": [{"op": op, "reason": r, "count": n} for (op, r), n in falls.items()],
            "reused_bytes": sum(p.reused_bytes for p in self.plans.values()),
            "profile": {k: round(v, 6) for k, v in self.step_seconds.most_common()},
        }


class TVMBackend:
    name = "tvm"

    def supports(self, node: ir.Node) -> Support:
        return TVM_EMITTERS.supports(node)

    def compile(
        self,
        graph: ir.Graph,
        target: str | Target = "cpu",
        *,
        blas: str = "auto",
        threads: int | None = None,
    ) -> TVMExecutable | DeviceExecutable:
        """A CPU executable, or for a GPU target the compile-only `DeviceExecutable` (CUDA)."""
        tgt = get_target(target)
        if tgt.is_gpu:
            from backends.tvm.device import DeviceExecutable

            return DeviceExecutable(graph, tgt)
        return TVMExecutable(graph, tgt, blas=blas, threads=threads)

    def load(self, graph: ir.Graph, target: str | Target, library: Library) -> TVMExecutable:
        """`graph` running the kernels of a built `library` (nothing compiled); raises
        `MissingKernel` when the graph needs a kernel the library lacks."""
        return TVMExecutable(graph, get_target(target), library=library)


def _runs_torch(step: Step, call: Call) -> bool:
    """A reference step, a matmul that may call BLAS (`MatmulLaunch`, per layout at run time),
    or a launch bound to its BLAS path (`Launch.counted("blas", ...)`: the prefill forms of
    compress, the indexer, sparse MQA, the experts, GEMM epilogues, FP8 matmuls)."""
    if step.launch is None or isinstance(step.launch, MatmulLaunch):
        return True
    return getattr(call, "impl", None) == "blas"


def _timed(call: Call, seconds: Counter[str], key: str, per_step: list[float]) -> Call:
    """`call`, adding its seconds to `seconds[key]` and to `per_step` ([seconds, calls])."""

    def run(inputs: Any) -> tuple[Any, ...]:
        start = time.perf_counter()
        out = call(inputs)
        took = time.perf_counter() - start
        seconds[key] += took
        per_step[0] += took
        per_step[1] += 1
        return out

    return run
