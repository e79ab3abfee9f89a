"""Elementwise ops: unary math, casts, broadcasting binary ops, where, clamp.

Binary ops broadcast like torch and compute in the torch result dtype of their operands
(`ir.types.result_dtype`; 0-d operands only win with a higher category). Unary "float" ops
(exp, log, sqrt, ...) turn integer/bool inputs into f32, as torch does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ir._lazy import torch
from ir.core import Kind, Op, register
from ir.ops._util import broadcast_shapes, f8_safe, require
from ir.types import DType, Scalar, TensorType, result_dtype, scalar_result_dtype

# --- unary ------------------------------------------------------------------------------------


class _Unary(Op):
    kind: ClassVar[Kind] = Kind.ELEMENTWISE
    num_operands: ClassVar[int | None] = 1
    to_float: ClassVar[bool] = False  # int/bool input -> f32 (exp, log, ...)
    float_only: ClassVar[bool] = False  # int/bool input is an error (silu, softplus)
    no_bool: ClassVar[bool] = False  # bool input is an error (neg, relu)

    def out_dtype(self, x: TensorType) -> DType:
        if self.float_only:
            require(self, x.dtype.is_float, "expected a float tensor (cast ints first)", x)
        if self.no_bool:
            require(self, x.dtype != DType.bool, "bool input not supported", x)
        if self.to_float and not x.dtype.is_float:
            return DType.f32
        return x.dtype

    def infer_type(self, x: TensorType) -> tuple[TensorType, ...]:
        return (TensorType(x.shape, self.out_dtype(x)),)

    def fn(self, x: Any) -> Any:
        raise NotImplementedError

    def reference(self, x: Any) -> tuple[Any, ...]:
        out_dtype = DType.from_torch(x.dtype)
        return (f8_safe(self.fn, x, out_dtype=self.out_dtype(TensorType((), out_dtype))),)


@register
@dataclass(frozen=True)
class Neg(_Unary):
    """-x."""

    mnemonic = "neg"
    no_bool = True

    def fn(self, x):
        return torch.neg(x)


@register
@dataclass(frozen=True)
class Abs(_Unary):
    """|x|."""

    mnemonic = "abs"
    no_bool = True

    def fn(self, x):
        return torch.abs(x)


@register
@dataclass(frozen=True)
class Exp(_Unary):
    """e**x (ints -> f32)."""

    mnemonic = "exp"
    to_float = True

    def fn(self, x):
        return torch.exp(x)


@register
@dataclass(frozen=True)
class Log(_Unary):
    """Natural log (ints -> f32)."""

    mnemonic = "log"
    to_float = True

    def fn(self, x):
        return torch.log(x)


@register
@dataclass(frozen=True)
class Log1p(_Unary):
    """log(1 + x) (ints -> f32)."""

    mnemonic = "log1p"
    to_float = True

    def fn(self, x):
        return torch.log1p(x)


@register
@dataclass(frozen=True)
class Sqrt(_Unary):
    """Square root (ints -> f32)."""

    mnemonic = "sqrt"
    to_float = True

    def fn(self, x):
        return torch.sqrt(x)


@register
@dataclass(frozen=True)
class Rsqrt(_Unary):
    """1 / sqrt(x) (ints -> f32)."""

    mnemonic = "rsqrt"
    to_float = True

    def fn(self, x):
        return torch.rsqrt(x)


@register
@dataclass(frozen=True)
class Sigmoid(_Unary):
    """1 / (1 + exp(-x)) (ints -> f32)."""

    mnemonic = "sigmoid"
    to_float = True

    def fn(self, x):
        return torch.sigmoid(x)


@register
@dataclass(frozen=True)
class Silu(_Unary):
    """x * sigmoid(x); float inputs only."""

    mnemonic = "silu"
    float_only = True

    def fn(self, x):
        return torch.nn.functional.silu(x)


@register
@dataclass(frozen=True)
class Relu(_Unary):
    """max(x, 0); not for bool."""

    mnemonic = "relu"
    no_bool = True

    def fn(self, x):
        return torch.relu(x)


@register
@dataclass(frozen=True)
class Tanh(_Unary):
    """Hyperbolic tangent (ints -> f32)."""

    mnemonic = "tanh"
    to_float = True

    def fn(self, x):
        return torch.tanh(x)


@register
@dataclass(frozen=True)
class Sin(_Unary):
    """Sine (ints -> f32)."""

    mnemonic = "sin"
    to_float = True

    def fn(self, x):
        return torch.sin(x)


@register
@dataclass(frozen=True)
class Cos(_Unary):
    """Cosine (ints -> f32)."""

    mnemonic = "cos"
    to_float = True

    def fn(self, x):
        return torch.cos(x)


@register
@dataclass(frozen=True)
class Reciprocal(_Unary):
    """1 / x (ints -> f32)."""

    mnemonic = "reciprocal"
    to_float = True

    def fn(self, x):
        return torch.reciprocal(x)


@register
@dataclass(frozen=True)
class Erf(_Unary):
    """Gauss error function (ints -> f32)."""

    mnemonic = "erf"
    to_float = True

    def fn(self, x):
        return torch.erf(x)


@register
@dataclass(frozen=True)
class Softplus(_Unary):
    """log(1 + exp(beta*x)) / beta, linear (x) where beta*x > threshold; floats only."""

    mnemonic = "softplus"
    float_only = True
    beta: float = 1.0
    threshold: float = 20.0

    def fn(self, x):
        return torch.nn.functional.softplus(x, beta=self.beta, threshold=self.threshold)


@register
@dataclass(frozen=True)
class LogicalNot(_Unary):
    """not x (nonzero is true); result bool."""

    mnemonic = "logical_not"

    def out_dtype(self, x: TensorType) -> DType:
        return DType.bool

    def fn(self, x):
        return torch.logical_not(x)


@register
@dataclass(frozen=True)
class Floor(_Unary):
    """Round down; ints unchanged."""

    mnemonic = "floor"
    no_bool = True

    def fn(self, x):
        return torch.floor(x)


@register
@dataclass(frozen=True)
class Ceil(_Unary):
    """Round up; ints unchanged."""

    mnemonic = "ceil"
    no_bool = True

    def fn(self, x):
        return torch.ceil(x)


@register
@dataclass(frozen=True)
class Sign(_Unary):
    """-1, 0 or 1 by sign, in x's dtype."""

    mnemonic = "sign"

    def fn(self, x):
        return torch.sign(x)


