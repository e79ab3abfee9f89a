"""schedule (launch categories, sunk order), plan_memory (liveness, reuse, aliases, symbolic vs
concrete sizes) and the per-kernel cost model, on builder graphs."""

from __future__ import annotations

import pytest

import ir
from ir import DType, TensorType
from passes import PassContext
from passes.cost import evaluate, kernel_cost, roofline_s
from passes.fuse_elementwise import fuse_elementwise
from passes.memory_plan import lifetimes, plan, plan_memory
from passes.schedule import build_schedule, schedule, sunk_order

T = ir.sym("T")
F32 = DType.f32


def chain(n: int = 4, width: int = 64) -> ir.Graph:
    b = ir.Builder(name="chain")
    v = b.input("x", TensorType((T, width), F32))
    for _ in range(n):
        v = b.op("exp", [v])
    b.output(v)
    return b.build()


def test_chain_runs_in_place_in_one_buffer() -> None:
    p = plan(chain(4), {"T": 10})
    size = 10 * 64 * 4
    assert p.no_reuse_bytes == 4 * size
    assert p.buffers == [size] and p.peak_bytes == size and p.live_bytes == size
    assert len(p.symbolic_buffers) == 1 and p.symbolic_bytes == size
    assert len({p.assignment[v] for v in ("0", "1", "2", "3")}) == 1


def test_no_in_place_over_a_gemm_operand_or_a_different_type() -> None:
    b = ir.Builder(name="gemm")
    x = b.input("x", TensorType((T, 8), F32))
    a = b.op("exp", [x], name="a")
    m = b.op("matmul", [a, b.input("w", TensorType((8, 8), F32))], name="m")
    s = b.op("sum", [m], dims=[1], keepdim=True, name="s")  # [T,1]: not m's type
    b.output(b.op("add", [s, b.constant(1.0, F32)], name="y"))
    p = plan(b.build(), {"T": 4})
    assert p.assignment["m"] != p.assignment["a"] and p.assignment["s"] != p.assignment["m"]
    assert p.assignment["y"] == p.assignment["s"]  # elementwise, same type: in place


def test_views_alias_their_operand_and_extend_its_life() -> None:
    b = ir.Builder(name="alias")
    x = b.input("x", TensorType((T, 8), F32))
    a = b.op("exp", [x], name="a")
    r = b.op("reshape", [a], shape=[8, T], name="r")
    c = b.op("exp", [x], name="c")
    b.output(b.op("add", [b.op("reshape", [r], shape=[T, 8]), c]))
    g = b.build()
    la, lc, lout = lifetimes(g)
    assert [lc.value.name, lout.value.name] == ["c", "1"]
    assert la.value.name == "a" and la.aliases == ("r", "0") and (la.start, la.end) == (0, 4)
    p = plan(g, {"T": 2})
    assert p.assignment["r"] == p.assignment["a"] == p.assignment["1"]  # the add runs in place
    assert len(p.buffers) == 2


def test_symbolic_plan_reuses_only_equal_sizes_concrete_plan_best_fits() -> None:
    b = ir.Builder(name="sizes")
    x = b.input("x", TensorType((T, 64), F32))
    a = b.op("cumsum", [b.op("cumsum", [x], dim=1)], dim=1)  # opaque: never in place
    c = b.op("slice", [a], dim=1, start=0, end=48, step=1)  # [T,48]: not provably <= [T,64]
    b.output(b.op("cumsum", [c], dim=1))
    p = plan(b.build(), {"T": 16})
    assert p.buffers == [16 * 64 * 4] * 2  # the [T,48] values fit the freed [T,64] buffers
    assert len(p.symbolic_buffers) == 4 and p.symbolic_bytes > p.peak_bytes


def test_concrete_plan_keeps_the_smaller_of_plain_and_slack_best_fit() -> None:
    b = ir.Builder(name="small")
    x = b.input("x", TensorType((T, 64), F32))
    t = b.op("cumsum", [b.op("cumsum", [x], dim=1)], dim=1)
    s = b.op("sum", [t], dims=[1], keepdim=True)  # [T,1]
    c = b.op("cumsum", [x], dim=1, name="c")
    b.output(b.op("mul", [c, s], name="y"))
    p = plan(b.build(), {"T": 16})
    assert sorted(p.buffers) == [4096, 4096]  # plain best fit: [T,1] in a freed [T,64]
    assert p.assignment["y"] == p.assignment["c"]
    assert p.peak_bytes <= p.symbolic_bytes < p.no_reuse_bytes


