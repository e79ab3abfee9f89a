"""Collectives over a named mesh axis (`dist.*`) and the MoE expert-parallel exchange
(`moe.dispatch`, `moe.combine`).

Every op names its group by a *mesh-axis name* (`"tp"`, `"ep"`, `"dp"`) and records the axis size,
so types are static (an all_gather over an axis of size R multiplies a dim by R). The axis is bound
to a process group only when the graph runs: `bind_groups({"tp": group, ...})` (a context manager)
makes `reference` call the bound group's collective. Axis groups are small objects with `size`,
`rank` and four methods (`all_reduce`, `all_gather`, `reduce_scatter`, `all_to_all`); the
`torch.distributed` implementation lives in `backends/distributed` — ir imports no transport.

An unbound axis of size 1 is the identity (one rank holds everything). An unbound axis of size > 1
is an error naming the axis and the fix, never a silent identity.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ir._lazy import torch
from ir.core import Cost, Kind, Op, register
from ir.ops._util import INT_INDEX, norm_dim, require
from ir.symbolic import Dim, canon_dim, same_dim
from ir.types import DType, TensorType

__all__ = [
    "AXES",
    "AxisGroup",
    "AllReduce",
    "AllGather",
    "ReduceScatter",
    "AllToAll",
    "AxisIndex",
    "Dispatch",
    "Combine",
    "bind_groups",
    "bound_group",
    "comm_bytes",
]

AXES = ("tp", "ep", "dp")


class AxisGroup(Protocol):
    """The ranks along one mesh axis, as the interpreter needs them (see module docstring)."""

    size: int
    rank: int

    def all_reduce(self, t: Any) -> Any: ...
    def all_gather(self, t: Any, dim: int) -> Any: ...
    def reduce_scatter(self, t: Any, dim: int) -> Any: ...
    def all_to_all(self, t: Any, dim: int) -> Any: ...
    def all_to_all_v(self, t: Any, in_splits: list[int], out_splits: list[int]) -> Any: ...


_GROUPS: contextvars.ContextVar[Mapping[str, AxisGroup]] = contextvars.ContextVar(
    "dsv4c_axis_groups", default={}
)


@contextlib.contextmanager
def bind_groups(groups: Mapping[str, AxisGroup]) -> Iterator[None]:
    """Within the block, collectives over axis `name` run on `groups[name]`."""
    for name in groups:
        if name not in AXES:
            raise ValueError(f"bind_groups: unknown mesh axis {name!r}; expected one of {AXES}")
    token = _GROUPS.set(dict(groups))
    try:
        yield
    finally:
        _GROUPS.reset(token)


def bound_group(op: Op, axis: str, size: int) -> AxisGroup | None:
    """The group bound to `axis`, or None when the axis has size 1 and nothing is bound."""
    group = _GROUPS.get().get(axis)
    if group is None:
        if size == 1:
            return None
        raise RuntimeError(
            f"{op.mnemonic} over mesh axis {axis!r} (size {size}) has no process group bound; "
            f"run the graph under backends.distributed (or ir.ops.collective.bind_groups) with "
            f"a group for {axis!r}"
        )
    if group.size != size:
        raise RuntimeError(
            f"{op.mnemonic}: mesh axis {axis!r} was compiled for {size} ranks but the bound "
            f"group has {group.size}; launch with the mesh the graph was compiled for"
        )
    return group


class _AxisOp(Op):
    """Shared attribute checks: a known axis name and a positive size."""

    def _check_axis(self, *types: TensorType) -> None:
        group, size = self.group, self.size  # type: ignore[attr-defined]
        require(self, group in AXES, f"group must be a mesh axis {AXES}, got {group!r}", *types)
        require(self, size >= 1, f"size (ranks on axis {group!r}) must be >= 1", *types)

    def _divisible(self, d: Any, what: str, *types: TensorType) -> None:
        size = self.size  # type: ignore[attr-defined]
        ok = not isinstance(d, int) or d % size == 0
        require(self, ok, f"{what} ({d}) must divide by the axis size {size}", *types)


@register
@dataclass(frozen=True)
class AllReduce(_AxisOp):
    """Sum `x` over the ranks of mesh axis `group` (`size` ranks); every rank gets the sum."""

    mnemonic = "dist.all_reduce"
    kind = Kind.OPAQUE
    group: str = "tp"
    size: int = 1

    def infer_type(self, x: TensorType):
        self._check_axis(x)
        require(self, x.dtype.is_float, "all_reduce sums floats; got a non-float tensor", x)
        return (x,)

    def reference(self, x):
        g = bound_group(self, self.group, self.size)
        return (x if g is None else g.all_reduce(x),)


@register
@dataclass(frozen=True)
class AllGather(_AxisOp):
    """Concatenate every rank's `x` along `dim` in rank order: dim grows `size`-fold."""

    mnemonic = "dist.all_gather"
    kind = Kind.OPAQUE
    group: str = "tp"
    size: int = 1
    dim: int = 0

    def infer_type(self, x: TensorType):
        self._check_axis(x)
        d = norm_dim(self, self.dim, x.rank, x)
        shape = list(x.shape)
        shape[d] = canon_dim(shape[d] * self.size)
        return (x.with_shape(tuple(shape)),)

    def reference(self, x):
        g = bound_group(self, self.group, self.size)
        return (x if g is None else g.all_gather(x, self.dim % x.dim()),)


