"""Reductions and row-wise normalisers: sum, mean, amax, amin, prod, any, all, argmax, argmin,
softmax, log_softmax, cumsum.

`dims=()` reduces every dim (torch's convention for an empty dim list). `keepdim` keeps reduced
dims as size 1. Integer/bool sums, products and cumsums accumulate in i64, as torch does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import f8_safe, io_cost, norm_dim, require
from ir.types import DType, TensorType


class _Reduce(Op):
    kind: ClassVar[Kind] = Kind.REDUCTION
    dims: tuple[int, ...] = ()
    keepdim: bool = False

    def reduced(self, x: TensorType) -> list[int]:
        dims = [norm_dim(self, d, x.rank, x) for d in self.dims] or list(range(x.rank))
        require(self, len(set(dims)) == len(dims), f"repeated dims {self.dims}", x)
        return sorted(dims)

    def out_dtype(self, x: TensorType) -> DType:
        return x.dtype

    def infer_type(self, x: TensorType):
        red = self.reduced(x)
        shape = [
            1 if i in red else d for i, d in enumerate(x.shape) if self.keepdim or i not in red
        ]
        return (TensorType(tuple(shape), self.out_dtype(x)),)

    def fn(self, x: Any, dims: list[int]) -> Any:
        raise NotImplementedError

    def reference(self, x):
        red = self.reduced(TensorType(tuple(x.shape), DType.from_torch(x.dtype)))
        out = self.out_dtype(TensorType((), DType.from_torch(x.dtype)))
        if not red:  # 0-d input: reducing nothing still applies the dtype rule
            return (f8_safe(lambda t: self.fn(t, []), x, out_dtype=out).to(out.to_torch()),)
        return (f8_safe(lambda t: self.fn(t, red), x, out_dtype=out),)

    def cost(self, operand_types, result_types):
        return io_cost(operand_types[0].numel, operand_types, result_types)


def _int_to_i64(x: TensorType) -> DType:
    return x.dtype if x.dtype.is_float else DType.i64


@register
@dataclass(frozen=True)
class Sum(_Reduce):
    """Sum over `dims` (ints/bool accumulate to i64)."""

    mnemonic = "sum"
    dims: tuple[int, ...] = ()
    keepdim: bool = False

    def out_dtype(self, x):
        return _int_to_i64(x)

    def fn(self, x, dims):
        return torch.sum(x, dim=dims, keepdim=self.keepdim) if dims else torch.sum(x)


@register
@dataclass(frozen=True)
class Mean(_Reduce):
    """Arithmetic mean over `dims`; float inputs only."""

    mnemonic = "mean"
    dims: tuple[int, ...] = ()
    keepdim: bool = False

    def out_dtype(self, x):
        require(self, x.dtype.is_float, "expected a float tensor (cast ints first)", x)
        return x.dtype

    def fn(self, x, dims):
        return torch.mean(x, dim=dims, keepdim=self.keepdim) if dims else torch.mean(x)


@register
@dataclass(frozen=True)
class Prod(_Reduce):
    """Product over `dims` (ints/bool accumulate to i64)."""

    mnemonic = "prod"
    dims: tuple[int, ...] = ()
    keepdim: bool = False

    def out_dtype(self, x):
        return _int_to_i64(x)

    def fn(self, x, dims):
        for d in sorted(dims, reverse=True):
            x = torch.prod(x, dim=d, keepdim=self.keepdim)
        return x if dims else torch.prod(x)


@register
@dataclass(frozen=True)
class Amax(_Reduce):
    """Maximum over `dims` (values only)."""

    mnemonic = "amax"
    dims: tuple[int, ...] = ()
    keepdim: bool = False

    def fn(self, x, dims):
        return torch.amax(x, dim=dims, keepdim=self.keepdim)


@register
@dataclass(frozen=True)
class Amin(_Reduce):
    """Minimum over `dims` (values only)."""

    mnemonic = "amin"
    dims: tuple[int, ...] = ()
    keepdim: bool = False

    def fn(self, x, dims):
        return torch.amin(x, dim=dims, keepdim=self.keepdim)


@register
@dataclass(frozen=True)
class Any_(_Reduce):
    """True where any element over `dims` is nonzero -> bool."""

    mnemonic = "any"
    dims: tuple[int, ...] = ()
    keepdim: bool = False

    def out_dtype(self, x):
        return DType.bool

    def fn(self, x, dims):
        return torch.any(x, dim=tuple(dims), keepdim=self.keepdim) if dims else torch.any(x)


@register
@dataclass(frozen=True)
class All(_Reduce):
    """True where every element over `dims` is nonzero -> bool."""

    mnemonic = "all"
    dims: tuple[int, ...] = ()
    keepdim: bool = False

    def out_dtype(self, x):
        return DType.bool

    def fn(self, x, dims):
        return torch.all(x, dim=tuple(dims), keepdim=self.keepdim) if dims else torch.all(x)


class _ArgReduce(Op):
    kind: ClassVar[Kind] = Kind.REDUCTION
    dim: int | None = None
    keepdim: bool = False

    def infer_type(self, x: TensorType):
        require(self, x.dtype != DType.bool, "bool input not supported", x)
        if self.dim is None:  # over the flattened tensor
            return (TensorType((1,) * x.rank if self.keepdim else (), DType.i64),)
        d = norm_dim(self, self.dim, x.rank, x)
        shape = [1 if i == d else s for i, s in enumerate(x.shape) if self.keepdim or i != d]
        return (TensorType(tuple(shape[: x.rank]), DType.i64),)


@register
@dataclass(frozen=True)
class Argmax(_ArgReduce):
    """Index (i64) of the first maximum along `dim` (None: of the flattened tensor)."""

    mnemonic = "argmax"
    dim: int | None = None
    keepdim: bool = False

    def reference(self, x):
        return (f8_safe(lambda t: torch.argmax(t, dim=self.dim, keepdim=self.keepdim), x),)


@register
@dataclass(frozen=True)
class Argmin(_ArgReduce):
    """Index (i64) of the first minimum along `dim` (None: of the flattened tensor)."""

    mnemonic = "argmin"
    dim: int | None = None
    keepdim: bool = False

    def reference(self, x):
        return (f8_safe(lambda t: torch.argmin(t, dim=self.dim, keepdim=self.keepdim), x),)


class _RowWise(Op):
    kind: ClassVar[Kind] = Kind.REDUCTION
    dim: int = -1

    def infer_type(self, x: TensorType):
        require(self, x.dtype.is_float, "expected a float tensor (cast ints first)", x)
        norm_dim(self, self.dim, x.rank, x)
        return (x,)

    def cost(self, operand_types, result_types):
        return io_cost(5 * operand_types[0].numel, operand_types, result_types)


@register
@dataclass(frozen=True)
class Softmax(_RowWise):
    """exp(x - max) / sum(exp(x - max)) along `dim`."""

    mnemonic = "softmax"
    dim: int = -1

    def reference(self, x):
        fn = lambda t: torch.softmax(t, dim=self.dim)  # noqa: E731
        return (f8_safe(fn, x, out_dtype=DType.from_torch(x.dtype)),)


@register
@dataclass(frozen=True)
class LogSoftmax(_RowWise):
    """x - logsumexp(x) along `dim`."""

    mnemonic = "log_softmax"
    dim: int = -1

    def reference(self, x):
        fn = lambda t: torch.log_softmax(t, dim=self.dim)  # noqa: E731
        return (f8_safe(fn, x, out_dtype=DType.from_torch(x.dtype)),)


@register
@dataclass(frozen=True)
class Cumsum(Op):
    """Inclusive prefix sum along `dim` (ints/bool accumulate to i64). A scan, hence opaque."""

    mnemonic = "cumsum"
    kind = Kind.OPAQUE
    dim: int = -1

    def infer_type(self, x: TensorType):
        norm_dim(self, self.dim, x.rank, x)
        return (TensorType(x.shape, _int_to_i64(x)),)

    def reference(self, x):
        out = _int_to_i64(TensorType((), DType.from_torch(x.dtype)))
        return (
            f8_safe(lambda t: torch.cumsum(t, dim=self.dim), x, out_dtype=out).to(out.to_torch()),
        )
