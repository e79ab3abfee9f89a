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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
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
        "outputs": [{"name": v.name, "type": str(v.type)} for v in g.outputs],
    }


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
    _checked_params: tuple[Any, ...] | None = field(default=None, repr=False)

    def __call__(self, *args: Any, params: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
        import torch

        leaves = self._flatten(args)
        feed = self._check(leaves, params)
        self.calls += 1
        with torch.no_grad():  # compiled graphs are inference graphs
            return self.executable(*leaves, params=feed)

    def _flatten(self, args: tuple[Any, ...]) -> list[Any]:
        """The input tensors in graph order. A dict argument is matched by key (its inputs are
        named `<arg>.<key>`), so a cache dict whose keys come in another order still fits."""
        import torch.utils._pytree as pytree

        names = [v.name for v in self.graph.inputs if self.graph.roles.get(v.name) != "parameter"]
        leaves: list[Any] = []
        for arg in args:
            pos = len(leaves)
            if not isinstance(arg, Mapping) or pos >= len(names) or "." not in names[pos]:
                leaves += pytree.tree_leaves(arg)
                continue
            prefix = names[pos].split(".")[0] + "."
            want = []
            for n in names[pos:]:
                if not n.startswith(prefix):
                    break
                want.append(n[len(prefix) :])
            got = {_path_text(path): leaf for path, leaf in pytree.tree_flatten_with_path(arg)[0]}
            if set(got) != set(want):
                missing = sorted(set(want) - set(got))[:3]
                extra = sorted(set(got) - set(want))[:3]
                raise InputError(
                    f"{self.name}: input {prefix[:-1]} has other keys than compiled "
                    f"(missing {missing}, unexpected {extra})"
                )
            leaves += [got[k] for k in want]
        return leaves

    def _check(self, leaves: list[Any], params: Mapping[str, Any] | None) -> dict[str, Any]:
        from ir.interpreter import InterpretError, bind_symbols

        g = self.graph
        runtime = self._runtime
        if len(leaves) != len(runtime):
            want = ", ".join(f"{v.name}: {v.type}" for v in runtime[:8])
            more = ", ..." if len(runtime) > 8 else ""
            raise InputError(
                f"{self.name}: expected {len(runtime)} input tensor(s) ({want}{more}), "
                f"got {len(leaves)}"
            )
        feed = self._params(params)
        ordered = [feed[v.name] for v in g.params]
        # parameters are checked once per set of tensor objects (they bind no symbol unless a
        # parameter has a symbolic dim); the runtime inputs on every call
        again = not self._static_params or not _same(ordered, self._checked_params)
        inputs, tensors = (runtime + g.params, leaves + ordered) if again else (runtime, leaves)
        try:
            env = bind_symbols(inputs, tensors)
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
    def limits(self) -> Limits:
        """What the inputs' sizes and index values may be (`dsv4c.limits`)."""
        return derive_limits(self.graph, self.model)

    @functools.cached_property
    def _static_params(self) -> bool:
        return all(isinstance(d, int) for v in self.graph.params for d in v.shape)

    def _params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        source = params if params is not None else self.params
        names = [v.name for v in self.graph.params]
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


def _same(a: list[Any], b: tuple[Any, ...] | None) -> bool:
    return b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))


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
    ) -> None:
        if not entries:
            raise ValueError("Compiled needs at least one entry point")
        self.entries = dict(entries)
        for e in self.entries.values():
            e.model = manifest.get("model") or {}
        self.backend = backend
        self.target = target
        self.manifest = manifest
        self.files = files
        self.path = path

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
