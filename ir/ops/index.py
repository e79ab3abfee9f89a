"""Indexing, scatter and sorting: gather, index_select, index, embedding, scatter, scatter_add,
index_put, topk, sort, argsort. Index operands are integer tensors (i64; i32 where torch accepts
it); out-of-range indices are undefined behaviour (the reference raises)."""

from __future__ import annotations

from dataclasses import dataclass

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import INT_INDEX, broadcast_shapes, f8_safe, norm_dim, require
from ir.symbolic import Dim
from ir.types import DType, TensorType


@register
@dataclass(frozen=True)
class Gather(Op):
    """torch.gather: out[i][j][k] = x[i][idx[i][j][k]][k] for dim=1; idx i64, same rank as x."""

    mnemonic = "gather"
    kind = Kind.INJECTIVE
    num_operands = 2
    dim: int = 0

    def infer_type(self, x: TensorType, idx: TensorType):
        norm_dim(self, self.dim, x.rank, x, idx)
        require(self, idx.dtype == DType.i64, "index must be i64", x, idx)
        require(self, idx.rank == x.rank, "index rank must equal input rank", x, idx)
        return (TensorType(idx.shape, x.dtype),)

    def reference(self, x, idx):
        return (torch.gather(x, self.dim, idx),)


@register
@dataclass(frozen=True)
class IndexSelect(Op):
    """torch.index_select: pick entries idx (1-D int) of dim `dim`."""

    mnemonic = "index_select"
    kind = Kind.INJECTIVE
    num_operands = 2
    dim: int = 0

    def infer_type(self, x: TensorType, idx: TensorType):
        d = norm_dim(self, self.dim, x.rank, x, idx)
        require(self, idx.dtype in INT_INDEX, "index must be i64 or i32", x, idx)
        require(self, idx.rank == 1, "index must be 1-D", x, idx)
        shape = list(x.shape)
        if x.rank:
            shape[d] = idx.shape[0]
        return (TensorType(tuple(shape), x.dtype),)

    def reference(self, x, idx):
        return (torch.index_select(x, self.dim, idx),)


@register
@dataclass(frozen=True)
class Index(Op):
    """x indexed at `dim` by an integer tensor of any rank:
    result shape = x.shape[:dim] + idx.shape + x.shape[dim+1:] (torch `x[:, idx]` for dim=1)."""

    mnemonic = "index"
    kind = Kind.INJECTIVE
    num_operands = 2
    dim: int = 0

    def infer_type(self, x: TensorType, idx: TensorType):
        require(self, x.rank >= 1, "input must be at least 1-D", x, idx)
        d = norm_dim(self, self.dim, x.rank, x, idx)
        require(self, idx.dtype in INT_INDEX, "index must be i64 or i32", x, idx)
        return (TensorType(x.shape[:d] + idx.shape + x.shape[d + 1 :], x.dtype),)

    def reference(self, x, idx):
        d = self.dim % x.dim()
        flat = torch.index_select(x, d, idx.reshape(-1))
        return (flat.reshape(tuple(x.shape[:d]) + tuple(idx.shape) + tuple(x.shape[d + 1 :])),)


@register
@dataclass(frozen=True)
class Embedding(Op):
    """Row lookup: weight [V, D], ids (int, any shape) -> ids.shape + [D]."""

    mnemonic = "embedding"
    kind = Kind.INJECTIVE
    num_operands = 2

    def infer_type(self, weight: TensorType, ids: TensorType):
        require(self, weight.rank == 2, "weight must be 2-D [V, D]", weight, ids)
        require(self, ids.dtype in INT_INDEX, "ids must be i64 or i32", weight, ids)
        return (TensorType(ids.shape + (weight.shape[1],), weight.dtype),)

    def reference(self, weight, ids):
        return (weight[ids],)


class _ScatterBase(Op):
    kind = Kind.OPAQUE
    num_operands = 3

    def infer_type(self, x: TensorType, idx: TensorType, src: TensorType):
        types = (x, idx, src)
        norm_dim(self, self.dim, x.rank, *types)  # type: ignore[attr-defined]
        require(self, idx.dtype == DType.i64, "index must be i64", *types)
        require(
            self, idx.rank == x.rank == src.rank, "x, index and src must have equal rank", *types
        )
        require(self, src.dtype == x.dtype, "src dtype must equal x dtype; insert a cast", *types)
        return (x,)


