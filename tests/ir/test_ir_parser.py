"""Parser errors: every malformed text raises ParseError with position and caret, nothing else."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphs
import ir

GOOD = """graph g(%x: f32[T,4] activation, %w: f32[4,4] parameter) {
  %y: f32[T,4] = matmul(%x, %w)  # layers.0 @ m.py:3
  %z: f32[T,4] = softmax(%y, dim=-1)
  return %z
}
"""


def _err(text: str) -> ir.ParseError:
    with pytest.raises(ir.ParseError) as e:
        ir.parse(text)
    return e.value


def test_good_text_parses() -> None:
    g = ir.parse(GOOD)
    assert [n.name for n in g.ops] == ["matmul", "softmax"]
    assert g.ops[0].loc == ir.Loc("layers.0", "m.py:3")
    assert g.role(g.inputs[1]) == "parameter"
    ir.verify(g)


@pytest.mark.parametrize(
    "old,new,line,anchor,fragment",
    [
        ("softmax(", "softmx(", 3, "softmx", "unknown op 'softmx'"),
        ("dim=-1", "axis=-1", 3, "axis", "unknown attribute 'axis' for softmax; known: dim"),
        (
            "dim=-1",
            'dim="last"',
            3,
            '"last"',
            "attribute dim of softmax: expected int, got str 'last'",
        ),
        ("dim=-1", "dim=1.5", 3, "1.5", "expected int, got float 1.5"),
        ("dim=-1", "dim=-1, dim=0", 3, "dim=0", "attribute 'dim' given twice"),
        ("matmul(%x, %w)", "matmul(%x, %v)", 2, "%v", "undefined value %v"),
        ("matmul(%x, %w)", "matmul(%x)", 2, "matmul", "matmul takes 2 operand(s), got 1"),
        ("%z: f32[T,4] = softmax", "%y: f32[T,4] = softmax", 3, "%y", "%y is defined twice"),
        ("f32[T,4] activation", "f33[T,4] activation", 1, "f33", "unknown dtype 'f33'"),
        ("activation", "weights", 1, "weights", "unknown role 'weights'"),
        ("f32[T,4] =", "f32[T,,4] =", 2, ",4]", "expected a dim"),
        ("return %z", "return %q", 4, "%q", "undefined value %q"),
        ("}\n", "", 5, None, "expected '}' closing the graph"),
        ("(%y, dim", "(dim=1, %y, dim", 3, "%y, dim", "operands must come before attributes"),
        ("f32[T,4] = m", "f32[T;4] = m", 2, ";", "unexpected character ';'"),
        ("f32[T,4] = m", "f32[T//0,4] = m", 2, "//", "division by zero"),
        ("# layers.0 @ m.py:3", '# "unterminated @ m.py:3', 2, '# "', "bad location comment"),
        ("dim=-1", "dim=", 3, ")", "expected an attribute value, got op ')'"),
        ("%x: f32", "%x f32", 1, "f32", "expected ':' before the type"),
    ],
)
def test_errors_have_position_and_caret(old, new, line, anchor, fragment) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    lines = text.splitlines()
    src = lines[line - 1] if line <= len(lines) else ""
    col = src.index(anchor) + 1 if anchor is not None else 1
    e = _err(text)
    assert fragment in e.msg, e.msg
    assert (e.line, e.col) == (line, col), str(e)
    shown = str(e).splitlines()
    assert shown[0].startswith(f"line {line}, column {col}: ")
    assert shown[1] == "  " + src
    assert shown[2] == "  " + " " * (col - 1) + "^"


def test_missing_required_attribute() -> None:
    text = "graph (%x: f32[4] activation) {\n  %y: f32[4] = fused.kernel(%x)\n  return %y\n}\n"
    assert "fused.kernel is missing attribute(s) body" in _err(text).msg


def test_trailing_garbage_and_deep_nesting() -> None:
    assert "end of input after the graph" in _err(GOOD + "graph").msg
    deep = GOOD.replace(
        "f32[T,4] = softmax", "f32[" + "(" * 5000 + "T" + ")" * 5000 + ",4] = softmax"
    )
    assert "nesting deeper than" in _err(deep).msg
    assert "exponent" in _err(GOOD.replace("f32[T,4] = softmax", "f32[T**100000,4] = softmax")).msg


def test_non_string_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        ir.parse(b"graph")  # type: ignore[arg-type]


# --- fuzzing -----------------------------------------------------------------------------------

CORPUS = [ir.to_text(make()) for make in graphs.ALL.values()] + [GOOD]
ALPHABET = '%:[](){},=#@.-+*/" \n\tabcdefTBx0123456789_'


def _parse_or_parse_error(text: str) -> None:
    try:
        ir.parse(text)
    except ir.ParseError as e:
        assert e.line >= 1 and e.col >= 1
        assert "^" in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), st.data())
def test_fuzz_mutations(text: str, data) -> None:
    ops = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["del", "ins", "rep", "cut", "dup"]),
                st.integers(0, len(text)),
                st.text(ALPHABET, max_size=4),
            ),
            min_size=1,
            max_size=4,
        )
    )
    for kind, pos, s in ops:
        pos = min(pos, len(text))
        if kind == "del":
            text = text[:pos] + text[pos + len(s) + 1 :]
        elif kind == "ins":
            text = text[:pos] + s + text[pos:]
        elif kind == "rep":
            text = text[:pos] + s + text[pos + len(s) :]
        elif kind == "cut":
            text = text[:pos]
        else:
            text = text[:pos] + text[pos : pos + 20] + text[pos:]
    _parse_or_parse_error(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_garbage(text: str) -> None:
    _parse_or_parse_error(text)


@settings(max_examples=200, deadline=None)
@given(st.text(ALPHABET, max_size=120).map(lambda s: "graph g(" + s))
def test_fuzz_garbage_after_header(text: str) -> None:
    _parse_or_parse_error(text)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(CORPUS), st.integers(0, 10_000))
def test_fuzz_truncation(text: str, n: int) -> None:
    cut = text[: n % (len(text) + 1)]
    if cut == text or cut.strip() == text.strip():
        ir.parse(cut)
    else:
        _parse_or_parse_error(cut)