def test_missing_symbols_are_assumed_one_and_listed() -> None:
    p = plan(chain(2), {})
    assert p.assumed == ["T"] and p.bindings == {"T": 1}
    assert plan(chain(2), {T: 7}).bindings == {"T": 7}  # symbols or names
    assert "no reuse" in p.summary()


def test_plan_memory_pass_reads_bindings_and_keeps_the_graph() -> None:
    g = chain(3)
    ctx = PassContext(options={"bindings": {"T": 100}})
    assert plan_memory(g, ctx) is g
    assert ctx.products["memory_plan"].bindings == {"T": 100}
    assert ctx.counters["plan_memory.buffers"] == 1


def mixed() -> ir.Graph:
    b = ir.Builder(name="mixed")
    x = b.input("x", TensorType((T, 16), F32))
    w = b.input("w", TensorType((32, 16), F32), role="parameter")
    wt = b.op("permute", [w], dims=[1, 0], name="wt")  # hoisted; a view the GEMM reads
    h = b.op("exp", [b.op("neg", [x])])
    y = b.op("relu", [b.op("matmul", [h, wt])])
    vals, _ = b.op("topk", [y], k=2, dim=-1)
    b.output(b.op("reshape", [vals], shape=[2 * T]))
    return b.build()


def test_launch_categories_and_count() -> None:
    g = fuse_elementwise(mixed())
    s = build_schedule(g)
    assert [launch.category for launch in s.launches] == ["fused", "gemm", "primitive"]
    assert [launch.node.name for launch in s.launches][-1] == "topk"
    assert s.count == 3 and s.free_ops == 2  # the reshape, and the permute the GEMM reads
    assert "3 launches" in s.summary()


def test_a_permute_read_otherwise_is_a_launch() -> None:
    b = ir.Builder(name="perm")
    w = b.input("w", TensorType((32, 16), F32))
    wt = b.op("permute", [w], dims=[1, 0])
    b.output(b.op("matmul", [b.input("x", TensorType((T, 32), F32)), w]), b.op("exp", [wt]))
    assert [launch.category for launch in build_schedule(b.build()).launches] == [
        "primitive",
        "gemm",
        "primitive",
    ]


def test_sunk_order_is_topological_and_moves_producers_to_their_reader() -> None:
    g = mixed()
    order = sunk_order(g)
    names = [n.results[0].name for n in order]
    assert names.index("wt") == names.index("2") - 1  # just before the matmul
    ir.verify(ir.Graph(g.inputs, order, g.outputs, name=g.name, roles=g.roles))


def test_schedule_pass_records_launches() -> None:
    ctx = PassContext(options={"bindings": {"T": 4}})
    out = schedule(fuse_elementwise(mixed()), ctx)
    ir.verify(out)
    assert ctx.products["schedule"].count == ctx.counters["schedule.launches"] == 3
    assert ctx.counters["schedule.gemm"] == 1 and ctx.counters["schedule.fused"] == 1
    flops, nbytes = ctx.products["schedule"].totals({"T": 4})
    fused, gemm, topk = (kernel_cost(launch.node) for launch in ctx.products["schedule"].launches)
    assert flops == evaluate(fused.flops + gemm.flops + topk.flops, {"T": 4}) > 2 * 4 * 32 * 16
    assert nbytes == evaluate(fused.bytes + gemm.bytes + topk.bytes, {"T": 4})


def test_fused_kernel_cost_moves_only_its_inputs_and_outputs() -> None:
    g = fuse_elementwise(chain(4))
    (k,) = g.ops
    c = kernel_cost(k)
    env = {"T": 10}
    assert evaluate(c.bytes, env) == 2 * 10 * 64 * 4  # x in, result out
    assert evaluate(c.flops, env) == 4 * 10 * 64
    unfused = chain(4)
    assert sum(evaluate(kernel_cost(n).bytes, env) for n in unfused.ops) == 8 * 10 * 64 * 4
    assert roofline_s(c, env, peak_flops=1e12, bandwidth=1e9) == pytest.approx(5120 / 1e9)


def test_gemm_epilogue_cost_and_free_views() -> None:
    g = fuse_elementwise(mixed())
    gemm = next(
        n for n in g.ops if n.name == "fused.kernel" and n.attrs["body"].ops[0].name == "matmul"
    )
    env = {"T": 8}
    assert evaluate(kernel_cost(gemm).flops, env) == 2 * 8 * 32 * 16 + 8 * 32
    view = next(n for n in g.ops if n.name == "reshape")
    assert kernel_cost(view).bytes == 0 and kernel_cost(view).flops == 0
    with pytest.raises(ValueError, match="bind T"):
        evaluate(kernel_cost(gemm).bytes, {})
