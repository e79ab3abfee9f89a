"""Generated Triton kernels for `fused.kernel` bodies of elementwise, broadcast and last-dim
reduction ops (RMSNorm, SwiGLU, softmax, residual adds, ...).

The body's *domain* is its iteration shape: the operand shape of its reductions, or the broadcast
of its inputs and outputs when it has none. It is viewed as `n_rows x n_cols` (all leading dims
flattened x the last dim). Each program owns BLOCK_M rows and BLOCK_N columns; with a reduction,
BLOCK_N covers a whole row (like the Triton softmax tutorial), so a row never leaves registers.

Inputs are loaded by layout (see `body.py`): `tile` inputs at `rows * n_cols + cols`, `row`
inputs at `rows`, `col` inputs at `cols`, 0-d inputs once. An input broadcast along some leading
dims only (e.g. [B,1,N] against [B,T,N]) is marked "bcast": the runtime materialises it.

    kernel = emit_fused(body)           # raises Unsupported(reason)
    kernel.source.source                # the module text, deterministic
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ir
from backends.triton.body import (
    REDUCTIONS,
    VIEWS,
    BodyEmitter,
    Unsupported,
    classify,
    compute_type,
    py_name,
    reduced_dims,
    row_shapes,
)
from backends import naming
from backends.naming import canonical_names, identifier
from backends.triton.kernel import KernelSource, Param, call_lines, next_pow2
from ir.symbolic import Dim, dim_str, subs_dim

__all__ = [
    "FusedPlan",
    "FusedKernel",
    "emit_fused",
    "fused_config",
    "kernel_name",
    "canonical_names",
    "MAX_ROW",
]

_IND = "    "
MAX_ROW = 32768  # longest reduced row one program holds in registers (fp32: 128 KiB per block)


@dataclass(frozen=True)
class FusedPlan:
    domain: tuple[Dim, ...]
    reduction: bool  # a row never spans programs (BLOCK_N >= n_cols)
    axis: int  # the domain dim the columns run along (reduced dim; the last without reduction)
    inputs: tuple[str, ...]  # layout per body input: tile, row, col, scalar or bcast
    outputs: tuple[str, ...]  # layout per body output: tile or row

    @property
    def inner(self) -> bool:
        """True when columns are not the last dim: offsets need the `n_inner` stride."""
        return self.axis != len(self.domain) - 1

    def sizes(self, env: dict) -> tuple[list[int], int, int, int]:
        """Bound domain, n_rows, n_cols, n_inner (the product of the dims after the axis)."""
        domain = [int(subs_dim(d, env)) for d in self.domain]
        n_cols = domain[self.axis]
        n_inner = math.prod(domain[self.axis + 1 :])
        n_rows = math.prod(domain[: self.axis]) * n_inner  # not prod // n_cols: n_cols may be 0
        return domain, n_rows, n_cols, n_inner


@dataclass(frozen=True)
class FusedKernel:
    source: KernelSource
    plan: FusedPlan
    body: ir.Graph


def fused_config(plan: FusedPlan, n_cols: int, gpu: bool = True) -> dict[str, int]:
    """Tile sizes and warps for a row length: whole rows for reductions, else 2-D tiles. Off the
    GPU (the interpreter runs one Python iteration per program) tiles are 8x larger."""
    budget = 2048 if gpu else 16384  # elements per program
    block_n = next_pow2(n_cols)
    if not plan.reduction:
        block_n = min(block_n, 1024 if gpu else 4096)
    block_m = max(1, min(16 if plan.reduction and gpu else 1024, budget // block_n))
    elems = block_m * block_n
    num_warps = 4 if elems <= 4096 else (8 if elems <= 16384 else 16)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


def kernel_name(body: ir.Graph) -> str:
    """`fused_<body name>` for a named body, else what it computes (`backends.naming`)."""
    if body.name:
        return identifier("fused_" + body.name)
    return naming.kernel_name([n.name for n in body.ops if n.name not in VIEWS])


def _broadcast(shapes: Sequence[Sequence[Dim]]) -> tuple[Dim, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        d: Dim = 1
        for s in shapes:
            j = i - rank + len(s)
            if j < 0 or s[j] == 1 or s[j] == d:
                continue
            if d != 1:
                raise Unsupported(f"inputs and outputs do not broadcast to one domain ({shapes})")
            d = s[j]
        out.append(d)
    return tuple(out)


def find_domain(body: ir.Graph) -> tuple[tuple[Dim, ...], bool, int]:
    """The body's domain, whether it reduces, and its column axis (the reduced dim)."""
    reductions = [n for n in body.ops if n.name in REDUCTIONS]
    if reductions:
        shapes = {tuple(n.operands[0].shape) for n in reductions}
        if len(shapes) > 1:
            raise Unsupported(f"reductions over different shapes {sorted(map(str, shapes))}")
        domain = shapes.pop()
        axes = {tuple(reduced_dims(n)) for n in reductions}
        if len(axes) > 1 or len(next(iter(axes))) != 1:
            raise Unsupported(
                f"reductions over dims {sorted(axes)}: a body reduces one dim, the same for all"
            )
        axis = next(iter(axes))[0]
    else:
        domain = _broadcast([v.shape for v in [*body.inputs, *body.outputs]])
        axis = len(domain) - 1
    if not domain:
        raise Unsupported("a 0-d body has nothing to tile")
    return domain, bool(reductions), axis


