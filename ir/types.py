"""Element types and tensor types.

`DType` names are the text form (`f32`, `bf16`, `i64`, ...). `TensorType(shape, dtype)` is frozen;
each dim is an `int` or a sympy expression over symbols made by `ir.sym`, canonicalised on
construction so equal expressions compare equal. Text form: `f32[B,T,64]`, 0-d `f32[]`.

Type promotion follows torch (`torch.result_type`): bool < integers < floats by category; within a
category the wider type wins; f16 with bf16 gives f32; float8 types only combine with themselves.
Zero-dim operands (scalars from `constant`) only change the result when they are of a higher
category than every dimensioned operand, exactly like torch.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import sympy

from ir.errors import IRTypeError
from ir.symbolic import Dim, canon_dim, dim_str

if TYPE_CHECKING:
    import torch

__all__ = ["DType", "TensorType", "IRTypeError", "promote", "result_dtype", "Dim"]


class DType(enum.Enum):
    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"
    f8e4m3 = "f8e4m3"
    f8e5m2 = "f8e5m2"
    i64 = "i64"
    i32 = "i32"
    i8 = "i8"
    bool = "bool"

    def __repr__(self) -> str:
        return f"DType.{self.value}"

    def __str__(self) -> str:
        return self.value

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_int(self) -> bool:
        return self in (DType.i64, DType.i32, DType.i8)

    @property
    def is_f8(self) -> bool:
        return self in (DType.f8e4m3, DType.f8e5m2)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def category(self) -> int:
        """0 bool, 1 integer, 2 float (torch's promotion categories)."""
        return 2 if self.is_float else (1 if self.is_int else 0)

    @staticmethod
    def from_torch(dtype: "torch.dtype") -> "DType":
        import torch

        found = _from_torch(torch).get(dtype)
        if found is not None:
            return found
        table = _torch_table(torch)
        supported = ", ".join(str(t).replace("torch.", "") for t in table.values())
        raise IRTypeError(
            f"torch dtype {dtype} has no IR dtype; supported: {supported}. "
            "Cast the tensor to one of these first."
        )

    def to_torch(self) -> "torch.dtype":
        import torch

        return _torch_table(torch)[self]

    @staticmethod
    def parse(name: str) -> "DType":
        try:
            return DType(name)
        except ValueError:
            names = ", ".join(d.value for d in DType)
            raise IRTypeError(f"unknown dtype {name!r}; expected one of {names}") from None


_FLOATS = (DType.f32, DType.bf16, DType.f16, DType.f8e4m3, DType.f8e5m2)
_ITEMSIZE = {
    DType.f32: 4,
    DType.bf16: 2,
    DType.f16: 2,
    DType.f8e4m3: 1,
    DType.f8e5m2: 1,
    DType.i64: 8,
    DType.i32: 4,
    DType.i8: 1,
    DType.bool: 1,
}
_INT_RANK = {DType.bool: 0, DType.i8: 1, DType.i32: 2, DType.i64: 3}


@functools.cache
def _from_torch(torch) -> dict["torch.dtype", DType]:
    return {t: d for d, t in _torch_table(torch).items()}


@functools.cache
def _torch_table(torch) -> dict[DType, "torch.dtype"]:
    return {
        DType.f32: torch.float32,
        DType.bf16: torch.bfloat16,
        DType.f16: torch.float16,
        DType.f8e4m3: torch.float8_e4m3fn,
        DType.f8e5m2: torch.float8_e5m2,
        DType.i64: torch.int64,
        DType.i32: torch.int32,
        DType.i8: torch.int8,
        DType.bool: torch.bool,
    }


def promote(a: DType, b: DType) -> DType:
    """torch.promote_types restricted to the IR dtypes; raises IRTypeError where torch does."""
    if a == b:
        return a
    if a.is_f8 or b.is_f8:
        raise IRTypeError(
            f"no type promotion between {a} and {b}: float8 only combines with itself; "
            "insert an explicit cast"
        )
    if a.is_float and b.is_float:
        return DType.f32  # distinct 16/32-bit floats: f16+bf16 -> f32, anything+f32 -> f32
    if a.is_float:
        return a
    if b.is_float:
        return b
    return a if _INT_RANK[a] >= _INT_RANK[b] else b


def _promote_all(dtypes: list[DType]) -> DType | None:
    out: DType | None = None
    for d in dtypes:
        out = d if out is None else promote(out, d)
    return out


def result_dtype(*types: "TensorType") -> DType:
    """torch.result_type over tensors: 0-d tensors only win with a higher category."""
    dim = _promote_all([t.dtype for t in types if t.rank > 0])
    zero = _promote_all([t.dtype for t in types if t.rank == 0])
    if dim is None or zero is None:
        return dim or zero  # type: ignore[return-value]
    if dim.is_float:
        return dim
    if dim == DType.bool or zero.category > dim.category:
        return promote(dim, zero)
    return dim


Scalar = Union[bool, int, float]


def scalar_result_dtype(t: DType, value: Scalar | None) -> DType:
    """dtype of `tensor op python_scalar` in torch (the scalar is a 'wrapped number')."""
    if value is None or isinstance(value, bool):
        return t
    if isinstance(value, float) and not t.is_float:
        return DType.f32
    if isinstance(value, int) and t == DType.bool:
        return DType.i64
    return t


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: DType

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, DType):
            raise IRTypeError(f"TensorType dtype must be a DType, got {self.dtype!r}")
        if not isinstance(self.shape, (tuple, list)):
            raise IRTypeError(f"TensorType shape must be a tuple of dims, got {self.shape!r}")
        shape = tuple(canon_dim(d) for d in self.shape)
        for d in shape:
            if isinstance(d, int) and d < 0:
                raise IRTypeError(f"TensorType dims must be >= 0, got {d} in {list(shape)}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> Dim:
        n: Dim = 1
        for d in self.shape:
            n = n * d
        return canon_dim(n)

    @property
    def nbytes(self) -> Dim:
        return canon_dim(self.numel * self.dtype.itemsize)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def symbols(self) -> set[sympy.Symbol]:
        out: set[sympy.Symbol] = set()
        for d in self.shape:
            if isinstance(d, sympy.Expr):
                out |= d.free_symbols  # type: ignore[arg-type]
        return out

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.dtype.value}[{','.join(dim_str(d) for d in self.shape)}]"

    def __repr__(self) -> str:
        return f"TensorType({self})"
