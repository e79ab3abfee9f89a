"""`Compiled`: the result of `dsv4c.compile` or `dsv4c.load` — entry points that run, plus the
artifact files they came with.

    c = dsv4c.compile(model, (tokens,), backend="triton", target="cpu")
    (logits,) = c(tokens)                       # the first entry point; a tuple of tensors
    c.entry("decode")(token, pos, cache)        # another entry point (nested inputs are flattened)
    c.save("out/")                              # the artifact directory (see artifact.py)

Inputs are checked before anything runs: their number, dtypes and shapes against the entry point's
IR types (symbolic dims bound consistently), the parameters against the graph's parameter inputs,
the tensors' device against the target, and their sizes and index values against the entry
point's limits (`dsv4c.limits`: token ids within the tables they index, positions and lengths
within the compiled cache). Failures raise `InputError` saying which input and what was
expected. Parameters are checked once per set of tensor objects (the bound state dict
is checked on the first call only).

In place or functional (`inplace`, an option of `dsv4c.compile` and `dsv4c.load`, default
False): a graph's aliased outputs (`Graph.aliases`, the cache and compressor-state updates that
`passes.plan_memory` marks) are either written into the caller's tensors — a decode step then
moves only the rows it writes, and the returned cache entries *are* the tensors passed in — or,
by default, returned as new tensors with the inputs left untouched, as the eager model does.
Functional is the default because it is what the PyTorch module means: a caller that keeps the
old cache (to retry a step, to branch two continuations, to compare with eager) gets what it
expects. In place is opt-in, like JAX's `donate_argnums`: `compile(..., inplace=True)`,
`load(dir, inplace=True)` or `compiled.inplace = True`. Donated tensors must not share memory
with another input (checked on each call).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import is_
from pathlib import Path
from typing import Any

import ir
from backends.targets import Target
from dsv4c.errors import InputError, TargetMismatchError
from dsv4c.limits import Limits, derive_limits

__all__ = ["Compiled", "EntryPoint", "signature"]


def signature(g: ir.Graph) -> dict[str, Any]:
    """An entry point's interface as JSON: inputs (name, type, role) and outputs (name, type)."""
    return {
        "inputs": [
            {"name": v.name, "type": str(v.type), "role": g.roles.get(v.name, "activation")}
            for v in g.inputs
            if g.roles.get(v.name) != "parameter"
        ],
        "params": len(g.params),
        "outputs": [
            {"name": v.name, "type": str(v.type)} | _alias_of(g, k) for k, v in enumerate(g.outputs)
        ],
    }


def _alias_of(g: ir.Graph, k: int) -> dict[str, str]:
    """{"into": input name} for an output written into an input's buffer in place."""
    return {"into": g.aliases[k]} if k in g.aliases else {}


