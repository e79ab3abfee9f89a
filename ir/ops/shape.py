"""Shape ops (all injective, no arithmetic): reshape, permute, expand, slice, concat, pad, select,
squeeze, unsqueeze, flip, repeat. Dims in attributes may be symbolic; the interpreter binds them
to ints before running the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import sympy

from ir._lazy import torch
from ir.core import Cost, Kind, Op, register
from ir.ops._util import norm_dim, numel, require
from ir.symbolic import Dim, canon_dim
from ir.types import Scalar, TensorType, result_dtype

_BIG = 2**62  # torch.export spells "to the end" as INT64_MAX


class _Shape(Op):
    kind: ClassVar[Kind] = Kind.INJECTIVE

    def cost(self, operand_types, result_types):
        return Cost(0, canon_dim(sum((t.nbytes for t in (*operand_types, *result_types)), 0)))


def _provably_unequal(a: Dim, b: Dim) -> bool:
    diff = sympy.expand(sympy.sympify(a) - sympy.sympify(b))
    return bool(diff.is_number and diff != 0)


@register
@dataclass(frozen=True)
class Reshape(_Shape):
    """View x with `shape` (same element count, row-major); one entry may be -1 (inferred)."""

    mnemonic = "reshape"
    shape: tuple[Dim, ...] = ()

    def infer_type(self, x: TensorType):
        shape = list(self.shape)
        holes = [i for i, d in enumerate(shape) if d == -1]
        require(self, len(holes) <= 1, f"at most one -1 in shape {list(self.shape)}", x)
        require(
            self,
            all(d == -1 or not isinstance(d, int) or d >= 0 for d in shape),
            f"negative dim in shape {list(self.shape)}",
            x,
        )
        if holes:
            rest = numel(tuple(d for d in shape if d != -1))
            require(self, rest != 0, "cannot infer -1 with a zero-sized dim", x)
            shape[holes[0]] = canon_dim(sympy.sympify(x.numel) / sympy.sympify(rest))
        require(
            self,
            not _provably_unequal(numel(tuple(shape)), x.numel),
            f"element count differs: {x.numel} vs shape {list(self.shape)}",
            x,
        )
        return (TensorType(tuple(shape), x.dtype),)

    def reference(self, x):
        return (x.reshape(self.shape),)


@register
@dataclass(frozen=True)
class Permute(_Shape):
    """Reorder dims: out.shape[i] = x.shape[dims[i]]."""

    mnemonic = "permute"
    dims: tuple[int, ...] = ()

    def infer_type(self, x: TensorType):
        dims = [norm_dim(self, d, x.rank, x) for d in self.dims]
        require(self, sorted(dims) == list(range(x.rank)), f"dims {self.dims} not a permutation", x)
        return (TensorType(tuple(x.shape[d] for d in dims), x.dtype),)

    def reference(self, x):
        return (x.permute(self.dims),)


@register
@dataclass(frozen=True)
class Expand(_Shape):
    """Broadcast x to `shape` (torch.expand): size-1 dims stretch, -1 keeps a dim, new leading
    dims may be added."""

    mnemonic = "expand"
    shape: tuple[Dim, ...] = ()

    def infer_type(self, x: TensorType):
        require(self, len(self.shape) >= x.rank, f"shape {list(self.shape)} has fewer dims", x)
        lead = len(self.shape) - x.rank
        out = list(self.shape)
        for i, d in enumerate(x.shape):
            want = self.shape[lead + i]
            if want == -1:
                out[lead + i] = d
                continue
            require(self, d == 1 or d == want, f"dim {i} of size {d} cannot expand to {want}", x)
        require(self, all(d != -1 for d in out[:lead]), "-1 not allowed in new leading dims", x)
        return (TensorType(tuple(out), x.dtype),)

    def reference(self, x):
        return (x.expand(self.shape),)


def _slice_len(size: Dim, start: Dim, end: Dim | None, step: int) -> Dim:
    if end is None or (isinstance(end, int) and end >= _BIG):
        end = size
    if all(isinstance(v, int) for v in (size, start, end)):
        return len(range(*slice(start, end, step).indices(size)))  # type: ignore[arg-type]
    if isinstance(start, int) and start < 0:
        start = size + start
    if isinstance(end, int) and end < 0:
        end = size + end
    elif isinstance(end, int):
        end = sympy.Min(end, size)
    return canon_dim(sympy.floor((sympy.sympify(end) - start + step - 1) / step))


@register
@dataclass(frozen=True)
class Slice(_Shape):
    """x[..., start:end:step, ...] at `dim` (Python slice rules; end None = to the end)."""

    mnemonic = "slice"
    dim: int = 0
    start: Dim = 0
    end: Dim | None = None
    step: int = 1

    def infer_type(self, x: TensorType):
        require(self, x.rank >= 1, "input must be at least 1-D", x)
        require(self, self.step >= 1, f"step must be >= 1, got {self.step}", x)
        d = norm_dim(self, self.dim, x.rank, x)
        shape = list(x.shape)
        shape[d] = _slice_len(x.shape[d], self.start, self.end, self.step)
        return (TensorType(tuple(shape), x.dtype),)

    def reference(self, x):
        d = self.dim % x.dim()
        return (x[(slice(None),) * d + (slice(self.start, self.end, self.step),)],)


@register
@dataclass(frozen=True)
class Concat(_Shape):
    """torch.cat along `dim` of one or more tensors (dtypes promoted)."""

    mnemonic = "concat"
    num_operands = None
    dim: int = 0

    def infer_type(self, *xs: TensorType):
        require(self, len(xs) >= 1, "needs at least one operand", *xs)
        rank = xs[0].rank
        require(
            self,
            rank >= 1 and all(t.rank == rank for t in xs),
            "operands need equal rank >= 1",
            *xs,
        )
        d = norm_dim(self, self.dim, rank, *xs)
        for t in xs:
            same = all(a == b for i, (a, b) in enumerate(zip(t.shape, xs[0].shape)) if i != d)
            require(self, same, f"shapes differ outside dim {d}", *xs)
        try:
            dtype = result_dtype(*(TensorType((1,), t.dtype) for t in xs))
        except Exception as e:
            raise self.type_error(str(e), *xs) from None
        shape = list(xs[0].shape)
        shape[d] = canon_dim(sum((t.shape[d] for t in xs), 0))
        return (TensorType(tuple(shape), dtype),)

    def reference(self, *xs):
        from ir.types import DType

        if all(t.dtype == xs[0].dtype for t in xs):
            return (torch.cat(xs, dim=self.dim),)
        dtype = result_dtype(*(TensorType((1,), DType.from_torch(t.dtype)) for t in xs)).to_torch()
        return (torch.cat([t.to(dtype) for t in xs], dim=self.dim),)


@register
@dataclass(frozen=True)
class Pad(_Shape):
    """Constant padding (torch.nn.functional.pad): `pads` = (last_lo, last_hi, prev_lo, ...);
    negative pads crop."""

    mnemonic = "pad"
    pads: tuple[Dim, ...] = ()
    value: Scalar = 0.0

    def infer_type(self, x: TensorType):
        n = len(self.pads)
        require(
            self, n % 2 == 0 and n // 2 <= x.rank, f"pads {list(self.pads)}: need pairs, <= rank", x
        )
        shape = list(x.shape)
        for i in range(n // 2):
            d = x.rank - 1 - i
            shape[d] = canon_dim(shape[d] + self.pads[2 * i] + self.pads[2 * i + 1])
        return (TensorType(tuple(shape), x.dtype),)

    def reference(self, x):
        return (torch.nn.functional.pad(x, self.pads, value=self.value),)


@register
@dataclass(frozen=True)
class Select(_Shape):
    """x.select(dim, index): drop `dim`, keeping entry `index` (negative counts from the end)."""

    mnemonic = "select"
    dim: int = 0
    index: Dim = 0

    def infer_type(self, x: TensorType):
        require(self, x.rank >= 1, "input must be at least 1-D", x)
        d = norm_dim(self, self.dim, x.rank, x)
        size = x.shape[d]
        if isinstance(self.index, int) and isinstance(size, int):
            require(self, -size <= self.index < size, f"index {self.index} out of range", x)
        return (TensorType(x.shape[:d] + x.shape[d + 1 :], x.dtype),)

    def reference(self, x):
        return (x.select(self.dim, self.index),)


@register
@dataclass(frozen=True)
class Squeeze(_Shape):
    """Remove `dim` if its size is literally 1, else no-op (symbolic sizes are kept)."""

    mnemonic = "squeeze"
    dim: int = 0

    def infer_type(self, x: TensorType):
        d = norm_dim(self, self.dim, x.rank, x)
        if x.rank and x.shape[d] == 1:
            return (TensorType(x.shape[:d] + x.shape[d + 1 :], x.dtype),)
        return (x,)

    def reference(self, x):
        d = self.dim % max(x.dim(), 1)
        return (x.squeeze(d) if x.dim() and x.shape[d] == 1 else x,)


@register
@dataclass(frozen=True)
class Unsqueeze(_Shape):
    """Insert a size-1 dim at `dim` (in [-rank-1, rank])."""

    mnemonic = "unsqueeze"
    dim: int = 0

    def infer_type(self, x: TensorType):
        d = norm_dim(self, self.dim, x.rank + 1, x)
        return (TensorType(x.shape[:d] + (1,) + x.shape[d:], x.dtype),)

    def reference(self, x):
        return (x.unsqueeze(self.dim),)


@register
@dataclass(frozen=True)
class Flip(_Shape):
    """Reverse the order of elements along each of `dims`."""

    mnemonic = "flip"
    dims: tuple[int, ...] = ()

    def infer_type(self, x: TensorType):
        dims = [norm_dim(self, d, x.rank, x) for d in self.dims]
        require(self, len(set(dims)) == len(dims), f"repeated dims {self.dims}", x)
        return (x,)

    def reference(self, x):
        return (torch.flip(x, self.dims),)


@register
@dataclass(frozen=True)
class Repeat(_Shape):
    """torch.Tensor.repeat: tile x `repeats[i]` times along dim i (extra leading repeats add
    dims)."""

    mnemonic = "repeat"
    repeats: tuple[Dim, ...] = ()

    def infer_type(self, x: TensorType):
        require(self, len(self.repeats) >= x.rank, f"need >= {x.rank} repeats", x)
        lead = len(self.repeats) - x.rank
        shape = list(self.repeats[:lead])
        shape += [canon_dim(d * r) for d, r in zip(x.shape, self.repeats[lead:])]
        return (TensorType(tuple(shape), x.dtype),)

    def reference(self, x):
        return (x.repeat(self.repeats),)
