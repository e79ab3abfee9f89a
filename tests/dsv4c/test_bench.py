"""`dsv4c bench`: rows for every (workload, backend), checked against eager; a backend that cannot
run gives a row with its reason; JSON and SVG written; bad names are one-line CLI errors."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dsv4c.bench import bench
from dsv4c.cli import main


def test_bench_rows_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    doc = bench(
        "tiny",
        ["eager", "reference", "triton"],
        prompt_len=8,
        context=12,
        batches=(2,),
        repeat=1,
        json_path=out,
        say=lambda _: None,
    )
    rows = {(r["workload"], r["backend"]): r for r in doc["rows"]}
    assert set(rows) == {
        (w, b) for w in ("prefill", "decode b2") for b in ("eager", "reference", "triton")
    }
    for w in ("prefill", "decode b2"):
        ref = rows[(w, "reference")]
        assert ref["check"]["ok"] and ref["check"]["max_rel_err"] <= 1e-5, ref
        assert ref["latency_s"] > 0 and ref["compile_s"] > 0 and ref["speedup_vs_eager"] > 0
        assert ref["tokens_per_s"] == pytest.approx((8 if w == "prefill" else 2) / ref["latency_s"])
        assert "no GPU here" in rows[(w, "triton")]["skipped"]
        for r in (ref, rows[(w, "eager")]):  # roofline: must-read bytes / bandwidth / latency
            want = r["must_read_bytes"]["total"] / doc["read_bandwidth_Bps"] / r["latency_s"]
            assert r["roofline_fraction"] == pytest.approx(want) and r["roofline_fraction"] > 0
            assert 0 < r["latency_min_s"] <= r["latency_s"]
            assert r["threads"]["torch"] >= 1  # the reference backend has no TVM pool
            assert "tvm" not in r["threads"]
    assert doc["back_to_back"] is True
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    svg = ET.fromstring(out.with_suffix(".svg").read_text())
    assert svg.tag.endswith("svg") and "prefill" in out.with_suffix(".svg").read_text()


def test_a_backend_that_fails_gives_an_error_row(tmp_path: Path, monkeypatch) -> None:
    from dsv4c import bench as bench_module

    def broken(model, w, target):
        raise NotImplementedError("no kernel for moe.experts\nsecond line")

    monkeypatch.setitem(bench_module.RUNNERS, "reference", broken)
    doc = bench("tiny", ["reference"], prompt_len=4, batches=(), repeat=1, say=lambda _: None)
    (row,) = doc["rows"]
    assert row["error"] == "NotImplementedError: no kernel for moe.experts"


def test_cli_bench_errors_are_one_line(capsys, tmp_path: Path) -> None:
    out = str(tmp_path / "b.json")
    assert main(["bench", "--model", "tiny", "--backends", "eager,vllm", "--json", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dsv4c bench: error: unknown backend(s) vllm; known: eager, inductor")
    assert main(["bench", "--model", "huge", "--json", out]) == 1
    assert "unknown model 'huge'" in capsys.readouterr().err
