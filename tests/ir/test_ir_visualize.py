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
