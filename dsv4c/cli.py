"""The `dsv4c` command line.

    dsv4c compile --model tiny --backend triton --target sm_90 -o out/    # prefill + decode
    dsv4c run out/ --prompt-len 32 --gen 16                               # tokens/s, vs eager
    dsv4c compile --model tiny-512 --mesh tp=2,ep=2 --backend tvm -o d/   # sharded (scale-out)
    dsv4c run d/ --nproc 4                                    # 4 local ranks (or under torchrun)
    dsv4c ir --model tiny --after fuse_elementwise                        # IR after a pass
    dsv4c ir --model tiny --explain mul_one                               # why a rule (not) fires
    dsv4c compile --model tiny-512 --backend tvm --target opencl -o cl/   # or webgpu: source
    dsv4c report out/                                                     # out/report.html
    dsv4c bench --model small --backends eager,inductor,tvm,tvm-relax     # side by side
    dsv4c tune --model tiny --target cpu                                  # CPU schedules -> DB

Errors (unknown model, target or backend, a bad directory, unreadable weights) print one line and
exit with status 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

# V4 itself, then its attention variants (models/config.py: V3.2's DSA, NSA) at the same sizes
PRESETS = (
    "tiny", "tiny-512", "small", "v4-flash", "v4-pro",
    "tiny-dsa", "v4-flash-dsa", "v4-pro-dsa", "tiny-nsa", "v4-flash-nsa", "v4-pro-nsa",
)  # fmt: skip
TARGET_HELP = (
    "cpu, sm_80, sm_90, sm_100, sm_120, gfx942, gfx950; opencl, webgpu (--backend tvm only: "
    "OpenCL C / WGSL source, no binaries)"
)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(phase: str, detail: str) -> None:
    _say(f"  [{phase}] {detail}")


# --- models --------------------------------------------------------------------------------


def _config(preset: str) -> Any:
    from models.deepseek_v4 import Config

    if preset not in PRESETS:
        raise ValueError(f"unknown model {preset!r}; known models: {', '.join(PRESETS)}")
    return Config.preset(preset)


def _meta_model(preset: str) -> Any:
    import torch

    from models.deepseek_v4 import Transformer

    with torch.device("meta"):
        return Transformer(_config(preset)).eval()


def model_methods(model: Any, max_len: int) -> dict[str, Any]:
    """Example inputs of the prefill (with cache) and decode entry points, batch `B` symbolic and
    prompt length `T` symbolic; the cache holds `max_len` positions."""
    import torch

    from dsv4c.driver import MethodSpec

    dev = next(model.parameters()).device
    cache = model.init_cache(2, max_len)
    tokens = torch.zeros(2, min(24, max_len - 1), dtype=torch.long, device=dev)
    token = torch.zeros(2, 1, dtype=torch.long, device=dev)
    pos = torch.tensor(min(16, max_len - 1), device=dev)
    return {
        "prefill": MethodSpec(
            (tokens, cache), {"tokens": {0: "B", 1: "T"}, "cache": {0: "B"}}, {"B": 1, "T": 4096}
        ),
        "decode": MethodSpec((token, pos, cache), {"token": {0: "B"}, "cache": {0: "B"}}, {"B": 1}),
    }


METHODS = ("prefill", "decode")


def input_limits(max_len: int) -> dict[str, dict[str, Any]]:
    """What `model_methods`' entry points accept beyond their types (checked on every call,
    `dsv4c.limits`): a prefill fills the cache from position 0, a decode step writes `position`."""
    why = f"the compiled KV cache holds {max_len} positions (recompile with a larger --max-len)"
    return {
        "T": {"min": 1, "max": max_len, "why": why},
        "position": {"min": 0, "max": max_len - 1, "why": why},
    }


def kv_cache_bytes(preset: str) -> dict[str, Any]:
    """KV cache / state bytes of one sequence (meta tensors, nothing allocated): the part that
    grows per token (the slope between two cache lengths) and the fixed part (window ring,
    compressor state), in the model's dtype and in bf16, and the total at 1M = 2^20 tokens."""
    import torch

    from models.deepseek_v4 import Transformer

    def size(model: Any, max_len: int, itemsize: int | None) -> int:
        cache = model.init_cache(1, max_len)
        return sum(t.numel() * (itemsize or t.element_size()) for t in cache.values())

    with torch.device("meta"):
        model = Transformer(_config(preset))
    lo, hi, million = 1 << 16, 1 << 17, 1 << 20
    out: dict[str, Any] = {"dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    for label, itemsize in (("model_dtype", None), ("bf16", 2)):
        a, b = size(model, lo, itemsize), size(model, hi, itemsize)
        per_token = (b - a) / (hi - lo)
        out[label] = {
            "bytes_per_token": per_token,
            "fixed_bytes": a - per_token * lo,
            "bytes_at_1m_tokens": size(model, million, itemsize),
            "gib_at_1m_tokens": per_token * million / 2**30,
        }
    return out


# --- commands ------------------------------------------------------------------------------


def _check_compile_args(args: argparse.Namespace) -> list[str] | None:
    """Fail fast, before any work, on a bad model, target, backend, --max-len or --methods
    name; returns the methods asked for (None: all)."""
    from dsv4c.driver import _target, make_backend
    from dsv4c.schema import MAX_LEN

    _config(args.model)
    _target(args.target), make_backend(args.backend)
    if not 2 <= args.max_len <= MAX_LEN:
        raise ValueError(
            f"--max-len {args.max_len}: the KV cache needs 2 to {MAX_LEN} positions (default 256)"
        )
    if not args.methods:
        return None
    asked = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in asked if m not in METHODS] or (["(none)"] if not any(asked) else [])
    if bad or len(set(asked)) != len(asked):
        raise ValueError(
            f"--methods {args.methods}: {', '.join(bad) or 'a repeated name'} is not an entry "
            f"point; choose from {', '.join(METHODS)} (comma separated, each once)"
        )
    return asked


