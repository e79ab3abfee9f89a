"""Core ATen coverage measured with PyTorch's OpInfo samples.

    python -m benchmarks.opinfo_coverage -o opinfo_coverage.json            # float32, bfloat16
    python -m benchmarks.opinfo_coverage --ops add,histc --samples 2 --backends tvm,triton
    python -m benchmarks.opinfo_coverage -o benchmarks/opinfo_coverage.json \
        --samples 2 --backends tvm,triton --models                           # the recorded sweep

For every OpInfo in `torch.testing._internal.common_methods_invocations.op_db` whose ATen op is
in the Core ATen opset (an overload tagged `torch.Tag.core`), a few samples per dtype go through
`frontend.capture` -> `ir.interpret` and, with --backends, `dsv4c.compile` for TVM / the Triton
interpreter (the first --backend-samples samples per dtype), each checked against eager PyTorch.
Per op the JSON records captured / interpreted / tvm / triton and the first error. A backend
column is true or false when the backend lowered at least one of the sample's ops to a kernel,
null when it was not tried or lowered none (every op ran its torch reference: `not_lowered`
lists such ops per backend). The summary gives the fraction of Core ATen ops with an OpInfo that
pass capture + interpret in every tried dtype, and per backend passed/lowered. With --models,
`models` names the listed Hugging Face models (tests/frontend/hf_tiny.py) whose captured program
uses the op, and the summary says which of those ops fail a backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

import ir
from frontend import capture

DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}
MAX_NUMEL = 4096  # larger samples take long to interpret and add no coverage
# ops whose values are unspecified or random: only shapes and dtypes are compared
UNSPECIFIED = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "randn",
               "rand", "randint", "normal", "bernoulli", "uniform"}  # fmt: skip


JSON_PATH = Path(__file__).with_name("opinfo_coverage.json")  # the recorded sweep
# The recorded sweep's figures (float32 and bfloat16, 2 samples each, 1 lowered sample through
# each backend), which tests/frontend/test_opinfo_coverage.py holds the JSON to; the test also
# runs SUBSET (capture + interpret, float32, one sample each; fails below SUBSET_FLOOR) and
# BACKEND_SPOT_CHECK through both backends live.
RECORDED_COVERAGE = 0.903  # 121 of 134 Core ATen OpInfos with samples (opinfo_coverage.json)
RECORDED_BACKENDS = {"tvm": 89, "triton": 81}  # ops each backend lowered and passed (of 92, 83)
BACKEND_SPOT_CHECK = ("where", "mul", "mean")
SUBSET = ("where", "amax", "cumsum", "gather", "split_with_sizes", "index_select", "max",
          "topk", "atan2", "native_group_norm", "diagonal", "cat")  # fmt: skip
SUBSET_FLOOR = 1.0  # every op of the subset passes today


@dataclass
class OpResult:
    """What one OpInfo achieved; a stage is None when it was not tried."""

    name: str
    aten: str
    dtypes: list[str] = field(default_factory=list)
    samples: int = 0
    captured: bool | None = None
    interpreted: bool | None = None
    tvm: bool | None = None
    triton: bool | None = None
    error: str | None = None
    not_lowered: dict[str, list[str]] = field(default_factory=dict)  # backend -> IR ops
    models: list[str] = field(default_factory=list)  # listed HF models whose program uses it


def core_aten_names() -> set[str]:
    """Names of the ATen overload packets that have at least one Core-ATen-tagged overload."""
    names = set()
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            if torch.Tag.core in getattr(packet, overload).tags:
                names.add(name)
                break
    return names


def core_opinfos(only: set[str] | None = None) -> list[Any]:
    """OpInfos whose ATen name is a Core ATen op (variants such as `max.reduction_with_dim` too)."""
    from torch.testing._internal.common_methods_invocations import op_db

    core = core_aten_names()
    picked = []
    for info in op_db:
        aten_name = info.aten_name or info.name
        if aten_name not in core:
            continue
        if only is not None and info.name not in only and aten_name not in only:
            continue
        picked.append(info)
    return picked


_SLOT = object()  # where a sample's tensor goes (None is a real argument value)


class _Call(torch.nn.Module):
    """`op(*args, **kwargs)` with the sample's tensors as the module's inputs."""

    def __init__(self, fn: Any, spec: Any, leaves: list[Any]) -> None:
        super().__init__()
        self.fn, self.spec = fn, spec
        self.constants = [_SLOT if isinstance(x, torch.Tensor) else x for x in leaves]

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        leaves = [next(it) if c is _SLOT else c for c in self.constants]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.fn(*args, **kwargs)


def _split(sample: Any) -> tuple[list[Any], Any, list[torch.Tensor]] | None:
    call = ((sample.input, *sample.args), dict(sample.kwargs))
    leaves, spec = pytree.tree_flatten(call)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if sum(t.numel() for t in tensors) > MAX_NUMEL:
        return None
    return leaves, spec, tensors


def _tensors(out: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _close(
    got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype, values: bool = True
) -> None:
    rtol, atol = TOLERANCE[dtype]
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} outputs, eager has {len(want)}")
    for g, w in zip(got, want):
        if not values:
            same = g.shape == w.shape and g.dtype == w.dtype
            assert same, f"{g.shape} {g.dtype} vs {w.shape} {w.dtype}"
            continue
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True, check_stride=False)


def run_sample(info: Any, sample: Any, dtype: torch.dtype, backends: tuple[str, ...]) -> dict:
    """Stages this sample passed: {"captured": bool, "interpreted": bool, "tvm": ..., ...}; a
    backend's stage is None when it lowered none of the graph's ops."""
    parts = _split(sample)
    if parts is None:
        return {}
    leaves, spec, tensors = parts
    module = _Call(info.op, spec, leaves)
    values = (info.aten_name or info.name) not in UNSPECIFIED
    with torch.no_grad():
        want = _tensors(module(*tensors))
    result: dict[str, Any] = {"captured": False}
    try:
        graph = capture(module, tensors)
    except Exception as e:  # noqa: BLE001 — the sweep records every failure
        return result | {"interpreted": False, "error": _first_line(e)}
    result["captured"] = True
    try:
        _close(list(ir.interpret(graph, *tensors)), want, dtype, values)
        result["interpreted"] = True
    except Exception as e:  # noqa: BLE001
        return result | {"interpreted": False, "error": _first_line(e)}
    for backend in backends:
        out = _run_backend(backend, module, tensors, want, dtype, values)
        result["not_lowered"] = result.get("not_lowered", {}) | out.pop("not_lowered", {})
        if "error" in out:
            result.setdefault("error", out.pop("error"))
        result |= out
    return result


def _run_backend(
    backend: str, module: Any, tensors: list, want: list, dtype: torch.dtype, values: bool
) -> dict[str, Any]:
    """{backend: True | False | None, "not_lowered": {backend: ops}, "error": ...}."""
    import dsv4c

    try:
        compiled = dsv4c.compile(module, tuple(tensors), backend=backend, target="cpu")
    except Exception as e:  # noqa: BLE001
        return {backend: False, "error": f"{backend}: {_first_line(e)}"}
    entries = compiled.report()["entries"].values()
    kernels = [k for e in entries for k in e["kernels"] if k["runs"] == "kernel"]
    reference = sorted({f["op"] for e in entries for f in e["fallbacks"]})
    out: dict[str, Any] = {"not_lowered": {backend: reference}} if reference else {}
    if not kernels:
        return out | {backend: None}
    try:
        _close(list(compiled(*tensors)), want, dtype, values)
    except Exception as e:  # noqa: BLE001
        return out | {backend: False, "error": f"{backend}: {_first_line(e)}"}
    return out | {backend: True}


def _first_line(e: BaseException) -> str:
    text = [line.strip() for line in str(e).strip().splitlines()] or [""]
    detail = text[0] if len(text) == 1 else f"{text[0]} ... {text[-1]}"
    return f"{type(e).__name__}: {detail}"[:300]


def run_op(
    info: Any,
    samples: int,
    backends: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    backend_dtypes: tuple[torch.dtype, ...] = DTYPES,
    backend_samples: int = 1,
) -> OpResult:
    """Up to `samples` samples per supported dtype in `dtypes`; for the dtypes also in
    `backend_dtypes`, backends see samples until `backend_samples` of them were lowered (up to
    MAX_PROBES samples past `samples`, which count for the backends only). A stage passes when
    every sample that tried it passes it."""
    res = OpResult(name=info.name, aten=info.aten_name or info.name)
    stages: dict[str, bool] = {}
    for dtype in dtypes:
        if dtype not in info.supported_dtypes("cpu"):
            continue
        res.dtypes.append(str(dtype).removeprefix("torch."))
        wanted = backends if dtype in backend_dtypes else ()
        try:
            res.samples += _run_dtype(info, dtype, samples, wanted, backend_samples, res, stages)
        except Exception as e:  # noqa: BLE001 — a sample generator that fails counts as a miss
            stages["captured"] = False
            res.error = res.error or f"samples: {_first_line(e)}"
    for stage, ok in stages.items():
        setattr(res, stage, ok)
    if res.captured and "interpreted" not in stages:
        res.interpreted = False
    return res


MAX_PROBES = 6  # samples past --samples a backend may see to find one it lowers


def _run_dtype(
    info: Any, dtype: torch.dtype, samples: int, backends: tuple[str, ...],
    backend_samples: int, res: OpResult, stages: dict[str, bool],
) -> int:  # fmt: skip
    """One dtype's samples into `res` and `stages`; returns how many counted as tried."""
    tried, probes, lowered = 0, 0, dict.fromkeys(backends, 0)
    for sample in info.sample_inputs("cpu", dtype, requires_grad=False):
        # a backend sees samples until it has lowered `backend_samples` of them (0-d samples,
        # say, run their reference on Triton: they say nothing of its kernels)
        through = tuple(b for b in backends if lowered[b] < backend_samples)
        probe = tried >= samples
        if probe and (not through or probes >= MAX_PROBES):
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run_sample(info, sample, dtype, through)
        if not out:
            continue
        probes, tried = (probes + 1, tried) if probe else (probes, tried + 1)
        lowered.update({b: lowered[b] + 1 for b in through if out.get(b) is not None})
        for backend, ops in out.get("not_lowered", {}).items():
            res.not_lowered[backend] = sorted(set(res.not_lowered.get(backend, [])) | set(ops))
        for stage in backends if probe else ("captured", "interpreted", *backends):
            if out.get(stage) is not None:
                stages[stage] = stages.get(stage, True) and bool(out[stage])
        error = out.get("error")
        if error and res.error is None and (not probe or error.startswith(through)):
            res.error = f"{res.dtypes[-1]}: {error}"
    return tried


