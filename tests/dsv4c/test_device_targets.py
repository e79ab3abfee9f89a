"""TVM GPU artifacts beyond CUDA, and the nvcc cubin cache.

- `--target opencl` / `webgpu`: every file under kernels/ belongs to exactly one kernel record
  and hash-checks, the records are OpenCL C / WGSL with no binaries (the manifest says why), each
  file holds every device function of its kernel, and calling the artifact says which device it
  needs. Triton refuses these targets; an unknown target still lists the valid ones.
- nvcc (skipped without it): compiling the same CUDA source twice reuses the cached cubins (the
  report counts the hits), and a damaged cache entry is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dsv4c_helpers import mlp, x
from test_kernel_records import check_records

import dsv4c
import ir
from backends.tvm.device import DeviceUnavailable
from dsv4c import loader
from dsv4c.errors import DsvError

pytest.importorskip("tvm")

DYNAMIC = {"x": {0: "B"}}
SOURCE = {"opencl": ("opencl", "cl", "an OpenCL device"), "webgpu": ("webgpu", "wgsl", "a WebGPU")}


@pytest.mark.parametrize("target", ["opencl", "webgpu"])
def test_source_target_artifact(tmp_path: Path, target: str):
    language, ext, device = SOURCE[target]
    c = dsv4c.compile(mlp(), (x(),), backend="tvm", target=target, dynamic=DYNAMIC,
                      output_dir=tmp_path / "a")  # fmt: skip
    manifest = check_records(tmp_path / "a")
    kernels = manifest["kernels"]
    assert len(kernels) == 4  # layernorm, matmul+add+relu, matmul+add, softmax
    assert {k["language"] for k in kernels} == {language}
    assert all(k["source"].endswith(f".{ext}") and k["binaries"] == [] for k in kernels)
    code = manifest["device_code"]
    assert code["source"] == language and code["binaries"] is None and not code["skipped"]
    assert "driver compiles it" in code["why"]
    assert manifest["runs_on"] == target and not manifest["runnable_on_compile_host"]["ok"]
    rows = c.report()["entries"]["forward"]["kernels"]
    assert {r["key"] for r in rows if r["runs"] == "kernel"} == {k["key"] for k in kernels}
    with pytest.raises(DeviceUnavailable, match=f"it needs {device}") as e:
        c.entries["forward"].executable(x())
    assert "--backend tvm --target cpu" in str(e.value)


@pytest.mark.parametrize("target", ["opencl", "webgpu"])
def test_loading_source_refuses_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
):
    """`dsv4c.load` of OpenCL/WebGPU source refuses from the manifest's target, with the
    executable's message (the device, where the sources are, what to compile instead), before
    it parses a graph or generates a kernel (it regenerated them all: 1-3 min on tiny-512)."""
    _, ext, device = SOURCE[target]
    dsv4c.compile(mlp(), (x(),), backend="tvm", target=target, dynamic=DYNAMIC,
                  output_dir=tmp_path / "a")  # fmt: skip

    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("dsv4c.load compiled kernels of a source-only artifact")

    monkeypatch.setattr(loader, "make_backend", no_compiling)
    monkeypatch.setattr(loader.ir, "parse", no_compiling)
    with pytest.raises(DeviceUnavailable) as e:
        dsv4c.load(tmp_path / "a", params=mlp().state_dict())
    msg = str(e.value)
    assert f"it needs {device}" in msg and "--backend tvm --target cpu" in msg
    assert f"{tmp_path / 'a'}/kernels/{target}/" in msg and ext.upper() in msg.upper()


@pytest.mark.parametrize("target", ["sm_90", "opencl", "webgpu"])
def test_a_kernel_file_holds_all_its_device_functions(target: str):
    """TVM launches a GEMM and its epilogue as two functions (`_kernel`, `_kernel_1`); the
    kernel's one file holds both, and the cost hints count both launches and the GEMM result
    they pass through device memory (f32[B,32]: 128·B bytes)."""
    c = dsv4c.compile(mlp(), (x(),), backend="tvm", target=target, dynamic=DYNAMIC)
    rec = next(r for r in c.entries["forward"].executable.kernel_records()
               if r.name == "matmul_add_relu")  # fmt: skip
    first, second = f"{rec.stem}_kernel(", f"{rec.stem}_kernel_1("
    assert first in rec.source and second in rec.source
    assert rec.source.count(second) == 1  # defined once (OpenCL prototypes dropped)
    assert rec.launch["functions"] == 2
    assert rec.cost.row() == {"launches": 2, "materialised_bytes": "128*B", "gemm_tile": [16, 16]}


class LinearArgmax(torch.nn.Module):
    """A GEMM + bias, a softmax, and an int64 add (argmax + 1) that WGSL cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x).softmax(-1), x.argmax(-1) + 1


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("webgpu", "2 distinct kernels with webgpu code, 1 skipped (WebGPU (WGSL) has no 64-bit "
                   "integers)"),
        ("opencl", "3 distinct kernels with opencl code"),
        ("cpu", "3 distinct kernels with tvmscript code"),
    ],
)  # fmt: skip
def test_the_compile_summary_counts_kernel_records(target: str, code: str):
    """`dsv4c compile`'s line per entry point counts the kernels that have code (the records,
    one manifest row each) and those skipped with the reason; it said "5 distinct kernels"
    for all three (the report's cost rows: every op, the fallback argmax included)."""
    from dsv4c.cli import entry_summary

    c = dsv4c.compile(LinearArgmax(), (x(),), backend="tvm", target=target, dynamic=DYNAMIC)
    entry = c.report()["entries"]["forward"]
    line = entry_summary("forward", entry)
    assert line == f"forward: 7 ops captured -> 4 launches, {code}"
    assert entry["code"]["kernels"] == len(c.manifest["kernels"])
    assert len(entry["kernels"]) == 5  # the old count: one cost row per op
    assert entry["code"]["skipped"] == c.manifest.get("device_code", {}).get("skipped", {})


