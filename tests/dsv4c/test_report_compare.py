"""The report's Triton-vs-TVM comparison for one target, kernel by kernel: each backend's kernels
are costed on their own (`passes.cost.backend_cost` with the record's `CostHints`), so the two
sides differ where the kernels differ, and every total is the sum of its kernels."""

from __future__ import annotations

import functools

import pytest
from dsv4c_helpers import mlp, x

import dsv4c
from dsv4c.report import compare_backends, compare_kernels
from passes.cost import evaluate, kernel_cost

pytest.importorskip("tvm")


@functools.cache
def reports() -> tuple[dict, dict, dsv4c.Compiled]:
    args = {"target": "sm_90", "dynamic": {"x": {0: "B"}}}
    tri = dsv4c.compile(mlp(), (x(),), backend="triton", **args)
    tvm = dsv4c.compile(mlp(), (x(),), backend="tvm", **args)
    return tri.report(), tvm.report(), tvm


def _row(report: dict, name: str) -> dict:
    return next(k for k in report["entries"]["forward"]["kernels"] if k["name"] == name)


def test_each_backend_kernel_has_its_own_cost():
    """matmul(x[4,16], w[16,32]) + bias, relu: TVM runs the GEMM and its epilogue as two
    launches passing f32[4,32] through device memory (written and read: 2·512 B) with 16×16
    output tiles (A read ceil(32/16) = 2 times: +256 B); Triton's one kernel keeps the GEMM
    result in registers, its BLOCK_M×BLOCK_N tile read from its compiled variant."""
    tri, tvm, compiled = reports()
    node = compiled.entries["forward"].graph.ops[_row(tvm, "matmul_add_relu")["sites"][0]]
    ideal = evaluate(kernel_cost(node).bytes, {"B": 4})
    t = _row(tvm, "matmul_add_relu")
    assert (t["launches"], t["gemm_tile"], t["bytes"] - ideal) == (2, [16, 16], 2 * 512 + 256)
    r = _row(tri, "matmul_f32_add_relu")
    rows, cols = r["gemm_tile"]
    extra = 4 * 16 * 4 * (-(-32 // cols) - 1) + 16 * 32 * 4 * (-(-4 // rows) - 1)
    assert (r["launches"], r["bytes"] - ideal) == (1, extra)
    assert r["flops"] == t["flops"] and r["roofline_s"] < t["roofline_s"]


def test_kernel_by_kernel_rows_add_up_to_the_totals():
    tri, tvm, _ = reports()
    pairs = compare_kernels(tri, tvm)
    assert [(p["a_kernel"], p["b_kernel"]) for p in pairs] == [
        ("layernorm", "layernorm"),
        ("matmul_f32_add_relu", "matmul_add_relu"),
        ("matmul_f32_add", "matmul_add"),
        ("fused_softmax", "softmax"),
    ]
    assert [(p["a_launches"], p["b_launches"]) for p in pairs] == [(1, 1), (1, 2), (1, 2), (1, 1)]
    differ = [p for p in pairs if p["a_s"] != p["b_s"]]
    assert [p["b_kernel"] for p in differ] == ["matmul_add_relu", "matmul_add"]
    assert all(p["b_s"] > p["a_s"] for p in differ)
    totals = {r["backend"]: r for r in compare_backends(tri, tvm)}
    assert sum(p["a_s"] for p in pairs) == pytest.approx(totals["triton"]["estimated_s"], rel=1e-12)
    assert sum(p["b_s"] for p in pairs) == pytest.approx(totals["tvm"]["estimated_s"], rel=1e-12)
    assert (totals["triton"]["launches"], totals["tvm"]["launches"]) == (4, 6)
    for report in (tri, tvm):
        for k in report["entries"]["forward"]["kernels"]:
            assert len(k["sites"]) == k["uses"] == len(k["site_s"])
            assert k["roofline_s"] == pytest.approx(sum(k["site_s"]), rel=1e-12)


def test_html_shows_the_kernel_by_kernel_table():
    from dsv4c.report_html import render

    tri, tvm, compiled = reports()
    page = render(compiled.manifest, tvm, tri)
    assert "tvm and triton side by side" in page and "Kernel by kernel" in page
    assert "matmul_add_relu" in page and "matmul_f32_add_relu" in page
