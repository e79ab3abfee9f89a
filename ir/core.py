"""Values, ops, nodes and graphs.

- `Value(name, type)`: an SSA value. Names match `[A-Za-z0-9_]+(\\.[A-Za-z0-9_]+)*` (dot-separated
  segments of letters, digits, underscores: `x`, `7`, `layers.0.attn.wq_a.weight`, `0.weight`)
  and print as `%name`. Anything else is rejected with `IRTypeError`.
- `Op`: base of every op kind. An op kind is a small frozen dataclass registered with `@register`
  in the one table `OPS` (mnemonic -> class). Its dataclass fields are its typed attributes; the
  class carries `mnemonic`, `kind`, a docstring stating semantics, `infer_type`, `reference` (torch)
  and `cost`. Attributes are validated and canonicalised on construction from the field
  annotations (int, float, bool, str, DType, Dim, Scalar, Optional, tuple[..., ...], Graph).
- `Node(op, operands, results, loc)`: one op application in a graph; `.name` is the mnemonic.
- `Graph(inputs, ops, outputs, name, roles, aliases)`: a flat ordered list of nodes (a jaxpr);
  every input has a role: "activation", "parameter" or "cache". `aliases` maps an output index
  to the name of the input whose buffer that output may be written into (donation: an executable
  running in place updates the caller's tensor instead of returning a new one; see
  `ir.verifier` rule 9 for what makes that safe).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import sympy

from ir.errors import IRTypeError
from ir.symbolic import Dim, canon_dim
from ir.types import DType, TensorType

__all__ = [
    "Kind",
    "Loc",
    "Cost",
    "Value",
    "Op",
    "OPS",
    "register",
    "Node",
    "Graph",
    "ROLES",
    "check_value_name",
    "attr_schema",
]

ROLES = ("activation", "parameter", "cache")
_NAME_RE = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")
_MNEMONIC_RE = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*\Z")


class Kind(enum.Enum):
    """What an op may fuse with (TVM OpPatternKind)."""

    ELEMENTWISE = "elementwise"  # out[i] = f(in[i]); same shape
    BROADCAST = "broadcast"  # elementwise after broadcasting operands
    INJECTIVE = "injective"  # each output element reads one input element (reshape, slice, ...)
    REDUCTION = "reduction"  # reduces along some dims (sum, softmax, ...)
    GEMM = "gemm"  # contraction (matmul, grouped_mm)
    OPAQUE = "opaque"  # anything else: sort, scatter, fused kernels, ...


@dataclass(frozen=True)
class Loc:
    """Provenance: the nn.Module path (`layers.0.ffn.gate`) and source (`model.py:120`)."""

    module: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("module", "source"):
            v = getattr(self, f)
            if not isinstance(v, str) or "\n" in v or "\r" in v:
                raise IRTypeError(f"Loc.{f} must be a one-line string, got {v!r}")


@dataclass(frozen=True)
class Cost:
    """Work of one op for the roofline report; may be symbolic."""

    flops: Dim
    bytes: Dim


def check_value_name(name: object, what: str = "value") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise IRTypeError(
            f"invalid {what} name {name!r}: expected dot-separated segments of letters, digits "
            "and underscores (e.g. 'x', '7', 'layers.0.attn.wq_a.weight'); rename it, e.g. "
            "replace other characters with '_'"
        )
    return name


@dataclass(frozen=True)
class Value:
    """An SSA value: printed `%name: type`."""

    name: str
    type: TensorType

    def __post_init__(self) -> None:
        check_value_name(self.name)
        if not isinstance(self.type, TensorType):
            raise IRTypeError(f"Value %{self.name} needs a TensorType, got {self.type!r}")

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    def __str__(self) -> str:
        return f"%{self.name}"


# --- ops --------------------------------------------------------------------------------------

OPS: dict[str, type["Op"]] = {}


class Op:
    """Base of all op kinds. Subclasses are frozen dataclasses registered with `@register`.

    Class attributes: `mnemonic`, `kind`, `num_operands` (an int, or None for variadic).
    Methods: `infer_type(*operand_types) -> tuple[TensorType, ...]`,
    `reference(*tensors) -> tuple[torch.Tensor, ...]` (attributes bound to ints; ops with no
    operands get `device=`), `cost(operand_types, result_types) -> Cost`.
    """

    mnemonic: ClassVar[str] = ""
    kind: ClassVar[Kind] = Kind.OPAQUE
    num_operands: ClassVar[int | None] = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = coerce_attr(attr_schema(type(self))[f.name], getattr(self, f.name))
            if isinstance(value, _Bad):
                raise IRTypeError(
                    f"op `{self.mnemonic}` attribute `{f.name}`: expected {value.expected}, "
                    f"got {type(value.got).__name__} {value.got!r}"
                )
            object.__setattr__(self, f.name, value)

    @property
    def attrs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore

    def infer_type(self, *operand_types: TensorType) -> tuple[TensorType, ...]:
        raise NotImplementedError(f"{self.mnemonic}.infer_type")

    def reference(self, *tensors: Any) -> tuple[Any, ...]:
        raise NotImplementedError(f"{self.mnemonic}.reference")

    def cost(self, operand_types, result_types) -> Cost:
        """Default: one flop per output element; bytes = everything read and written."""
        flops = sum((t.numel for t in result_types), 0)
        nbytes = sum((t.nbytes for t in (*operand_types, *result_types)), 0)
        return Cost(canon_dim(flops), canon_dim(nbytes))

    def type_error(self, msg: str, *types_: TensorType) -> IRTypeError:
        got = ", ".join(str(t) for t in types_)
        return IRTypeError(f"{self.mnemonic}({got}): {msg}")

    def bind(self, env: dict) -> "Op":
        """Copy with symbols in attributes replaced by ints from `env` ({symbol: int})."""
        if not env:
            return self
        changes = {k: _bind(v, env) for k, v in self.attrs.items()}
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _bind(v: Any, env: dict) -> Any:
    if isinstance(v, sympy.Expr):
        return canon_dim(v.xreplace({k: sympy.Integer(x) for k, x in env.items()}))
    if isinstance(v, tuple):
        return tuple(_bind(x, env) for x in v)
    return v


def register(cls: type[Op]) -> type[Op]:
    """Add an op class to `OPS` under its mnemonic (one table for the whole compiler)."""
    if not (isinstance(cls, type) and issubclass(cls, Op)):
        raise TypeError(f"@register expects an Op subclass, got {cls!r}")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"op class {cls.__name__} must be a @dataclass(frozen=True)")
    m = cls.__dict__.get("mnemonic")
    if not isinstance(m, str) or not _MNEMONIC_RE.match(m):
        raise TypeError(f"op class {cls.__name__} needs a mnemonic like 'matmul' or 'moe.route'")
    if m in OPS and OPS[m] is not cls:
        raise TypeError(f"mnemonic {m!r} already registered by {OPS[m].__name__}")
    if not cls.__doc__ or cls.__doc__.startswith(cls.__name__ + "("):
        raise TypeError(f"op class {cls.__name__} needs a docstring stating its semantics")
    attr_schema(cls)  # resolve annotations now so a typo fails at import
    OPS[m] = cls
    return cls


# --- attribute schemas ------------------------------------------------------------------------

_SCHEMAS: dict[type, dict[str, Any]] = {}


def attr_schema(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, for an op class."""
    if cls not in _SCHEMAS:
        import ir.core as core_mod

        ns = dict(vars(core_mod))
        ns.update(vars(__import__(cls.__module__, fromlist=["_"])))
        hints = typing.get_type_hints(cls, globalns=ns)
        _SCHEMAS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _SCHEMAS[cls]