@register
@dataclass(frozen=True)
class ReduceScatter(_AxisOp):
    """Sum `x` over the ranks, then keep this rank's `dim` block (block r on rank r)."""

    mnemonic = "dist.reduce_scatter"
    kind = Kind.OPAQUE
    group: str = "tp"
    size: int = 1
    dim: int = 0

    def infer_type(self, x: TensorType):
        self._check_axis(x)
        require(self, x.dtype.is_float, "reduce_scatter sums floats", x)
        d = norm_dim(self, self.dim, x.rank, x)
        self._divisible(x.shape[d], f"dim {d}", x)
        shape = list(x.shape)
        shape[d] = _div(shape[d], self.size)
        return (x.with_shape(tuple(shape)),)

    def reference(self, x):
        g = bound_group(self, self.group, self.size)
        return (x if g is None else g.reduce_scatter(x, self.dim % x.dim()),)


@register
@dataclass(frozen=True)
class AllToAll(_AxisOp):
    """Split `x` along `dim` into `size` equal blocks, send block j to rank j, and concatenate
    the received blocks along `dim` in source-rank order. The shape is unchanged."""

    mnemonic = "dist.all_to_all"
    kind = Kind.OPAQUE
    group: str = "ep"
    size: int = 1
    dim: int = 0

    def infer_type(self, x: TensorType):
        self._check_axis(x)
        d = norm_dim(self, self.dim, x.rank, x)
        self._divisible(x.shape[d], f"dim {d}", x)
        return (x,)

    def reference(self, x):
        g = bound_group(self, self.group, self.size)
        return (x if g is None else g.all_to_all(x, self.dim % x.dim()),)


@register
@dataclass(frozen=True)
class AxisIndex(_AxisOp):
    """This rank's index along mesh axis `group` (i64 scalar, 0 when the axis is unbound and of
    size 1). Rank-dependent offsets (the first local expert, a vocabulary slice) come from here,
    so every rank runs the same program (SPMD)."""

    mnemonic = "dist.axis_index"
    kind = Kind.OPAQUE
    num_operands = 0
    group: str = "ep"
    size: int = 1

    def infer_type(self):
        self._check_axis()
        return (TensorType((), DType.i64),)

    def reference(self, device=None):
        g = bound_group(self, self.group, self.size)
        return (torch.tensor(0 if g is None else g.rank, dtype=torch.int64, device=device),)

    def cost(self, operand_types, result_types) -> Cost:
        return Cost(0, 0)


def _route_check(op: Op, x: TensorType, w: TensorType, e: TensorType) -> None:
    require(op, x.rank == 2 and x.dtype.is_float, "x must be float [N,d]", x, w, e)
    require(op, w.rank == 2 and w.dtype.is_float, "weights must be float [N,k]", x, w, e)
    require(op, e.shape == w.shape and e.dtype in INT_INDEX, "experts: int [N,k]", x, w, e)
    require(op, same_dim(w.shape[0], x.shape[0]), "weights need N rows like x", x, w, e)


