"""benchmarks/sparse_scaling.py at small contexts (1K and 2K tokens, one timed round): it runs,
writes its JSON with the expected fields, the pipeline forms each variant's semantic ops and
every compiled decode step equals eager. The analytic bytes are pinned to hand-computed figures
and checked against the cost model. No timing assertions: speed goals live in the benchmark.

1K is the smallest context at which NSA's geometry (16 selection blocks of 64) forms
attn.block_select; about a minute of compiles on 2 cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import sparse_scaling  # noqa: E402
from benchmarks.sparse_bytes import GROWS, ORDER, analytic  # noqa: E402

LENGTHS = (1024, 2048)
FORMED = {
    "csa": {"attn.compress_step": 2, "attn.indexer_topk": 1, "attn.sparse_mqa": 1},
    "dsa": {"attn.indexer_topk": 1, "attn.sdpa": 1},
    "nsa": {"attn.sdpa": 3, "attn.block_select": 1},
}


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sparse") / "scaling.json"
    argv = ["--lengths", *map(str, LENGTHS), "--repeat", "1", "--json", str(out)]
    assert sparse_scaling.main(argv) == 0
    return json.loads(out.read_text())


def test_json_fields_and_rows(doc: dict) -> None:
    assert doc["lengths"] == list(LENGTHS) and set(doc["variants"]) == {"csa", "dsa", "nsa"}
    assert {"loadavg_start", "loadavg_end", "shared", "torch_threads"} <= set(doc["machine"])
    for name, v in doc["variants"].items():
        assert [r["L"] for r in v["rows"]] == list(LENGTHS)
        for r in v["rows"]:
            for side in ("tvm", "eager"):
                assert len(r[side]["times_s"]) == 1 and r[side]["min_s"] > 0
            assert list(r["bytes"]["per_op"]) == list(ORDER[name])
            assert r["tvm_profile_s"], "the profiled call timed no op"
            assert 0 < r["tvm_attn_ops_s"] < sum(r["tvm_profile_s"].values())
        (step,) = v["ratios"]
        assert (step["from"], step["to"], step["length"]) == (1024, 2048, 2.0)
        assert v["verdict"]["grows_with_L"] == list(GROWS[name])


@pytest.mark.parametrize("variant", ["csa", "dsa", "nsa"])
def test_ops_formed_and_compiled_equals_eager(doc: dict, variant: str) -> None:
    for r in doc["variants"][variant]["rows"]:
        assert r["ops"]["formed"] == FORMED[variant], r["ops"]
        assert r["ops"]["attn_fallbacks"] == [], r["ops"]
        assert r["check"]["ok"], f"{variant} L={r['L']}: {r['check']}"


def test_analytic_bytes_by_hand() -> None:
    """Rows x width x 4 bytes at L = 1024 (decode at position 1023)."""
    csa = analytic("csa", sparse_scaling.config("csa", 1024), 1024)
    assert csa["attn.indexer_topk"] == 256 * 128 * 4  # L/4 keys of 128
    assert csa["attn.sparse_mqa"] == (128 + 256) * 512 * 4  # window + min(512, 256) picks
    dsa = analytic("dsa", sparse_scaling.config("dsa", 1024), 1024)
    assert dsa["attn.indexer_topk"] == 1024 * 128 * 4  # every token's key
    assert dsa["attn.sdpa slc"] == 1024 * (512 + 64) * 4  # min(2048, 1024) latent rows
    nsa = analytic("nsa", sparse_scaling.config("nsa", 1024), 1024)
    assert nsa["attn.sdpa cmp"] == 63 * 2 * (192 + 128) * 4  # (1024 - 32) // 16 + 1 blocks
    assert nsa["attn.block_select"] == 63 * 2 * 192 * 4
    assert nsa["attn.sdpa slc"] == 1024 * 2 * 320 * 4  # 16 blocks of 64 = every token
    assert nsa["attn.sdpa win"] == 512 * 2 * 320 * 4


def test_cost_model_counts_at_least_the_rows_read(doc: dict) -> None:
    """Every op's cost-model bytes cover the rows the query reads; the ops that read a whole
    operand (indexer keys, NSA's branches, DSA's picks) agree within 25 % (q, output, picks)."""
    close = {"attn.indexer_topk", "attn.sdpa slc", "attn.sdpa cmp", "attn.sdpa win",
             "attn.block_select"}  # fmt: skip
    for name, v in doc["variants"].items():
        for r in v["rows"]:
            cmp = r["cost_vs_analytic"]
            assert not cmp["missing_in_graph"] and not cmp["not_in_analytic"], cmp
            for op, ratio in cmp["cost_over_analytic"].items():
                assert ratio >= 1.0, (name, r["L"], op, ratio)
                assert op not in close or ratio <= 1.25, (name, r["L"], op, ratio)


def test_o_l_bytes_double_with_the_context(doc: dict) -> None:
    for name, v in doc["variants"].items():
        (step,) = v["ratios"]
        for op in GROWS[name]:
            assert 2.0 <= step["bytes_per_op"][op] <= 2.05, (name, op, step["bytes_per_op"])