@dataclass
class _Bad:
    expected: str
    got: Any


def schema_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if tp in (int, float, bool, str):
        return tp.__name__
    if tp is DType:
        return "dtype"
    if tp is Graph:
        return "graph"
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {schema_name(args[0])}"
    if origin in (Union, types.UnionType):
        if {bool, int, float, sympy.Expr} <= set(args):
            return "scalar (bool, int, float) or symbolic int expression"
        if sympy.Expr in args:
            return "dim (int or symbolic expression)"
        return " or ".join(schema_name(a) for a in args)
    return str(tp)


def coerce_attr(tp: Any, v: Any) -> Any:
    """Validate `v` against annotation `tp`; return the canonical value, or `_Bad`."""
    bad = _Bad(schema_name(tp), v)
    if tp is type(None):
        return None if v is None else bad
    if tp is bool:
        return bool(v) if isinstance(v, bool) or type(v).__name__ == "bool_" else bad
    if tp is int:
        if isinstance(v, bool):
            return bad
        if isinstance(v, int) or (isinstance(v, sympy.Integer)):
            return int(v)
        return (
            int(v.__index__())
            if hasattr(v, "__index__") and not isinstance(v, sympy.Basic)
            else bad
        )
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return bad
        return float(v)
    if tp is str:
        return v if isinstance(v, str) else bad
    if tp is DType:
        return _coerce_dtype(v, bad)
    if tp is Graph:
        return v if isinstance(v, Graph) else bad
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            return bad
        items = [coerce_attr(args[0], x) for x in v]
        return bad if any(isinstance(x, _Bad) for x in items) else tuple(items)
    if origin in (Union, types.UnionType):
        return _coerce_union(args, v, bad)
    raise TypeError(f"unsupported attribute annotation {tp!r}")


