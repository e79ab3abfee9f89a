"""`Graph.aliases` ("output i may be written into input j's buffer"): the text form round-trips,
structural equality sees it, and each part of verifier rule 9 has a broken fixture."""

from __future__ import annotations

import pytest

import ir
from ir.equality import first_difference

# A decode-like step: a ring cache updated at one row, read after the update, and returned.
STEP = """graph step(
    %cache: f32[B,8,4] cache,
    %other: f32[B,8,4] cache,
    %idx: i64[1] activation,
    %rows: f32[B,1,4] activation,
) {
  %new: f32[B,8,4] = index_put(%cache, %idx, %rows, dim=1, accumulate=false)
  %s: f32[B,8,4] = add(%new, %other)
  return %s, %new into %cache, %other into %other
}
"""


def _fails(text_or_graph, *fragments: str) -> str:
    g = ir.parse(text_or_graph) if isinstance(text_or_graph, str) else text_or_graph
    with pytest.raises(ir.VerifyError) as e:
        ir.verify(g)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in:\n{msg}"
    return msg


def test_aliases_round_trip_and_verify() -> None:
    g = ir.verify(ir.parse(STEP))
    assert g.aliases == {1: "cache", 2: "other"}
    text = ir.to_text(g)
    assert "return %s, %new into %cache, %other into %other\n" in text
    assert ir.parse(text) == g
    assert text == STEP  # the printer writes what the parser read


def test_equality_sees_aliases() -> None:
    a, b = ir.parse(STEP), ir.parse(STEP)
    b.aliases.pop(1)
    assert a != b
    diff = first_difference(a, b)
    assert diff is not None and "aliases" in diff


def test_into_names_an_input() -> None:
    with pytest.raises(ir.ParseError, match="%s after 'into' is not an input"):
        ir.parse(STEP.replace("%new into %cache", "%new into %s"))


def test_alias_of_a_missing_output() -> None:
    g = ir.parse(STEP)
    g.aliases[7] = "cache"
    _fails(g, "alias of output 7: the graph has 3 outputs")


def test_alias_into_a_parameter() -> None:
    _fails(
        STEP.replace("%other: f32[B,8,4] cache", "%other: f32[B,8,4] parameter"),
        "output 2 (%other) into %other: %other is a parameter",
    )


def test_alias_needs_the_same_type() -> None:
    g = ir.parse(STEP.replace("%new into %cache, %other into %other", "%new, %idx into %other"))
    _fails(g, "output 2 (%idx) into %other: types i64[1] and f32[B,8,4]")


def test_one_output_per_input() -> None:
    g = ir.parse(STEP.replace("%other into %other", "%new"))
    g.aliases[2] = "cache"
    _fails(g, "output 2 (%new) into %cache: output 1 is written there too")


def test_alias_of_another_input() -> None:
    g = ir.parse(STEP.replace("%other into %other", "%other into %cache"))
    g.aliases.pop(1)
    _fails(g, "output 2 (%other) into %cache: the output is another input, %other")


def test_aliased_input_read_by_another_op() -> None:
    text = STEP.replace("add(%new, %other)", "add(%cache, %other)")
    _fails(
        text,
        "output 1 (%new) into %cache: op 1 reads %cache, which op 0 overwrites in place",
        ">>> %s: f32[B,8,4] = add(%cache, %other)",
        "fix: alias only an input that the op writing it alone reads",
    )