def input_layout(v: ir.Value, domain: tuple[Dim, ...], axis: int) -> str:
    try:
        return classify(v.shape, domain, axis) or "bcast"
    except Unsupported:
        if list(v.shape) == row_shapes(domain, axis)[0]:  # reduced with keepdim=False
            return "row"
        raise


_LOAD = {
    "tile": ("offsets", "mask"),
    "bcast": ("offsets", "mask"),
    "row": ("rows[:, None]", "row_mask[:, None]"),
    "col": ("cols[None, :]", "col_mask[None, :]"),
}


def emit_fused(body: ir.Graph, name: str | None = None, loc: ir.Loc | None = None) -> FusedKernel:
    """Generate the kernel for a fused body; raises `Unsupported` with the reason. `loc`: the
    fused op's provenance, the header's `source:` line (and the ops' without their own)."""
    where = naming.locations(body.ops, loc)
    body = canonical_names(body)
    domain, reduction, axis = find_domain(body)
    if reduction and isinstance(domain[axis], int) and domain[axis] > MAX_ROW:
        raise Unsupported(
            f"a reduced row of {domain[axis]} exceeds one block (at most {MAX_ROW}); looped "
            "reductions over column chunks are not implemented"
        )
    layouts = tuple(input_layout(v, domain, axis) for v in body.inputs)
    name = name or kernel_name(body)
    em = BodyEmitter(domain, "col_mask[None, :]", "n_cols", _IND, axis)
    em.used_names |= {"offsets", "mask"}
    params: list[Param] = []
    loads: list[str] = []
    for v, layout in zip(body.inputs, layouts):
        var = em.fresh(py_name(v, "in"))
        ptr = em.fresh(f"{var}_ptr")
        params.append(Param(ptr, "ptr", v.dtype))
        loads += _load_lines(var, ptr, v, layout)
        em.bind(v, var, "tile" if layout == "bcast" else layout)
    em.emit_nodes(body.ops)
    out_layouts, stores = [], []
    for i, v in enumerate(body.outputs):
        val = em.values[v.name]
        layout = _output_layout(v, val.layout, domain, axis)
        ptr = em.fresh(_out_name(v, i, len(body.outputs)) + "_ptr")
        params.append(Param(ptr, "ptr", v.dtype))
        out_layouts.append(layout)
        offs, mask = _LOAD[layout]
        value = f"{val.expr}.to({ptr}.dtype.element_ty)"
        stores += call_lines("tl.store", [f"{ptr} + {offs}", value, f"mask={mask}"])
    plan = FusedPlan(domain, reduction, axis, layouts, tuple(out_layouts))
    params += [Param("n_rows", "int"), Param("n_cols", "int")]
    params += [Param("n_inner", "int")] if plan.inner else []
    params += [Param("BLOCK_M", "constexpr"), Param("BLOCK_N", "constexpr")]
    fused_ops = tuple(n.name for n in body.ops if n.name not in VIEWS and n.name != "constant")
    text = _module(name, body, plan, params, loads, em.lines, stores, fused_ops, where)
    return FusedKernel(KernelSource(name, text, tuple(params), fused_ops), plan, body)


def _out_name(v: ir.Value, i: int, count: int) -> str:
    if not v.name[0].isdigit():
        return py_name(v)
    return "out" if count == 1 else f"out{i}"


