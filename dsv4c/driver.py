"""The compile driver: capture -> passes.pipeline -> backend (-> AOT for GPU targets) -> artifact.

    c = compile(model, (tokens,), backend="triton", target="sm_90", method="prefill",
                dynamic={"tokens": {0: "B", 1: "T"}}, output_dir="out/")

`compile_methods` does the same for several entry points of one module (the CLI compiles
`prefill` and `decode` of a model into one artifact). Each phase is timed and announced through
`progress(phase, detail)`; the times go into `report.json`. With the graph cache on, methods after
the first are captured and run through the passes in forked worker processes at the same time
(`_start_workers`; `DSV4C_JOBS=1` turns that off).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ir
from backends.targets import Target, get_target, parallel_jobs
from backends.base import Executable, KernelRecord
from dsv4c.artifact import FORMAT, FORMAT_VERSION, versions
from dsv4c.compiled import Compiled, EntryPoint, signature
from dsv4c.errors import DsvError, UnavailableError

if TYPE_CHECKING:
    from passes import FusionPolicy

__all__ = [
    "BACKEND_NAMES",
    "MethodSpec",
    "check_backend_target",
    "compile",
    "compile_methods",
    "fusion_policy",
    "make_backend",
]

BACKEND_NAMES = ("reference", "triton", "tvm")
Progress = Callable[[str, str], None]  # (phase, detail)
DynamicSpec = Mapping[str, Mapping[int, str]] | None


@dataclass(frozen=True)
class MethodSpec:
    """One entry point to compile: example inputs, dynamic dims, symbol values for the report."""

    inputs: Sequence[Any]
    dynamic: DynamicSpec = None
    bindings: Mapping[str, int] | None = None  # default: the example inputs' sizes


@dataclass
class _Run:
    progress: Progress | None
    times: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        if self.progress:
            self.progress(name, detail)
        start = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        if self.progress:
            self.progress(name, f"done in {self.times[name]:.1f} s")


def fusion_policy(backend: str, tgt: Target) -> FusionPolicy | None:
    """What the generic fusion may group for `backend` on `tgt`; None: the default policy (what
    the Triton emitters take: one domain per kernel). TVM on the CPU lowers each body op to a
    loop nest of its own, so its kernels also take data movement (`backends.tvm.CPU_FUSION`)."""
    if backend == "tvm" and not tgt.is_gpu:
        from backends.tvm.runtime import CPU_FUSION

        return CPU_FUSION
    return None


def make_backend(name: str) -> Any:
    """The backend instance for `name`, or a `DsvError` saying why there is none."""
    import backends

    if name not in BACKEND_NAMES:
        raise DsvError(f"unknown backend {name!r}; known backends: {', '.join(BACKEND_NAMES)}")
    try:
        return backends.get_backend(name)
    except ImportError as e:
        raise UnavailableError(
            f"backend {name!r} is not available yet in this installation ({e}); "
            "use backend='triton' or 'reference'"
        ) from None


def compile(
    module: Any,
    example_inputs: Sequence[Any],
    *,
    backend: str = "reference",
    target: str | Target = "cpu",
    method: str = "forward",
    dynamic: DynamicSpec = None,
    output_dir: str | Path | None = None,
    bindings: Mapping[str, int] | None = None,
    progress: Progress | None = None,
    inplace: bool = False,
) -> Compiled:
    """Compile `module.<method>` for `target` with `backend` (see the module docstring).

    The module's parameters stay graph inputs: the result is bound to the module's current
    tensors (unless they are on the meta device) and any call may pass `params=` instead.
    `inplace`: calls write the cache updates into the caller's tensors (`dsv4c.compiled`);
    by default they return new tensors and leave the inputs as they were.
    """
    spec = MethodSpec(tuple(example_inputs), dynamic, bindings)
    return compile_methods(
        module,
        {method: spec},
        backend=backend,
        target=target,
        output_dir=output_dir,
        progress=progress,
        inplace=inplace,
    )


def compile_methods(
    module: Any,
    methods: Mapping[str, MethodSpec],
    *,
    backend: str = "reference",
    target: str | Target = "cpu",
    output_dir: str | Path | None = None,
    progress: Progress | None = None,
    model_info: Mapping[str, Any] | None = None,
    use_cache: bool = True,
    graph_key: str | None = None,
    inplace: bool = False,
) -> Compiled:
    """Compile several entry points of `module` into one `Compiled`. `graph_key` names what fully
    determines the module (e.g. a model preset's config): with it, capture + passes results are
    cached (graph_cache.py); `use_cache=False` bypasses that cache and the kernel cache.
    `inplace` as for `compile`."""
    from dsv4c import tuning
    from dsv4c.report import build_report, entry_report

    graph_key = graph_key if use_cache else None
    tgt = _target(target)
    check_backend_target(backend, tgt)
    be = make_backend(backend)
    run = _Run(progress)
    start = time.perf_counter()
    entries: dict[str, EntryPoint] = {}
    files: dict[str, bytes] = {}
    reports: dict[str, Any] = {}
    records: dict[str, list[KernelRecord]] = {}
    cache_stats = {"hits": 0, "misses": 0}
    bound = _bound_params(module)
    fusion = fusion_policy(backend, tgt)
    workers = _start_workers(module, methods, tgt, graph_key, run, fusion)
    for i, (method, spec) in enumerate(methods.items()):
        env = dict(spec.bindings or {})
        if method in workers and workers.pop(method).join(run):
            loaded = _Run(None)  # the worker's graph, from the cache: not a "hit" to announce
            g, summary = _lower(module, method, spec, tgt, env, loaded, graph_key, fusion)
            run.times[f"load {method}"] = sum(loaded.times.values())
            summary = summary | {"cached": False}
        else:
            g, summary = _lower(module, method, spec, tgt, env, run, graph_key, fusion)
        # TVM CPU kernels take their schedule knobs from the tuning database (dsv4c/tuning.py)
        with run.phase(f"backend {method}", f"{backend} for {tgt.name}"):
            with tuning.applied(backend, tgt, env):
                exe = be.compile(g, tgt)
        files[graph_file(method, i)] = ir.to_text(g).encode()
        with run.phase(f"codegen {method}", f"kernel sources for {tgt.name}"):
            found = kernel_list(exe)  # TVM GPU targets generate their source here
        if tgt.is_gpu and backend == "triton":
            with run.phase(f"kernels {method}", f"AOT for {tgt.name}"):
                binaries, blobs, stats = _aot(exe, tgt, env, use_cache, progress)
            found = [k.with_binaries(binaries.get(k.key, ())) for k in found]
            files |= {f"{kernel_dir(tgt)}/{name}": data for name, data in blobs.items()}
            cache_stats = {k: cache_stats[k] + stats[k] for k in cache_stats}
        if tgt.is_gpu and backend == "tvm" and not tgt.source_only:
            with run.phase(f"kernels {method}", f"nvcc for {tgt.name}"):
                binaries, blobs, stats = _nvcc(exe, use_cache)
            found = [k.with_binaries(binaries.get(k.key, ())) for k in found]
            files |= {f"{kernel_dir(tgt)}/{name}": data for name, data in blobs.items()}
            cache_stats = {k: cache_stats[k] + stats[k] for k in cache_stats}
        files |= source_files(found, tgt)
        if backend == "tvm" and not tgt.is_gpu:  # the built kernels: a load compiles nothing
            from backends.tvm.library import export_files

            with run.phase(f"library {method}", "CPU kernels as shared libraries"):
                files |= export_files(exe, f"kernels/{tgt.name}", method)
        records[method] = found
        entries[method] = EntryPoint(method, g, exe, tgt, bound)
        reports[method] = entry_report(summary, g, exe, env, tgt, found)
    run.times["total"] = time.perf_counter() - start
    manifest = build_manifest(entries, backend, tgt, records, model_info)
    if tgt.is_gpu and backend == "tvm":
        manifest["device_code"] = _device_code(tgt, [e.executable for e in entries.values()])
    report = build_report(manifest, reports, run.times, cache_stats)
    files["report.json"] = _json(report)
    compiled = Compiled(
        entries, backend=backend, target=tgt, manifest=manifest, files=files, inplace=inplace
    )
    if output_dir is not None:
        with run.phase("write", str(output_dir)):
            compiled.save(output_dir)
    return compiled


def _lower(
    module: Any,
    method: str,
    spec: MethodSpec,
    tgt: Target,
    env: dict[str, int],
    run: _Run,
    graph_key: str | None,
    fusion: FusionPolicy | None = None,
) -> tuple[ir.Graph, dict[str, Any]]:
    """Capture + pipeline (or their cached result); fills `env` from the example inputs when the
    spec gives no bindings; `fusion`: the generic fusion's policy (`fusion_policy`). Returns the
    final graph and the pipeline summary for the report."""
    import frontend
    import passes
    from dsv4c import graph_cache
    from dsv4c.report import pipeline_summary
    from passes.context import PassContext

    key = None
    if graph_key is not None:
        parts = {"dynamic": spec.dynamic, "bindings": spec.bindings, "target": tgt.name}
        parts["fusion"] = sorted(fusion.movement) if fusion is not None else None
        key = graph_cache.cache_key(graph_key, method, spec.inputs, parts)
        with run.phase(f"graph cache {method}", key[:12]):
            hit = graph_cache.get(key)
        if hit is not None:
            g, summary = hit
            env.update(summary["bindings"])
            if run.progress:
                run.progress(f"graph cache {method}", f"hit: {len(g.ops)} ops, capture skipped")
            return g, summary | {"cached": True}
    with run.phase(f"capture {method}", type(module).__name__):
        g0 = frontend.capture(module, spec.inputs, dynamic=spec.dynamic, method=method)
    env.update(env or _example_bindings(g0, spec.inputs))
    options: dict[str, Any] = {"bindings": dict(env)}
    if fusion is not None:
        options["fusion_policy"] = fusion
    ctx = PassContext.from_env(target=tgt.name, options=options)
    with run.phase(f"passes {method}", f"{len(g0.ops)} ops"):
        g = passes.pipeline(g0, target=tgt.name, ctx=ctx)
    summary = pipeline_summary(g0, ctx) | {"bindings": dict(env)}
    if key is not None:
        graph_cache.put(key, g, summary)
    return g, summary


@dataclass
class _Worker:
    """A forked process lowering one method into the graph cache (see `_start_workers`)."""

    method: str
    pid: int
    times_file: Path

    def join(self, run: _Run) -> bool:
        """Wait for the worker; True when its graph is in the cache. Its phase times join
        `run.times` marked "(worker)"; a failed worker only costs the time it took."""
        with run.phase(f"wait {self.method}", f"worker {self.pid}"):
            _, status = os.waitpid(self.pid, 0)
        try:
            times = json.loads(self.times_file.read_text()) if status == 0 else {}
        except (OSError, ValueError):
            times = {}
        finally:
            self.times_file.unlink(missing_ok=True)
        run.times |= {f"{k} (worker)": v for k, v in times.items()}
        if not times and run.progress:
            run.progress(f"wait {self.method}", "the worker failed; lowering here instead")
        return bool(times)


def _start_workers(
    module: Any,
    methods: Mapping[str, MethodSpec],
    tgt: Target,
    graph_key: str | None,
    run: _Run,
    fusion: FusionPolicy | None = None,
) -> dict[str, _Worker]:
    """Fork one process per method after the first to capture it and run the passes into the
    graph cache, while this process lowers the first: capture and passes are pure Python, so
    on two cores prefill and decode of a preset take about the time of the slower one. Only
    with the graph cache (it carries the graphs back) and more than one core; `DSV4C_JOBS=1`
    turns it off. Nothing is pickled: the child inherits the module and writes IR text."""
    jobs = parallel_jobs()
    if graph_key is None or len(methods) < 2 or jobs < 2 or not hasattr(os, "fork"):
        return {}
    workers: dict[str, _Worker] = {}
    for method, spec in list(methods.items())[1:jobs]:
        fd, name = tempfile.mkstemp(prefix=f"dsv4c-{method}-", suffix=".json")
        os.close(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: lower, leave the graph in the cache, report the times
            _worker_main(module, method, spec, tgt, graph_key, Path(name), fusion)
        workers[method] = _Worker(method, pid, Path(name))
        if run.progress:
            run.progress(f"worker {method}", f"capture + passes in process {pid}")
    return workers


def _worker_main(
    module: Any,
    method: str,
    spec: MethodSpec,
    tgt: Target,
    graph_key: str,
    times: Path,
    fusion: FusionPolicy | None,
) -> None:
    code = 1
    try:
        import torch

        torch.set_num_threads(1)  # the parent keeps the thread pool (OpenMP is not fork-safe)
        run = _Run(None)
        _lower(module, method, spec, tgt, dict(spec.bindings or {}), run, graph_key, fusion)
        times.write_text(json.dumps(run.times))
        code = 0
    except Exception as e:  # noqa: BLE001  (any failure: the parent lowers it and shows why)
        print(f"dsv4c: worker for {method} failed: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        os._exit(code)


def _target(target: str | Target) -> Target:
    from backends.targets import UnknownTargetError

    try:
        return get_target(target)
    except UnknownTargetError as e:
        raise DsvError(str(e)) from None


def _bound_params(module: Any) -> dict[str, Any] | None:
    state = getattr(module, "state_dict", None)
    if state is None:
        return None
    # non-persistent buffers (Hugging Face's rotary inv_freq) are graph inputs too
    buffers = dict(module.named_buffers()) if hasattr(module, "named_buffers") else {}
    tensors = {**buffers, **state()}
    if any(getattr(t, "is_meta", False) for t in tensors.values()):
        return None  # compiled on the meta device: weights come at run time
    return tensors


def _example_bindings(g: ir.Graph, inputs: Sequence[Any]) -> dict[str, int]:
    import torch.utils._pytree as pytree

    from ir.interpreter import bind_symbols

    runtime = [v for v in g.inputs if g.roles.get(v.name) != "parameter"]
    env = bind_symbols(runtime, pytree.tree_leaves(list(inputs)))
    return {s.name: int(n) for s, n in env.items()}


def _aot(exe: Any, tgt: Target, env: Mapping[str, int], use_cache: bool, progress: Any):
    from dsv4c.kernel_cache import aot_with_cache

    def tick(done: int, total: int) -> None:
        if progress:
            progress("kernels", f"{done}/{total} compiled")

    return aot_with_cache(exe, tgt, env, use_cache=use_cache, progress=tick)


def _nvcc(exe: Any, use_cache: bool) -> tuple[dict[str, list[Any]], dict[str, bytes], dict]:
    """The TVM GPU executable's cubins through the nvcc cache (`kernel_cache.nvcc_with_cache`)."""
    from backends.tvm.device import DeviceExecutable
    from dsv4c.kernel_cache import nvcc_with_cache

    if not isinstance(exe, DeviceExecutable):
        raise TypeError(f"expected the TVM backend's DeviceExecutable, got {type(exe).__name__}")
    return nvcc_with_cache(exe, use_cache=use_cache)


def _device_code(tgt: Target, executables: Sequence[Any]) -> dict[str, Any]:
    """What the manifest says about a TVM GPU artifact's code: its language, and binaries
    (cubins when nvcc was there: its version) or why there are none; `skipped`: the kernels
    with no code for this target (and why), which the artifact cannot hold."""
    from backends.tvm.device import nvcc_version

    skipped = {k: why for exe in executables for k, why in exe.skipped.items()}
    if tgt.source_only:
        language = tgt.backend  # "opencl" or "webgpu"
        why = (
            f"{language} source only: the device's {language} driver compiles it when the "
            "program is created; dsv4c writes no binaries for it"
        )
        return {"source": language, "binaries": None, "why": why, "skipped": skipped}
    nvcc = nvcc_version()
    if nvcc is None:
        why = "nvcc not found on PATH at compile"
        return {"source": "cuda", "binaries": None, "why": why, "skipped": skipped}
    return {"source": "cuda", "binaries": "cubin", "nvcc": nvcc, "skipped": skipped}


def check_backend_target(backend: str, tgt: Target) -> None:
    """Raise `DsvError` when `backend` cannot compile for `tgt` (OpenCL/WebGPU source comes from
    the TVM backend only)."""
    if tgt.source_only and backend != "tvm":
        raise DsvError(
            f"target {tgt.name} ({tgt.description}) is portable {tgt.backend} source, which only "
            f"the TVM backend writes; use --backend tvm (backend {backend!r} compiles for cpu and "
            "sm_*/gfx* targets)"
        )


def graph_file(method: str, index: int) -> str:
    return "graph.ir" if index == 0 else f"graph.{method}.ir"


def kernel_dir(tgt: Target) -> str:
    return f"kernels/{tgt.name}"


def kernel_list(exe: Executable) -> list[KernelRecord]:
    """The executable's distinct kernels as typed records (none for the reference)."""
    return list(exe.kernel_records())


def source_files(records: Sequence[KernelRecord], tgt: Target) -> dict[str, bytes]:
    """Kernel sources by artifact path: `kernels/<target>/<name>_<key>.<ext>`."""
    return {f"{kernel_dir(tgt)}/{k.source_file}": k.source.encode() for k in records}


def build_manifest(
    entries: Mapping[str, EntryPoint],
    backend: str,
    tgt: Target,
    records: Mapping[str, Sequence[KernelRecord]],
    model_info: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The manifest without its `files` table (`write_artifact` adds it). One kernel row per
    distinct key over all entry points: `KernelRecord.row` plus the entry points using it and
    the binaries of every variant any of them compiled."""
    kernels: dict[str, dict[str, Any]] = {}
    for method, found in records.items():
        for k in found:
            new = k.row(kernel_dir(tgt))
            if k.key not in kernels:
                kernels[k.key] = new | {"entries": [method]}
                continue
            row = kernels[k.key]
            if row["source"] != new["source"]:
                raise RuntimeError(f"two kernels share key {k.key}: {row['name']}, {k.name}")
            row["entries"].append(method)
            row["uses"] += new["uses"]
            _merge_binaries(row, new)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "backend": backend,
        "target": tgt.name,
        "target_description": tgt.description,
        "runs_on": tgt.torch_device or tgt.backend,  # "cpu", "cuda", "opencl" or "webgpu"
        "runnable_on_compile_host": runnable_here(tgt),
        "model": dict(model_info or {}),
        "entry_points": [
            {"name": e.name, "graph": graph_file(e.name, i)} | signature(e.graph)
            for i, e in enumerate(entries.values())
        ],
        "kernels": list(kernels.values()),
    }


def _merge_binaries(row: dict[str, Any], other: Mapping[str, Any]) -> None:
    """Add `other`'s binaries (variants another entry point compiled) to `row`."""
    have = {(b["target"], b["variant"]) for b in row["binaries"]}
    for b in other["binaries"]:
        if (b["target"], b["variant"]) not in have:
            row["binaries"].append(b)
            row["files"] += b["files"]
    for loc in other["locations"]:
        if loc not in row["locations"]:
            row["locations"].append(loc)


def runnable_here(tgt: Target) -> dict[str, Any]:
    """Whether this machine can run code for `tgt`, and if not why (recorded in the manifest:
    GPU artifacts are usually compiled ahead of time on machines without that GPU)."""
    if not tgt.is_gpu:
        return {"ok": True, "reason": "CPU target"}
    if tgt.source_only:
        return {"ok": False, "reason": f"{tgt.backend} source: dsv4c launches no such kernels"}
    import torch

    if not torch.cuda.is_available():
        return {"ok": False, "reason": f"no GPU here; {tgt.name} kernels compiled ahead of time"}
    name = torch.cuda.get_device_name()
    if tgt.backend == "cuda" and torch.version.cuda is not None:
        major, minor = torch.cuda.get_device_capability()
        if major * 10 + minor != tgt.arch:
            return {"ok": False, "reason": f"this GPU ({name}) is sm_{major}{minor}"}
    return {"ok": True, "reason": name}


def _json(obj: Any) -> bytes:
    import json

    return (json.dumps(obj, indent=1, default=str) + "\n").encode()