def _coerce_dtype(v: Any, bad: _Bad) -> Any:
    if isinstance(v, DType):
        return v
    if type(v).__name__ == "dtype" and type(v).__module__ == "torch":
        return DType.from_torch(v)
    return bad


def _coerce_union(args: tuple, v: Any, bad: _Bad) -> Any:
    if v is None:
        return None if type(None) in args else bad
    rest = tuple(a for a in args if a is not type(None))
    if {bool, int, float, sympy.Expr} <= set(rest):  # Scalar or symbolic integer
        if isinstance(v, (bool, int, float)) and not isinstance(v, sympy.Basic):
            return v
        rest = (int, sympy.Expr)
    if sympy.Expr in rest:  # Dim
        try:
            return canon_dim(v)
        except IRTypeError:
            return bad
    if set(rest) == {bool, int, float}:  # Scalar keeps its Python type
        if isinstance(v, (bool, int, float)) and not isinstance(v, sympy.Basic):
            return v
        return bad
    for a in rest:
        out = coerce_attr(a, v)
        if not isinstance(out, _Bad):
            return out
    return bad


# --- nodes and graphs -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Node:
    """One op application: `results = op(operands)` with optional provenance."""

    op: Op
    operands: tuple[Value, ...]
    results: tuple[Value, ...]
    loc: Loc | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "operands", tuple(self.operands))
        object.__setattr__(self, "results", tuple(self.results))

    @property
    def name(self) -> str:
        """The op's mnemonic, e.g. "matmul" or "moe.route"."""
        return self.op.mnemonic

    @property
    def kind(self) -> Kind:
        return self.op.kind

    @property
    def attrs(self) -> dict[str, Any]:
        return self.op.attrs

    @property
    def result(self) -> Value:
        """The single result (raises for multi-result nodes)."""
        if len(self.results) != 1:
            raise ValueError(f"{self.name} has {len(self.results)} results; use .results")
        return self.results[0]

    def __repr__(self) -> str:
        from ir.printer import node_text

        return f"Node({node_text(self)})"


class Graph:
    """A typed SSA function: inputs (with roles), an ordered list of nodes, outputs.

    `==` is structural equality (`ir.structurally_equal`), so `parse(to_text(g)) == g`.
    """

    def __init__(
        self,
        inputs=(),
        ops=(),
        outputs=(),
        name: str | None = None,
        roles: dict[str, str] | None = None,
        aliases: dict[int, str] | None = None,
    ) -> None:
        self.inputs: list[Value] = list(inputs)
        self.ops: list[Node] = list(ops)
        self.outputs: list[Value] = list(outputs)
        self.name = name
        self.roles: dict[str, str] = {v.name: "activation" for v in self.inputs}
        self.roles.update(roles or {})
        # output index -> input name: that output may be written into that input's buffer
        self.aliases: dict[int, str] = dict(aliases or {})
        if name is not None:
            check_value_name(name, "graph")

    def role(self, v: Value | str) -> str:
        """Role of a graph input ("activation", "parameter" or "cache")."""
        name = v if isinstance(v, str) else v.name
        if name not in self.roles:
            raise KeyError(f"%{name} is not an input of graph {self.name or '<anonymous>'}")
        return self.roles[name]

    def inputs_with_role(self, role: str) -> list[Value]:
        return [v for v in self.inputs if self.roles.get(v.name) == role]

    @property
    def params(self) -> list[Value]:
        return self.inputs_with_role("parameter")

    def producers(self) -> dict[str, Node]:
        """Value name -> node defining it."""
        return {r.name: n for n in self.ops for r in n.results}

    def users(self) -> dict[str, list[Node]]:
        """Value name -> nodes using it (in order)."""
        out: dict[str, list[Node]] = {}
        for n in self.ops:
            for v in n.operands:
                out.setdefault(v.name, []).append(n)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        from ir.equality import structurally_equal

        return structurally_equal(self, other)

    def __hash__(self) -> int:  # consistent with == (equal graphs share these)
        return hash((self.name, len(self.inputs), len(self.ops), len(self.outputs)))

    def __str__(self) -> str:
        from ir.printer import to_text

        return to_text(self)

    def __repr__(self) -> str:
        return (
            f"<Graph {self.name or '<anonymous>'}: {len(self.inputs)} inputs, "
            f"{len(self.ops)} ops, {len(self.outputs)} outputs>"
        )


def float_eq(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
