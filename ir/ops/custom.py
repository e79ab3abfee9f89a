"""`custom.call`: a `torch.library` custom op that dsv4c keeps whole and does not compile.

The frontend emits it for a custom op that has neither a translator nor a decomposition
(`frontend/custom_ops.py`). Its reference semantics are the op itself, dispatched through
`torch.ops` (on CPU tensors: the op's CPU implementation); its result types come from the op's
fake kernel at capture time, stored as attributes. Backends have no emitter for it, so it always
runs its reference and is listed as not compiled in the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.symbolic import Dim
from ir.types import DType, TensorType

__all__ = ["CustomCall", "resolve_overload"]


def resolve_overload(target: str) -> Any:
    """`ns::name.overload` -> the `torch.ops` overload; a clear error when it is not registered."""
    qualname, _, overload = target.partition(".")
    ns, _, name = qualname.partition("::")
    try:
        return getattr(getattr(getattr(torch.ops, ns), name), overload or "default")
    except (AttributeError, RuntimeError) as err:
        raise RuntimeError(
            f"custom op {target} is not registered in this process; import the module that "
            "defines it (torch.library) before running the graph"
        ) from err


@register
@dataclass(frozen=True)
class CustomCall(Op):
    """Calls the custom op `target` (`ns::name.overload`) eagerly. `args` is the JSON of the
    call `{"args": [...], "kwargs": {...}}` where `{"operand": i}` stands for the i-th operand,
    `{"dim": i}` for `dims[i]` (a size, possibly symbolic) and `{"dtype": "bf16"}` for a dtype;
    `shapes`/`dtypes` are the result types the op's fake kernel gave at capture time."""

    mnemonic = "custom.call"
    kind = Kind.OPAQUE
    num_operands = None
    target: str = ""
    args: str = '{"args": [], "kwargs": {}}'
    dims: tuple[Dim, ...] = ()
    shapes: tuple[tuple[Dim, ...], ...] = ()
    dtypes: tuple[DType, ...] = ()

    def infer_type(self, *operand_types: TensorType) -> tuple[TensorType, ...]:
        if len(self.shapes) != len(self.dtypes) or not self.shapes:
            raise self.type_error(
                f"needs one dtype per result shape and at least one result, got "
                f"{len(self.shapes)} shapes and {len(self.dtypes)} dtypes",
                *operand_types,
            )
        used = _operand_slots(json.loads(self.args))
        if used and max(used) >= len(operand_types):
            raise self.type_error(
                f"args refer to operand {max(used)} but the op has {len(operand_types)}",
                *operand_types,
            )
        return tuple(TensorType(s, d) for s, d in zip(self.shapes, self.dtypes))

    def reference(self, *tensors: Any, device: Any = None) -> tuple[Any, ...]:
        call = json.loads(self.args)
        args = [self._decode(a, tensors) for a in call["args"]]
        kwargs = {k: self._decode(v, tensors) for k, v in call["kwargs"].items()}
        out = resolve_overload(self.target)(*args, **kwargs)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(self.shapes):
            raise RuntimeError(
                f"custom op {self.target} returned {len(outs)} tensors; its fake kernel gave "
                f"{len(self.shapes)} at capture time"
            )
        return outs

    def _decode(self, v: Any, tensors: tuple[Any, ...]) -> Any:
        if isinstance(v, list):
            return [self._decode(x, tensors) for x in v]
        if not isinstance(v, dict):
            return v
        if "operand" in v:
            return tensors[v["operand"]]
        if "dim" in v:
            return int(self.dims[v["dim"]])
        if "dtype" in v:
            return DType(v["dtype"]).to_torch()
        raise RuntimeError(f"custom.call {self.target}: unknown argument encoding {v!r}")


def _operand_slots(v: Any) -> list[int]:
    if isinstance(v, list):
        return [i for x in v for i in _operand_slots(x)]
    if isinstance(v, dict):
        if "operand" in v:
            return [v["operand"]]
        return [i for x in v.values() for i in _operand_slots(x)]
    return []