@register
@dataclass(frozen=True)
class Scatter(_ScatterBase):
    """torch.scatter: copy of x with x[i][idx[i][j]] = src[i][j] for dim=1 (last write wins)."""

    mnemonic = "scatter"
    dim: int = 0

    def reference(self, x, idx, src):
        return (torch.scatter(x, self.dim, idx, src),)


@register
@dataclass(frozen=True)
class ScatterAdd(_ScatterBase):
    """torch.scatter_add: copy of x with x[i][idx[i][j]] += src[i][j] for dim=1."""

    mnemonic = "scatter_add"
    dim: int = 0

    def reference(self, x, idx, src):
        return (
            f8_safe(
                lambda a, b: torch.scatter_add(a, self.dim, idx, b),
                x,
                src,
                out_dtype=DType.from_torch(x.dtype),
            ),
        )


@register
@dataclass(frozen=True)
class IndexPut(Op):
    """Copy of x with slices at `dim` replaced (or, with accumulate, incremented) by values:
    x[:, idx[j]] (=|+=) values[:, j] for dim=1; idx 1-D int,
    values.shape = x.shape[:dim] + idx.shape + x.shape[dim+1:]."""

    mnemonic = "index_put"
    kind = Kind.OPAQUE
    num_operands = 3
    dim: int = 0
    accumulate: bool = False

    def infer_type(self, x: TensorType, idx: TensorType, values: TensorType):
        types = (x, idx, values)
        require(self, x.rank >= 1, "input must be at least 1-D", *types)
        d = norm_dim(self, self.dim, x.rank, *types)
        require(self, idx.dtype in INT_INDEX and idx.rank == 1, "index must be 1-D i64/i32", *types)
        want = x.shape[:d] + idx.shape + x.shape[d + 1 :]
        require(self, values.shape == want, f"values shape must be {list(want)}", *types)
        require(self, values.dtype == x.dtype, "values dtype must equal x dtype", *types)
        return (x,)

    def reference(self, x, idx, values):
        idx = idx.long()
        if self.accumulate:
            fn = lambda a, v: a.index_add(self.dim, idx, v)  # noqa: E731
        else:
            fn = lambda a, v: a.index_copy(self.dim, idx, v)  # noqa: E731
        return (f8_safe(fn, x, values, out_dtype=DType.from_torch(x.dtype)),)


@register
@dataclass(frozen=True)
class TopK(Op):
    """torch.topk: the k largest (or smallest) entries along `dim` -> (values, i64 indices)."""

    mnemonic = "topk"
    kind = Kind.OPAQUE
    k: Dim = 1
    dim: int = -1
    largest: bool = True
    sorted: bool = True

    def infer_type(self, x: TensorType):
        d = norm_dim(self, self.dim, x.rank, x)
        require(self, x.dtype != DType.bool, "bool input not supported", x)
        if isinstance(self.k, int) and x.rank and isinstance(x.shape[d], int):
            require(self, 0 <= self.k <= x.shape[d], f"k={self.k} exceeds dim size {x.shape[d]}", x)
        shape = list(x.shape)
        if x.rank:
            shape[d] = self.k
        return (TensorType(tuple(shape), x.dtype), TensorType(tuple(shape), DType.i64))

    def reference(self, x):
        fn = lambda t: torch.topk(t, self.k, dim=self.dim, largest=self.largest, sorted=self.sorted)  # noqa: E731
        values, indices = f8_safe(lambda t: tuple(fn(t)), x)
        return (values.to(x.dtype), indices)


@register
@dataclass(frozen=True)
class Sort(Op):
    """torch.sort along `dim` -> (values, i64 indices); `stable` keeps equal elements in order."""

    mnemonic = "sort"
    kind = Kind.OPAQUE
    dim: int = -1
    descending: bool = False
    stable: bool = False

    def infer_type(self, x: TensorType):
        norm_dim(self, self.dim, x.rank, x)
        return (x, TensorType(x.shape, DType.i64))

    def reference(self, x):
        fn = lambda t: tuple(
            torch.sort(t, dim=self.dim, descending=self.descending, stable=self.stable)
        )  # noqa: E731
        values, indices = f8_safe(fn, x)
        return (values.to(x.dtype), indices)