def test_source_targets_need_the_tvm_backend():
    for backend in ("triton", "reference"):
        with pytest.raises(DsvError, match="only the TVM backend writes; use --backend tvm"):
            dsv4c.compile(mlp(), (x(),), backend=backend, target="webgpu")


@pytest.mark.parametrize("target", ["opencl", "webgpu"])
def test_the_triton_backend_itself_refuses_source_targets(target: str):
    """Called directly, not only through dsv4c.compile (it compiled WebGPU 'kernels' before)."""
    from backends.triton import TritonBackend
    from frontend.capture import capture

    g = capture(mlp(), (x(),))
    with pytest.raises(ValueError, match=f"Triton backend cannot compile for target {target}") as e:
        TritonBackend().compile(g, target)
    assert "--backend tvm" in str(e.value) and "cpu, sm_80, sm_90" in str(e.value)
    assert TritonBackend().compile(g, "sm_90").target.name == "sm_90"  # GPU targets still compile


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(DsvError) as e:
        dsv4c.compile(mlp(), (x(),), backend="tvm", target="vulkan")
    for name in ("cpu", "sm_90", "gfx942", "opencl", "webgpu"):
        assert name in str(e.value)


def _compile_sm90(out: Path) -> dict:
    c = dsv4c.compile(mlp(), (x(),), backend="tvm", target="sm_90", dynamic=DYNAMIC,
                      output_dir=out)  # fmt: skip
    check_records(out)
    return c.report()["kernel_cache"]


