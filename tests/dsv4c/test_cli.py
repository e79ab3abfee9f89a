"""The dsv4c command line: --help everywhere, one-line errors (tracebacks only with --debug),
report.html from an artifact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dsv4c_helpers import compiled, mlp, x

import ir
from dsv4c.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("command", ["compile", "run", "ir", "report"])
def test_every_command_has_help(capsys, command: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: dsv4c {command}" in capsys.readouterr().out


def test_console_script_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dsv4c.cli", "--help"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0
    assert all(c in out.stdout for c in ("compile", "run", "ir", "report"))


def test_error_paths_are_one_line(capsys, tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    assert _error(capsys, ["compile", "--model", "huge", "-o", out]) == (
        "dsv4c compile: error: unknown model 'huge'; known models: tiny, tiny-512, small, "
        "v4-flash, v4-pro, tiny-dsa, v4-flash-dsa, v4-pro-dsa, tiny-nsa, v4-flash-nsa, v4-pro-nsa"
    )
    line = _error(capsys, ["compile", "--model", "tiny", "--target", "sm_99", "-o", out])
    assert line.startswith("dsv4c compile: error: unknown target 'sm_99'; known targets: cpu")
    line = _error(capsys, ["compile", "--model", "tiny", "--backend", "cuda", "-o", out])
    assert line.startswith("dsv4c compile: error: unknown backend 'cuda'")
    line = _error(capsys, ["compile", "--model", "tiny", "--weights", "/no/such.st", "-o", out])
    assert line.startswith("dsv4c compile: error: --weights /no/such.st: no such file")
    line = _error(capsys, ["run", str(tmp_path / "missing")])
    assert line.startswith("dsv4c run: error: ") and "not a dsv4c artifact directory" in line
    line = _error(capsys, ["report", str(tmp_path)])
    assert (
        line == f"dsv4c report: error: {tmp_path} has no manifest.json; it is not a dsv4c artifact"
    )
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        main(["--debug", "compile", "--model", "huge", "-o", str(tmp_path)])


def test_run_refuses_an_artifact_without_a_model(capsys, tmp_path: Path) -> None:
    path = compiled().save(tmp_path / "art")
    line = _error(capsys, ["run", str(path)])
    assert line == f"dsv4c run: error: {path} was not compiled from a model preset; `run` needs one"


def test_report_writes_html_with_the_roofline(capsys, tmp_path: Path) -> None:
    path = compiled("triton").save(tmp_path / "art")
    assert main(["report", str(path)]) == 0
    html = (path / "report.html").read_text()
    assert "<svg" in html and "<circle" in html  # the roofline with one dot per kernel
    assert "Fusion summary" in html and "Compile time" in html
    assert "fused_" in html or "matmul" in html  # the per-kernel table
    # the picture: a module without `layers.N` is drawn whole, before and after fusion
    assert "One layer before and after fusion" in html and "the whole graph" in html
    assert html.count('class="dag"') == 2 and "fused.kernel" in html
    import dsv4c

    dsv4c.load(path)  # report.html beside the artifact does not break its verification


def test_kv_cache_bytes_agree_with_the_architecture_notes() -> None:
    """v4-architecture.md §3.9: BF16 compressed KV 6880 B/token (Flash), 9848 B/token (Pro),
    9.62 GiB at 1M tokens for Pro."""
    from dsv4c.cli import kv_cache_bytes

    pro, flash = kv_cache_bytes("v4-pro")["bf16"], kv_cache_bytes("v4-flash")["bf16"]
    assert (pro["bytes_per_token"], flash["bytes_per_token"]) == (9848, 6880)
    assert round(pro["gib_at_1m_tokens"], 2) == 9.62
    assert round(flash["gib_at_1m_tokens"], 2) == 6.72


def test_the_picture_shows_the_first_csa_layer() -> None:
    from dsv4c.report import picture_module
    from ir import Loc, TensorType

    b = ir.Builder()
    v = b.input("x", TensorType((4,), ir.DType.f32))
    for module in ("embed", "layers.0.attn", "layers.1.attn.indexer.wq_b", "layers.2.attn.indexer"):
        v = b.op("exp", [v], loc=Loc(module, "m.py:1"))
    b.output(v)
    assert picture_module(b.build()) == "layers.1"
    b = ir.Builder()
    b.output(
        b.op("exp", [b.input("x", TensorType((4,), ir.DType.f32))], loc=Loc("layers.3.ffn", ""))
    )
    assert picture_module(b.build()) == "layers.3"


@pytest.mark.parametrize(
    ("backend", "target", "needs"),
    [
        ("tvm", "opencl", "it needs an OpenCL device"),
        ("tvm", "webgpu", "it needs a WebGPU device"),
        ("tvm", "sm_90", "TVM CUDA kernels for sm_90 (NVIDIA H100/H200 SXM)"),
        ("triton", "sm_90", "triton code for sm_90 (NVIDIA H100/H200 SXM)"),
    ],
)
def test_run_refuses_what_this_machine_cannot_run_before_loading(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, target: str, needs: str
) -> None:
    """From the manifest's target alone (`dsv4c.load` regenerated every kernel first, 1-3 min on
    tiny-512): the device the code needs, where it is, what to compile for this machine."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    import torch

    import dsv4c

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    c = dsv4c.compile(mlp(), (x(),), backend=backend, target=target, dynamic={"x": {0: "B"}})
    path = c.save(tmp_path / "art")

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("dsv4c run loaded an artifact it cannot run")

    monkeypatch.setattr(dsv4c, "load", no_loading)
    line = _error(capsys, ["run", str(path)])
    assert line.startswith("dsv4c run: error: this holds ") and needs in line
    assert f" in {path}/kernels/{target}/ " in line and line.endswith("--target cpu")


def test_run_names_decode_outputs_by_decode_order() -> None:
    """`dsv4c run` rebuilds the cache dict from each entry point's own output order: NSA's
    prefill returns its cache keys in another order than decode (captured on init_cache), and
    reading decode's outputs in prefill's order fed win.k a cmp.k tensor."""
    from dsv4c.run import cache_key_orders
    from models.config import Config
    from models.deepseek_v4 import Transformer

    with torch.device("meta"):
        model = Transformer(Config.preset("tiny-nsa")).eval()
        keys = cache_key_orders(model, 1, 64)
        _, stepped = model.decode(torch.zeros(1, 1, dtype=torch.long), torch.tensor(2),
                                  model.init_cache(1, 64))  # fmt: skip
    assert list(stepped) == keys["in"] and sorted(keys["out"]) == sorted(keys["in"])
    assert keys["out"] != keys["in"]  # the case this guards
