"""dsv4c.compile / Compiled / save / load: round trips against eager, tampering, wrong inputs."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from dsv4c_helpers import compiled, eager, mlp, x

import dsv4c
import ir
from dsv4c.artifact import sha256


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_run_save_load_round_trip(tmp_path: Path, backend: str) -> None:
    c = compiled(backend)
    for batch in (4, 7):  # B is symbolic: one compile serves both
        (got,) = c(x(batch, seed=batch))
        torch.testing.assert_close(got, eager(x(batch, seed=batch)), rtol=1e-5, atol=1e-6)
    path = c.save(tmp_path / "art")
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"manifest.json", "graph.ir", "report.json"} <= names
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json", "manifest.json.sha256"}  # all hashed
    assert manifest["versions"]["torch"] == metadata.version("torch")
    (entry,) = manifest["entry_points"]
    assert entry["inputs"] == [{"name": "x", "type": "f32[B,16]", "role": "activation"}]
    assert entry["outputs"][0]["type"] == "f32[B,8]"
    if backend == "triton":
        assert manifest["kernels"] and all(k["files"] for k in manifest["kernels"])
        assert any(n.startswith("kernels/cpu/") and n.endswith(".py") for n in names)

    loaded = dsv4c.load(path, params=mlp().state_dict())
    assert loaded.graph == c.graph
    (got,) = loaded(x(5, seed=9))
    torch.testing.assert_close(got, eager(x(5, seed=9)), rtol=1e-5, atol=1e-6)


def test_gpu_target_compiles_ahead_of_time_and_cache_hits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSV4C_CACHE_DIR", str(tmp_path / "cache"))
    args = {"backend": "triton", "target": "sm_90", "dynamic": {"x": {0: "B"}}}
    first = dsv4c.compile(mlp(), (x(),), **args, output_dir=tmp_path / "a")
    report = first.report()
    assert report["kernel_cache"]["misses"] > 0 and report["kernel_cache"]["hits"] == 0
    assert all(r["error"] is None and r["registers"] for r in report["aot"])
    assert any(f.endswith(".cubin") for f in first.files)
    assert any(f.endswith(".ptx") for f in first.files)
    assert first.manifest["runs_on"] == "cuda"
    if not torch.cuda.is_available():
        assert first.manifest["runnable_on_compile_host"] == {
            "ok": False,
            "reason": "no GPU here; sm_90 kernels compiled ahead of time",
        }
    with pytest.raises(dsv4c.TargetMismatchError, match="sm_90.*cuda tensors, got a tensor on cpu"):
        first(x())

    second = dsv4c.compile(mlp(), (x(),), **args)
    cache = second.report()["kernel_cache"]
    assert cache == {"hits": report["kernel_cache"]["misses"], "misses": 0}
    binaries = [f for f in first.files if f.endswith(".cubin")]
    assert all(first.files[f] == second.files[f] for f in binaries)
    loaded = dsv4c.load(tmp_path / "a", target="sm_90")
    assert loaded.target.name == "sm_90"


def test_tampered_missing_and_foreign_artifacts_are_refused(tmp_path: Path) -> None:
    path = compiled("triton").save(tmp_path / "art")
    kernel = next((path / "kernels" / "cpu").glob("*.py"))
    text = kernel.read_text()
    kernel.write_text(text.replace("tl.", "tl .", 1))
    rel = kernel.relative_to(path).as_posix()
    with pytest.raises(dsv4c.ArtifactError, match=f"file {rel} was altered: "):
        dsv4c.load(path)
    kernel.unlink()
    with pytest.raises(dsv4c.ArtifactError, match=f"file {rel} is missing"):
        dsv4c.load(path)
    kernel.write_text(text)
    dsv4c.load(path)  # restored: fine again

    with pytest.raises(dsv4c.TargetMismatchError, match="compiled for target cpu.*expected sm_90"):
        dsv4c.load(path, target="sm_90")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["versions"]["triton"] = "0.0.1"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(dsv4c.ArtifactError, match="manifest.json was altered"):
        dsv4c.load(path)
    sidecar = f"{sha256((path / 'manifest.json').read_bytes())}  manifest.json\n"
    (path / "manifest.json.sha256").write_text(sidecar)  # re-signed: the versions differ
    with pytest.raises(dsv4c.ArtifactError, match="compiled with triton 0.0.1, this environment"):
        dsv4c.load(path)
    with pytest.raises(dsv4c.ArtifactError, match="does not exist"):
        dsv4c.load(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(dsv4c.ArtifactError, match="no manifest.json"):
        dsv4c.load(tmp_path / "junk")
    with pytest.raises(dsv4c.ArtifactError, match="not empty and holds no manifest.json"):
        compiled().save(tmp_path / "junk")  # never clobbers a directory that is not ours
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_wrong_inputs_say_which_and_what_was_expected(tmp_path: Path) -> None:
    c = compiled()
    with pytest.raises(dsv4c.InputError, match=r"input x: expected f32\[B,16\], got i64\[4, 16\]"):
        c(torch.zeros(4, 16, dtype=torch.long))
    with pytest.raises(dsv4c.InputError, match=r"expected f32\[B,16\], got f32\[4, 15\]"):
        c(torch.zeros(4, 15))
    with pytest.raises(dsv4c.InputError, match=r"expected 1 input tensor\(s\) \(x: f32\[B,16\]\)"):
        c(x(), x())
    loaded = dsv4c.load(c.save(tmp_path / "art"))  # weights are not part of the artifact
    with pytest.raises(dsv4c.InputError, match="needs 6 parameter tensor"):
        loaded(x())
    params = dict(mlp().state_dict())
    params["up.weight"] = params["up.weight"][:, :8]
    with pytest.raises(dsv4c.InputError, match=r"up.weight: expected f32\[32,16\]"):
        loaded(x(), params=params)
    del params["up.weight"]
    with pytest.raises(dsv4c.InputError, match="params lacks 1 of 6 parameter"):
        loaded(x(), params=params)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(dsv4c.DsvError, match="unknown target 'sm_99'; known targets: cpu"):
        dsv4c.compile(mlp(), (x(),), target="sm_99")
    with pytest.raises(dsv4c.DsvError, match="unknown backend 'cuda'; known backends"):
        dsv4c.compile(mlp(), (x(),), backend="cuda")


def test_graph_cache_skips_capture_on_a_second_compile(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSV4C_CACHE_DIR", str(tmp_path / "cache"))
    phases: list[str] = []
    spec = dsv4c.MethodSpec((x(),), {"x": {0: "B"}})

    def build() -> dsv4c.Compiled:
        return dsv4c.compile_methods(
            mlp(),
            {"forward": spec},
            graph_key="tests.MLP v1",
            progress=lambda phase, detail: phases.append(phase),
        )

    first = build()
    assert "capture forward" in phases and not first.report()["entries"]["forward"]["graph_cached"]
    phases.clear()
    second = build()
    assert "capture forward" not in phases and "passes forward" not in phases
    assert second.report()["entries"]["forward"]["graph_cached"]
    assert second.graph == first.graph
    (got,) = second(x(6, seed=2))
    torch.testing.assert_close(got, eager(x(6, seed=2)), rtol=1e-5, atol=1e-6)

    # an entry edited on disk (still a valid graph: only a source line differs) is a miss
    (entry,) = (tmp_path / "cache" / "graphs").iterdir()
    text = (entry / "graph.ir").read_text()
    edited = text.replace("dsv4c_helpers.py:22", "dsv4c_helpers.py:23", 1)
    assert edited != text
    (entry / "graph.ir").write_text(edited)
    phases.clear()
    third = build()
    assert "capture forward" in phases and not third.report()["entries"]["forward"]["graph_cached"]


class TopK(torch.nn.Module):
    """Ops without a Triton kernel (top-k, cumsum) next to ones with one: still compiles."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = torch.topk(x.exp(), 3, dim=-1).values
        return torch.cumsum(vals, -1) * 2.0


