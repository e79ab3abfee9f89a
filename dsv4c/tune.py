"""`dsv4c tune`: measure candidate schedules of a model's CPU TVM kernels into the tuning database.

Per method (prefill, decode): compile the model preset with the TVM backend and the default
schedules, run it once on seeded inputs while recording each kernel's first call (its argument
tensors), then per kernel re-schedule its TensorIR with each candidate `Knobs`, build it, check
that its outputs equal the default kernel's (rel. 1e-4; a candidate that differs or fails is
dropped, never chosen) and time it on the recorded arguments (median of `repeat` calls). A kernel
whose best candidate beats the default by more than `MIN_GAIN` gets an entry; entries are keyed
as `dsv4c.tuning` says (the bucket is the method's compile bindings, as `dsv4c compile` uses).

Times are of single kernels on this machine, loaded or not: tune on a quiet machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from backends.tvm.schedule_cpu import Knobs
from dsv4c.tuning import Entry, TuningDB, TuningKey, bucket_of, cpu_target_key, versions

__all__ = ["candidates", "tune"]

MIN_GAIN = 0.05  # a candidate must be 5 % faster than the default to be recorded


def candidates(kind: str, limit: int | None = None) -> list[Knobs]:
    """The knob sets tried for a kernel of `kind` ("matmul_nn", "matmul_nt" or "generic"),
    the default first; `limit` keeps the first few (tests)."""
    tiles = [(i, j, k) for i in (4, 8, 16) for j in (8, 16, 32) for k in (4, 1, 8)]
    if kind == "generic":
        found = [Knobs(vector=v, serial_max=s) for v in (16, 8, 32) for s in (256, 4096, 32)]
    elif kind == "matmul_nt":  # rfactor dot products (the default) or register tiles
        found = [Knobs(vector=v) for v in (16, 8, 32)]
        found += [Knobs(dots=False, tile_i=i, tile_j=j, tile_k=k) for i, j, k in tiles]
    else:
        found = [Knobs(tile_i=i, tile_j=j, tile_k=k) for i, j, k in tiles]
    found = [Knobs(), *[k for k in found if k != Knobs()]]
    return found[:limit] if limit else found


def kernel_kind(kernel: Any) -> str:
    if kernel.name in ("matmul_nn", "matmul_nt"):
        return kernel.name
    return "generic"


def _schedule(kernel: Any, knobs: Knobs) -> Any:
    from backends.tvm import schedule_cpu
    from backends.tvm.matmul import schedule_matmul_cpu

    token = schedule_cpu.TUNED.set({kernel.symbol: knobs})
    try:
        kind = kernel_kind(kernel)
        if kind == "generic":
            return schedule_cpu.schedule_cpu(kernel.tensor_ir)
        return schedule_matmul_cpu(kernel.tensor_ir, kind == "matmul_nt")
    finally:
        schedule_cpu.TUNED.reset(token)


def _record_calls(exe: Any) -> dict[str, list[torch.Tensor]]:
    """Wrap the executable's packed functions so each kernel's first call's arguments (inputs,
    then outputs) are kept; call before the executable's first run (plans bind them then)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def recorder(key: str, fn: Any) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            out = fn(*args)
            if key not in seen and all(isinstance(a, torch.Tensor) for a in args):
                seen[key] = [a.clone() for a in args]
            return out

        return call

    exe.fns = {key: recorder(key, fn) for key, fn in exe.fns.items()}
    exe.plans.clear()
    return seen


