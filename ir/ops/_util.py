"""Shared helpers for op definitions: dim normalisation, broadcasting, float8 upcasting."""

from __future__ import annotations

from typing import Any, Callable

import sympy

from ir._lazy import torch
from ir.core import Cost, Op
from ir.errors import IRTypeError
from ir.symbolic import Dim, canon_dim
from ir.types import DType, TensorType

__all__ = ["norm_dim", "broadcast_shapes", "f8_safe", "require", "numel", "io_cost", "INT_INDEX"]

INT_INDEX = (DType.i64, DType.i32)


def norm_dim(op: Op, d: int, rank: int, *types: TensorType) -> int:
    """Wrap a possibly negative dim into [0, rank) (0-d tensors accept -1 and 0, like torch)."""
    r = max(rank, 1)
    if not -r <= d < r:
        raise op.type_error(
            f"dim {d} out of range for rank {rank}; expected -{r} <= dim < {r}", *types
        )
    return d % r


def broadcast_shapes(op: Op, *types: TensorType) -> tuple[Dim, ...]:
    """Torch broadcasting: align right; equal dims or 1 combine."""
    rank = max((t.rank for t in types), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dims = [t.shape[i - rank + t.rank] for t in types if i - rank + t.rank >= 0]
        d: Dim = 1
        for x in dims:
            if x == 1 or x == d:
                continue
            if d != 1:
                raise op.type_error(
                    f"shapes do not broadcast: dim {x} vs {d} at position {i - rank}; expected "
                    "equal dims or 1 (insert expand/reshape if the symbols are equal at runtime)",
                    *types,
                )
            d = x
        out.append(d)
    return tuple(out)


def require(op: Op, ok: bool, msg: str, *types: TensorType) -> None:
    if not ok:
        raise op.type_error(msg, *types)


def f8_safe(fn: Callable[..., Any], *tensors: Any, out_dtype: DType | None = None) -> Any:
    """Run `fn`, computing in f32 when any input is float8 (torch has few f8 kernels)."""
    f8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if not any(getattr(t, "dtype", None) in f8 for t in tensors):
        return fn(*tensors)
    up = [t.float() if getattr(t, "dtype", None) in f8 else t for t in tensors]
    out = fn(*up)
    return out.to(out_dtype.to_torch()) if out_dtype is not None else out


def numel(shape: tuple[Dim, ...]) -> Dim:
    n: Any = 1
    for d in shape:
        n = n * d
    return canon_dim(n)


def io_cost(flops: Any, operand_types, result_types) -> Cost:
    nbytes = sum((t.nbytes for t in (*operand_types, *result_types)), 0)
    return Cost(canon_dim(sympy.sympify(flops)), canon_dim(sympy.sympify(nbytes)))


def dtype_error(op: Op, what: str, *types: TensorType) -> IRTypeError:
    return op.type_error(what, *types)