def test_nvcc_cubins_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (CUDA toolkit missing): no cubins to cache")
    monkeypatch.setenv("DSV4C_CACHE_DIR", str(tmp_path / "cache"))
    assert _compile_sm90(tmp_path / "a") == {"hits": 0, "misses": 4}
    assert _compile_sm90(tmp_path / "b") == {"hits": 4, "misses": 0}
    cubins = sorted(p.name for p in (tmp_path / "a/kernels/sm_90").glob("*.cubin"))
    assert len(cubins) == 4
    for name in cubins:  # the cached cubins are the compiled ones, byte for byte
        a, b = (tmp_path / d / "kernels/sm_90" / name for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    entries = sorted((tmp_path / "cache/nvcc/sm_90").glob("*/*.cubin"))
    assert len(entries) == 4 and sorted(p.name for p in entries) == cubins
    damaged = entries[0]
    damaged.write_bytes(b"\0" + damaged.read_bytes()[1:])
    with pytest.warns(RuntimeWarning, match="is damaged .the sha256 of .* differs"):
        assert _compile_sm90(tmp_path / "c") == {"hits": 3, "misses": 1}
    assert (tmp_path / "c/kernels/sm_90" / damaged.name).read_bytes() == (
        tmp_path / "a/kernels/sm_90" / damaged.name
    ).read_bytes()  # rebuilt, not the damaged bytes
    assert _compile_sm90(tmp_path / "d") == {"hits": 4, "misses": 0}  # the entry was rewritten
    (damaged.parent / "result.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="is damaged .JSONDecodeError"):
        assert _compile_sm90(tmp_path / "e") == {"hits": 3, "misses": 1}
    row = json.loads((damaged.parent / "result.json").read_text())
    assert row["registers"] and row["blobs"] == [damaged.name]


def test_cost_hints_of_a_compound_dim_evaluate():
    """TVM names the variable of an input dim floor(T/4) `floor_T_4_`; the hints map it back to
    the IR dim, so the GEMM result the epilogue reads back (f32[T//4, 48]) evaluates."""
    import sympy

    import ir
    from backends.targets import get_target
    from backends.tvm.device import DeviceExecutable
    from passes.cost import evaluate

    f32 = ir.DType.f32
    rows = sympy.floor(ir.sym("T") / 4)
    bb = ir.Builder(name="mm_add")
    a = bb.input("a", ir.TensorType((rows, 16), f32))
    w = bb.input("w", ir.TensorType((16, 48), f32))
    bias = bb.input("bias", ir.TensorType((48,), f32))
    bb.output(bb.op("add", [bb.op("matmul", [a, w]), bias]))
    b = ir.Builder(name="compound")
    x = b.input("x", ir.TensorType((rows, 16), f32))
    w = b.input("w", ir.TensorType((16, 48), f32), role="parameter")
    bias = b.input("bias", ir.TensorType((48,), f32), role="parameter")
    b.output(b.op("fused.kernel", [x, w, bias], body=bb.build()))
    (rec,) = DeviceExecutable(b.build(), get_target("sm_90")).kernel_records()
    assert rec.cost.launches == 2 and rec.cost.row()["materialised_bytes"] == "192*floor(T/4)"
    assert evaluate(rec.cost.materialised_bytes, {"T": 41}) == 10 * 48 * 4


def test_triton_records_count_every_launch_of_a_call(monkeypatch: pytest.MonkeyPatch):
    """A tiny decode step on the Triton interpreter, its kernel launches counted one op at a
    time: each op's kernel record says as many launches as the op really makes (MoE experts 5
    phases, split-KV attention and the indexer 2 stages, compress_step step + finish). The
    records said 1 for all of them, so the side-by-side compare undercounted Triton."""
    from triton.runtime.interpreter import InterpretedFunction

    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny")).eval()
    with torch.no_grad():
        tokens = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(3))
        cache = model.prefill(tokens[:, :12], model.init_cache(2, 24))[1]
    args = (tokens[:, 12:], torch.tensor(12), cache)
    spec = dsv4c.MethodSpec(args, {"token": {0: "B"}, "cache": {0: "B"}})
    c = dsv4c.compile_methods(model, {"decode": spec}, backend="triton",
                              graph_key="test_device_targets tiny decode")  # fmt: skip
    exe = c.entries["decode"].executable
    made: list[int] = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda *a, **k: made.append(1) or run(*a, **k))
    counted: dict[str, list[int]] = {}  # the op's kernel -> launches of each call
    depth = [0]  # a cache update (`_update`) computes through `_compute`: count it once

    def counting(method):  # noqa: ANN001, ANN202
        def call(step, *rest):  # noqa: ANN001, ANN202
            before, depth[0] = len(made), depth[0] + 1
            try:
                return method(step, *rest)
            finally:
                depth[0] -= 1
                if depth[0] == 0 and step.launch is not None:
                    counted.setdefault(step.launch.source.key, []).append(len(made) - before)

        return call

    monkeypatch.setattr(exe, "_compute", counting(exe._compute))
    monkeypatch.setattr(exe, "_update", counting(exe._update))
    c.entry("decode")(*args, params=model.state_dict())
    records = {r.key: r for r in exe.kernel_records()}
    said = {key: records[key].cost.launches for key in counted}
    assert {key: set(n) for key, n in counted.items()} == {key: {n} for key, n in said.items()}
    by_name = {records[key].name: n for key, n in said.items()}
    assert by_name["moe_experts"] == 5 and by_name["sparse_mqa_decode"] == 2
    assert by_name["indexer_topk"] == 2 and by_name["compress_step"] == 2


def test_every_aot_variant_keeps_its_own_binary():
    """MoE experts compile as 5 variants (one per PHASE) in one AOT batch; each variant's
    cubin is its own (as long as ptxas said, the 5 distinct). All 5 were the bytes of the one
    written last: `aot_compile` names a kernel's files `<name>_<key>.<kind>` in one folder."""
    from backends.triton import TritonBackend
    from backends.targets import get_target
    from dsv4c.kernel_cache import aot_with_cache

    n, f32 = ir.sym("N"), ir.DType.f32
    b = ir.Builder(name="experts")
    x = b.input("x", ir.TensorType((n, 32), f32))
    weights = b.input("weights", ir.TensorType((n, 2), f32))
    experts = b.input("experts", ir.TensorType((n, 2), ir.DType.i64))
    w1, w3 = (b.input(w, ir.TensorType((4, 16, 32), f32), role="parameter") for w in "ab")
    w2 = b.input("c", ir.TensorType((4, 32, 16), f32), role="parameter")
    b.output(b.op("moe.experts", [x, weights, experts, w1, w3, w2]))
    exe = TritonBackend().compile(b.build(), "sm_90")
    try:
        binaries, files, _ = aot_with_cache(exe, get_target("sm_90"), {"N": 8}, use_cache=False)
    except RuntimeError as e:  # a triton wheel without the GPU toolchains
        pytest.skip(f"Triton cannot compile for sm_90 here: {e}")
    (variants,) = binaries.values()
    assert len(variants) == 5 and all(v.error is None for v in variants)
    cubins = [files[next(f for f in v.files if f.endswith(".cubin"))] for v in variants]
    assert [len(c) for c in cubins] == [v.binary_bytes for v in variants]
    assert len(set(cubins)) == 5