def summary(results: list[OpResult]) -> dict[str, Any]:
    tried = [r for r in results if r.samples]
    ok = [r for r in tried if r.captured and r.interpreted]
    out = {
        "core_ops_with_opinfo": len(results),
        "with_samples": len(tried),
        "captured": sum(bool(r.captured) for r in tried),
        "captured_and_interpreted": len(ok),
        "coverage": round(len(ok) / max(len(tried), 1), 4),
    }
    for backend in ("tvm", "triton"):
        ran = [r for r in tried if getattr(r, backend) is not None]
        if ran:  # passed / lowered (ops whose samples the backend ran as kernels)
            out[backend] = f"{sum(bool(getattr(r, backend)) for r in ran)}/{len(ran)}"
            out[f"{backend}_not_lowered"] = sum(
                1 for r in tried if getattr(r, backend) is None and backend in r.not_lowered
            )
    return out


def model_ops() -> dict[str, set[str]]:
    """ATen op names (overload packets) in each listed Hugging Face model's program as capture
    sees it: exported, then lowered with the core-ATen decompositions minus `capture.KEEP`."""
    import importlib.util

    from frontend.capture import KEEP
    from frontend.outputs import plain_outputs

    path = Path(__file__).resolve().parents[1] / "tests" / "frontend" / "hf_tiny.py"
    spec = importlib.util.spec_from_file_location("hf_tiny", path)
    hf_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf_tiny)

    class Logits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor) -> Any:
            return plain_outputs(self.model(ids), "auto")

    table = torch.export.default_decompositions()
    for op in KEEP:
        table.pop(op, None)
    found = {}
    for name, build in hf_tiny.MODELS.items():
        program = torch.export.export(Logits(build()), (hf_tiny.tokens(1, 12),), strict=False)
        nodes = program.run_decompositions(table).graph.nodes
        targets = [n.target for n in nodes if isinstance(n.target, torch._ops.OpOverload)]
        found[name] = {t.name().split("::")[1].split(".")[0] for t in targets}
    return found


