"""Interpreter: symbol binding, parameter passing by state_dict name, input errors, check mode."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import graphs
import ir
from ir import DType, TensorType

T, B = graphs.T, graphs.B
f32 = DType.f32


def _params():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(100, 64, generator=g),
        "layers.0.ffn.gate.weight": torch.randn(64, 8, generator=g),
    }


def test_moe_gate_matches_eager() -> None:
    g = graphs.moe_gate()
    tokens = torch.randint(0, 100, (2, 6))
    cache = torch.randn(2, 128, 64).bfloat16()
    p = _params()
    m, idx, half, kb = ir.interpret(g, tokens, cache, params=p, check=True)
    h = torch.nn.functional.embedding(tokens, p["embed.weight"])
    vals, want_idx = torch.topk(torch.softmax(h @ p["layers.0.ffn.gate.weight"], -1), 2)
    torch.testing.assert_close(m, vals * 0.5)
    assert torch.equal(idx, want_idx)
    assert half.shape == (2, 3, 64) and kb.dtype == torch.float32


def test_parameters_come_from_a_state_dict() -> None:
    lin = torch.nn.Linear(4, 3)
    bl = ir.Builder()
    x = bl.input("x", TensorType((T, 4), f32))
    w = bl.input("weight", TensorType((3, 4), f32), role="parameter")
    bias = bl.input("bias", TensorType((3,), f32), role="parameter")
    y = bl.op("add", [bl.op("matmul", [x, bl.op("permute", [w], dims=(1, 0))]), bias])
    bl.output(y)
    xs = torch.randn(5, 4)
    (got,) = ir.interpret(bl.build(), xs, params=lin.state_dict(), check=True)
    torch.testing.assert_close(got, lin(xs).detach())


def test_symbol_binding_and_expressions() -> None:
    bl = ir.Builder()
    x = bl.input("x", TensorType((B, T), f32))
    y = bl.input("y", TensorType((B, 2 * T), f32))  # checked after T is bound
    z = bl.input("z", TensorType((T + 1,), f32))  # solved? no: T already bound, checked
    r = bl.op("reshape", [y], shape=(B, T, 2))
    s = bl.op("slice", [r], dim=1, start=0, end=T // 2)
    bl.output(s, x, z)
    g = bl.build()
    out = ir.interpret(g, torch.zeros(3, 4), torch.zeros(3, 8), torch.zeros(5), check=True)
    assert out[0].shape == (3, 2, 2)
    with pytest.raises(
        ir.InterpretError, match=r"input %y dim 1: expected 2\*T = 8 \(with B=3, T=4\), got 9"
    ):
        ir.interpret(g, torch.zeros(3, 4), torch.zeros(3, 9), torch.zeros(5))


def test_symbol_binder_remembers_only_what_it_accepted() -> None:
    """`SymbolBinder` binds as `bind_symbols` does; remembered shapes never hide a bad call."""
    from ir.interpreter import SymbolBinder

    bl = ir.Builder()
    x = bl.input("x", TensorType((B, T), f32))
    y = bl.input("y", TensorType((B, 2 * T), f32))
    bl.output(x, y)
    bind = SymbolBinder(bl.build().inputs)
    good = [torch.zeros(3, 4), torch.zeros(3, 8)]
    env = bind(good)
    assert {str(k): v for k, v in env.items()} == {"B": 3, "T": 4}
    env.clear()  # the caller's copy: what the binder keeps is not changed
    assert len(bind([torch.ones(3, 4), torch.ones(3, 8)])) == 2  # same shapes, other tensors
    with pytest.raises(ir.InterpretError, match=r"input %y dim 1: expected 2\*T = 8"):
        bind([torch.zeros(3, 4), torch.zeros(3, 9)])
    with pytest.raises(ir.InterpretError, match=r"input %x: expected f32\[B,T\], got i64"):
        bind([torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 8)])
    with pytest.raises(ir.InterpretError, match=r"input %y: expected a tensor"):
        bind([torch.zeros(3, 4), [0.0] * 8])
    assert {str(k): v for k, v in bind([torch.zeros(2, 5), torch.zeros(2, 10)]).items()} == {
        "B": 2,
        "T": 5,
    }


def test_symbol_solved_from_an_expression() -> None:
    bl = ir.Builder()
    x = bl.input("x", TensorType((2 * T + 2,), f32))
    bl.output(bl.op("iota", [], start=0, end=T, dtype=DType.i64), x)
    (ar, _) = ir.interpret(bl.build(), torch.zeros(10), check=True)
    assert ar.tolist() == [0, 1, 2, 3]
    bl2 = ir.Builder()
    bl2.output(bl2.input("x", TensorType((2 * T,), f32)))
    with pytest.raises(ir.InterpretError, match=r"cannot solve 2\*T = 7 for T"):
        ir.interpret(bl2.build(), torch.zeros(7))


def test_input_errors_name_the_input() -> None:
    g = graphs.moe_gate()
    tokens, cache, p = torch.randint(0, 100, (2, 6)), torch.zeros(2, 128, 64).bfloat16(), _params()
    with pytest.raises(
        ir.InterpretError, match=r"takes 2 positional input\(s\) \(%tokens: i64\[B,T\], %cache.k"
    ):
        ir.interpret(g, tokens, params=p)
    with pytest.raises(
        ir.InterpretError, match=r"missing parameter %layers.0.ffn.gate.weight: f32\[64,8\]"
    ):
        ir.interpret(g, tokens, cache, params={"embed.weight": p["embed.weight"]})
    with pytest.raises(ir.InterpretError, match="not parameter inputs of the graph: extra.bias"):
        ir.interpret(g, tokens, cache, params={**p, "extra.bias": torch.zeros(1)})
    ir.interpret(g, tokens, cache, params={**p, "extra.bias": torch.zeros(1)}, strict=False)
    with pytest.raises(
        ir.InterpretError, match=r"input %tokens: expected i64\[B,T\], got i32\[2, 6\]"
    ):
        ir.interpret(g, tokens.int(), cache, params=p)
    with pytest.raises(
        ir.InterpretError,
        match=r"input %cache.k: expected bf16\[B,128,64\], got bf16\[2, 127, 64\] \(dim 1\)",
    ):
        ir.interpret(g, tokens, cache[:, :127], params=p)
    with pytest.raises(
        ir.InterpretError, match=r"input %cache.k dim 0: expected B = 2 \(with B=2, T=6\), got 3"
    ):
        ir.interpret(g, tokens, torch.zeros(3, 128, 64).bfloat16(), params=p)


def test_check_mode_catches_a_lying_type() -> None:
    bl = ir.Builder()
    x = bl.input("x", TensorType((T,), f32))
    bl.output(bl.op("squeeze", [bl.op("unsqueeze", [x], dim=0)], dim=1))
    g = bl.build()
    g.inputs[0] = ir.Value("x", TensorType((T,), f32))
    # T = 1: squeeze(dim=1) of [1, 1] removes the dim at runtime, but the type says [1, T].
    with pytest.raises(
        ir.InterpretError,
        match=r"op 1 \(squeeze\) result %1: recorded f32\[1,T\] = f32\[1, 1\] with T=1",
    ):
        ir.interpret(g, torch.zeros(1), check=True)
    ir.interpret(g, torch.zeros(1))  # unchecked runs


def test_fused_kernel_runs_its_body() -> None:
    g = graphs.fused()
    x, bias = torch.randn(3, 8), torch.randn(8)
    (got,) = ir.interpret(g, x, params={"layers.1.mlp.bias": bias}, check=True)
    s = x + bias
    torch.testing.assert_close(got, torch.nn.functional.silu(torch.exp(s)) * s)
    assert ir.OPS["fused.kernel"].kind == ir.Kind.OPAQUE


def test_import_ir_does_not_import_torch() -> None:
    code = "import sys, ir; print('torch' in sys.modules, 'networkx' in sys.modules, len(ir.OPS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", str(len(ir.OPS))]


def test_symbolic_constant_and_helpers() -> None:
    bl = ir.Builder(name="sc")
    x = bl.input("x", TensorType((T, 2), f32))
    c = bl.op("constant", [], value=T - 1, dtype=DType.i64)
    fl = bl.op("full", [], shape=(2,), value=2 * T, dtype=DType.i32)
    bl.output(bl.op("mul", [x, c]), fl)
    g = bl.build()
    assert "= constant(value=T - 1, dtype=i64)" in ir.to_text(g)
    assert ir.parse(ir.to_text(g)) == g
    y, f = ir.interpret(g, torch.ones(5, 2), check=True)
    assert y.tolist() == [[4.0, 4.0]] * 5 and f.tolist() == [10, 10]
    with pytest.raises(ir.IRTypeError, match="symbolic value T needs an i64/i32 dtype"):
        bl.op("constant", [], value=T, dtype=f32)
    assert ir.same_shape((T * (T + 1) - T**2, 3), (T, 3)) and not ir.same_shape((T,), (T, 1))
    assert ir.check_name("layers.0.w") == "layers.0.w"
    with pytest.raises(ir.IRTypeError, match="invalid value name"):
        ir.check_name("a-b")
