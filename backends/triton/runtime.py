"""Run a whole graph with the Triton backend.

Ops with a Triton emitter launch generated kernels; every other op runs its torch reference
(the same semantics `ir.interpret` uses) and is listed in `report()["fallbacks"]` with the
reason. A kernel whose sizes only turn out unsupported at run time (a symbolic row longer than
one block on a GPU) runs the reference for that call, counted in `report()["runtime_fallbacks"]`.
Symbolic dims are bound from the input shapes on each call. `exe(*args, params=...,
inplace=True)` writes the aliased outputs (`Graph.aliases`: the cache updates) into the caller's
input tensors and returns those; by default the inputs are left as they were (`backends.inplace`,
`backends.triton.inplace`). On a GPU the kernels run
natively; on CPU tensors they need the Triton interpreter, i.e. `TRITON_INTERPRET=1` set before
`triton` is first imported.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ir
from backends.base import CostHints, KernelRecord, Support, feed_inputs
from backends.inplace import aliased_results, update_call
from backends.naming import locations
from backends.reference import run_node
from backends.targets import Target
from backends.triton.body import Unsupported
from backends.triton.emitters import (
    TRITON_EMITTERS,
    FusedLaunch,
    Launch,
    emit_node,
)
from backends.triton.inplace import writer
from backends.triton.kernel import KernelSource, triton_target
from ir.symbolic import dim_str

__all__ = ["TritonBackend", "TritonExecutable", "Step"]


@dataclass
class Step:
    node: ir.Node
    launch: Launch | None
    reason: str = ""  # why it falls back (when launch is None)


class TritonExecutable:
    def __init__(self, graph: ir.Graph, target: Target) -> None:
        self.graph = graph
        self.target = target
        self.steps: list[Step] = []
        for node in graph.ops:
            found = emit_node(node, target)
            if isinstance(found, str):
                self.steps.append(Step(node, None, found))
            else:
                self.steps.append(Step(node, found))
        self.launches: Counter[str] = Counter()  # kernel name -> launches so far
        self.runtime_fallbacks: Counter[tuple[str, str]] = Counter()  # (op, reason) -> calls
        self.updates = aliased_results(graph)  # step -> results written in place

    def __call__(
        self, *args: Any, params: Mapping[str, Any] | None = None, inplace: bool = False
    ) -> tuple[Any, ...]:
        """Run the graph; `inplace`: write the aliased outputs into their input tensors."""
        feed, env = feed_inputs(self.graph, args, params)
        values = {v.name: t for v, t in zip(self.graph.inputs, feed)}
        device = next((t.device for t in feed if hasattr(t, "device")), None)
        if device is not None and device.type == "cpu" and self.kernels():
            _require_interpreter()
        for i, step in enumerate(self.steps):
            ins = [values[v.name] for v in step.node.operands]
            if i in self.updates:
                outs = self._update(step, self.updates[i], ins, env, device, inplace)
            else:
                outs = self._compute(step, ins, env, device)
            values.update({r.name: t for r, t in zip(step.node.results, outs)})
        return tuple(values[v.name] for v in self.graph.outputs)

    def _compute(self, step: Step, ins: list[Any], env: dict, device: Any) -> tuple[Any, ...]:
        if step.launch is None:
            return run_node(step.node, ins, env, device)
        return self._launch(step, ins, env, device)

    def _update(
        self, step: Step, aliased: tuple[int, ...], ins: list[Any], env: dict, device: Any,
        inplace: bool,
    ) -> tuple[Any, ...]:
        """A cache update (`backends.inplace.update_call`): in place or on a copy."""
        compute = lambda inputs: self._compute(step, list(inputs), env, device)  # noqa: E731
        write = writer(step.node, step.launch)
        if write is not None and step.launch is not None:
            self.launches[step.launch.source.name] += 1  # type: ignore[union-attr]
        return update_call(step.node, aliased, compute, write, inplace)(ins)

    def _launch(self, step: Step, ins: list[Any], env: dict, device: Any) -> tuple[Any, ...]:
        """Launch the step's kernel; sizes only known now may still send it to the reference."""
        try:
            outs = step.launch(ins, env)  # type: ignore[misc]
        except Unsupported as e:
            self.runtime_fallbacks[(step.node.name, str(e))] += 1
            return run_node(step.node, ins, env, device)
        self.launches[step.launch.source.name] += 1  # type: ignore[union-attr]
        return outs

    def kernels(self) -> list[KernelSource]:
        """The distinct kernels of the graph, in first-use order."""
        seen: dict[str, KernelSource] = {}
        for step in self.steps:
            for source in _sources(step):
                seen.setdefault(source.key, source)
        return list(seen.values())

    def kernel_records(self) -> list[KernelRecord]:
        """One `KernelRecord` per distinct kernel (language "triton", a `.py` module), with the
        source lines of every op it runs for and how the launch tiles its domain. The op's
        kernel (its launch's `source`) has `cost.launches` = the device launches of one call of
        the op, every phase and kernel counted (`Launch.launches`: MoE experts 5, split-KV
        decode 2, compress's pool + finish 2); a launch's other kernels have 1."""
        sources: dict[str, KernelSource] = {}
        where: dict[str, dict[str, None]] = {}
        sites: dict[str, list[int]] = {}
        launch: dict[str, dict[str, Any]] = {}
        launches: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for source in _sources(step):
                sources.setdefault(source.key, source)
                sites.setdefault(source.key, []).append(i)
                for loc in _step_locations(step.node):
                    where.setdefault(source.key, {})[loc] = None
                launch.setdefault(source.key, _launch_info(step.launch))
                first = step.launch is not None and source.key == step.launch.source.key
                launches.setdefault(source.key, step.launch.launches if first else 1)
        return [
            KernelRecord(
                name=s.name,
                key=k,
                language="triton",
                ext="py",
                source=s.source,
                fused_ops=s.fused_ops,
                locations=tuple(where.get(k, ())),
                sites=tuple(sites[k]),
                launch=launch[k],
                cost=CostHints(launches=launches[k]),
            )
            for k, s in sources.items()
        ]

    def fallbacks(self) -> list[tuple[str, str]]:
        """(op mnemonic, reason) for every op that runs its reference instead of a kernel."""
        return [(s.node.name, s.reason) for s in self.steps if s.launch is None]

    def report(self) -> dict[str, Any]:
        falls = Counter(self.fallbacks())
        kernels = Counter(s.launch.source.key for s in self.steps if s.launch is not None)
        by_key = {k.key: k for k in self.kernels()}
        return {
            "backend": "triton",
            "target": self.target.name,
            "ops": len(self.graph.ops),
            "kernels": [
                {"name": by_key[k].name, "key": k, "ops": list(by_key[k].fused_ops), "uses": n}
                for k, n in kernels.items()
            ],
            "fallbacks": [
                {"op": op, "kind": ir.OPS[op].kind.value, "reason": r, "count": n}
                for (op, r), n in falls.items()
            ],
            "runtime_fallbacks": [
                {"op": op, "reason": r, "calls": n} for (op, r), n in self.runtime_fallbacks.items()
            ],
        }