def model_summary(results: list[OpResult], backends: tuple[str, ...]) -> dict[str, Any]:
    """The swept ops the listed models use: those failing capture + interpret, and per backend
    those that fail it or that it does not lower (they run their torch reference there)."""
    used = [r for r in results if r.models and r.samples]
    ok = [r for r in used if r.captured and r.interpreted]

    def names(rows: list[OpResult]) -> list[str]:
        return sorted({r.name for r in rows})

    out: dict[str, Any] = {
        "model_ops_swept": len(names(used)),
        "model_ops_failing_interpret": names([r for r in used if r not in ok]),
    }
    for backend in backends:
        out[f"model_ops_failing_{backend}"] = names([r for r in ok if getattr(r, backend) is False])
        out[f"model_ops_not_lowered_{backend}"] = names(
            [r for r in ok if getattr(r, backend) is None]
        )
    return out


def write_json(path: Path, payload: dict) -> None:
    """Atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, default=Path("opinfo_coverage.json"))
    p.add_argument("--ops", help="comma-separated OpInfo or ATen names (default: all core ops)")
    p.add_argument("--samples", type=int, default=3, help="samples per op and dtype")
    p.add_argument("--backends", default="", help="also run these: tvm,triton")
    p.add_argument(
        "--backend-samples", type=int, default=1, help="lowered samples per op and dtype"
    )
    p.add_argument("--backend-dtypes", default="float32,bfloat16", help="dtypes for backends")
    p.add_argument("--models", action="store_true", help="mark the ops the HF models use")
    p.add_argument("--resume", action="store_true", help="keep the ops --output already has")
    args = p.parse_args(argv)
    if "triton" in args.backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    only = set(args.ops.split(",")) if args.ops else None
    backends = tuple(b for b in args.backends.split(",") if b)
    backend_dtypes = tuple(getattr(torch, d) for d in args.backend_dtypes.split(",") if d)
    infos = core_opinfos(only)
    done, used, seconds = _previous(args.output, infos) if args.resume else ([], None, 0.0)
    if used is None:
        used = {m: sorted(ops) for m, ops in model_ops().items()} if args.models else {}
    start = time.time()
    results = list(done)
    for i, info in enumerate(infos[len(done) :], start=len(done)):
        r = run_op(info, args.samples, backends, DTYPES, backend_dtypes, args.backend_samples)
        r.models = sorted(m for m, ops in used.items() if r.aten in ops)
        results.append(r)
        print(f"[{i + 1}/{len(infos)}] {r.name}: captured={r.captured} interpreted={r.interpreted}"
              f" tvm={r.tvm} triton={r.triton} {r.error or ''}"[:200], file=sys.stderr)  # fmt: skip
        complete = len(results) == len(infos)
        extra = model_summary(results, backends) if used else {}
        payload = {
            "summary": summary(results) | extra
            | {"seconds": round(seconds + time.time() - start, 1)},
            "complete": complete,  # a partial file after each op: --resume goes on from it
            "torch": torch.__version__,
            "options": {"samples": args.samples, "backend_samples": args.backend_samples,
                        "backend_dtypes": args.backend_dtypes.split(",")},
            "model_ops": used,
            "ops": [asdict(r) for r in results],
        }  # fmt: skip
        write_json(args.output, payload)
    print(json.dumps(payload["summary"], indent=1))
    return 0


def _previous(path: Path, infos: list[Any]) -> tuple[list[OpResult], dict | None, float]:
    """The rows a partial run wrote for the first of `infos` (same names, same order)."""
    if not path.exists():
        return [], None, 0.0
    old = json.loads(path.read_text())
    rows = [OpResult(**r) for r in old.get("ops", [])]
    names = [i.name for i in infos]
    if [r.name for r in rows] != names[: len(rows)]:
        raise SystemExit(f"{path} holds other ops than this run would sweep; drop --resume")
    return rows, old.get("model_ops"), old.get("summary", {}).get("seconds", 0.0)


if __name__ == "__main__":
    raise SystemExit(main())
