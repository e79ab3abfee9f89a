"""Trace each distinct layer once: repeated submodules become replayed regions.

`torch.export` costs milliseconds per traced op, so tracing all 61 blocks of `v4-pro` one by one
dominates capture time. Blocks of one kind (same class, parameter shapes, settings and input
types) trace to the same ops up to parameter names, so only the first of each kind is traced:

- its call is bracketed by `region_begin` / `region_end` markers (identity on its tensors), and
  the translator records the IR ops it emitted in between as a template;
- every later call of the same kind is one opaque `region(inputs, template, instance)` op, whose
  fake implementation returns tensors shaped like the template's outputs; the translator replays
  the template there, with `layers.0.*` parameters renamed to the instance's (`layers.7.*`).

Candidates are the children of every `nn.ModuleList` (the usual way to hold repeated layers).
The result is the graph a full trace gives, op for op; `tests/frontend/test_capture_basic.py`
checks that on the tiny model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import sympy
import torch
from torch.utils import _pytree as pytree

_LIB = torch.library.Library("dsv4c_frontend", "DEF")
_LIB.define("region_begin(Tensor[] inputs, int template) -> Tensor[]")
_LIB.define("region_end(Tensor[] outputs, int template) -> Tensor[]")
_LIB.define("region(Tensor[] inputs, int template, int instance) -> Tensor[]")

REGION_BEGIN = torch.ops.dsv4c_frontend.region_begin.default
REGION_END = torch.ops.dsv4c_frontend.region_end.default
REGION = torch.ops.dsv4c_frontend.region.default


@dataclasses.dataclass
class Template:
    """The first traced call of one kind of submodule."""

    prefix: str  # qualified name of the traced instance, e.g. "layers.0"
    in_shapes: list[tuple] = dataclasses.field(default_factory=list)
    out_spec: pytree.TreeSpec | None = None
    out_leaves: list[Any] = dataclasses.field(default_factory=list)  # tensors' slots are None
    out_types: list[tuple[tuple, torch.dtype]] = dataclasses.field(default_factory=list)


class Regions:
    """Per-capture state shared by the patched modules, the fake kernels and the translator."""

    def __init__(self) -> None:
        self.templates: list[Template] = []
        self.by_key: dict[Any, int] = {}
        self.instances: list[str] = []  # qualified names of replayed instances

    def call(self, module: torch.nn.Module, prefix: str, method: str, fn, args, kwargs) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (_module_key(module), method, spec, _leaves_key(leaves))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if not tensors:
            return fn(*args, **kwargs)
        tid = self.by_key.get(key)
        if tid is None:
            return self._trace_first(key, prefix, fn, leaves, spec, tensors)
        template = self.templates[tid]
        self.instances.append(prefix)
        # The template's trace equated its input sizes with each other (`x` and the cache share
        # the batch); state the same equalities here, where nothing is traced.
        for want, got in zip(template.in_shapes, tensors):
            for a, b in zip(want, got.shape):
                if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
                    torch._check(a == b)
        outs = iter(REGION(tensors, tid, len(self.instances) - 1))
        leaves = [next(outs) if x is None else x for x in template.out_leaves]
        return pytree.tree_unflatten(leaves, template.out_spec)

    def _trace_first(self, key, prefix, fn, leaves, spec, tensors) -> Any:
        tid = len(self.templates)
        template = Template(prefix, in_shapes=[tuple(t.shape) for t in tensors])
        self.templates.append(template)
        inner = iter(REGION_BEGIN(tensors, tid))
        leaves = [next(inner) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        result = fn(*args, **kwargs)
        out_leaves, template.out_spec = pytree.tree_flatten(result)
        out_tensors = [x for x in out_leaves if isinstance(x, torch.Tensor)]
        template.out_leaves = [None if isinstance(x, torch.Tensor) else x for x in out_leaves]
        template.out_types = [(tuple(t.shape), t.dtype) for t in out_tensors]
        marked = iter(REGION_END(out_tensors, tid))
        # Registered last, so a recursive call of the same kind inside `fn` is traced, not replayed.
        self.by_key[key] = tid
        return pytree.tree_unflatten(
            [next(marked) if isinstance(x, torch.Tensor) else x for x in out_leaves],
            template.out_spec,
        )


_ACTIVE: list[Regions] = []  # the capture in progress (fake kernels need its templates)


@contextlib.contextmanager
def replay_repeated(root: torch.nn.Module, method: str) -> Iterator[Regions]:
    """Patch the children of every ModuleList under `root` for the duration of one capture."""
    regions = Regions()
    patched: list[tuple[torch.nn.Module, str]] = []
    for name, module in root.named_modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        for index, child in enumerate(module):
            prefix = f"{name}.{index}" if name else str(index)
            for attr in dict.fromkeys(("forward", method)):
                fn = getattr(child, attr, None)
                if fn is None or attr in vars(child):
                    continue
                setattr(child, attr, _wrap(regions, child, prefix, attr, fn))
                patched.append((child, attr))
    _ACTIVE.append(regions)
    try:
        yield regions
    finally:
        _ACTIVE.pop()
        for child, attr in patched:
            delattr(child, attr)


def _wrap(regions: Regions, module, prefix: str, method: str, fn):
    def call(*args: Any, **kwargs: Any) -> Any:
        return regions.call(module, prefix, method, fn, args, kwargs)

    return call


# --- fake kernels (shape propagation during export) --------------------------------------


def _begin_or_end(tensors: list[torch.Tensor], template: int) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in tensors]


def _region(tensors: list[torch.Tensor], template: int, instance: int) -> list[torch.Tensor]:
    if not _ACTIVE:
        raise RuntimeError("dsv4c_frontend::region only exists inside frontend.capture")
    like = tensors[0]
    return [
        like.new_empty(shape, dtype=dtype)
        for shape, dtype in _ACTIVE[-1].templates[template].out_types
    ]


for _op in ("region_begin", "region_end"):
    torch.library.register_fake(f"dsv4c_frontend::{_op}", _begin_or_end, lib=_LIB)
torch.library.register_fake("dsv4c_frontend::region", _region, lib=_LIB)


# --- keys --------------------------------------------------------------------------------


def _module_key(module: torch.nn.Module) -> tuple:
    """Everything the traced ops of `module` can depend on, except parameter names' prefix."""
    parts = []
    for name, sub in module.named_modules():
        attrs = tuple(
            (k, _value_key(v))
            for k, v in sorted(vars(sub).items())
            if not k.startswith("_")
            and not isinstance(v, (torch.nn.Module, torch.Tensor))
            and not callable(v)  # methods, and the wrappers `replay_repeated` installs
        )
        tensors = tuple(
            (k, tuple(t.shape), t.dtype)
            for k, t in (*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False))
        )
        parts.append((name, type(sub), attrs, tensors, sub.training))
    return tuple(parts)


def _value_key(v: Any) -> Any:
    try:
        hash(v)
    except TypeError:
        return repr(v)
    return v


def _leaves_key(leaves: list[Any]) -> tuple:
    """Types of the inputs, with shape symbols numbered by first appearance: two calls whose
    sizes are the same expressions of (possibly different) symbols get the same key."""
    canonical: dict[Any, Any] = {}
    out = []
    for x in leaves:
        if not isinstance(x, torch.Tensor):
            out.append(("value", _value_key(x)))
            continue
        dims = []
        for size in x.shape:
            if not isinstance(size, torch.SymInt):
                dims.append(int(size))
                continue
            expr = size.node.expr
            for s in sorted(expr.free_symbols, key=str):
                canonical.setdefault(s, sympy.Symbol(f"d{len(canonical)}"))
            dims.append(str(expr.xreplace(canonical)))
        out.append((tuple(dims), x.dtype, x.device.type))
    return tuple(out)
