"""Creation ops (no tensor operands; the interpreter passes `device=`): constant, full, iota;
plus `copy` (identity)."""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ir._lazy import torch
from ir.core import Cost, Kind, Op, register
from ir.ops._util import require
from ir.symbolic import Dim, canon_dim
from ir.types import DType, Scalar, TensorType


def _check_value(op: Op, value: Scalar | Dim, dtype: DType) -> None:
    if isinstance(value, sympy.Expr):
        require(
            op, dtype in (DType.i64, DType.i32), f"symbolic value {value} needs an i64/i32 dtype"
        )
        return
    if (
        isinstance(value, float)
        and not dtype.is_float
        and value == value
        and abs(value) != float("inf")
    ):
        require(op, value == int(value), f"value {value} is not representable in {dtype}")
    if (
        isinstance(value, float)
        and not dtype.is_float
        and (value != value or abs(value) == float("inf"))
    ):
        raise op.type_error(f"value {value} is not representable in {dtype}")


@register
@dataclass(frozen=True)
class Constant(Op):
    """A 0-d tensor holding `value` (scalars in the IR are 0-d tensors). `value` may be a symbolic
    integer expression (e.g. `T - 1`, dtype i64/i32), bound to an int when the graph runs."""

    mnemonic = "constant"
    kind = Kind.ELEMENTWISE
    num_operands = 0
    value: Scalar | Dim = 0.0
    dtype: DType = DType.f32

    def infer_type(self):
        _check_value(self, self.value, self.dtype)
        return (TensorType((), self.dtype),)

    def reference(self, *, device=None):
        return (torch.full((), self.value, dtype=self.dtype.to_torch(), device=device),)

    def cost(self, operand_types, result_types):
        return Cost(0, self.dtype.itemsize)


@register
@dataclass(frozen=True)
class Full(Op):
    """A tensor of `shape` filled with `value` (a scalar or a symbolic integer expression)."""

    mnemonic = "full"
    kind = Kind.ELEMENTWISE
    num_operands = 0
    shape: tuple[Dim, ...] = ()
    value: Scalar | Dim = 0.0
    dtype: DType = DType.f32

    def infer_type(self):
        _check_value(self, self.value, self.dtype)
        require(self, all(not isinstance(d, int) or d >= 0 for d in self.shape), "negative dim")
        return (TensorType(self.shape, self.dtype),)

    def reference(self, *, device=None):
        return (torch.full(self.shape, self.value, dtype=self.dtype.to_torch(), device=device),)


def _arange_len(start: Dim, end: Dim, step: int) -> Dim:
    if isinstance(start, int) and isinstance(end, int):
        return len(range(start, end, step))
    return canon_dim(sympy.floor((sympy.sympify(end) - start + step - 1) / step))


@register
@dataclass(frozen=True)
class Iota(Op):
    """1-D torch.arange(start, end, step) in `dtype` (end may be symbolic)."""

    mnemonic = "iota"
    kind = Kind.ELEMENTWISE
    num_operands = 0
    start: Dim = 0
    end: Dim = 1
    step: int = 1
    dtype: DType = DType.i64

    def infer_type(self):
        require(self, self.step >= 1, f"step must be >= 1, got {self.step}")
        return (TensorType((_arange_len(self.start, self.end, self.step),), self.dtype),)

    def reference(self, *, device=None):
        out = torch.arange(self.start, self.end, self.step, device=device)
        return (out.to(self.dtype.to_torch()),)


@register
@dataclass(frozen=True)
class Copy(Op):
    """Identity: a new value equal to x (a fresh buffer when materialised)."""

    mnemonic = "copy"
    kind = Kind.ELEMENTWISE

    def infer_type(self, x: TensorType):
        return (x,)

    def reference(self, x):
        return (x.clone(),)