def _time(fn: Any, args: Sequence[torch.Tensor], repeat: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _outputs_match(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> bool:
    for g, w in zip(got, want):
        if not g.dtype.is_floating_point:
            if not torch.equal(g, w):
                return False
            continue
        scale = w.float().abs().max().clamp_min(1e-12)
        if ((g.float() - w.float()).abs().max() / scale).item() > 1e-4:
            return False
    return True


def tune_kernel(
    kernel: Any, args: list[torch.Tensor], n_out: int, repeat: int, limit: int | None
) -> tuple[Knobs, float, float, int]:
    """(best knobs, their seconds, the default's seconds, candidates that ran correctly)."""
    import tvm

    from backends.tvm.kernel import host_target

    target = host_target()
    inputs = args[: len(args) - n_out]
    results: list[tuple[float, Knobs]] = []
    want: list[torch.Tensor] | None = None
    for knobs in candidates(kernel_kind(kernel), limit):
        outs = [torch.empty_like(a) for a in args[len(inputs):]]
        try:
            func = _schedule(kernel, knobs).with_attr("global_symbol", "tuned")
            fn = tvm.tirx.build(tvm.IRModule({"tuned": func}), target=target)["tuned"]
            fn(*inputs, *outs)
        except Exception:  # noqa: BLE001  (a candidate TVM refuses is no candidate)
            continue
        if want is None:
            want = [o.clone() for o in outs]  # the default knobs come first
        elif not _outputs_match(outs, want):
            continue
        results.append((_time(fn, [*inputs, *outs], repeat), knobs))
    if not results:
        return Knobs(), float("nan"), float("nan"), 0
    default_s = results[0][0]
    best_s, best = min(results, key=lambda r: r[0])
    return best, best_s, default_s, len(results)


def tune(
    preset: str,
    *,
    target: str = "cpu",
    methods: Sequence[str] = ("decode", "prefill"),
    max_len: int = 64,
    prompt_len: int = 16,
    repeat: int = 5,
    limit: int | None = None,
    db: TuningDB | None = None,
    say: Callable[[str], None] = print,
) -> TuningDB:
    """Measure candidates for every TVM CPU kernel of `preset`'s methods; returns `db` (a new one
    if None) with an entry per kernel whose best candidate beats its default by MIN_GAIN."""
    import dsv4c
    from dsv4c.cli import model_methods
    from models.deepseek_v4 import Config, Transformer

    if target != "cpu":
        raise ValueError(
            f"dsv4c tune measures on this machine's CPU only (--target cpu), got {target}; GPU "
            "targets use the cost-model defaults (dsv4c.tuning.gpu_defaults), untuned"
        )
    db = db if db is not None else TuningDB()
    torch.manual_seed(0)
    model = Transformer(Config.preset(preset)).eval()
    specs = model_methods(model, max_len)
    tkey, version = cpu_target_key(), versions()
    for method in methods:
        spec = specs[method]
        with torch.no_grad():  # the compile only records arguments: candidates start unscheduled
            compiled = dsv4c.compile_methods(model, {method: spec}, backend="tvm", target="cpu")
            exe = compiled.entries[method].executable
            seen = _record_calls(exe)
            compiled.entry(method)(*_inputs(model, method, max_len, prompt_len))
        bucket = bucket_of(spec.bindings)
        for kernel in exe.kernels():
            if kernel.key not in seen or kernel.tensor_ir is None:
                continue
            n_out = len(kernel.tensor_ir.params) - len(kernel.body.inputs)
            best, best_s, default_s, n = tune_kernel(kernel, seen[kernel.key], n_out, repeat, limit)
            gain = default_s / best_s if best_s == best_s and best_s > 0 else 1.0
            say(
                f"  {method} {kernel.symbol}: {n} candidates, default {default_s * 1e6:.1f} us, "
                f"best {best_s * 1e6:.1f} us ({gain:.2f}x) {best.text()}"
            )
            if best != Knobs() and gain > 1 + MIN_GAIN:
                key = TuningKey(kernel.symbol, bucket, tkey, version)
                db.put(Entry(key, best, "measured", best_s, default_s))
    return db


def _inputs(model: Any, method: str, max_len: int, prompt_len: int) -> tuple[Any, ...]:
    """Seeded batch-1 inputs of `method` (the bucket's B <= 1)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    cache = model.init_cache(1, max_len)
    if method == "prefill":
        return (torch.randint(0, vocab, (1, min(prompt_len, max_len - 1)), generator=gen), cache)
    for t in cache.values():
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype) * 0.1)
    token = torch.randint(0, vocab, (1, 1), generator=gen)
    return (token, torch.tensor(min(prompt_len, max_len - 1)), cache)


# --- command line: `dsv4c tune` -----------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register `dsv4c tune` on the CLI's subparsers."""
    t = sub.add_parser("tune", help="measure CPU schedule candidates into the tuning database")
    t.add_argument("--model", default="tiny", help="model preset (tiny, small, ...)")
    t.add_argument("--target", default="cpu", help="cpu (GPU targets: cost-model defaults)")
    t.add_argument("--methods", default="decode,prefill", help="entry points, comma separated")
    t.add_argument("--max-len", type=int, default=64, help="KV cache positions while tuning")
    t.add_argument("--repeat", type=int, default=5, help="timed calls per candidate (median)")
    t.add_argument("--candidates", type=int, help="try only the first N candidates per kernel")
    t.add_argument("--db", help="database to update (default: $DSV4C_TUNING_DB or the cache's)")
    t.set_defaults(fn=cmd_tune)


def cmd_tune(args: Any) -> int:
    from pathlib import Path

    from dsv4c.cli import _config
    from dsv4c.tuning import user_db_path

    _config(args.model)  # an unknown preset is a one-line error
    path = Path(args.db) if args.db else user_db_path()
    db = TuningDB.load(path)
    before = len(db.entries)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"decode", "prefill"})
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: decode, prefill")
    print(f"tune {args.model} on {cpu_target_key()} ({versions()})", flush=True)
    tune(
        args.model,
        target=args.target,
        methods=methods,
        max_len=args.max_len,
        repeat=args.repeat,
        limit=args.candidates,
        db=db,
        say=lambda msg: print(msg, flush=True),
    )
    db.save(path)
    print(f"wrote {path}: {len(db.entries)} entries ({len(db.entries) - before:+d})")
    return 0
