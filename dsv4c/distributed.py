"""Sharded artifacts: compile a preset's prefill for a mesh, run it on local gloo ranks.

    python -m dsv4c.distributed compile --model tiny-512 --mesh tp=2,ep=2 -o out/
    python -m dsv4c.distributed run out/ --nproc 4 [--backend tvm]

An artifact holds `mesh.json` (axes, MoE lowering, batch axis, placement rules, file hashes) and
one graph per rank role: every rank runs the same SPMD program (`graph.prefill.ir`; the role is
"all"), its parameter slices chosen at load from the rules and the rank's mesh coordinates.
`run` spawns the ranks (random weights from `--seed`, rebuilt identically in each rank), checks
the gathered logits against the eager model on rank 0 and prints tokens/s. The collectives'
process groups are bound at load time, never stored. (`dsv4c compile --mesh` / `dsv4c run
--nproc` on the main CLI are not wired yet: these are the functions they would call.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any

import ir
from backends.distributed import Mesh, init_mesh, local_params, run_ranks
from ir.ops.collective import bind_groups
from passes.shard import shard
from passes.shard_rules import Rule, Shard, rules_for_mesh

__all__ = ["compile_mesh", "run_mesh"]

MESH_FILE, GRAPH_FILE = "mesh.json", "graph.prefill.ir"


def _write(path: str, text: str) -> str:
    """Atomic write; returns the sha256 of `text`."""
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)
    return hashlib.sha256(text.encode()).hexdigest()


def _semantic_prefill(model: Any, batch: int, prompt: int) -> ir.Graph:
    import torch

    import frontend
    import passes
    from passes.fuse_attention import fuse_attention
    from passes.fuse_hc import fuse_hc
    from passes.fuse_moe import fuse_moe

    tokens = torch.zeros(batch, prompt, dtype=torch.long)
    g = frontend.capture(model, (tokens,), method="prefill")
    return fuse_hc(fuse_moe(fuse_attention(passes.canonicalize(g))))


def compile_mesh(model_name: str, mesh: Mesh, out: str, *, moe: str = "all_reduce",
                 batch_axis: str | None = None, batch: int = 4, prompt: int = 16) -> dict:
    """Capture `model_name`'s prefill at [batch, prompt] on the meta device, shard it for
    `mesh`, write the artifact to `out`; returns the manifest."""
    import torch

    from models.deepseek_v4 import Config, Transformer

    with torch.device("meta"):
        model = Transformer(Config.preset(model_name)).eval()
    sizes = mesh.to_json()
    rules = rules_for_mesh(sizes, moe=moe)
    program = ir.verify(shard(_semantic_prefill(model, batch, prompt), sizes, rules=rules,
                              moe=moe, batch_axis=batch_axis))
    os.makedirs(out, exist_ok=True)
    digest = _write(os.path.join(out, GRAPH_FILE), ir.to_text(program))
    manifest = {
        "model": model_name, "mesh": sizes, "world_size": mesh.world_size, "moe": moe,
        "batch_axis": batch_axis, "batch": batch, "prompt": prompt,
        "rules": [{"pattern": r.pattern, "axis": r.axis, "shard_dim": r.placement.dim}
                  for r in rules],
        "roles": {"all": {"prefill": GRAPH_FILE}}, "sha256": {GRAPH_FILE: digest},
    }
    _write(os.path.join(out, MESH_FILE), json.dumps(manifest, indent=1))
    return manifest


def _load(path: str) -> tuple[dict, ir.Graph, list[Rule]]:
    with open(os.path.join(path, MESH_FILE)) as f:
        manifest = json.load(f)
    with open(os.path.join(path, GRAPH_FILE)) as f:
        text = f.read()
    if hashlib.sha256(text.encode()).hexdigest() != manifest["sha256"][GRAPH_FILE]:
        raise ValueError(f"{path}/{GRAPH_FILE}: sha256 differs from {MESH_FILE}; recompile")
    rules = [Rule(r["pattern"], r["axis"], Shard(r["shard_dim"])) for r in manifest["rules"]]
    return manifest, ir.parse(text), rules


def _rank_main(rank: int, path: str, seed: int, backend: str) -> dict:
    import torch

    from models.deepseek_v4 import Config, Transformer

    manifest, program, rules = _load(path)
    mesh = Mesh(tuple(manifest["mesh"].items()))
    torch.manual_seed(seed)
    model = Transformer(Config.preset(manifest["model"])).eval()
    tokens = torch.randint(0, model.embed.weight.shape[0], (manifest["batch"], manifest["prompt"]))
    names = {v.name for v in program.params}
    params = {k: v for k, v in local_params(model.state_dict(), rules, mesh, rank).items()
              if k in names}
    mine = tokens
    if manifest["batch_axis"]:
        axis = manifest["batch_axis"]
        mine = tokens.chunk(mesh.size(axis), 0)[mesh.coords(rank)[axis]]
    run = ir.interpret
    if backend != "reference":
        import backends

        exe = backends.get_backend(backend).compile(program, "cpu")
        run = lambda g, *a, params: exe(*a, params=params)  # noqa: E731
    with bind_groups(init_mesh(mesh)):
        run(program, mine, params=params)  # warm-up
        start = time.perf_counter()
        (logits,) = run(program, mine, params=params)
        seconds = time.perf_counter() - start
    out = {"seconds": seconds, "tokens": tokens.numel()}
    if rank == 0:
        with torch.no_grad():
            out["max_abs_diff"] = (logits - model.prefill(tokens)).abs().max().item()
    return out


def run_mesh(path: str, nproc: int, *, seed: int = 0, backend: str = "reference",
             timeout_s: float = 600) -> dict:
    """Run the artifact on `nproc` local gloo ranks; returns rank 0's figures."""
    manifest, _, _ = _load(path)
    if nproc != manifest["world_size"]:
        raise ValueError(f"{path} was compiled for mesh {manifest['mesh']} = "
                         f"{manifest['world_size']} ranks; run with --nproc "
                         f"{manifest['world_size']}")
    res = run_ranks(_rank_main, nproc, (path, seed, backend), timeout_s=timeout_s)
    slowest = max(r["seconds"] for r in res)
    return {**res[0], "tokens_per_s": res[0]["tokens"] / slowest, "ranks": nproc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv4c.distributed", description=__doc__.split(
        "\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--model", required=True)
    c.add_argument("--mesh", required=True, help="e.g. tp=2,ep=2")
    c.add_argument("--moe", default="all_reduce", help="all_reduce, dispatch, dispatch_ragged")
    c.add_argument("--batch-axis", help="data-parallel attention over this axis (e.g. ep)")
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--prompt-len", type=int, default=16)
    c.add_argument("-o", "--output", required=True)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--nproc", type=int, required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--backend", default="reference", help="reference or tvm")
    args = ap.parse_args(argv)
    if args.command == "compile":
        m = compile_mesh(args.model, Mesh.parse(args.mesh), args.output, moe=args.moe,
                         batch_axis=args.batch_axis, batch=args.batch, prompt=args.prompt_len)
        print(f"wrote {args.output}: mesh {m['mesh']} ({m['world_size']} ranks), moe {m['moe']}")
        return 0
    res = run_mesh(args.dir, args.nproc, seed=args.seed, backend=args.backend)
    ok = res["max_abs_diff"] <= 1e-4
    print(f"{res['ranks']} ranks: prefill {res['tokens_per_s']:.1f} tokens/s; vs eager max |diff| "
          f"{res['max_abs_diff']:.2e} ({'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