def cmd_compile(args: argparse.Namespace) -> int:
    import dsv4c

    asked = _check_compile_args(args)
    if args.mesh:  # sharded over local ranks: dsv4c/distributed.py (mesh.json + rank graphs)
        from dsv4c.distributed import compile_from_args

        if args.weights:
            raise ValueError("--weights with --mesh is not supported yet: sharded artifacts run "
                             "with random weights; drop --weights or --mesh")
        args.methods_list = asked
        return compile_from_args(args, _say)
    model = _meta_model(args.model)
    if args.weights:  # checked here, not when the artifact first runs
        from dsv4c.run import check_weights

        check_weights(model, args.weights)
    start = time.perf_counter()
    methods = model_methods(model, args.max_len)
    if asked:
        methods = {m: methods[m] for m in asked}
    _say(f"compiling {args.model} ({', '.join(methods)}) with {args.backend} for {args.target}")
    info = {
        "preset": args.model,
        "max_len": args.max_len,
        "weights": args.weights,
        "kv_cache": kv_cache_bytes(args.model),
        "input_limits": input_limits(args.max_len),
    }
    compiled = dsv4c.compile_methods(
        model,
        methods,
        backend=args.backend,
        target=args.target,
        output_dir=args.output,
        progress=_progress,
        model_info=info,
        use_cache=not args.no_cache,
        graph_key=f"preset {args.model} {_config(args.model)!r}",
    )
    report = compiled.report()
    for name, entry in report["entries"].items():
        _say(f"  {entry_summary(name, entry)}")
    cache = report["kernel_cache"]
    if cache["hits"] or cache["misses"]:
        _say(f"  kernel cache: {cache['hits']} hits, {cache['misses']} compiled")
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


def entry_summary(name: str, entry: dict[str, Any]) -> str:
    """One entry point's compile summary, from its report section: ops, launches, and its
    kernel records (`report.code_summary`): how many have code in which language, how many
    the target got none for and why."""
    head = f"{name}: {entry['ops_captured']} ops captured -> {entry['launches']} launches"
    code = entry["code"]
    langs = "/".join(code["languages"])
    text = f"{head}, {code['kernels']} distinct kernels with {langs} code"
    if not langs:  # the reference backend, or a target that got code for no kernel
        text = f"{head}, no kernel code"
    if code["skipped"]:
        reasons = Counter(code["skipped"].values()).most_common()
        why = "; ".join(f"{n}: {reason}" if len(reasons) > 1 else reason for reason, n in reasons)
        text += f", {len(code['skipped'])} skipped ({why})"
    return text