def test_unfusable_ops_fall_back_to_the_reference_and_stay_correct() -> None:
    c = dsv4c.compile(TopK(), (x(),), backend="triton", dynamic={"x": {0: "B"}})
    (got,) = c(x(6, seed=4))
    torch.testing.assert_close(got, TopK()(x(6, seed=4)))
    (entry,) = c.report()["entries"].values()
    assert {f["op"] for f in entry["fallbacks"]} >= {"topk"}
    assert all(f["reason"] for f in entry["fallbacks"])
    assert any(k["runs"] == "kernel" for k in entry["kernels"])


class WithState(torch.nn.Module):
    """A dict input, like the model's cache: its tensors are inputs named `state.<key>`."""

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return x * state["scale"] + state["shift"]


def test_dict_inputs_are_matched_by_key() -> None:
    state = {"scale": torch.full((16,), 2.0), "shift": torch.arange(16.0)}
    c = dsv4c.compile(WithState(), (x(), state))
    names = [i["name"] for i in c.manifest["entry_points"][0]["inputs"]]
    assert names == ["x", "state.scale", "state.shift"]
    (got,) = c(x(), {"shift": state["shift"], "scale": state["scale"]})  # other key order
    torch.testing.assert_close(got, WithState()(x(), state))
    with pytest.raises(dsv4c.InputError, match=r"input state has other keys than compiled"):
        c(x(), {"scale": state["scale"], "bias": state["shift"]})


