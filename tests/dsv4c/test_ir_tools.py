"""`dsv4c ir`: the graph after each pipeline pass, unknown names, and --explain."""

from __future__ import annotations

import pytest
from dsv4c_helpers import mlp, x

import ir
from dsv4c import DsvError, MethodSpec
from dsv4c.ir_tools import graphs_by_pass, show_ir

SPEC = MethodSpec((x(),), {"x": {0: "B"}})


def test_graph_after_every_pass() -> None:
    graphs, ctx = graphs_by_pass(mlp(), "forward", SPEC)
    names = list(graphs)
    assert names[0] == "capture" and names[-1] == "pipeline"
    assert {"canonicalize", "fuse_elementwise"} <= set(names)
    assert graphs["pipeline"] is graphs[names[-2]]  # the last pass's output is the result
    fused = [n for n in graphs["fuse_elementwise"].ops if n.name == "fused.kernel"]
    assert fused and not any(n.name == "fused.kernel" for n in graphs["canonicalize"].ops)
    text = show_ir(mlp(), "forward", SPEC, after="canonicalize", explain=None)
    assert ir.parse(text) == graphs["canonicalize"]
    assert ctx.rules  # the rule drivers registered what they ran


def test_unknown_pass_and_rule_list_the_known_ones() -> None:
    with pytest.raises(DsvError, match="unknown pass 'fuse_everything'; passes: capture, canon"):
        show_ir(mlp(), "forward", SPEC, after="fuse_everything", explain=None)
    with pytest.raises(DsvError, match="unknown rule 'no_such_rule'; rules the pipeline ran: "):
        show_ir(mlp(), "forward", SPEC, after="pipeline", explain="no_such_rule")


def test_explain_a_rule() -> None:
    _, ctx = graphs_by_pass(mlp(), "forward", SPEC)
    rule = min(ctx.rules)
    text = show_ir(mlp(), "forward", SPEC, after="pipeline", explain=rule)
    assert text.startswith(f"rule {rule} ")
