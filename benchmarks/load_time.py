"""How long `dsv4c.load` of a TVM CPU artifact takes in a fresh process (issue 20), medians of
several fresh processes, written as JSON.

    .venv/bin/python -m dsv4c.cli compile --model tiny --backend tvm --target cpu -o /tmp/tiny
    .venv/bin/python benchmarks/load_time.py /tmp/tiny --runs 7 --json load_time.json
    .venv/bin/python benchmarks/load_time.py /tmp/tiny --repo base=/tmp/base-worktree  # compare

What is timed: a new Python process runs `import torch, dsv4c` (timed apart, `import_s`), then
`dsv4c.load(artifact)` (`load_s`, wall clock; `load_cpu_s`, this process's CPU time, which other
processes' load on a shared machine disturbs less). Every check of a load is inside that time:
the manifest's sha256 and schema, every file's size and sha256, parsing and verifying the IR
graphs, binding the shipped kernel library. After the load the child reports whether TVM's
compiler was imported (`tvm` in sys.modules) or mapped (`libtvm_compiler` / `libtvm.so`), and how
many full garbage collections ran.

Importing torch leaves a full garbage collection pending (the generation counters stand just
below their thresholds): whatever runs next with a few thousand allocations pays it, 0.11-0.14 s
of CPU over the ~200,000 objects torch and dsv4c created. `load_after_gc` runs `gc.collect()`
before the clock starts, to show the load without that debt (both are reported; `load` is the
headline). Two more process kinds measure what the load cannot avoid, so the table can say where
the time goes: `runtime` imports only `tvm_ffi` (TVM's runtime bindings, which import `ml_dtypes`
unconditionally) after torch and dsv4c, `ml_dtypes` imports only that. `phases` runs the
loader's steps one by one (read + hash, parse + verify, runtime import, library, executable).

Process kinds and checkouts (`--repo name=path`) are interleaved run by run, so a change in the
machine's load hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# child program: argv = artifact, kind; prints one JSON line of seconds and facts
CHILD = r"""
import gc, json, sys, time
sys.path.insert(0, {repo!r})
W, C = time.perf_counter, time.process_time
w0, c0 = W(), C()
import torch, dsv4c
w1, c1 = W(), C()
art, kind = sys.argv[1], sys.argv[2]
if kind == "load_after_gc":  # the imports' pending full collection, paid before the clock
    gc.collect()
    w1, c1 = W(), C()
full0 = gc.get_stats()[2]["collections"]
phases = {{}}
if kind in ("load", "load_after_gc"):
    dsv4c.load(art)
elif kind == "runtime":
    import tvm_ffi
elif kind == "ml_dtypes":
    import ml_dtypes
elif kind == "phases":
    from dsv4c import loader
    from dsv4c.artifact import read_artifact
    from backends.targets import get_target
    t = W(); m, files = read_artifact(art); phases["read_and_hash"] = W() - t
    tgt = get_target(m["target"])
    t = W(); graphs = {{e["name"]: loader._parse(files, e["graph"], art)
                       for e in m["entry_points"]}}; phases["parse_and_verify"] = W() - t
    t = W(); import tvm_ffi; phases["runtime_import"] = W() - t
    t = W()
    for name, g in graphs.items():
        loader._executable(m, files, name, g, tgt, art)
    phases["library_and_executable"] = W() - t
w2, c2 = W(), C()
maps = open("/proc/self/maps").read()
print(json.dumps({{
    "import_s": w1 - w0, "import_cpu_s": c1 - c0, "load_s": w2 - w1, "load_cpu_s": c2 - c1,
    "phases": phases, "full_gc": gc.get_stats()[2]["collections"] - full0,
    "tvm_imported": "tvm" in sys.modules,
    "compiler_mapped": "libtvm_compiler" in maps or "/libtvm.so" in maps,
}}))
"""

KINDS = ("load", "load_after_gc", "runtime", "ml_dtypes", "phases")


def run_child(repo: Path, artifact: Path, kind: str) -> dict[str, Any]:
    code = CHILD.format(repo=str(repo))
    out = subprocess.run(
        [sys.executable, "-c", code, str(artifact), kind],
        capture_output=True, text=True, cwd=repo, timeout=600,
    )  # fmt: skip
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"load_time: the {kind} child in {repo} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min of every number over the runs (phases too)."""
    out: dict[str, Any] = {}
    for key in ("import_s", "import_cpu_s", "load_s", "load_cpu_s", "full_gc"):
        values = [r[key] for r in rows]
        out[key] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4)}
    for key in rows[0]["phases"]:
        values = [r["phases"][key] for r in rows]
        out[f"phase.{key}"] = {"median": round(statistics.median(values), 4)}
    out["tvm_imported"] = any(r["tvm_imported"] for r in rows)
    out["compiler_mapped"] = any(r["compiler_mapped"] for r in rows)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", type=Path, help="a TVM CPU artifact (dsv4c compile ... -o DIR)")
    ap.add_argument("--runs", type=int, default=7, help="fresh processes per variant")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    ap.add_argument("--repo", action="append", default=[], help="name=path of another checkout")
    ap.add_argument("--json", type=Path, default=None, help="write the table here")
    args = ap.parse_args()
    if not (args.artifact / "manifest.json").is_file():
        ap.error(f"{args.artifact} is not an artifact directory (no manifest.json)")
    kinds = [k for k in args.kinds.split(",") if k]
    if bad := [k for k in kinds if k not in KINDS]:
        ap.error(f"unknown kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    repos = {"this": ROOT} | dict(_named(r, ap) for r in args.repo)
    rows: dict[str, list[dict[str, Any]]] = {}
    start = os.getloadavg()
    for _ in range(args.runs):
        for name, repo in repos.items():
            for kind in kinds:
                rows.setdefault(f"{name}:{kind}", []).append(run_child(repo, args.artifact, kind))
    doc = {
        "what": "seconds of dsv4c.load(artifact) in a fresh process after import torch, dsv4c",
        "artifact": str(args.artifact),
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "loadavg_start_end": [start[0], os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "variants": {k: summary(v) for k, v in rows.items()},
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    for name, s in doc["variants"].items():
        load, cpu = s["load_s"], s["load_cpu_s"]["median"]
        print(
            f"{name:24} load {load['median']:.3f} s (min {load['min']:.3f}), cpu {cpu:.3f} s, "
            f"full gc {s['full_gc']['median']}, tvm imported {s['tvm_imported']}, "
            f"compiler mapped {s['compiler_mapped']}"
        )
        phases = {k[6:]: v["median"] for k, v in s.items() if k.startswith("phase.")}
        if phases:
            print(f"{'':24} phases {phases}")
    print(f"load average {doc['loadavg_start_end'][0]:.2f} -> {doc['loadavg_start_end'][1]:.2f}")
    return 0


def _named(text: str, ap: argparse.ArgumentParser) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not (Path(path) / "dsv4c").is_dir():
        ap.error(f"--repo expects name=path of a dsv4c checkout, got {text!r}")
    return name, Path(path).resolve()


if __name__ == "__main__":
    sys.exit(main())