def cmd_run(args: argparse.Namespace) -> int:
    from dsv4c.distributed import is_sharded, run_from_args

    if is_sharded(args.dir):  # compiled with --mesh: start its ranks (or one under torchrun)
        if args.weights:
            raise ValueError(f"{args.dir} is sharded; --weights is not supported there yet")
        return run_from_args(args, _say)
    args.prompt_len = 16 if args.prompt_len is None else args.prompt_len
    if args.nproc is not None:
        raise ValueError(f"--nproc {args.nproc}: {args.dir} was compiled for one device; "
                         "compile with --mesh (e.g. --mesh tp=2) to run on several ranks")
    manifest = _peek_manifest(args.dir)
    _refuse_unrunnable(manifest, args.dir)  # from the manifest: nothing loaded or compiled yet
    if manifest.get("backend") == "triton" and manifest.get("target") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        # masked-off lanes of interpreted kernels compute on padding; numpy warns about it
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime")
    import dsv4c
    from dsv4c.run import generate

    compiled = dsv4c.load(args.dir)
    generate(compiled, args, _say)
    return 0


def _refuse_unrunnable(manifest: dict, path: str) -> None:
    """Raise `TargetMismatchError` when this machine cannot run the artifact, from its manifest
    alone: OpenCL/WebGPU source and TVM GPU kernels (dsv4c launches neither; the message is
    `DeviceUnavailable`'s), or GPU kernels where torch sees no GPU. Loading such an artifact
    regenerated its kernels first (1-3 minutes) only to refuse afterwards."""
    from backends.targets import TARGETS
    from dsv4c.errors import TargetMismatchError

    tgt = TARGETS.get(str(manifest.get("target")))
    if tgt is None or not tgt.is_gpu:
        return  # the CPU runs it; an unknown target is the loader's ArtifactError
    folder = f"{path}/kernels/{tgt.name}"
    if tgt.source_only or manifest.get("backend") == "tvm":
        from backends.tvm.device import unavailable

        raise TargetMismatchError(str(unavailable(tgt, folder)))
    import torch

    if not torch.cuda.is_available():
        raise TargetMismatchError(
            f"this holds {manifest.get('backend')} code for {tgt.name} ({tgt.description}) in "
            f"{folder}/ and graph*.ir; this machine has no GPU to run it. Run it on that GPU, or "
            f"compile for this machine: --backend {manifest.get('backend')} --target cpu"
        )


def _peek_manifest(path: str) -> dict:
    """The checked manifest (read safely: no FIFO or link is followed), before triton loads."""
    from dsv4c.artifact import read_manifest

    return read_manifest(path)


