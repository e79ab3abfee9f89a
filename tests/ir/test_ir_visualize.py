"""networkx and DOT views."""

from __future__ import annotations

import graphs
import ir


def test_to_networkx() -> None:
    g = graphs.moe_gate()
    G = ir.to_networkx(g)
    assert G.nodes[("input", "embed.weight")]["role"] == "parameter"
    assert G.nodes[("op", 3)]["mnemonic"] == "topk" and G.nodes[("op", 3)]["attrs"]["k"] == 2
    edges = list(G.in_edges(("op", 1), data=True))
    assert [(u, d["value"], d["port"]) for u, _, d in edges] == [
        (("op", 0), "0", 0),
        (("input", "layers.0.ffn.gate.weight"), "layers.0.ffn.gate.weight", 1),
    ]
    assert G.number_of_nodes() == len(g.inputs) + len(g.ops) + len(g.outputs)
    assert G.number_of_edges() == sum(len(n.operands) for n in g.ops) + len(g.outputs)
    import networkx as nx

    assert nx.is_directed_acyclic_graph(G)


def test_to_dot() -> None:
    dot = ir.to_dot(graphs.moe_gate())
    assert dot.startswith('digraph "prefill" {')
    assert 'op3 [shape=box, label="topk\\nk=2, dim=-1, largest=True, sorted=True"];' in dot
    assert 'in1 -> op0 [label="%embed.weight: f32[100,64]"];' in dot
    assert dot.rstrip().endswith("}")
    assert dot.count("->") == sum(len(n.operands) for n in graphs.moe_gate().ops) + 4


def _layer_graph() -> ir.Graph:
    """Two modules: `blk` (three source lines, line 2 used twice) and `head`, with a view."""
    from ir import Loc, TensorType

    b = ir.Builder(name="g")
    x = b.input("x", TensorType((4, 8), ir.DType.f32))
    a = b.op("exp", [x], loc=Loc("blk.attn", "m.py:1"))
    c = b.op("mul", [a, a], loc=Loc("blk.attn", "m.py:2"))
    v = b.op("reshape", [c], shape=(8, 4), loc=Loc("blk.attn", "m.py:3"))
    d = b.op("neg", [v], loc=Loc("blk.attn", "m.py:2"))  # line 2 again: a cycle 2 -> 3 -> 2
    e = b.op("sum", [d], dims=(0,), loc=Loc("blk", "m.py:4"))
    b.output(b.op("sin", [e], loc=Loc("head", "m.py:9")))
    return b.build()


def test_region_view_by_op_and_by_line() -> None:
    g = _layer_graph()
    ops = ir.region_view(g, "blk")
    assert ops["ops"] == 5 and [n["label"] for n in ops["nodes"]] == [
        "exp", "mul", "reshape", "neg", "sum",
    ]  # fmt: skip
    assert [n["rank"] for n in ops["nodes"]] == [0, 1, 2, 3, 4]
    assert ops["edges"] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    # by line: lines 2 and 3 feed each other, so they are one box
    lines = ir.region_view(g, "blk", by_line=True)
    assert [(n["label"], n["ops"]) for n in lines["nodes"]] == [
        ("attn @ m.py:1", 1), ("attn @ m.py:2", 3), ("blk @ m.py:4", 1),
    ]  # fmt: skip
    assert lines["edges"] == [[0, 1], [1, 2]]
    # left-out ops are wired through: neg reads the mul across the reshape
    kept = ir.region_view(g, "blk", keep=lambda n: n.name != "reshape")
    assert [n["label"] for n in kept["nodes"]] == ["exp", "mul", "neg", "sum"]
    assert kept["edges"] == [[0, 1], [1, 2], [2, 3]]
    assert ir.region_view(g, "")["ops"] == 6 and ir.region_view(g, "bl")["ops"] == 0
