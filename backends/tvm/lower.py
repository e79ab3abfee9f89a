"""Lowering IR ops to TVM tensor expressions (te), one function per op family.

`Lowering` turns a body graph (a `fused.kernel` body, or a graph holding one node) into te: body
inputs become placeholders whose symbolic dims are `te.var`s (one per distinct dim expression, so
equal IR dims share a var), each op becomes `te.compute` stages, and `prim_func()` packs it into
a TensorIR `PrimFunc` taking the inputs then the outputs (destination passing). Kernels are
therefore built once per op signature, whatever the sizes of B and T (symbolic shapes, no
re-specialisation per binding).

An op that cannot be lowered raises `Unsupported(reason)`; the runtime then runs its reference.
Semantics follow the IR docstrings (torch): binary ops compute in the promoted dtype, integer
inputs of float-only unary ops become f32, bool add/mul are or/and.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy

import ir
from ir.types import DType, TensorType

__all__ = ["TE_OPS", "Lowering", "Unsupported", "dtype_of", "guarded", "lowerable", "tvm_dtype"]

_DTYPES = {
    DType.f32: "float32",
    DType.f16: "float16",
    DType.bf16: "bfloat16",
    DType.i64: "int64",
    DType.i32: "int32",
    DType.i8: "int8",
    DType.bool: "bool",
}
# Input-only storage dtypes: a kernel may read them (decoded exactly by the LLVM/CUDA codegen),
# but no lowering produces them (torch's f32 -> e4m3 rounding is not checked against TVM's).
_INPUT_DTYPES = {**_DTYPES, DType.f8e4m3: "float8_e4m3fn"}


class Unsupported(Exception):
    """This op (or these sizes) cannot be lowered; the message is the reason."""


def tvm_dtype(d: DType) -> str:
    if d not in _DTYPES:
        raise Unsupported(f"dtype {d} has no TVM lowering")
    return _DTYPES[d]


# mnemonic -> fn(lowering, node, args) -> list of te tensors (one per result)
LowerFn = Callable[["Lowering", ir.Node, list[Any]], list[Any]]
TE_OPS: dict[str, LowerFn] = {}


def lowers(*mnemonics: str) -> Callable[[LowerFn], LowerFn]:
    def deco(fn: LowerFn) -> LowerFn:
        for m in mnemonics:
            TE_OPS[m] = fn
        return fn

    return deco


def lowerable(g: ir.Graph) -> bool | str:
    """True when every op of `g` has a te lowering, else the first reason it has not."""
    for n in g.ops:
        if n.name not in TE_OPS:
            return f"no TVM lowering for {n.name}"
    return True


class Lowering:
    """te for one body graph; `dims` maps IR dim expressions to TIR expressions. `gpu`: lower for
    a GPU (no extern CPU calls: top-k is computed in the kernel, see `semantic.topk`)."""

    def __init__(
        self,
        body: ir.Graph,
        name: str,
        overrides: dict[str, LowerFn] | None = None,
        gpu: bool = False,
    ) -> None:
        from tvm import te

        self.body = body
        self.gpu = gpu
        self.name = name
        self.dims: dict[Any, Any] = {}
        self.placeholders: list[Any] = []
        self.values: dict[str, Any] = {}
        self.counter = 0
        for i, v in enumerate(body.inputs):
            shape = [self._input_dim(d) for d in v.shape]
            dtype = _INPUT_DTYPES.get(v.dtype) or tvm_dtype(v.dtype)
            ph = te.placeholder(shape, dtype=dtype, name=_ident(v.name, f"in{i}"))
            self.placeholders.append(ph)
            self.values[v.name] = ph
        for node in body.ops:
            fn = (overrides or {}).get(node.name) or TE_OPS.get(node.name)
            if fn is None:
                raise Unsupported(f"no TVM lowering for {node.name}")
            outs = fn(self, node, [self.values[v.name] for v in node.operands])
            for r, t in zip(node.results, outs):
                want = tvm_dtype(r.dtype)
                self.values[r.name] = t if dtype_of(t) == want else self.cast(t, want)
        self.outputs = [self.values[v.name] for v in body.outputs]

    # --- dims ---------------------------------------------------------------------------------

    def _input_dim(self, d: ir.Dim) -> Any:
        from tvm import te

        if isinstance(d, int):
            return d
        if d not in self.dims:
            self.dims[d] = te.var(_ident(str(d), f"d{len(self.dims)}"), dtype="int32")
        return self.dims[d]

    def dim(self, d: ir.Dim) -> Any:
        """The TIR expression of an IR dim (ints stay ints)."""
        if isinstance(d, int):
            return d
        if d in self.dims:
            return self.dims[d]
        return _sympy_to_tir(d, self.dims)

    def shape(self, t: TensorType) -> list[Any]:
        return [self.dim(d) for d in t.shape]

    # --- helpers ------------------------------------------------------------------------------

    def tag(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def cast(self, t: Any, dtype: str) -> Any:
        from tvm import te

        if dtype_of(t) == dtype:
            return t
        return te.compute(
            t.shape, lambda *i: convert(t(*i), dtype), name=self.tag("cast"), tag="elemwise"
        )

    def prim_func(self) -> Any:
        from tvm import te

        outs = list(self.outputs)
        for i, t in enumerate(outs):  # an output that is an input (or repeated) needs a copy
            if any(t.same_as(p) for p in self.placeholders) or any(t.same_as(o) for o in outs[:i]):
                outs[i] = te.compute(t.shape, lambda *j, t=t: t(*j), name=self.tag("copy"))
        return te.create_prim_func([*self.placeholders, *outs]).with_attr(
            "global_symbol", self.name
        )


def _ident(text: str, fallback: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in text)
    return out if out and not out[0].isdigit() else f"{fallback}_{out}" if out else fallback


def _sympy_to_tir(e: Any, dims: dict) -> Any:
    """Integer sympy expression over bound dims -> TIR (Add, Mul, floor division, Mod)."""
    from tvm import tirx

    if e in dims:
        return dims[e]
    if isinstance(e, sympy.Integer):
        return int(e)
    if isinstance(e, sympy.Add):
        out = _sympy_to_tir(e.args[0], dims)
        for a in e.args[1:]:
            out = out + _sympy_to_tir(a, dims)
        return out
    if isinstance(e, sympy.Mul):
        out = _sympy_to_tir(e.args[0], dims)
        for a in e.args[1:]:
            out = out * _sympy_to_tir(a, dims)
        return out
    if isinstance(e, sympy.floor) and isinstance(e.args[0], sympy.Mul):
        num, den = sympy.fraction(e.args[0])
        if den != 1:
            return tirx.floordiv(_sympy_to_tir(num, dims), _sympy_to_tir(den, dims))
    if isinstance(e, sympy.Mod):
        return tirx.floormod(_sympy_to_tir(e.args[0], dims), _sympy_to_tir(e.args[1], dims))
    raise Unsupported(f"dim {e} is not bound by a kernel input's shape")


def convert(x: Any, dtype: str) -> Any:
    """torch `.to(dtype)` on one scalar expression (to bool: x != 0)."""
    from tvm import tirx

    src = dtype_of(x)
    if src == dtype:
        return x
    if dtype == "bool":
        return tirx.NE(x, tirx.const(0, src))
    if src == "float8_e4m3fn":  # TVM's own cast flushes subnormals; decode the bits exactly
        from backends.tvm.quant import decode_e4m3

        return convert(decode_e4m3(x), dtype)
    return x.astype(dtype)


def guarded(cond: Any, then: Any, otherwise: Any) -> Any:
    """`cond ? then : otherwise`, evaluating only the branch taken (`tirx.if_then_else`).

    Use it, not `tirx.Select`, when a branch loads at an index that is in bounds only under its
    condition. TVM's simplifier rewrites each branch of a Select assuming that branch's condition
    (a clamp like `max(i - s, 0)` becomes `i - s`), yet a Select evaluates both branches: the
    other one then reads out of bounds (seen: sparse_mqa read cos/sin before their first row).
    """
    from tvm import tirx

    return tirx.if_then_else(cond, then, otherwise)


def dtype_of(x: Any) -> str:
    """The dtype string of a te tensor or a TIR expression."""
    return str(x.dtype) if hasattr(x, "dtype") else str(x.ty)


def broadcast_index(t: Any, out_rank: int, idx: tuple) -> tuple:
    """Indices into `t` for output indices `idx` (numpy broadcasting: size-1 dims read 0)."""
    rank = len(t.shape)
    lead = out_rank - rank
    out = []
    for axis in range(rank):
        out.append(0 if static(t.shape[axis]) == 1 else idx[lead + axis])
    return tuple(out)


def static(size: Any) -> int | None:
    """The int value of a static extent (int or IntImm), None when symbolic."""
    if isinstance(size, int):
        return size
    return int(size.value) if hasattr(size, "value") else None


from backends.tvm import lower_ops as _lower_ops  # noqa: F401  (fills TE_OPS)
from backends.tvm import lower_shape as _lower_shape  # noqa: F401  (fills TE_OPS)
