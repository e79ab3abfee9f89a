"""dsv4c's graph IR: typed SSA graphs of registered ops, with a text form that round-trips,
a verifier, and a torch reference interpreter.

    import ir
    T = ir.sym("T")
    b = ir.Builder(name="f")
    x = b.input("x", ir.TensorType((T, 64), ir.DType.f32))
    y = b.op("softmax", [x], dim=-1)
    b.output(y)
    g = b.build()
    assert ir.parse(ir.to_text(g)) == g

Importing `ir` does not import torch (the reference semantics import it on first use).
"""

from ir.core import OPS, ROLES, Cost, Graph, Kind, Loc, Node, Op, Value, register
from ir.core import check_value_name as check_name
from ir.errors import IRTypeError, ParseError, VerifyError
from ir.symbolic import Dim, same_dim, same_shape, sym
from ir.types import DType, TensorType

from ir import ops as _ops  # noqa: F401,E402  (registers the op library)
from ir.builder import Builder  # noqa: E402
from ir.equality import assert_structural_equal, structurally_equal  # noqa: E402
from ir.interpreter import InterpretError, interpret  # noqa: E402
from ir.mlir import to_mlir  # noqa: E402
from ir.parser import parse  # noqa: E402
from ir.printer import to_text  # noqa: E402
from ir.verifier import verify  # noqa: E402
from ir.visualize import region_view, to_dot, to_networkx  # noqa: E402

__all__ = [
    "Graph",
    "Value",
    "Node",
    "Op",
    "TensorType",
    "DType",
    "Dim",
    "Kind",
    "Loc",
    "Cost",
    "sym",
    "Builder",
    "OPS",
    "ROLES",
    "register",
    "to_text",
    "to_mlir",
    "parse",
    "ParseError",
    "verify",
    "VerifyError",
    "IRTypeError",
    "InterpretError",
    "interpret",
    "structurally_equal",
    "assert_structural_equal",
    "to_networkx",
    "region_view",
    "to_dot",
    "check_name",
    "same_dim",
    "same_shape",
]
