"""Runs docs/writing_a_fusion_pass.md: its python blocks in order in one namespace; each ```text
block must equal what the python block before it printed."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing_a_fusion_pass.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def test_doc_has_code_and_outputs() -> None:
    kinds = [k for k, _ in blocks(DOC.read_text())]
    assert kinds.count("python") >= 5 and kinds.count("text") >= 3


def test_worked_example_runs_and_prints_what_the_doc_shows() -> None:
    namespace: dict = {"__name__": "docs_example"}
    printed = ""
    for i, (kind, body) in enumerate(blocks(DOC.read_text())):
        if kind == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(body, f"{DOC.name}[block {i}]", "exec"), namespace)  # noqa: S102
            printed = out.getvalue()
        elif kind == "text":
            assert printed.strip() == body.strip(), f"block {i} differs from the output:\n{printed}"