def cmd_ir(args: argparse.Namespace) -> int:
    from dsv4c.ir_tools import show_ir

    model = _meta_model(args.model)
    spec = model_methods(model, args.max_len)[args.method]
    print(show_ir(model, args.method, spec, after=args.after, explain=args.explain))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dsv4c.artifact import atomic_write, read_artifact
    from dsv4c.distributed import is_sharded
    from dsv4c.report_html import render

    if is_sharded(args.dir):
        raise ValueError(f"{args.dir} is a sharded artifact (compiled with --mesh); `report` "
                         "covers single-device artifacts (read its graph.*.ir and mesh.json)")
    manifest, files = read_artifact(args.dir, check_versions_=False)
    report = json.loads(files["report.json"])
    other = None
    if args.compare:  # another backend's artifact for the same target, side by side
        other = json.loads(read_artifact(args.compare, check_versions_=False)[1]["report.json"])
    out = Path(args.dir) / "report.html"
    atomic_write(out, render(manifest, report, other).encode())
    print(f"wrote {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime")
    from dsv4c.bench import bench

    _config(args.model)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    _say(f"bench {args.model} on {args.target}: {', '.join(backends)}")
    doc = bench(
        args.model,
        backends,
        target=args.target,
        prompt_len=args.prompt_len,
        context=args.context,
        batches=args.batches,
        repeat=args.repeat,
        interpret=args.interpret,
        json_path=args.json,
        say=_say,
        profile=args.profile,
    )
    print(f"wrote {args.json} and {Path(args.json).with_suffix('.svg')}")
    bad = [r for r in doc["rows"] if "check" in r and not r["check"]["ok"]]
    return 1 if bad else 0


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dsv4c.driver import BACKEND_NAMES

    ap = argparse.ArgumentParser(
        prog="dsv4c", description="Compile DeepSeek-V4-class models for GPUs and the CPU."
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model preset into an artifact directory")
    c.add_argument("--model", required=True, help=f"model preset: {', '.join(PRESETS)}")
    c.add_argument("--backend", default="triton", help=f"{', '.join(BACKEND_NAMES)}")
    c.add_argument("--target", default="cpu", help=TARGET_HELP)
    c.add_argument("-o", "--output", required=True, help="artifact directory to write")
    c.add_argument("--weights", help="safetensors checkpoint the artifact will run with")
    c.add_argument("--max-len", type=int, default=256, help="KV cache positions (default 256)")
    c.add_argument("--methods", help="entry points, comma separated (default prefill,decode)")
    c.add_argument("--no-cache", action="store_true", help="bypass the graph and kernel caches")
    from dsv4c.distributed import add_compile_arguments  # --mesh, --moe, --batch-axis, ...

    add_compile_arguments(c)
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="generate tokens with a compiled model and print tokens/s")
    r.add_argument("dir", help="artifact directory from `dsv4c compile`")
    r.add_argument("--prompt-len", type=int, help="prompt tokens (default 16; a --mesh "
                   "artifact's is fixed at compile time)")
    r.add_argument("--gen", type=int, default=8, help="tokens to generate after the prompt")
    r.add_argument("--weights", help="safetensors checkpoint (default: random weights)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")
    r.add_argument("--no-check", action="store_true", help="skip the comparison with eager")
    r.add_argument("--nproc", type=int, help="ranks to start for an artifact compiled with "
                   "--mesh (default: its mesh's size; under torchrun: its WORLD_SIZE)")
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("ir", help="print a model's IR after a pipeline pass")
    i.add_argument("--model", required=True, help=f"model preset: {', '.join(PRESETS)}")
    i.add_argument("--method", default="prefill", choices=("prefill", "decode"))
    i.add_argument("--after", default="pipeline", help="capture, a pass name, or pipeline")
    i.add_argument("--explain", metavar="RULE", help="say why RULE does or does not fire")
    i.add_argument("--max-len", type=int, default=64, help=argparse.SUPPRESS)
    i.set_defaults(fn=cmd_ir)

    p = sub.add_parser("report", help="write report.html for an artifact directory")
    p.add_argument("dir", help="artifact directory from `dsv4c compile`")
    p.add_argument("--compare", metavar="DIR", help="another backend's artifact, same target")
    p.set_defaults(fn=cmd_report)

    from dsv4c.bench import BACKENDS

    b = sub.add_parser("bench", help="prefill and decode under several backends, side by side")
    b.add_argument("--model", default="small", help=f"model preset: {', '.join(PRESETS)}")
    b.add_argument(
        "--backends",
        default="eager,inductor,tvm,tvm-relax",
        help=f"comma separated: {', '.join(BACKENDS)}",
    )
    b.add_argument("--target", default="cpu", help="cpu, or the GPU this machine has (sm_90, ...)")
    b.add_argument("--prompt-len", type=int, default=128, help="prefill tokens (0: no prefill)")
    b.add_argument("--context", type=int, default=4096, help="decode position (cache length)")
    b.add_argument("--batches", type=int, nargs="*", default=[1], help="decode batch sizes")
    b.add_argument("--repeat", type=int, default=3, help="timed calls per row (median)")
    b.add_argument("--interpret", action="store_true", help="allow Triton's CPU interpreter")
    b.add_argument("--json", default="bench.json", help="output JSON (and .svg beside it)")
    b.add_argument(
        "--profile",
        action="store_true",
        help="per-kernel profile of one step for the tvm rows (table and JSON kernel_profile)",
    )
    b.set_defaults(fn=cmd_bench)

    from dsv4c import plan as plan_cmd  # scale-out planner: `dsv4c plan --model v4-pro --mesh ...`

    plan_cmd.add_parser(sub)
    from dsv4c import tune as tune_cmd  # `dsv4c tune --model tiny --target cpu`

    tune_cmd.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        _say("dsv4c: interrupted")
        return 130
    except Exception as e:  # one line for the user; the traceback with --debug
        if args.debug:
            raise
        from dsv4c.errors import DsvError

        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not isinstance(e, DsvError | ValueError | OSError):  # unexpected: name it
            first = f"{type(e).__name__}: {first} (--debug shows the traceback)"
        _say(f"dsv4c {args.command}: error: {first}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