@register
@dataclass(frozen=True)
class Dispatch(_AxisOp):
    """Static-capacity expert-parallel dispatch over axis `group` (`size` ranks R, `n_experts` E,
    E/R experts per rank, expert e on rank e // (E/R)).

    x [N,d], weights [N,k] float, experts [N,k] int -> (recv_x [E/R, R·C, d] in x's dtype,
    recv_w [E/R, R·C] f32, slots [N,k] i64), with C = `capacity`.

    Each (token n, choice j) pair goes to expert e = experts[n,j] at position p = the number of
    earlier pairs (row-major over [N,k]) on this rank bound for e; pairs with p >= C are dropped
    (slot -1). slots[n,j] = p or -1. Rank r's row block [s·C, (s+1)·C) of recv_x[i] holds the rows
    source rank s sent to its local expert i, zero-padded; recv_w holds their routing weights (0
    in padding), so an expert FFN scaled by recv_w sends 0 for empty rows. Capacity C = N drops
    nothing (a token picks an expert at most once). Shapes never depend on the routing.

    `layout` picks the transport, not the result: "padded" sends the whole [E, C] buffers in an
    equal-split all_to_all (no host sync; DeepEP low-latency / masked layout); "ragged" exchanges
    the per-expert counts first and sends only the valid rows in an uneven all_to_all (the split
    sizes are read on the host: one sync per exchange; DeepEP normal / torchtitan).
    """

    mnemonic = "moe.dispatch"
    kind = Kind.OPAQUE
    num_operands = 3
    group: str = "ep"
    size: int = 1
    n_experts: int = 1
    capacity: Dim = 1  # int or symbolic (e.g. the token count N)
    layout: str = "padded"

    def infer_type(self, x: TensorType, w: TensorType, e: TensorType):
        self._check_axis(x, w, e)
        _check_layout(self, x)
        _route_check(self, x, w, e)
        require(self, self.n_experts % self.size == 0, "n_experts must divide by size", x)
        local = self.n_experts // self.size
        rows = canon_dim(self.size * canon_dim(self.capacity))
        return (
            TensorType((local, rows, x.shape[1]), x.dtype),
            TensorType((local, rows), DType.f32),
            TensorType(w.shape, DType.i64),
        )

    def reference(self, x, w, e):
        g = bound_group(self, self.group, self.size)
        cap, n_e = int(self.capacity), self.n_experts
        slots = _slots(e.long(), n_e, cap)
        keep = slots >= 0
        flat = (e.long() * cap + slots.clamp(min=0))[keep]  # row in the [E·C] send buffer
        send_x = x.new_zeros(n_e * cap, x.shape[1])
        send_w = torch.zeros(n_e * cap, dtype=torch.float32, device=x.device)
        tok = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(e)[keep]
        send_x[flat] = x[tok]
        send_w[flat] = w.float()[keep]
        counts = _counts(e, slots, n_e)
        ragged = self.layout == "ragged" and g is not None
        recv_counts = g.all_to_all(counts, 0) if ragged else None
        recv_x = _exchange(g, send_x.view(n_e, cap, -1), self.size, counts, recv_counts)
        recv_w = _exchange(g, send_w.view(n_e, cap, 1), self.size, counts, recv_counts)
        return (recv_x, recv_w.squeeze(-1), slots)

    def cost(self, operand_types, result_types) -> Cost:
        return Cost(0, canon_dim(sum((t.nbytes for t in result_types[:2]), 0)))


