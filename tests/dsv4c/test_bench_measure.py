"""How `dsv4c bench` measures: Dynamo captures `tiny`'s decode once for every position (no
recompile, no graph break); timing rounds interleave the backends after an untimed warm-up round;
a recompile after the first call is counted on the row; the must-read bytes of the roofline
column follow the documented formula."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from dsv4c import bench as bench_module
from dsv4c.bench_roofline import kv_bytes, must_read_bytes, weight_bytes
from models.deepseek_v4 import Config, Transformer


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(Config.preset("tiny")).eval()


def test_decode_is_one_graph_for_every_position(tiny: Transformer) -> None:
    """The graph Inductor compiles, captured by Dynamo (eager backend: no C++ build): three
    positions, one graph, no graph break, no recompile — the position is a 0-d tensor."""
    (w,) = bench_module.workloads(tiny, 0, 12, (1,))
    token, _, cache = w.args
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(tiny.decode, backend="eager")
    with torch.no_grad():
        for pos in (12, 13, 14):
            fn(token, torch.tensor(pos), cache)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert counters["frames"]["total"] == 1  # compiled once; guards held for positions 13, 14
    torch._dynamo.reset()


def test_timing_interleaves_backends_after_a_warm_up_round() -> None:
    log: list[str] = []

    def call(name: str, fail_at: int | None = None):
        def run() -> None:
            log.append(name)
            if fail_at is not None and log.count(name) == fail_at:
                raise RuntimeError("lost the device\nmore")

        return run

    calls = {"a": call("a"), "b": call("b", fail_at=2)}
    times = bench_module.time_interleaved(calls, repeat=3, after_warmup=lambda: log.append("|"))
    assert log == ["a", "b", "|", "a", "b", "a", "a"]  # round 0 warms up; b fails in round 1
    assert len(times["a"]) == 3 and times["b"] == "RuntimeError: lost the device"


def test_back_to_back_times_the_second_of_two_calls_per_backend() -> None:
    """Each timed call follows an untimed call of the same backend (its own pools' state)."""
    log: list[str] = []
    calls = {k: (lambda k=k: log.append(k)) for k in ("a", "b")}
    times = bench_module.time_interleaved(calls, repeat=2, back_to_back=True)
    assert log == ["a", "b", "a", "a", "b", "b", "a", "a", "b", "b"]
    assert len(times["a"]) == len(times["b"]) == 2


def test_rows_record_torch_and_tvm_threads(monkeypatch) -> None:
    """torch's threads for every row; a TVM executable adds its pool's and torch's in its calls."""
    from types import SimpleNamespace

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    n = torch.get_num_threads()
    assert bench_module.row_threads() == {"torch": n}
    exe = SimpleNamespace(threads=None, torch_parallel="heavy")
    held = "1 (heavy steps: torch's)" if n > 1 else n
    assert bench_module.row_threads(exe) == {"torch": n, "tvm": n, "torch_in_tvm_call": held}
    exe = SimpleNamespace(threads=1, torch_parallel="always")
    assert bench_module.row_threads(exe) == {"torch": n, "tvm": 1, "torch_in_tvm_call": n}


def test_a_recompile_while_timed_is_counted_on_the_row() -> None:
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    fn(torch.ones(3))
    row = {"backend": "inductor", "dynamo": bench_module._dynamo_stats()}
    fn(torch.ones(4))  # a new shape (say in the warm-up round): a second graph
    bench_module._before_timing([row])
    fn(torch.ones(5))  # and a third while timed
    bench_module._finish_row(row, [0.2, 0.1, 0.3], tokens=1)
    want = {"graphs": 1, "graph_breaks": 0, "recompiles": 1, "recompiles_in_warmup": 1}
    assert row["dynamo"] == want
    assert row["latency_s"] == 0.2 and row["latency_min_s"] == 0.1
    assert row["times_s"] == [0.2, 0.1, 0.3]
    extra = {"workload": "w", "peak_bytes": None, "compile_s": 1.0}
    assert "UNSTABLE" not in bench_module._row_text(row | extra)  # median 2.0x min: not flagged
    bench_module._finish_row(row, [0.3, 0.1, 0.5], tokens=1)
    assert "UNSTABLE: median 3.0x min" in bench_module._row_text(row | extra)
    torch._dynamo.reset()


def test_must_read_bytes_formula(tiny: Transformer) -> None:
    cfg = tiny.cfg
    prefill, decode = bench_module.workloads(tiny, 16, 40, (1,))
    params = dict(tiny.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".ffn.experts." in n and "mtp" not in n)
    dense = sum(
        p.numel()
        for n, p in params.items()
        if ".ffn.experts." not in n and not n.startswith("mtp.") and n != "embed.weight"
    )
    k, e = cfg.n_activated_experts, cfg.n_routed_experts
    want = 4 * (dense + cfg.dim + experts * k // e)  # fp32; one token: one embedding row
    assert weight_bytes(tiny, 1) == want
    table = params["embed.weight"].numel()  # 10,000 tokens read every row of the table
    assert weight_bytes(tiny, 10_000) == pytest.approx(4 * (dense + table + experts), rel=1e-3)
    got = must_read_bytes(tiny, decode)
    cache = decode.args[2]
    everything = sum(t.numel() * 4 for t in cache.values())
    assert got["kv"] == kv_bytes(tiny, cache) <= everything and got["kv"] > 0
    assert got["total"] == got["weights"] + got["kv"]
    assert must_read_bytes(tiny, prefill)["kv"] == 0


def test_a_mismatch_within_eagers_own_near_tie_sensitivity_is_marked_not_hidden() -> None:
    def row(rel: float, ok: bool) -> dict:
        return {"check": {"max_rel_err": rel, "same_argmax": ok, "ok": ok}}

    rows = [row(1e-6, True), row(2.1e-2, False), row(0.5, False), {"error": "x"}]
    asked: list[int] = []
    bench_module.judge_near_ties(rows, lambda: asked.append(1) or 1.5e-2)
    assert asked == [1]  # measured once, for the failed rows only
    assert rows[0]["check"] == {"max_rel_err": 1e-6, "same_argmax": True, "ok": True}
    assert rows[1]["check"]["ok"] and rows[1]["check"]["near_tie"]
    assert not rows[2]["check"]["ok"] and rows[2]["check"]["eager_sensitivity"] == 1.5e-2
    timed = {"latency_s": 1.0, "latency_min_s": 1.0, "tokens_per_s": 1.0, "compile_s": 1.0}
    assert "near-tie" in bench_module._row_text(rows[1] | timed | {"peak_bytes": None})
    quiet = [row(1e-6, True)]
    bench_module.judge_near_ties(quiet, lambda: asked.append(2) or 0.0)
    assert asked == [1]  # nothing failed: eager is not run again


def test_table_has_ratios_roofline_and_verdicts() -> None:
    def row(backend: str, ms: float, check: dict) -> dict:
        times = {"latency_s": ms / 1e3, "latency_min_s": ms / 2e3, "roofline_fraction": 0.25}
        return {"workload": "decode b1", "backend": backend, **times, "check": check}

    ok = {"max_rel_err": 1e-7, "ok": True}
    tie = {"max_rel_err": 2e-2, "ok": True, "near_tie": True}
    rows = [row("eager", 40.0, ok), row("inductor", 20.0, tie), row("tvm", 10.0, ok)]
    rows.append({"workload": "decode b1", "backend": "triton", "skipped": "no GPU here"})
    bench_module._ratios(rows)
    lines = bench_module.bench_table({"rows": rows}).splitlines()
    # columns: ..., roofline, cache MB moved (— where the row has no update_bytes), check
    want = "| decode b1 | inductor | 20.0 | 10.0 | 2.00x | — | 25.0% | — | near tie (rel 2.0e-02) |"
    assert lines[3] == want
    assert lines[4].startswith("| decode b1 | tvm | 10.0 | 5.0 | 4.00x | 2.00x | 25.0% | — | ok")
    assert lines[5] == "| decode b1 | triton | no GPU here | | | | | | |"
