"""Sharded artifacts: compile a preset's prefill and decode for a mesh, run them on local ranks.

    dsv4c compile --model tiny-512 --mesh tp=2,ep=2 --backend tvm --target cpu -o out/
    dsv4c run out/ --nproc 4       # or: torchrun --nproc-per-node 4 $(which dsv4c) run out/
    python -m dsv4c.distributed compile ... / run ...   # the same functions without the main CLI

An artifact holds `mesh.json` (model, axes, MoE lowering, batch axis, static shapes, placement
rules, the cache's key order, the sha256 of every file) and one graph per entry point for the one
rank role "all": every rank runs the same SPMD program (`graph.prefill.ir`, `graph.decode.ir`,
each the `shard` pass's output put through the single-device pipeline, so fusions fire inside the
rank's graph), its parameter slices chosen at load from the rules and the rank's mesh coordinates.
With `--backend tvm --target cpu` the kernels are built once at compile time (`kernels/cpu/`,
the same program on every rank) and each rank loads them; the collectives have no TVM lowering
and run through their reference semantics on the bound groups. Process groups are bound at load
time, never stored.

`run` starts the ranks (gloo, process-group timeout set: a dead rank fails the others), builds the
random weights from `--seed` identically in each, generates greedily (prefill, then `--gen`
decode steps), prints tokens/s of the slowest rank and checks the logits of every step against
the eager model on rank 0. Shapes are static: batch, prompt length and cache size are fixed at
compile time (`--batch`, `--prompt-len`, `--max-len`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import ir
from backends.distributed import Mesh, init_mesh, local_params, run_ranks
from ir.ops.collective import bind_groups
from passes.shard import MOE_MODES, shard
from passes.shard_rules import Rule, Shard, rules_for_mesh

__all__ = ["compile_mesh", "run_mesh", "is_sharded", "check_mesh", "add_compile_arguments"]

MESH_FILE = "mesh.json"
METHODS = ("prefill", "decode")
KERNELS = "kernels/cpu"


def graph_file(method: str) -> str:
    return f"graph.{method}.ir"


def is_sharded(path: str) -> bool:
    """Whether `path` is a sharded artifact (holds `mesh.json`)."""
    return os.path.isfile(os.path.join(path, MESH_FILE))


def _write(path: str, data: str | bytes) -> str:
    """Atomic write (parent folders made); returns the sha256 of `data`."""
    raw = data.encode() if isinstance(data, str) else data
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=folder, delete=False, suffix=".tmp") as f:
        f.write(raw)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile makes 0600; artifacts are shared files
    os.replace(f.name, path)
    return hashlib.sha256(raw).hexdigest()


# --- checks --------------------------------------------------------------------------------


def check_mesh(model_name: str, mesh: Mesh, *, moe: str = "all_reduce",
               batch_axis: str | None = None, batch: int = 4) -> str | None:
    """Raise ValueError naming what is wrong and how to fix it when `mesh` cannot shard
    `model_name` (sizes that do not divide heads, output groups, experts, vocabulary or the
    batch; an unknown MoE lowering or batch axis). Returns the batch axis to use (a `dp` axis
    is data-parallel by default)."""
    from dsv4c.plan import check_divisible
    from models.config import Config

    if moe not in MOE_MODES:
        raise ValueError(f"--moe {moe!r}: expected one of {', '.join(MOE_MODES)}")
    if batch_axis is None and mesh.size("dp") > 1:
        batch_axis = "dp"
    if batch_axis is not None and batch_axis not in mesh.names:
        raise ValueError(f"--batch-axis {batch_axis!r} is not an axis of mesh {mesh}; "
                         f"use one of {', '.join(mesh.names)} or leave it out")
    if mesh.size("dp") > 1 and batch_axis != "dp":
        raise ValueError(f"mesh {mesh}: a dp axis splits the batch; drop --batch-axis "
                         f"{batch_axis} or the dp axis")
    if batch_axis is not None and batch % mesh.size(batch_axis):
        raise ValueError(f"--batch {batch} does not divide by {batch_axis}={mesh.size(batch_axis)}"
                         f" (each rank of {batch_axis} takes batch/{mesh.size(batch_axis)} "
                         "sequences); pick a batch that is a multiple of it")
    try:
        check_divisible(Config.preset(model_name), mesh.to_json(), moe=moe, model=model_name)
    except ValueError as e:
        raise ValueError(f"--mesh {mesh}: {e}") from None
    return batch_axis


# --- compile -------------------------------------------------------------------------------


def _check_target(target: str) -> None:
    if target != "cpu":
        raise ValueError(f"--target {target} with --mesh: sharded artifacts run on CPU ranks "
                         "(gloo) for now; use --target cpu")


def _entry_inputs(model: Any, batch: int, prompt: int, max_len: int) -> dict[str, tuple]:
    import torch

    cache = model.init_cache(batch, max_len)
    tokens = torch.zeros(batch, prompt, dtype=torch.long)
    token = torch.zeros(batch, 1, dtype=torch.long)
    return {"prefill": (tokens, cache), "decode": (token, torch.tensor(prompt), cache)}


def _rank_program(model: Any, method: str, inputs: tuple, sizes: dict[str, int],
                  rules: list[Rule], moe: str, batch_axis: str | None, target: str) -> ir.Graph:
    """Capture -> semantic fusions -> shard -> the single-device pipeline (fusions, schedule)."""
    import frontend
    import passes
    from passes.fuse_attention import fuse_attention
    from passes.fuse_hc import fuse_hc
    from passes.fuse_moe import fuse_moe

    g = frontend.capture(model, inputs, method=method)
    g = fuse_hc(fuse_moe(fuse_attention(passes.canonicalize(g))))
    program = shard(g, sizes, rules=rules, moe=moe, batch_axis=batch_axis)
    return ir.verify(passes.pipeline(program, target=target))


def compile_mesh(model_name: str, mesh: Mesh, out: str, *, moe: str = "all_reduce",
                 batch_axis: str | None = None, batch: int = 4, prompt: int = 16,
                 max_len: int = 64, backend: str = "reference", target: str = "cpu",
                 methods: tuple[str, ...] = METHODS,
                 say: Callable[[str], None] = lambda s: None) -> dict:
    """Capture `model_name`'s entry points at static shapes on the meta device, shard them for
    `mesh`, write the artifact to `out` (kernels built for tvm/cpu); returns the manifest."""
    import torch

    from dsv4c.run import cache_key_orders
    from models.deepseek_v4 import Config, Transformer

    batch_axis = check_mesh(model_name, mesh, moe=moe, batch_axis=batch_axis, batch=batch)
    _check_target(target)
    if not 1 <= prompt < max_len:
        raise ValueError(f"--prompt-len {prompt} must be at least 1 and below --max-len {max_len}")
    with torch.device("meta"):
        model = Transformer(Config.preset(model_name)).eval()
        inputs = _entry_inputs(model, batch, prompt, max_len)
        keys = cache_key_orders(model, batch, max_len)
    sizes = mesh.to_json()
    rules = rules_for_mesh(sizes, moe=moe)
    digests, roles = {}, {}
    for method in methods:
        start = time.perf_counter()
        program = _rank_program(model, method, inputs[method], sizes, rules, moe, batch_axis,
                                target)
        files = {graph_file(method): ir.to_text(program).encode()}
        if backend == "tvm" and target == "cpu":  # one SPMD program: build its kernels once
            import backends
            from backends.tvm.library import export_files

            exe = backends.get_backend("tvm").compile(program, "cpu")
            files |= export_files(exe, KERNELS, method)
        for rel, data in files.items():
            digests[rel] = _write(os.path.join(out, rel), data)
        roles[method] = graph_file(method)
        say(f"  {method}: {len(program.ops)} ops per rank, {len(files) - 1} kernel files, "
            f"{time.perf_counter() - start:.1f} s")
    manifest = {
        "format": "dsv4c-sharded-1", "model": model_name, "mesh": sizes,
        "world_size": mesh.world_size, "moe": moe, "batch_axis": batch_axis, "batch": batch,
        "prompt": prompt, "max_len": max_len, "backend": backend, "target": target,
        "cache_keys": keys,
        "rules": [{"pattern": r.pattern, "axis": r.axis, "shard_dim": r.placement.dim}
                  for r in rules],
        "roles": {"all": roles}, "sha256": digests,
    }
    _write(os.path.join(out, MESH_FILE), json.dumps(manifest, indent=1))
    return manifest


# --- load and run --------------------------------------------------------------------------


def _load(path: str) -> tuple[dict, dict[str, ir.Graph], list[Rule], dict[str, bytes]]:
    """Manifest, graphs by entry point, rules, kernel files; every file's sha256 checked."""
    try:
        with open(os.path.join(path, MESH_FILE)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: no readable {MESH_FILE} ({e}); compile with --mesh") from None
    files = {}
    for rel, digest in manifest["sha256"].items():
        with open(os.path.join(path, rel), "rb") as f:
            files[rel] = f.read()
        if hashlib.sha256(files[rel]).hexdigest() != digest:
            raise ValueError(f"{path}/{rel}: sha256 differs from {MESH_FILE}; recompile")
    graphs = {m: ir.parse(files.pop(rel).decode())
              for m, rel in manifest.get("roles", {}).get("all", {}).items()}
    rules = [Rule(r["pattern"], r["axis"], Shard(r["shard_dim"])) for r in manifest["rules"]]
    return manifest, graphs, rules, files


def _executables(manifest: dict, graphs: dict[str, ir.Graph], files: dict[str, bytes],
                 backend: str | None) -> dict[str, Callable[..., tuple]]:
    """Entry point -> call(*inputs, params=): the built TVM kernels, another backend's
    executable (compiled here) or the interpreter."""
    backend = backend or manifest.get("backend", "reference")
    if backend == "triton":  # CPU ranks run Triton kernels in its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import warnings  # masked-off lanes compute on padding; numpy warns (as in `dsv4c run`)

        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime")
    if backend == "reference":
        return {m: (lambda g: lambda *a, params: ir.interpret(g, *a, params=params))(g)
                for m, g in graphs.items()}
    import backends

    be = backends.get_backend(backend)
    out = {}
    for m, g in graphs.items():
        if backend == "tvm" and any(rel.startswith(KERNELS) for rel in files):
            from backends.tvm.library import load_library

            out[m] = be.load(g, "cpu", load_library(files, KERNELS, m))
        else:
            out[m] = be.compile(g, "cpu")
    return out


def _mine(inputs: list, mesh: Mesh, rank: int, batch_axis: str | None) -> list:
    """This rank's block of the batch dim of every non-scalar input (data-parallel)."""
    if batch_axis is None or mesh.size(batch_axis) == 1:
        return inputs
    size, coord = mesh.size(batch_axis), mesh.coords(rank)[batch_axis]
    return [t.chunk(size, 0)[coord] if t.dim() else t for t in inputs]


def _generate(step: Callable[..., tuple], model: Any, tokens: Any, manifest: dict,
              gen: int) -> tuple[list, list, float, float]:
    """Greedy generation through `step(method, *inputs)`: (logits per step, the tokens fed to
    decode, prefill seconds, decode seconds)."""
    import torch

    keys, n = manifest["cache_keys"], manifest["prompt"]
    cache = model.init_cache(manifest["batch"], manifest["max_len"])
    start = time.perf_counter()
    logits, *flat = step("prefill", tokens, *(cache[k] for k in keys["in"]))
    prefill_s = time.perf_counter() - start
    steps, fed, names = [logits], [], keys["out"]
    start = time.perf_counter()
    for i in range(gen):
        cache = dict(zip(names, flat))
        fed.append(logits[:, -1:].argmax(-1))
        logits, *flat = step("decode", fed[-1], torch.tensor(n + i),
                             *(cache[k] for k in keys["in"]))
        steps.append(logits)
        names = keys["in"]  # decode returns its cache in its input's order
    return steps, fed, prefill_s, time.perf_counter() - start


def _eager_diff(model: Any, tokens: Any, manifest: dict, steps: list, fed: list) -> float:
    """Largest |logit difference| between the run's steps and the eager model fed the same
    tokens."""
    import torch

    n = manifest["prompt"]
    with torch.no_grad():
        logits, cache = model.prefill(tokens, model.init_cache(manifest["batch"],
                                                               manifest["max_len"]))
        worst = (logits - steps[0]).abs().max().item()
        for i, tok in enumerate(fed):
            logits, cache = model.decode(tok, torch.tensor(n + i), cache)
            worst = max(worst, (logits - steps[i + 1]).abs().max().item())
    return worst


def _rank_main(rank: int, path: str, seed: int, gen: int, backend: str | None,
               check: bool) -> dict:
    """One rank (the process group is initialised): load, run, time; rank 0 checks."""
    import torch
    import torch.distributed as dist

    from models.deepseek_v4 import Config, Transformer

    manifest, graphs, rules, files = _load(path)
    mesh = Mesh(tuple(manifest["mesh"].items()))
    torch.manual_seed(seed)
    model = Transformer(Config.preset(manifest["model"])).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (manifest["batch"], manifest["prompt"]),
                           generator=torch.Generator().manual_seed(seed))
    names = {v.name for g in graphs.values() for v in g.params}
    params = {k: v for k, v in local_params(model.state_dict(), rules, mesh, rank).items()
              if k in names}
    exes = _executables(manifest, graphs, files, backend)
    axis = manifest["batch_axis"]

    def step(method: str, *inputs: Any) -> tuple:
        return exes[method](*_mine(list(inputs), mesh, rank, axis), params=params)

    with torch.no_grad(), bind_groups(init_mesh(mesh)):
        _generate(step, model, tokens, manifest, min(gen, 1))  # warm-up (plans, allocations)
        steps, fed, prefill_s, decode_s = _generate(step, model, tokens, manifest, gen)
    slowest = torch.tensor([prefill_s, decode_s], dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    out = {"prefill_s": slowest[0].item(), "decode_s": slowest[1].item(),
           "tokens": torch.cat(fed, 1).tolist() if fed else []}
    if rank == 0 and check:
        out["max_abs_diff"] = _eager_diff(model, tokens, manifest, steps, fed)
        out["max_abs_logit"] = max(s.abs().max().item() for s in steps)
    return out


def run_mesh(path: str, nproc: int | None = None, *, seed: int = 0, gen: int = 8,
             backend: str | None = None, check: bool = True, timeout_s: float = 600) -> dict:
    """Run the artifact on its world size of ranks: spawned gloo ranks, or this process as one
    rank when launched by torchrun (`WORLD_SIZE` set). Returns rank 0's figures with
    `prefill_tokens_per_s` / `decode_tokens_per_s` (slowest rank) and `max_abs_diff`."""
    manifest, graphs, _, _ = _load(path)
    world = manifest["world_size"]
    launched = int(os.environ.get("WORLD_SIZE", "0") or 0)
    if launched and nproc not in (None, launched):
        raise ValueError(f"--nproc {nproc} but torchrun started {launched} ranks; drop --nproc")
    if launched and launched != world:
        raise ValueError(f"torchrun started {launched} ranks but {path} was compiled for mesh "
                         f"{Mesh(tuple(manifest['mesh'].items()))} = {world} ranks; launch "
                         f"with torchrun --nproc-per-node {world}")
    nproc = launched or nproc or world
    if nproc != world:
        raise ValueError(f"{path} was compiled for mesh {Mesh(tuple(manifest['mesh'].items()))} "
                         f"= {world} ranks; run with --nproc {world}")
    if not 0 <= gen < manifest["max_len"] - manifest["prompt"] + 1:
        raise ValueError(f"--gen {gen}: the prompt ({manifest['prompt']}) and the generated "
                         f"tokens must fit the compiled cache of {manifest['max_len']} positions")
    if gen and "decode" not in graphs:
        raise ValueError(f"{path} has no decode entry point; run with --gen 0 or recompile "
                         "with --methods prefill,decode")
    args = (path, seed, gen, backend, check)
    if launched:
        res = _under_torchrun(args, timeout_s)
        if res is None:
            return {}
    else:
        res = run_ranks(_rank_main, nproc, args, timeout_s=timeout_s)[0]
    b = manifest["batch"]
    return {**res, "ranks": nproc, "batch": b, "prompt": manifest["prompt"], "gen": gen,
            "prefill_tokens_per_s": b * manifest["prompt"] / res["prefill_s"],
            "decode_tokens_per_s": b * gen / res["decode_s"] if gen else None}


def _under_torchrun(args: tuple, timeout_s: float) -> dict | None:
    """This process is one rank of a torchrun launch: rank 0's figures, None on other ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        out = _rank_main(dist.get_rank(), *args)
        return out if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


# --- command line --------------------------------------------------------------------------


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    """The mesh options of `dsv4c compile` (and `python -m dsv4c.distributed compile`)."""
    p.add_argument("--mesh", help="shard over a mesh of local ranks, e.g. tp=2,ep=2 (axes dp, "
                   "ep, tp); `dsv4c run` then starts that many ranks")
    p.add_argument("--moe", default="all_reduce",
                   help=f"with --mesh: MoE lowering, one of {', '.join(MOE_MODES)}")
    p.add_argument("--batch-axis", help="with --mesh: data-parallel attention over this axis")
    p.add_argument("--batch", type=int, default=4, help="with --mesh: sequences (static)")
    p.add_argument("--prompt-len", type=int, default=16, help="with --mesh: prompt (static)")


def compile_from_args(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    mesh = Mesh.parse(args.mesh)
    methods = tuple(getattr(args, "methods_list", None) or METHODS)
    check_mesh(args.model, mesh, moe=args.moe, batch_axis=args.batch_axis, batch=args.batch)
    _check_target(args.target)
    say(f"compiling {args.model} ({', '.join(methods)}) for mesh {mesh} ({mesh.world_size} "
        f"ranks) with {args.backend} for {args.target}")
    start = time.perf_counter()
    m = compile_mesh(args.model, mesh, args.output, moe=args.moe, batch_axis=args.batch_axis,
                     batch=args.batch, prompt=args.prompt_len, max_len=args.max_len,
                     backend=args.backend, target=args.target, methods=methods, say=say)
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s: mesh {mesh} "
          f"({m['world_size']} ranks), moe {m['moe']}, batch axis {m['batch_axis']}")
    return 0


def run_from_args(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """`dsv4c run DIR [--nproc N]` on a sharded artifact: prints tokens/s and the check."""
    prompt = getattr(args, "prompt_len", None)
    if prompt is not None and prompt != _load(args.dir)[0]["prompt"]:
        raise ValueError(f"--prompt-len {prompt}: {args.dir} was compiled for prompts of "
                         f"{_load(args.dir)[0]['prompt']} tokens (static shapes); drop "
                         "--prompt-len or recompile with it")
    res = run_mesh(args.dir, args.nproc, seed=args.seed, gen=args.gen,
                   backend=getattr(args, "backend", None), check=not args.no_check)
    if not res:  # a torchrun rank other than 0
        return 0
    say(f"{args.dir}: {res['ranks']} ranks, batch {res['batch']}, random weights")
    print(f"prefill  {res['batch']}x{res['prompt']} tokens  "
          f"{res['prefill_tokens_per_s']:,.1f} tokens/s")
    if res["gen"]:
        print(f"decode   {res['batch']}x{res['gen']} tokens  "
              f"{res['decode_tokens_per_s']:,.2f} tokens/s")
    if args.no_check:
        return 0
    diff, scale = res["max_abs_diff"], res["max_abs_logit"] or 1.0
    ok = diff <= 1e-4 * scale  # fp32: run.RTOL's relative tolerance
    print(f"vs eager max |diff| {diff:.2e}, relative {diff / scale:.2e} (tolerance 1e-04)"
          f" {'ok' if ok else 'MISMATCH'}")
    if not ok:
        raise ValueError(f"{args.dir}: sharded logits differ from eager by {diff:.2e}; the "
                         "artifact does not compute the model")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv4c.distributed",
                                 description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--model", required=True)
    c.add_argument("--backend", default="reference", help="reference or tvm")
    c.add_argument("--target", default="cpu")
    c.add_argument("--max-len", type=int, default=64)
    c.add_argument("-o", "--output", required=True)
    add_compile_arguments(c)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--nproc", type=int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--gen", type=int, default=8)
    r.add_argument("--backend", help="override the artifact's backend (reference, tvm)")
    r.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    say = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if args.command == "compile":
        if not args.mesh:
            ap.error("compile needs --mesh")
        return compile_from_args(args, say)
    return run_from_args(args, say)


if __name__ == "__main__":
    sys.exit(main())