@register
@dataclass(frozen=True)
class Cast(_Unary):
    """x converted to `dtype` (torch `.to(dtype)`: floats truncate toward zero into ints)."""

    mnemonic = "cast"
    dtype: DType = DType.f32

    def out_dtype(self, x: TensorType) -> DType:
        return self.dtype

    def reference(self, x):
        return (x.to(self.dtype.to_torch()),)


# --- binary -----------------------------------------------------------------------------------


class _Binary(Op):
    """Broadcasting binary op computed in the promoted dtype of its operands."""

    kind: ClassVar[Kind] = Kind.BROADCAST
    num_operands: ClassVar[int | None] = 2
    allow_bool: ClassVar[bool] = True
    allow_float: ClassVar[bool] = True
    bool_operand: ClassVar[bool] = True  # False: any bool operand is an error (torch sub)

    def out_dtype(self, common: DType) -> DType:
        return common

    def infer_type(self, a: TensorType, b: TensorType) -> tuple[TensorType, ...]:
        shape = broadcast_shapes(self, a, b)
        try:
            common = result_dtype(a, b)
        except Exception as e:
            raise self.type_error(str(e), a, b) from None
        require(self, self.allow_bool or common != DType.bool, "bool operands not supported", a, b)
        no_bool = not self.bool_operand and DType.bool in (a.dtype, b.dtype)
        require(self, not no_bool, "bool operand not supported (use logical ops)", a, b)
        require(self, self.allow_float or not common.is_float, "integer/bool operands only", a, b)
        return (TensorType(shape, self.out_dtype(common)),)

    def fn(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def reference(self, a, b):
        ta, tb = (TensorType(tuple(t.shape), DType.from_torch(t.dtype)) for t in (a, b))
        common = result_dtype(ta, tb).to_torch()
        out = self.out_dtype(result_dtype(ta, tb))
        return (f8_safe(self.fn, a.to(common), b.to(common), out_dtype=out),)


def _binary(name: str, mnemonic: str, doc: str, fn, **flags) -> type[Op]:
    """Define one binary op class (kept tiny: the semantics are the torch function)."""
    body = {"mnemonic": mnemonic, "__doc__": doc, "fn": lambda self, a, b: fn(a, b)}
    body.update(flags)
    body["__module__"] = __name__
    body["__qualname__"] = name
    cls = type(name, (_Binary,), body)
    return register(dataclass(frozen=True)(cls))


def _to_bool(common: DType) -> DType:
    return DType.bool


def _true_div(common: DType) -> DType:
    return common if common.is_float else DType.f32


Add = _binary("Add", "add", "a + b (bool: logical or).", lambda a, b: torch.add(a, b))
Sub = _binary(
    "Sub",
    "sub",
    "a - b (no bool operands).",
    lambda a, b: torch.sub(a, b),
    allow_bool=False,
    bool_operand=False,
)
Mul = _binary("Mul", "mul", "a * b (bool: logical and).", lambda a, b: torch.mul(a, b))
Div = _binary(
    "Div",
    "div",
    "True division a / b; integer operands give f32.",
    lambda a, b: torch.div(a, b),
    out_dtype=lambda self, c: _true_div(c),
)
FloorDiv = _binary(
    "FloorDiv",
    "floordiv",
    "floor(a / b) (Python //), in the promoted dtype.",
    lambda a, b: torch.div(a, b, rounding_mode="floor"),
    allow_bool=False,
)
Remainder = _binary(
    "Remainder",
    "remainder",
    "a - floor(a / b) * b (Python %, sign of b).",
    lambda a, b: torch.remainder(a, b),
    allow_bool=False,
)
Pow = _binary("Pow", "pow", "a ** b.", lambda a, b: torch.pow(a, b), allow_bool=False)
Maximum = _binary(
    "Maximum", "maximum", "Elementwise max (NaN propagates).", lambda a, b: torch.maximum(a, b)
)
Minimum = _binary(
    "Minimum", "minimum", "Elementwise min (NaN propagates).", lambda a, b: torch.minimum(a, b)
)
_CMP = {"out_dtype": lambda self, c: _to_bool(c)}
Eq = _binary("Eq", "eq", "a == b -> bool.", lambda a, b: torch.eq(a, b), **_CMP)
Ne = _binary("Ne", "ne", "a != b -> bool.", lambda a, b: torch.ne(a, b), **_CMP)
Lt = _binary("Lt", "lt", "a < b -> bool.", lambda a, b: torch.lt(a, b), **_CMP)
Le = _binary("Le", "le", "a <= b -> bool.", lambda a, b: torch.le(a, b), **_CMP)
Gt = _binary("Gt", "gt", "a > b -> bool.", lambda a, b: torch.gt(a, b), **_CMP)
Ge = _binary("Ge", "ge", "a >= b -> bool.", lambda a, b: torch.ge(a, b), **_CMP)
LogicalAnd = _binary(
    "LogicalAnd",
    "logical_and",
    "a and b (nonzero is true) -> bool.",
    lambda a, b: torch.logical_and(a, b),
    **_CMP,
)
LogicalOr = _binary(
    "LogicalOr",
    "logical_or",
    "a or b (nonzero is true) -> bool.",
    lambda a, b: torch.logical_or(a, b),
    **_CMP,
)
BitwiseAnd = _binary(
    "BitwiseAnd",
    "bitwise_and",
    "a & b on integer/bool operands.",
    lambda a, b: torch.bitwise_and(a, b),
    allow_float=False,
)


@register
@dataclass(frozen=True)
class Where(Op):
    """cond ? a : b, broadcasting all three; cond must be bool; a, b promoted like add."""

    mnemonic = "where"
    kind = Kind.BROADCAST
    num_operands = 3

    def infer_type(self, cond: TensorType, a: TensorType, b: TensorType):
        require(self, cond.dtype == DType.bool, "condition must be bool", cond, a, b)
        shape = broadcast_shapes(self, cond, a, b)
        try:
            return (TensorType(shape, result_dtype(a, b)),)
        except Exception as e:
            raise self.type_error(str(e), cond, a, b) from None

    def reference(self, cond, a, b):
        ta, tb = (TensorType(tuple(t.shape), DType.from_torch(t.dtype)) for t in (a, b))
        common = result_dtype(ta, tb)
        fn = lambda x, y: torch.where(cond, x, y)  # noqa: E731
        return (f8_safe(fn, a.to(common.to_torch()), b.to(common.to_torch()), out_dtype=common),)


@register
@dataclass(frozen=True)
class Clamp(Op):
    """min(max(x, min), max); a None bound is absent. Float bounds on an int tensor give f32."""

    mnemonic = "clamp"
    kind = Kind.ELEMENTWISE
    min: Scalar | None = None
    max: Scalar | None = None

    def infer_type(self, x: TensorType):
        require(self, self.min is not None or self.max is not None, "needs min or max", x)
        require(self, x.dtype != DType.bool, "bool input not supported", x)
        dtype = scalar_result_dtype(scalar_result_dtype(x.dtype, self.min), self.max)
        return (TensorType(x.shape, dtype),)

    def reference(self, x):
        out = self.infer_type(TensorType(tuple(x.shape), DType.from_torch(x.dtype)))[0].dtype
        fn = lambda t: torch.clamp(t, min=self.min, max=self.max)  # noqa: E731
        return (f8_safe(fn, x, out_dtype=out),)