def _sources(step: Step) -> tuple[KernelSource, ...]:
    """The kernels a step launches (`Launch.sources`)."""
    return () if step.launch is None else tuple(step.launch.sources)


def _step_locations(node: ir.Node) -> tuple[str, ...]:
    ops = node.attrs["body"].ops if node.name == "fused.kernel" else [node]
    return locations(ops, node.loc)


def _launch_info(launch: Launch | None) -> dict[str, Any]:
    """How a launch covers its domain, from the IR (generated kernels) or the template."""
    if isinstance(launch, FusedLaunch):
        plan = launch.kernel.plan
        return {
            "kind": "generated",
            "domain": [dim_str(d) for d in plan.domain],
            "grid": "(cdiv(n_rows, BLOCK_M),)" if plan.reduction else
                    "(cdiv(n_rows, BLOCK_M), cdiv(n_cols, BLOCK_N))",
            "tiles": ["BLOCK_M", "BLOCK_N"],
        }  # fmt: skip
    return {"kind": "template" if launch is not None else "none"}


def _require_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            "Triton kernels on CPU tensors run only in the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported (e.g. in the environment), or move the "
            "inputs to a GPU"
        )


class TritonBackend:
    name = "triton"

    def supports(self, node: ir.Node) -> Support:
        return TRITON_EMITTERS.supports(node)

    def compile(self, graph: ir.Graph, target: str | Target = "cpu") -> TritonExecutable:
        return TritonExecutable(graph, triton_target(target))  # refuses OpenCL/WebGPU