@dataclass
class EntryPoint:
    """One compiled method: its final graph and the backend executable running it."""

    name: str
    graph: ir.Graph
    executable: Any
    target: Target
    params: Mapping[str, Any] | None = None  # bound parameters (from the compiled module)
    model: Mapping[str, Any] | None = None  # the manifest's model info (its input limits)
    calls: int = field(default=0)
    inplace: bool = False  # write the aliased outputs into the caller's tensors (module doc)
    _checked_params: tuple[Any, ...] | None = field(default=None, repr=False)
    _passed_layout: list | None = field(default=None, repr=False)  # `_check_donated`'s last

    def __call__(self, *args: Any, params: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
        import torch

        leaves = self._flatten(args)
        feed = self._check(leaves, params)
        self.calls += 1
        with torch.no_grad():  # compiled graphs are inference graphs
            if not (self.inplace and self.graph.aliases):
                return self.executable(*leaves, params=feed)
            self._check_donated(leaves)
            if self._runs_in_place:
                return self.executable(*leaves, params=feed, inplace=True)
            return self._copy_back(leaves, self.executable(*leaves, params=feed))

    @functools.cached_property
    def _donated(self) -> list[tuple[int, int]]:
        """(output index, runtime input index) of every output written in place."""
        where = {v.name: i for i, v in enumerate(self._runtime)}
        return [(k, where[name]) for k, name in sorted(self.graph.aliases.items())]

    @functools.cached_property
    def _runs_in_place(self) -> bool:
        """Whether the executable writes the aliases itself (TVM CPU, Triton): `inplace=`."""
        import inspect

        call = getattr(self.executable, "__call__", None)
        return call is not None and "inplace" in inspect.signature(call).parameters

    def _copy_back(self, leaves: list[Any], outs: tuple[Any, ...]) -> tuple[Any, ...]:
        """In place for an executable that computes functionally (reference, distributed)."""
        out = list(outs)
        for k, i in self._donated:
            if out[k] is not leaves[i]:
                leaves[i].copy_(out[k])
                out[k] = leaves[i]
        return tuple(out)

    def _check_donated(self, leaves: list[Any]) -> None:
        """A tensor written in place must not overlap another input in memory: the step would
        read what it already overwrote (one sweep over the inputs' byte ranges). Inputs at the
        same addresses with the same layouts as the last ones that passed are not swept again."""
        layout = [(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in leaves]
        if layout == self._passed_layout:
            return
        self._sweep_donated(leaves)
        self._passed_layout = layout

    def _sweep_donated(self, leaves: list[Any]) -> None:
        donated = {i for _, i in self._donated}
        active: list[tuple[int, int]] = []  # (end, input index) of ranges still open
        for start, end, i in sorted(_byte_range(t, i) for i, t in enumerate(leaves) if t.numel()):
            active = [(e, j) for e, j in active if e > start]
            hit = next((j for _, j in active if i in donated or j in donated), None)
            if hit is not None:
                a, b = sorted((i, hit), key=lambda k: k not in donated)
                raise InputError(
                    f"{self.name}: input {self._runtime[a].name} is written in place but "
                    f"overlaps input {self._runtime[b].name} in memory; pass separate tensors "
                    "(e.g. a .clone()) or set inplace=False"
                )
            active.append((end, i))

    def _flatten(self, args: tuple[Any, ...]) -> list[Any]:
        """The input tensors in graph order. A dict argument is matched by key (its inputs are
        named `<arg>.<key>`), so a cache dict whose keys come in another order still fits."""
        import torch
        import torch.utils._pytree as pytree

        names = self._runtime_names
        leaves: list[Any] = []
        for arg in args:
            pos = len(leaves)
            if isinstance(arg, torch.Tensor):
                leaves.append(arg)
                continue
            if not isinstance(arg, Mapping) or pos >= len(names) or "." not in names[pos]:
                leaves += pytree.tree_leaves(arg)
                continue
            prefix, want = self._dict_keys[pos]
            if _flat(arg):  # str keys to tensors: the keys are the path names (no pytree walk)
                got = arg
            else:
                got = {_path_text(p): leaf for p, leaf in pytree.tree_flatten_with_path(arg)[0]}
            if got.keys() != set(want):
                missing = sorted(set(want) - set(got))[:3]
                extra = sorted(set(got) - set(want))[:3]
                raise InputError(
                    f"{self.name}: input {prefix[:-1]} has other keys than compiled "
                    f"(missing {missing}, unexpected {extra})"
                )
            leaves += [got[k] for k in want]
        return leaves

    @functools.cached_property
    def _runtime_names(self) -> list[str]:
        return [v.name for v in self._runtime]

    @functools.cached_property
    def _dict_keys(self) -> dict[int, tuple[str, list[str]]]:
        """Runtime input index -> (`<arg>.`, the keys in graph order) of a dict argument that
        would start there: the run of inputs named with that prefix."""
        names, out = self._runtime_names, {}
        for pos, name in enumerate(names):
            if "." not in name:
                continue
            prefix = name.split(".")[0] + "."
            want = []
            for n in names[pos:]:
                if not n.startswith(prefix):
                    break
                want.append(n[len(prefix) :])
            out[pos] = (prefix, want)
        return out

    def _check(self, leaves: list[Any], params: Mapping[str, Any] | None) -> dict[str, Any]:
        from ir.interpreter import InterpretError, bind_symbols

        runtime = self._runtime
        if len(leaves) != len(runtime):
            want = ", ".join(f"{v.name}: {v.type}" for v in runtime[:8])
            more = ", ..." if len(runtime) > 8 else ""
            raise InputError(
                f"{self.name}: expected {len(runtime)} input tensor(s) ({want}{more}), "
                f"got {len(leaves)}"
            )
        feed = self._params(params)
        ordered = [feed[n] for n in self._param_names]
        # parameters are checked once per set of tensor objects (they bind no symbol unless a
        # parameter has a symbolic dim); the runtime inputs on every call
        again = not self._static_params or not _same(ordered, self._checked_params)
        inputs, tensors = (runtime, leaves)
        if again:
            inputs, tensors = runtime + self._param_values, leaves + ordered
        try:
            env = bind_symbols(inputs, tensors) if again else self._bind_runtime(leaves)
        except InterpretError as e:
            raise InputError(f"{self.name}: {str(e).replace('%', '')}") from None
        self._check_device(tensors)
        self.limits.check(self.name, runtime, leaves, env)
        if again:
            self._checked_params = tuple(ordered)
        return feed

    @functools.cached_property
    def _runtime(self) -> list[ir.Value]:
        return [v for v in self.graph.inputs if self.graph.roles.get(v.name) != "parameter"]

    @functools.cached_property
    def _bind_runtime(self) -> Any:
        from ir.interpreter import SymbolBinder

        return SymbolBinder(self._runtime)

    @functools.cached_property
    def limits(self) -> Limits:
        """What the inputs' sizes and index values may be (`dsv4c.limits`)."""
        return derive_limits(self.graph, self.model)

    @functools.cached_property
    def _static_params(self) -> bool:
        return all(isinstance(d, int) for v in self.graph.params for d in v.shape)

    def _params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        source = params if params is not None else self.params
        names = self._param_names
        if not names:
            return {}
        if source is None:
            v = self.graph.params[0]
            raise InputError(
                f"{self.name}: needs {len(names)} parameter tensor(s) (e.g. {v.name}: {v.type}) "
                "and none are bound; pass params=model.state_dict() (or a safetensors state dict)"
            )
        missing = [n for n in names if n not in source]
        if missing:
            v = next(v for v in self.graph.params if v.name == missing[0])
            raise InputError(
                f"{self.name}: params lacks {len(missing)} of {len(names)} parameter(s), first "
                f"{v.name}: {v.type}"
            )
        return {n: source[n] for n in names}

    @functools.cached_property
    def _param_values(self) -> list[ir.Value]:
        return self.graph.params  # a list built per access: kept for the per-call checks

    @functools.cached_property
    def _param_names(self) -> list[str]:
        return [v.name for v in self._param_values]

    def _check_device(self, tensors: list[Any]) -> None:
        want = self.target.torch_device
        if want is None:  # OpenCL/WebGPU source: the executable says which device it needs
            return
        for t in tensors:
            dev = getattr(t, "device", None)
            if dev is None or dev.type == want:
                continue
            if dev.type == "meta":
                raise InputError(
                    f"{self.name}: got a meta tensor; meta tensors have no data to run"
                )
            raise TargetMismatchError(
                f"{self.name}: compiled for target {self.target.name} ({self.target.description}), "
                f"which runs on {want} tensors, got a tensor on {dev}; "
                + (
                    "move the inputs to the GPU"
                    if want == "cuda"
                    else "recompile for a GPU target (e.g. target='sm_90')"
                )
            )


def _byte_range(t: Any, i: int) -> tuple[int, int, int]:
    """(first byte, one past the last byte, i) of a non-empty tensor's elements."""
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + span * t.element_size(), i


def _flat(arg: Any) -> bool:
    """A dict of str keys to tensors (a model's cache): its pytree path names are its keys."""
    import torch

    return type(arg) is dict and all(
        type(k) is str and isinstance(v, torch.Tensor) for k, v in arg.items()
    )


def _same(a: list[Any], b: tuple[Any, ...] | None) -> bool:
    return b is not None and len(a) == len(b) and all(map(is_, a, b))


def _path_text(path: tuple) -> str:
    """A pytree key path as the frontend names it: `layers.0.attn.window_kv`."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class Compiled:
    """Compiled entry points, their target and backend, and the artifact files (in memory)."""

    def __init__(
        self,
        entries: Mapping[str, EntryPoint],
        *,
        backend: str,
        target: Target,
        manifest: dict[str, Any],
        files: dict[str, bytes],
        path: Path | None = None,
        inplace: bool = False,
    ) -> None:
        if not entries:
            raise ValueError("Compiled needs at least one entry point")
        self.entries = dict(entries)
        for e in self.entries.values():
            e.model = manifest.get("model") or {}
        self.inplace = inplace
        self.backend = backend
        self.target = target
        self.manifest = manifest
        self.files = files
        self.path = path

    @property
    def inplace(self) -> bool:
        """Whether calls write the cache updates into the caller's tensors (module docstring)."""
        return all(e.inplace for e in self.entries.values())

    @inplace.setter
    def inplace(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"inplace must be True or False, got {value!r}")
        for e in self.entries.values():
            e.inplace = value

    @property
    def default(self) -> EntryPoint:
        return next(iter(self.entries.values()))

    @property
    def graph(self) -> ir.Graph:
        """The final IR of the first entry point."""
        return self.default.graph

    def entry(self, name: str) -> EntryPoint:
        if name not in self.entries:
            raise KeyError(f"no entry point {name!r}; this artifact has {', '.join(self.entries)}")
        return self.entries[name]

    def __call__(self, *args: Any, params: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
        return self.default(*args, params=params)

    def bind(self, params: Mapping[str, Any]) -> Compiled:
        """Use `params` (e.g. `model.state_dict()`) whenever a call passes none."""
        for e in self.entries.values():
            e.params = params
        return self

    def report(self) -> dict[str, Any]:
        import json

        return json.loads(self.files["report.json"])

    def save(self, path: str | Path) -> Path:
        """Write the artifact directory (atomically; an earlier artifact there is replaced)."""
        from dsv4c.artifact import write_artifact

        manifest = {k: v for k, v in self.manifest.items() if k != "files"}
        self.path = write_artifact(path, manifest, self.files)
        return self.path

    def __repr__(self) -> str:
        names = ", ".join(self.entries)
        return f"<Compiled {names} for {self.target.name} ({self.backend})>"