def _load_lines(var: str, ptr: str, v: ir.Value, layout: str) -> list[str]:
    to = ".to(tl.float32)" if v.dtype.is_float and v.dtype != ir.DType.f32 else ""
    if layout == "scalar":
        return [f"{var} = tl.load({ptr}){to}"]
    offs, mask = _LOAD[layout]
    other = "0.0" if v.dtype.is_float else "0"
    return call_lines(f"{var} = tl.load", [f"{ptr} + {offs}", f"mask={mask}", f"other={other}"], to)


def _output_layout(v: ir.Value, layout: str, domain: tuple[Dim, ...], axis: int) -> str:
    """How an output is stored; its shape may drop leading 1s of the domain (same layout)."""
    if layout == "row" and list(v.shape) in row_shapes(domain, axis):
        return "row"
    try:
        stored = classify(v.shape, domain, axis)
    except Unsupported:
        stored = None
    if layout in ("row", "tile") and stored == layout:
        return layout
    raise Unsupported(
        f"output %{v.name} {list(v.shape)} is a {layout} value of the domain {list(domain)}; "
        "only whole tiles and per-row values are stored"
    )


def _module(
    name: str,
    body: ir.Graph,
    plan: FusedPlan,
    params: list[Param],
    loads: list[str],
    ops: list[str],
    stores: list[str],
    fused_ops: tuple[str, ...],
    where: tuple[str, ...] = (),
) -> str:
    domain = "[" + ", ".join(dim_str(d) for d in plan.domain) + "]"
    n_cols = plan.domain[plan.axis]
    along = f"dim {plan.axis}, stride n_inner" if plan.inner else "the last dim"
    how = (
        f"BLOCK_M whole rows of {dim_str(n_cols)} per program (reduction along {along})"
        if plan.reduction
        else "BLOCK_M x BLOCK_N tiles"
    )
    ins = ", ".join(f"{p.name[:-4]}: {v.type} {lay}" for p, v, lay in _zip_in(params, body, plan))
    outs = ", ".join(f"{v.type} {lay}" for v, lay in zip(body.outputs, plan.outputs))
    lines = [
        "# Generated by dsv4c backends/triton/fused.py; do not edit.",
        f"# kernel:    {name}",
        f"# fused ops: {', '.join(fused_ops)} ({len(fused_ops)} ops)",
        f"# domain:    {domain} as n_rows x n_cols",
        f"# tiling:    {how}",
        f"# inputs:    {ins}",
        f"# outputs:   {outs}",
        *([f"# source:    {', '.join(where)}"] if where else []),
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {name}(",
        *[f"{_IND}{p.name}{': tl.constexpr' if p.kind == 'constexpr' else ''}," for p in params],
        "):",
    ]
    if plan.reduction and isinstance(n_cols, int):
        lines.append(
            f'{_IND}tl.static_assert(BLOCK_N >= {n_cols}, "a row of {n_cols} fits one block")'
        )
    if plan.reduction:
        lines += [
            f"{_IND}pid = tl.program_id(0)",
            f"{_IND}rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)",
            f"{_IND}cols = tl.arange(0, BLOCK_N)",
        ]
    else:
        lines += [
            f"{_IND}pid_m = tl.program_id(0)",
            f"{_IND}pid_n = tl.program_id(1)",
            f"{_IND}rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)",
            f"{_IND}cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        ]
    lines += [
        f"{_IND}row_mask = rows < n_rows",
        f"{_IND}col_mask = cols < n_cols",
        f"{_IND}mask = row_mask[:, None] & col_mask[None, :]",
        f"{_IND}offsets = {_OFFSETS[plan.inner]}",
        "",
        *[_IND + ln for ln in loads],
        "",
        *ops,
        "",
        *[_IND + s for s in stores],
        "",
    ]
    return "\n".join(lines)


_OFFSETS = {
    False: "rows[:, None] * n_cols + cols[None, :]",
    True: "(rows // n_inner)[:, None] * (n_cols * n_inner) + cols[None, :] * n_inner"
    " + (rows % n_inner)[:, None]",
}


def _zip_in(params: list[Param], body: ir.Graph, plan: FusedPlan) -> Any:
    return zip(params[: len(body.inputs)], body.inputs, plan.inputs)


def compute_types(body: ir.Graph) -> dict[str, str]:
    """Value name -> Triton compute type (for tests and debugging)."""
    return {v.name: compute_type(v.dtype) for n in body.ops for v in n.results}
