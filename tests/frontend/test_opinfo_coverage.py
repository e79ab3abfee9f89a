"""Core-ATen coverage with PyTorch's OpInfo samples: fails when it drops.

The full sweep (`python -m benchmarks.opinfo_coverage ...`, see its docstring; about 30 min on
2 busy cores with both backends) is recorded in benchmarks/opinfo_coverage.json. Here: the recorded
JSON keeps its figures (they agree with its rows, and meet the recorded floors and the issue's
90 % goal), and a handful of ops run live on float32 samples: capture -> ir.interpret for
a subset, and through TVM and the Triton interpreter for a few that the JSON says both lower.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("expecttest")  # torch's OpInfo database imports it (test extras)

from benchmarks import opinfo_coverage as sweep  # noqa: E402


def _recorded() -> dict:
    return json.loads(sweep.JSON_PATH.read_text())


def test_recorded_sweep_keeps_its_figures() -> None:
    recorded = _recorded()
    rows = [sweep.OpResult(**r) for r in recorded["ops"]]
    figures = sweep.summary(rows)
    assert {k: recorded["summary"][k] for k in figures} == figures  # summary agrees with rows
    assert figures["coverage"] >= max(0.90, sweep.RECORDED_COVERAGE)
    for backend, floor in sweep.RECORDED_BACKENDS.items():
        passed, lowered = map(int, figures[backend].split("/"))
        assert passed >= floor, f"{backend}: {figures[backend]} passed/lowered, floor {floor}"
        assert lowered >= passed
    used = [r for r in rows if r.models]
    assert len(used) >= 10  # the listed HF models' ops were marked


def test_core_aten_subset_keeps_its_coverage() -> None:
    infos = sweep.core_opinfos(set(sweep.SUBSET))
    assert len({i.aten_name or i.name for i in infos}) >= len(sweep.SUBSET) - 2
    results = [
        sweep.run_op(info, samples=1, backends=(), dtypes=(torch.float32,)) for info in infos
    ]
    summary = sweep.summary(results)
    failed = [f"{r.name}: {r.error}" for r in results if not (r.captured and r.interpreted)]
    assert summary["coverage"] >= sweep.SUBSET_FLOOR, "\n".join(failed)


def test_backends_spot_check_against_eager(monkeypatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    recorded = {r["name"]: r for r in _recorded()["ops"]}
    infos = sweep.core_opinfos(set(sweep.BACKEND_SPOT_CHECK))
    assert {i.name for i in infos} == set(sweep.BACKEND_SPOT_CHECK)
    for info in infos:
        assert recorded[info.name]["tvm"] and recorded[info.name]["triton"], info.name
        r = sweep.run_op(info, samples=2, backends=("tvm", "triton"), dtypes=(torch.float32,))
        assert r.tvm is True and r.triton is True, f"{info.name}: {r.error} {r.not_lowered}"
