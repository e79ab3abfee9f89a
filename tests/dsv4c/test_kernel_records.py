"""Typed kernel records: every file under an artifact's kernels/ belongs to exactly one kernel
row of the manifest, every row's files exist and match their sha256, for both backends and a GPU
and a CPU target; names are `<name>_<key>.<ext>` with safe characters only."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from dsv4c_helpers import mlp, x

import dsv4c
from backends.base import KernelRecord
from backends.triton.kernel import KernelSource, Param

SAFE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*_[0-9a-f]{16}(\.[0-9a-f]{8})?\.[a-z.]+$")


def library_file(rel: str) -> bool:
    """The TVM CPU library the loader uses (a module of kernels, not one kernel's file)."""
    name = rel.split("/", 2)[-1]
    return name.startswith(("lib/", "library."))


def check_records(path: Path) -> dict:
    """The checks of the module docstring on the artifact at `path`; returns its manifest."""
    manifest = json.loads((path / "manifest.json").read_text())
    table = manifest["files"]
    on_disk = {p.relative_to(path).as_posix() for p in (path / "kernels").rglob("*") if p.is_file()}
    kernel_files = {f for f in on_disk if not library_file(f)}
    owners = Counter(f for k in manifest["kernels"] for f in k["files"])
    assert set(owners) == kernel_files, set(owners) ^ kernel_files
    assert all(n == 1 for n in owners.values()), [f for f, n in owners.items() if n > 1]
    assert len({k["key"] for k in manifest["kernels"]}) == len(manifest["kernels"])
    for k in manifest["kernels"]:
        assert k["source"] == k["files"][0]
        for rel in k["files"]:
            data = (path / rel).read_bytes()
            assert table[rel] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            assert SAFE.match(rel.rsplit("/", 1)[-1]), rel
            assert rel.rsplit("/", 1)[-1].startswith(f"{k['name']}_{k['key']}.")
        assert k["ops"] and k["uses"] >= 1 and k["language"]
    return manifest


@pytest.mark.parametrize(
    "backend,target",
    [("triton", "cpu"), ("triton", "sm_90"), ("tvm", "cpu"), ("tvm", "sm_90")],
)
def test_every_kernel_file_belongs_to_one_record(tmp_path: Path, backend: str, target: str):
    if backend == "tvm":
        pytest.importorskip("tvm")
    args = {"backend": backend, "target": target, "dynamic": {"x": {0: "B"}}}
    c = dsv4c.compile(mlp(), (x(),), **args, output_dir=tmp_path / "a")
    manifest = check_records(tmp_path / "a")
    assert manifest["kernels"]
    language = {"triton": "triton", "tvm": "cuda" if target == "sm_90" else "tvmscript"}[backend]
    assert {k["language"] for k in manifest["kernels"]} == {language}
    if target == "sm_90" and (backend == "triton" or shutil.which("nvcc")):
        bins = [b for k in manifest["kernels"] for b in k["binaries"]]
        assert bins and all(b["error"] is None and b["registers"] for b in bins)
        assert all(any(f.endswith(".cubin") for f in b["files"]) for b in bins)
    rows = c.report()["entries"]["forward"]["kernels"]
    assert {r["key"] for r in rows if r["runs"] == "kernel"} == {
        k["key"] for k in manifest["kernels"]
    }


def test_kernels_of_one_module_have_their_own_keys():
    """Prefill and decode of sparse MQA share one module's text: the key names the kernel."""
    params = (Param("x_ptr", "ptr", None),)
    a = KernelSource("sparse_mqa_prefill", "text", params, ("attn.sparse_mqa",))
    b = KernelSource("sparse_mqa_decode", "text", params, ("attn.sparse_mqa",))
    assert a.key != b.key
    assert KernelSource("k", "x = 1\n# a comment", params, ()).key == KernelSource(
        "k", "x = 1\n# another site", params, ()
    ).key  # comments (source lines of a site) do not split a shared kernel


def test_kernel_record_row_lists_source_and_binaries():
    from backends.base import KernelBinary

    rec = KernelRecord("rmsnorm", "0123456789abcdef", "triton", "py", "src", ("mul", "rsqrt"))
    cubin = "rmsnorm_0123456789abcdef.89abcdef.cubin"
    rec = rec.with_binaries([KernelBinary("sm_90", "89abcdef", (cubin,))])
    row = rec.row("kernels/sm_90")
    assert row["source"] == "kernels/sm_90/rmsnorm_0123456789abcdef.py"
    assert row["files"] == [row["source"], f"kernels/sm_90/{cubin}"]


def test_report_compares_triton_and_tvm_for_one_target(tmp_path: Path):
    """The report puts both backends' kernels for sm_90 side by side: count, resources, time."""
    pytest.importorskip("tvm")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: TVM kernels have no registers to compare")
    from dsv4c.report import compare_backends
    from dsv4c.report_html import render

    args = {"target": "sm_90", "dynamic": {"x": {0: "B"}}}
    tri = dsv4c.compile(mlp(), (x(),), backend="triton", **args)
    tvm = dsv4c.compile(mlp(), (x(),), backend="tvm", **args)
    rows = compare_backends(tri.report(), tvm.report())
    assert [r["backend"] for r in rows] == ["triton", "tvm"]
    for r in rows:
        assert r["kernels"] > 0 and r["compiled"] == r["kernels"] and r["max_registers"] > 0
        assert r["estimated_s"] > 0
    page = render(tri.manifest, tri.report(), tvm.report())
    assert "triton and tvm side by side" in page
    cpu = dsv4c.compile(mlp(), (x(),), backend="reference", dynamic={"x": {0: "B"}})
    with pytest.raises(ValueError, match="different targets"):
        compare_backends(tri.report(), cpu.report())