@register
@dataclass(frozen=True)
class Argsort(Op):
    """torch.argsort along `dim` -> i64 indices."""

    mnemonic = "argsort"
    kind = Kind.OPAQUE
    dim: int = -1
    descending: bool = False
    stable: bool = False

    def infer_type(self, x: TensorType):
        norm_dim(self, self.dim, x.rank, x)
        return (TensorType(x.shape, DType.i64),)

    def reference(self, x):
        fn = lambda t: torch.argsort(
            t, dim=self.dim, descending=self.descending, stable=self.stable
        )  # noqa: E731
        return (f8_safe(fn, x),)


def _multi_index_shape(op: Op, x: TensorType, idxs: tuple[TensorType, ...]) -> tuple[Dim, ...]:
    """torch advanced indexing with index tensors on `op.dims` and full slices elsewhere."""
    dims = op.dims  # type: ignore[attr-defined]
    types = (x, *idxs)
    require(op, len(dims) == len(idxs) >= 1, "needs one index tensor per entry of dims", *types)
    require(op, list(dims) == sorted(set(dims)), "dims must be strictly increasing", *types)
    require(op, all(0 <= d < x.rank for d in dims), f"dims must lie in [0, {x.rank})", *types)
    require(op, all(t.dtype in INT_INDEX for t in idxs), "indices must be i64 or i32", *types)
    picked = broadcast_shapes(op, *idxs)
    rest = lambda lo, hi: tuple(s for d, s in enumerate(x.shape) if lo <= d < hi and d not in dims)  # noqa: E731
    if dims[-1] - dims[0] == len(dims) - 1:  # adjacent: the picked dims replace them in place
        return rest(0, dims[0]) + picked + rest(dims[-1] + 1, x.rank)
    return picked + rest(0, x.rank)  # torch moves the picked dims to the front


def _index_tuple(x, dims: tuple[int, ...], idxs) -> tuple:
    it = iter(idxs)
    return tuple(next(it).long() if d in dims else slice(None) for d in range(dims[-1] + 1))


@register
@dataclass(frozen=True)
class IndexMulti(Op):
    """torch advanced indexing by several integer tensors, `x[:, i, j]` for dims=(1, 2).

    The index tensors broadcast together; when `dims` are adjacent their broadcast shape takes
    their place in the result, otherwise it comes first (torch's rule)."""

    mnemonic = "index_multi"
    kind = Kind.INJECTIVE
    num_operands = None
    dims: tuple[int, ...] = ()

    def infer_type(self, x: TensorType, *idxs: TensorType):
        return (TensorType(_multi_index_shape(self, x, idxs), x.dtype),)

    def reference(self, x, *idxs):
        return (x[_index_tuple(x, self.dims, idxs)],)


@register
@dataclass(frozen=True)
class IndexPutMulti(Op):
    """Copy of x with `x[:, i, j]` (=|+=) values for dims=(1, 2): torch `index_put` with several
    index tensors. Operands: x, one index per entry of dims, then values (broadcast to the
    indexed shape)."""

    mnemonic = "index_put_multi"
    kind = Kind.OPAQUE
    num_operands = None
    dims: tuple[int, ...] = ()
    accumulate: bool = False

    def infer_type(self, x: TensorType, *rest: TensorType):
        require(self, len(rest) >= 2, "needs x, index tensors and values", x, *rest)
        *idxs, values = rest
        picked = _multi_index_shape(self, x, tuple(idxs))
        broadcast_shapes(self, TensorType(picked, x.dtype), values)
        require(self, values.dtype == x.dtype, "values dtype must equal x dtype", x, *rest)
        return (x,)

    def reference(self, x, *rest):
        *idxs, values = rest
        index = _index_tuple(x, self.dims, idxs)
        return (x.index_put(index, values, accumulate=self.accumulate),)
