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
`report()` sums it up: graphs compiled, graphs run eagerly with their reasons, and the custom ops
the compiled graphs run uncompiled (`dsv4c.report.dynamo_report`); `STATS=1` prints it at exit.
Dynamo's FX graphs are captured like any module: torch's core-ATen decompositions bring their
composite ops down to the ops the frontend translates.
"""

from __future__ import annotations

import atexit
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dsv4c.errors import DsvError

__all__ = [
    "NAME", "EagerFallbackError", "EagerFallbackWarning", "backend", "dsv4c_backend", "fallbacks",
    "register", "report", "reset_fallbacks",
]  # fmt: skip

NAME = "dsv4c"
OPTIONS = ("backend", "target")
STRICT_ENV = "DSV4C_STRICT"

# One reason per graph that ran eagerly, in order (read with fallbacks()).
_FALLBACKS: list[str] = []
# Per graph dsv4c compiled, the entries of its report (launches, custom ops not compiled) —
# not the `Compiled` itself, which would keep every recompiled graph alive.
_COMPILED: list[dict[str, Any]] = []


class EagerFallbackWarning(UserWarning):
    """A graph Dynamo handed to dsv4c runs eagerly (not compiled); the message says why."""


class EagerFallbackError(DsvError):
    """DSV4C_STRICT=1 and a graph would have run eagerly; the message says why."""


def fallbacks() -> list[str]:
    """The reasons of every graph that fell back to eager since the last reset (one per graph)."""
    return list(_FALLBACKS)


def reset_fallbacks() -> None:
    """Forget the graphs seen so far: the fallback count and report() start again from zero."""
    _FALLBACKS.clear()
    _COMPILED.clear()


def report() -> dict[str, Any]:
    """What torch.compile(backend="dsv4c") did since the last reset: {"graphs", "compiled",
    "eager_fallbacks" (the count), "fallback_reasons", "launches", "not_compiled"}."""
    from dsv4c.report import dynamo_report

    return dynamo_report(_COMPILED, _FALLBACKS)


def _print_report() -> None:
    """With STATS=1, the summary on stderr at exit (when any graph reached dsv4c)."""
    if os.environ.get("STATS", "") in ("", "0") or not (_COMPILED or _FALLBACKS):
        return
    r = report()
    print(
        f"dsv4c (torch.compile): {r['graphs']} graph(s): {r['compiled']} compiled, "
        f"{r['eager_fallbacks']} ran eagerly",
        file=sys.stderr,
    )
    for row in r["fallback_reasons"]:
        print(f"  eager x{row['graphs']}: {row['reason']}", file=sys.stderr)
    for op, row in r["not_compiled"].items():
        print(f"  custom op not compiled: {op} x{row['count']}", file=sys.stderr)


atexit.register(_print_report)


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
    _COMPILED.append(_entries(compiled))
    return run


def _entries(compiled: Any) -> dict[str, Any]:
    """What report() needs of one compiled graph: per entry point, launches and not_compiled."""
    entries = compiled.report()["entries"]
    return {
        "entries": {
            name: {"launches": e.get("launches"), "not_compiled": e.get("not_compiled", {})}
            for name, e in entries.items()
        }
    }


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
