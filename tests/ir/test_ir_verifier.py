"""Break the IR on purpose: one corrupted fixture per verifier rule, asserting the message."""

from __future__ import annotations

import dataclasses

import pytest

import graphs
import ir
from ir import DType, Node, TensorType, Value

f32 = DType.f32


def _fails(g: ir.Graph, *fragments: str) -> str:
    with pytest.raises(ir.VerifyError) as e:
        ir.verify(g)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in:\n{msg}"
    return msg


def test_valid_graphs_verify() -> None:
    for make in graphs.ALL.values():
        g = make()
        assert ir.verify(g) is g


def test_use_before_def_shows_context_with_marker() -> None:
    g = graphs.chain(20)
    g.ops[10], g.ops[11] = g.ops[11], g.ops[10]
    msg = _fails(
        g,
        "verify: operand %10 is used before it is defined",
        "in graph chain, at op 10:",
        "  >>> %11: f32[4] = exp(%10)",
        "fix: define it earlier",
    )
    lines = msg.splitlines()
    marked = [i for i, l in enumerate(lines) if l.startswith("  >>> ")]
    assert len(marked) == 1
    ops_shown = [l for l in lines if "= exp(" in l]
    assert len(ops_shown) == 11  # 5 before, the culprit, 5 after
    assert lines[2] == "      ..." and "      ..." in lines[-2:]


def test_single_assignment() -> None:
    g = graphs.chain(3)
    n = g.ops[2]
    g.ops[2] = Node(n.op, n.operands, (Value("0", n.results[0].type),))
    _fails(g, "%0 is defined twice (single assignment)", ">>> %0: f32[4] = exp(%1)")


def test_result_may_not_shadow_input() -> None:
    g = graphs.chain(3)
    n = g.ops[1]
    g.ops[1] = Node(n.op, n.operands, (Value("x", n.results[0].type),))
    _fails(g, "%x is defined twice")


def test_duplicate_input() -> None:
    g = graphs.chain(2)
    g.inputs.append(g.inputs[0])
    _fails(g, "input %x is declared twice", "at inputs:", ">>> graph(%x: f32[4] activation, %x:")


def test_bad_role() -> None:
    g = graphs.chain(2)
    g.roles["x"] = "weight"
    _fails(g, "input %x has role 'weight'; expected one of activation, parameter, cache")


def test_recorded_type_disagrees_with_infer_type() -> None:
    g = graphs.chain(5)
    n = g.ops[2]
    wrong = Value("2", TensorType((4,), DType.bf16))
    g.ops[2] = Node(n.op, n.operands, (wrong,))
    g.ops[3] = Node(g.ops[3].op, (wrong,), g.ops[3].results)
    _fails(g, "result %2 is recorded as bf16[4] but exp infers f32[4]", ">>> %2: bf16[4] = exp(%1)")


def test_operand_type_differs_from_definition() -> None:
    g = graphs.chain(3)
    n = g.ops[1]
    g.ops[1] = Node(n.op, (Value("0", TensorType((5,), f32)),), n.results)
    _fails(g, "operand %0 has type f32[5] here but is defined as f32[4]")


def test_infer_type_error_is_reported_at_the_op() -> None:
    bl = ir.Builder(name="mm")
    a = bl.input("a", TensorType((3, 5), f32))
    c = bl.input("c", TensorType((5, 2), f32))
    bl.output(bl.op("matmul", [a, c]))
    g = bl.build()
    n = g.ops[0]
    g.ops[0] = Node(n.op, (a, a), n.results)
    _fails(
        g,
        "type error: matmul(f32[3,5], f32[3,5]): contracted dims differ: 5 vs 3",
        ">>> %0: f32[3,2] = matmul(%a, %a)",
    )


def test_attribute_schema() -> None:
    g = graphs.moe_gate()
    op = g.ops[2].op
    object.__setattr__(op, "dim", "last")
    _fails(
        g,
        "attribute dim of softmax: expected int, got str 'last'",
        ">>> %scores: f32[B,T,8] = softmax(",
    )


def test_result_arity() -> None:
    g = graphs.moe_gate()
    n = g.ops[3]
    g.ops[3] = Node(n.op, n.operands, n.results[:1])
    _fails(g, "topk produces 2 result(s), but 1 are recorded")


def test_operand_count() -> None:
    g = graphs.chain(2)
    n = g.ops[0]
    g.ops[0] = Node(n.op, n.operands * 2, n.results)
    _fails(g, "exp takes 1 operand(s), got 2")


def test_output_undefined() -> None:
    g = graphs.chain(2)
    g.outputs.append(Value("ghost", TensorType((4,), f32)))
    _fails(g, "graph output %ghost is never defined", "at return:", ">>> return %1, %ghost")


def test_unregistered_op() -> None:
    @dataclasses.dataclass(frozen=True)
    class Rogue(ir.Op):
        """Not in the table."""

        mnemonic = "rogue"

        def infer_type(self, x):
            return (x,)

    g = graphs.chain(2)
    g.ops[1] = Node(Rogue(), g.ops[1].operands, g.ops[1].results)
    _fails(g, "op 'rogue' is not registered in ir.OPS")


def test_nested_body_verified_recursively() -> None:
    g = graphs.fused()
    body = g.ops[0].op.body
    n = body.ops[0]
    body.ops[0] = Node(n.op, n.operands, (Value(n.results[0].name, TensorType((8,), f32)),))
    _fails(
        g,
        "nested graph `body` is invalid",
        "in graph outer/op 0 (fused.kernel).body",
        "result %0 is recorded as f32[8] but add infers f32[T,8]",
        ">>> %0: f32[8] = add(%p, %q)",
        ">>> %0: f32[T,8], %1: f32[T,8] = fused.kernel(%x, ",
    )


def test_builder_verifies_on_build() -> None:
    bl = ir.Builder()
    x = bl.input("x", TensorType((4,), f32))
    bl.output(Value("nope", x.type))
    with pytest.raises(ir.VerifyError, match="graph output %nope is never defined"):
        bl.build()


def test_builder_errors() -> None:
    bl = ir.Builder()
    x = bl.input("x", TensorType((4,), f32))
    with pytest.raises(ir.IRTypeError, match="unknown op 'softmx'"):
        bl.op("softmx", [x])
    with pytest.raises(ir.IRTypeError, match="already used"):
        bl.op("exp", [x], name="x")
    with pytest.raises(ir.IRTypeError, match="topk has 2 result"):
        bl.op("topk", [x], k=1, name="v")
    with pytest.raises(ir.IRTypeError, match="role must be one of"):
        bl.input("y", x.type, role="weights")
    with pytest.raises(ir.IRTypeError, match=r"softmax\(i64\[4\]\): expected a float tensor"):
        bl.op("softmax", [bl.input("i", TensorType((4,), DType.i64))])