@register
@dataclass(frozen=True)
class Combine(_AxisOp):
    """Inverse of `moe.dispatch`: y [E/R, R·C, d] (expert outputs, already weighted), experts
    [N,k], slots [N,k] (from dispatch) -> out [N,d] in y's dtype, out[n] = Σ_j y_home[e_nj,
    slot_nj] summed in fp32 over the pairs not dropped, where y_home is the rows sent back to
    the pair's source rank. `layout` as for `moe.dispatch` (ragged: counts exchanged again, only
    valid rows sent back)."""

    mnemonic = "moe.combine"
    kind = Kind.OPAQUE
    num_operands = 3
    group: str = "ep"
    size: int = 1
    n_experts: int = 1
    layout: str = "padded"

    def infer_type(self, y: TensorType, e: TensorType, slots: TensorType):
        self._check_axis(y, e, slots)
        _check_layout(self, y)
        require(self, y.rank == 3 and y.dtype.is_float, "y must be float [E/R, R*C, d]", y)
        require(self, self.n_experts % self.size == 0, "n_experts must divide by size", y)
        ok = same_dim(y.shape[0], self.n_experts // self.size)
        require(self, ok, f"y must hold n_experts/size = {self.n_experts // self.size} experts", y)
        require(self, e.rank == 2 and e.dtype in INT_INDEX, "experts must be int [N,k]", e)
        require(self, slots.shape == e.shape and slots.dtype == DType.i64, "slots: i64 [N,k]", e)
        self._divisible(y.shape[1], "y's row count", y)
        return (TensorType((e.shape[0], y.shape[2]), y.dtype),)

    def reference(self, y, e, slots):
        g = bound_group(self, self.group, self.size)
        n_e = self.n_experts
        cap = y.shape[1] // self.size
        local = y.shape[0]
        # [E/R, R, C, d] -> [R, E/R, C, d]: block s goes back to source rank s
        back = y.view(local, self.size, cap, -1).transpose(0, 1).reshape(n_e, cap, -1)
        if g is None:
            home = back
        elif self.layout == "ragged":  # valid rows: what each source sent (counts re-exchanged)
            counts = _counts(e, slots, n_e)
            home = _a2a_rows(g, back, g.all_to_all(counts, 0), counts)
        else:
            home = g.all_to_all(back.contiguous(), 0)
        keep = slots >= 0
        rows = home.reshape(n_e * cap, -1)[(e.long() * cap + slots.clamp(min=0)).view(-1)]
        rows = rows.view(*e.shape, -1).float() * keep[..., None]
        return (rows.sum(1).to(y.dtype),)

    def cost(self, operand_types, result_types) -> Cost:
        return Cost(0, canon_dim(operand_types[0].nbytes))


def _div(d: Any, size: int) -> Any:
    """d / size for a dim known to divide (int floor division, or a sympy quotient)."""
    import sympy

    return d // size if isinstance(d, int) else canon_dim(d / sympy.Integer(size))


def _slots(e, n_experts: int, cap: int):
    """Position of each (n, j) pair among the pairs bound for its expert, or -1 past capacity."""
    flat = e.reshape(-1)
    onehot = torch.nn.functional.one_hot(flat, n_experts)
    pos = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    return torch.where(pos < cap, pos, torch.full_like(pos, -1)).view(e.shape)


def _check_layout(op: Op, *types: TensorType) -> None:
    layout = getattr(op, "layout")
    ok = layout in ("padded", "ragged")
    require(op, ok, f"layout must be 'padded' or 'ragged', got {layout!r}", *types)


def _counts(e, slots, n_experts: int):
    """Kept (token, choice) pairs per expert on this rank: i64 [E]."""
    kept = e.long()[slots >= 0]
    return torch.bincount(kept, minlength=n_experts).to(torch.int64)


def _a2a_rows(g: AxisGroup, send, send_counts, recv_counts):
    """What `g.all_to_all(send, 0)` returns for an expert-major [E, C, c] buffer whose expert e
    holds send_counts[e] leading valid rows (the rest zero), moving only the valid rows: an uneven
    all_to_all whose split sizes are read on the host. recv_counts[e'] = valid rows in block e'
    of the result (block s·E/R + i: what source s holds for local expert i)."""
    n_e, cap = send.shape[0], send.shape[1]
    pos = torch.arange(cap, device=send.device)[None, :]
    packed = send[pos < send_counts[:, None]]  # expert-major = destination-rank-major
    in_splits = send_counts.view(g.size, -1).sum(1).tolist()
    out_splits = recv_counts.view(g.size, -1).sum(1).tolist()
    got = g.all_to_all_v(packed.contiguous(), in_splits, out_splits)
    out = send.new_zeros(send.shape)
    out[pos < recv_counts[:, None]] = got
    return out


def _exchange(g: AxisGroup | None, send, size: int, counts=None, recv_counts=None):
    """[E, C, c] send buffer (expert-major) -> [E/R, R·C, c] rows received for local experts
    (ragged transport when `recv_counts` is given)."""
    if g is not None and recv_counts is not None:
        send = _a2a_rows(g, send, counts, recv_counts)
    elif g is not None:
        send = g.all_to_all(send.contiguous(), 0)  # now block s = what rank s sent to my experts
    n_e, cap = send.shape[0], send.shape[1]
    local = n_e // size
    return send.view(size, local, cap, -1).transpose(0, 1).reshape(local, size * cap, -1)


def comm_bytes(op: Op, operand_types: tuple[TensorType, ...]) -> Any:
    """Bytes one rank sends for a collective (ring algorithms; dispatch/combine by buffer size):
    all_reduce 2(R-1)/R·n, all_gather (R-1)·n, reduce_scatter (R-1)/R·n, all_to_all and MoE
    exchange (R-1)/R of the buffer. n is the operand's bytes; 0 for other ops."""
    size = getattr(op, "size", 1)
    if size == 1 or not operand_types:
        return 0
    n = operand_types[0].nbytes
    frac = sympy_frac(size - 1, size)
    if isinstance(op, AllReduce):
        return canon_dim(2 * frac * n)
    if isinstance(op, AllGather):
        return canon_dim((size - 1) * n)
    if isinstance(op, (ReduceScatter, AllToAll, Combine)):
        return canon_dim(frac * n)
    if isinstance(op, Dispatch):
        x, w = operand_types[0], operand_types[1]
        cap = canon_dim(op.capacity)
        per_expert = cap * (x.shape[1] * x.dtype.itemsize + 4)
        return canon_dim(frac * op.n_experts * per_expert)
    return 0


def sympy_frac(a: int, b: int) -> Any:
    import sympy

    return sympy.Rational(a, b)
