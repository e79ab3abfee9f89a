"""Run a whole graph with the TVM backend on the CPU (llvm for the host's CPU).

`TVMBackend().compile(graph, "cpu", blas="auto")` lowers every op that has a TVM emitter to a
scheduled TensorIR kernel and builds all distinct kernels at once (one LLVM module, cached per
session by op signature); every other op runs its torch reference (the semantics `ir.interpret`
uses) and is listed in `report()["fallbacks"]` with the reason. Shapes stay symbolic in the
kernels: B, T are bound from the input tensors on each call, so one build serves every size.
Tensors cross into TVM by DLPack (torch tensors are passed to the packed functions directly; the
outputs are torch tensors the kernels write in place): no copies.

`exe.profile = True` times every step; `report()["profile"]` sums the seconds per op and
whether it ran a kernel or the reference (where the time goes).

`blas`: "auto" (GEMMs of at least `BLAS_MIN_FLOPS` call `torch.matmul`, i.e. MKL/OpenBLAS, as
Inductor does), "never" (every matmul runs its TVM kernel) or "always". The report says which
matmuls called BLAS and how often.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ir
from backends.base import Support, feed_inputs
from backends.reference import run_node
from backends.targets import Target, get_target
from backends.tvm.emitters import TVM_EMITTERS, Launch, emit_node
from backends.tvm.kernel import Kernel, build, host_target

__all__ = ["Step", "TVMBackend", "TVMExecutable"]

BLAS_POLICIES = ("auto", "never", "always")


@dataclass
class Step:
    node: ir.Node
    launch: Launch | None
    reason: str = ""  # why it falls back (when launch is None)


class TVMExecutable:
    def __init__(self, graph: ir.Graph, target: Target, blas: str = "auto") -> None:
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
        self.steps: list[Step] = []
        for node in graph.ops:
            found = emit_node(node, target, {"blas": blas})
            if isinstance(found, str):
                self.steps.append(Step(node, None, found))
            else:
                self.steps.append(Step(node, found))
        self.llvm_target = host_target()
        self.fns = build(self.kernels(), self.llvm_target)
        self.profile = False  # True: time every step (report()["profile"])
        self.step_seconds: Counter[str] = Counter()

    def __call__(self, *args: Any, params: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
        feed, env = feed_inputs(self.graph, args, params)
        values = {v.name: t for v, t in zip(self.graph.inputs, feed)}
        device = next((t.device for t in feed if hasattr(t, "device")), None)
        for step in self.steps:
            ins = [values[v.name] for v in step.node.operands]
            start = time.perf_counter() if self.profile else 0.0
            if step.launch is None:
                outs = run_node(step.node, ins, env, device)
            else:
                outs = step.launch(ins, env, self.fns)
            if self.profile:
                where = "reference" if step.launch is None else "kernel"
                self.step_seconds[f"{step.node.name} ({where})"] += time.perf_counter() - start
            values.update({r.name: t for r, t in zip(step.node.results, outs)})
        return tuple(values[v.name] for v in self.graph.outputs)

    def kernels(self) -> list[Kernel]:
        """The distinct kernels of the graph, in first-use order."""
        seen: dict[str, Kernel] = {}
        for step in self.steps:
            for k in step.launch.kernels if step.launch is not None else ():
                seen.setdefault(k.key, k)
        return list(seen.values())

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
                by_key[k].name: c["blas"] for k, c in calls.items() if c.get("blas", 0) > 0
            },
            "fallbacks": [{"op": op, "reason": r, "count": n} for (op, r), n in falls.items()],
            "profile": {k: round(v, 6) for k, v in self.step_seconds.most_common()},
        }


class TVMBackend:
    name = "tvm"

    def supports(self, node: ir.Node) -> Support:
        return TVM_EMITTERS.supports(node)

    def compile(
        self, graph: ir.Graph, target: str | Target = "cpu", *, blas: str = "auto"
    ) -> TVMExecutable:
        return TVMExecutable(graph, get_target(target), blas=blas)