class TwoMethods(torch.nn.Module):
    """Two entry points, like a model's prefill and decode."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x * 2.0).log()


def _two_methods(tmp_path: Path, jobs: str, phases: list[str]) -> dsv4c.Compiled:
    spec = dsv4c.MethodSpec((x(),), {"x": {0: "B"}})
    return dsv4c.compile_methods(
        TwoMethods(),
        {"forward": spec, "scaled": spec},
        graph_key=f"tests.TwoMethods jobs={jobs}",
        progress=lambda phase, detail: phases.append(phase),
    )


def test_second_method_is_lowered_in_a_worker_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSV4C_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DSV4C_JOBS", "2")
    phases: list[str] = []
    c = _two_methods(tmp_path, "2", phases)
    assert "worker scaled" in phases and "capture scaled" not in phases
    times = c.report()["compile_times_s"]
    assert times["capture scaled (worker)"] > 0 and "load scaled" in times
    assert not c.report()["entries"]["scaled"]["graph_cached"]

    monkeypatch.setenv("DSV4C_JOBS", "1")
    alone = _two_methods(tmp_path, "1", phases := [])
    assert "worker scaled" not in phases and "capture scaled" in phases
    assert ir.to_text(c.entries["scaled"].graph) == ir.to_text(alone.entries["scaled"].graph)
    (got,) = c.entries["scaled"](x(5, seed=3))
    with torch.no_grad():
        want = TwoMethods().scaled(x(5, seed=3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_failed_worker_leaves_the_method_to_the_parent(tmp_path: Path, monkeypatch) -> None:
    import os

    from dsv4c import driver

    monkeypatch.setenv("DSV4C_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DSV4C_JOBS", "2")
    parent, lower = os.getpid(), driver._lower

    def fails_in_the_child(*args, **kwargs):
        if os.getpid() != parent:
            raise MemoryError("simulated")
        return lower(*args, **kwargs)

    monkeypatch.setattr(driver, "_lower", fails_in_the_child)
    phases: list[str] = []
    c = _two_methods(tmp_path, "fail", phases)
    assert "worker scaled" in phases and "capture scaled" in phases
    (got,) = c.entries["scaled"](x(5, seed=3))
    with torch.no_grad():
        torch.testing.assert_close(got, TwoMethods().scaled(x(5, seed=3)), rtol=1e-5, atol=1e-6)
