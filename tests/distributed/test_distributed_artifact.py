"""Sharded artifacts (`python -m dsv4c.distributed compile/run`): integrity and launch errors
(fast), and compile + run on 4 ranks against eager (DSV4C_SLOW=1)."""

from __future__ import annotations

import os

import pytest

from dsv4c import distributed

SLOW = os.environ.get("DSV4C_SLOW", "") not in ("", "0")


def _fake(tmp_path, text: str = "graph g() {\n  return\n}\n") -> str:
    path = str(tmp_path / "art")
    os.makedirs(path)
    digest = distributed._write(os.path.join(path, distributed.GRAPH_FILE), text)
    manifest = {"mesh": {"tp": 2, "ep": 2}, "world_size": 4, "rules": [],
                "sha256": {distributed.GRAPH_FILE: digest}}
    distributed._write(os.path.join(path, distributed.MESH_FILE), distributed.json.dumps(manifest))
    return path


def test_wrong_nproc_and_tampered_graph_are_clear_errors(tmp_path) -> None:
    path = _fake(tmp_path)
    with pytest.raises(ValueError, match="compiled for mesh .* = 4 ranks; run with --nproc 4"):
        distributed.run_mesh(path, 2)
    with open(os.path.join(path, distributed.GRAPH_FILE), "a") as f:
        f.write("# edited\n")
    with pytest.raises(ValueError, match="sha256 differs from mesh.json; recompile"):
        distributed.run_mesh(path, 4)


@pytest.mark.skipif(not SLOW, reason="capture + 4 ranks take about a minute; DSV4C_SLOW=1")
def test_compile_and_run_on_four_ranks(tmp_path, capsys) -> None:
    out = str(tmp_path / "tp2ep2")
    argv = ["compile", "--model", "tiny-512", "--mesh", "tp=2,ep=2", "-o", out]
    assert distributed.main(argv) == 0
    assert distributed.main(["run", out, "--nproc", "4"]) == 0
    text = capsys.readouterr().out
    assert "4 ranks: prefill" in text and "tokens/s" in text and "(ok)" in text
