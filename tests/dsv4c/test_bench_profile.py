"""`dsv4c bench --profile`: the TVM rows' per-kernel profile of one step names the executable's
kernels as its kernel records do, accounts for every step once, and its shares sum to 1; the
timing hook is off outside the profile. (No timing assertions: the figures are the machine's.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from dsv4c import bench as bench_module
from dsv4c.bench import bench


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[str], object]:
    out = tmp_path_factory.mktemp("bench") / "b.json"
    said: list[str] = []
    doc = bench(
        "tiny",
        ["eager", "tvm"],
        prompt_len=0,
        context=12,
        batches=(2,),
        repeat=1,
        json_path=out,
        say=said.append,
        profile=True,
    )
    (exe,) = bench_module._EXES.values()
    assert json.loads(Path(out).read_text()) == json.loads(json.dumps(doc))
    return doc, said, exe


def test_profile_names_the_kernel_records(profiled) -> None:
    doc, _, exe = profiled
    rows = {r["backend"]: r for r in doc["rows"]}
    assert "kernel_profile" not in rows["eager"]
    prof = rows["tvm"]["kernel_profile"]
    records = {r.key: r.name for r in exe.kernel_records()}
    first = {s.launch.kernels[0].key for s in exe.steps if s.launch is not None}
    assert {p["key"] for p in prof if p["key"] is not None} == first
    assert first <= set(records)
    for p in prof:
        if p["key"] is None:  # an op that ran its torch reference
            assert p["kernel"].removesuffix(" (reference)") in {op for op, _ in exe.fallbacks()}
        else:
            assert p["kernel"] == records[p["key"]], p
    (plan,) = exe.plans.values()  # each step once, but the hoisted ones (Plan.invariant)
    assert sum(p["calls"] for p in prof) == pytest.approx(len(exe.steps) - len(plan.invariant))
    assert sum(p["share"] for p in prof) == pytest.approx(1.0, abs=1e-9)
    assert [p["ms"] for p in prof] == sorted((p["ms"] for p in prof), reverse=True)
    moved = [p for p in prof if p["bytes"]]
    assert moved and all(p["GBps"] > 0 for p in moved if p["ms"] > 0)


def test_profile_is_printed_and_the_hook_is_off_after(profiled) -> None:
    doc, said, exe = profiled
    prof = {r["backend"]: r for r in doc["rows"]}["tvm"]["kernel_profile"]
    table = [s for s in said if "decode b2 / tvm: top" in s]
    assert len(table) == 1 and prof[0]["kernel"] in table[0]
    assert exe.profile is False
    (plan,) = exe.plans.values()  # the last profiled call: each step in the plan once
    assert set(exe.step_times) == set(plan.steps) and len(plan.invariant) > 0
    assert {calls for _, calls in exe.step_times.values()} == {1}


def test_the_hook_is_off_by_default() -> None:
    """Unprofiled calls time nothing; with `profile` on, each step of each call is counted."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "backends"))
    from backend_graphs import graph_of

    from backends.tvm import TVMBackend

    x = torch.randn(4, 32)
    exe = TVMBackend().compile(graph_of([("softmax", ["x"], {"dim": -1})], {"x": x}), "cpu")
    exe(x)
    exe(x)
    assert not exe.step_times and not exe.step_seconds
    exe.profile = True
    exe(x)
    exe(x)
    assert {i: calls for i, (_, calls) in exe.step_times.items()} == {0: 2}
