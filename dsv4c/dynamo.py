"""`torch.compile(module, backend="dsv4c")` through PyTorch's documented custom-backend API.

    torch.compile(model, backend="dsv4c")                                       # reference, CPU
    torch.compile(model, backend="dsv4c", options={"backend": "triton", "target": "cpu"})
    torch.compile(model, backend=dsv4c.dynamo.backend(backend="triton"))        # same, no registry

The name "dsv4c" is registered through the `torch_dynamo_backends` entry point (pyproject.toml),
so it works without importing dsv4c first; `register()` registers it by hand (e.g. from a source
checkout that was not pip-installed). Dynamo hands over each FX graph with its example inputs;
the graph is compiled with `dsv4c.compile` (parameters lifted by Dynamo arrive as ordinary
inputs). Graphs dsv4c cannot take — symbolic sizes passed as ints, outputs that are not all
tensors, an op the frontend cannot capture — run eagerly: each such graph warns once
(`EagerFallbackWarning`, with the reason) and is counted (`fallbacks()`, `reset_fallbacks()`);
with `DSV4C_STRICT=1` in the environment a fallback is an error (`EagerFallbackError`) instead.
Dynamo's FX graphs are captured like any module: torch's core-ATen decompositions bring their
composite ops down to the ops the frontend translates.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dsv4c.errors import DsvError

__all__ = [
    "NAME", "EagerFallbackError", "EagerFallbackWarning", "backend", "dsv4c_backend", "fallbacks",
    "register",
    "reset_fallbacks",
]  # fmt: skip

NAME = "dsv4c"
OPTIONS = ("backend", "target")
STRICT_ENV = "DSV4C_STRICT"

# One reason per graph that ran eagerly, in order (read with fallbacks()).
_FALLBACKS: list[str] = []


class EagerFallbackWarning(UserWarning):
    """A graph Dynamo handed to dsv4c runs eagerly (not compiled); the message says why."""


class EagerFallbackError(DsvError):
    """DSV4C_STRICT=1 and a graph would have run eagerly; the message says why."""


def fallbacks() -> list[str]:
    """The reasons of every graph that fell back to eager since the last reset (one per graph)."""
    return list(_FALLBACKS)


def reset_fallbacks() -> None:
    _FALLBACKS.clear()


def dsv4c_backend(
    gm: Any, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """The Dynamo backend: FX graph + example inputs -> a callable returning the same outputs."""
    import torch

    from dsv4c.driver import compile
    from dsv4c.errors import DsvError

    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise DsvError(f"unknown dsv4c option(s) {unknown}; known: {', '.join(OPTIONS)}")
    why = _unsupported(gm, example_inputs)
    if why:
        return _eager(gm, why)
    try:
        compiled = compile(
            gm,
            list(example_inputs),
            backend=opts.get("backend", "reference"),
            target=opts.get("target", "cpu"),
        )
    except DsvError:
        raise  # a wrong option is the user's to fix, not a reason to run eagerly
    except Exception as e:  # noqa: BLE001 — e.g. an op the frontend cannot capture
        return _eager(gm, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    as_tuple = isinstance(_output_args(gm), tuple)

    def run(*args: Any) -> Any:
        with torch.no_grad():
            outs = compiled(*args)
        return tuple(outs) if as_tuple else list(outs)

    run.compiled = compiled  # type: ignore[attr-defined]
    return run


def _output_args(gm: Any) -> Any:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return out.args[0]


def _unsupported(gm: Any, example_inputs: Sequence[Any]) -> str | None:
    import torch
    import torch.utils._pytree as pytree

    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        return "inputs that are not tensors (symbolic sizes); use torch.compile(dynamic=False)"
    leaves = pytree.tree_leaves(_output_args(gm))
    if not leaves or not all(isinstance(n, torch.fx.Node) for n in leaves):
        return "outputs that are not all tensors"
    if any(getattr(x, "requires_grad", False) and torch.is_grad_enabled() for x in example_inputs):
        return "autograd (a tensor requires grad); dsv4c compiles inference graphs — use no_grad"
    return None


def _eager(gm: Any, why: str) -> Callable[..., Any]:
    """Run `gm` eagerly: counted, warned once (here, when Dynamo hands it over), or an error."""
    if os.environ.get(STRICT_ENV, "") not in ("", "0"):
        raise EagerFallbackError(
            f"dsv4c could not compile a graph of {len(gm.graph.nodes)} nodes: {why}\n"
            f"  ({STRICT_ENV}=1 makes this an error; unset it to run such graphs eagerly)"
        )
    _FALLBACKS.append(why)
    warnings.warn(
        f"dsv4c: running this graph eagerly (fallback {len(_FALLBACKS)}): {why}",
        EagerFallbackWarning,
        stacklevel=2,
    )
    return gm.forward


def backend(**options: Any) -> Callable[..., Any]:
    """A backend callable with options bound: `torch.compile(m, backend=backend(target="cpu"))`."""

    def fn(gm: Any, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return dsv4c_backend(gm, example_inputs, options=options)

    return fn


def register() -> None:
    """Register "dsv4c" with torch._dynamo by hand (the entry point normally does this)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if NAME not in _BACKENDS:
        register_backend(name=NAME)(dsv4c_backend)
