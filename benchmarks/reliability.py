"""Hostile and careless input against dsv4c (issue 20), counted: each case runs in its own
subprocess, so a crash (a signal, an unexpected traceback) is counted instead of ending the run.

    .venv/bin/python benchmarks/reliability.py --json reliability.json      # ~2-4 min on 2 cores
    .venv/bin/python benchmarks/reliability.py --fuzz 10000 --json r.json

Cases are built on the small language model of tests/dsv4c/test_reliability.py (compiled once
with the TVM backend): broken artifacts (FIFO, links, schema mutants, edited manifest), inputs
out of range, valid inputs at every batch size and odd lengths (must equal eager), CLI arguments,
and failed writes (must leave no debris). Each outcome is one of: `clear` (a one-line DsvError
naming the problem), `correct` (a valid case that ran and matched eager), `crash`, `silent`
(accepted what it should refuse, or a wrong answer), `debris` (a failed write left files).

Then a fuzz of byte-level mutations: of graph.ir through the loader's parser and verifier, and of
manifest.json (re-signed, so the schema is what refuses it) through `read_manifest`: each must be
refused with a DsvError or parse into a graph that verifies; anything else is listed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "dsv4c"))

# child program: run one case, print one JSON line {"outcome", "detail"}
CHILD = r"""
import json, os, sys, torch
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import dsv4c
from dsv4c.errors import DsvError
import test_reliability as R
from pathlib import Path
art, kind, arg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def done(outcome, detail=""):
    print(json.dumps({{"outcome": outcome, "detail": str(detail)[:200]}})); sys.exit(0)
try:
    if kind == "load":
        dsv4c.load(art); done("silent", "loaded")
    if kind in ("input", "valid"):
        c = dsv4c.load(art).bind(R.toy().state_dict())
        if kind == "input":
            entry, make, _ = R.INPUT_CASES[arg]
            args, want = make(), None
        else:
            entry, args, want = R.valid_case(arg)
        got = c.entry(entry)(*args)
        if kind == "input":
            done("silent", "ran")
        ok = torch.allclose(got[0], want, rtol=1e-5, atol=1e-5)
        done("correct" if ok else "silent", "max diff %.2e" % (got[0] - want).abs().max())
    if kind == "write":
        R.failed_write(art, arg); done("silent", "written")
except DsvError as e:
    text = str(e)
    done("clear" if "\n" not in text else "crash", text)
except Exception as e:
    done("crash", f"{{type(e).__name__}}: {{e}}")
"""


def _test_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "test_reliability", ROOT / "tests" / "dsv4c" / "test_reliability.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def run_case(art: Path, kind: str, arg: str, workdir: Path) -> dict[str, Any]:
    """One case in a subprocess; a signal or a traceback is a crash; leftovers are debris."""
    code = CHILD.format(tests=str(ROOT / "tests" / "dsv4c"), root=str(ROOT))
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(art), kind, arg],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"outcome": "crash", "detail": "hung for 120 s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"outcome": "crash", "detail": f"exit {out.returncode}: {out.stderr[-200:]}"}
    row = json.loads(lines[-1])
    leftovers = [p.name for p in workdir.rglob(".*") if p.suffix in (".partial", ".tmp", ".old")]
    if leftovers:
        row = {"outcome": "debris", "detail": ", ".join(leftovers[:3])}
    return row


def cli_case(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "dsv4c.cli", *argv], capture_output=True, text=True, cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    err = out.stderr.strip().splitlines()
    if out.returncode == 1 and len(err) == 1 and "error:" in err[0] and "Error:" not in err[0]:
        return {"outcome": "clear", "detail": err[0][:200]}
    if out.returncode == 0:
        return {"outcome": "silent", "detail": "accepted"}
    return {"outcome": "crash", "detail": (err[-1] if err else f"exit {out.returncode}")[:200]}


def cases(R: Any, art: Path, tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for kind in R.CASES:
        work = tmp / f"case{len(rows)}"
        work.mkdir()
        broken = R.copy_of(art, work)
        R._break(kind, broken)
        rows.append((f"artifact: {kind}", run_case(broken, "load", "", work)))
    for name in R.INPUT_CASES_NAMES:
        rows.append((f"input: {name}", run_case(art, "input", name, tmp)))
    for name in R.VALID_CASES:
        rows.append((f"valid: {name}", run_case(art, "valid", name, tmp)))
    for name in R.WRITE_CASES:
        work = tmp / f"case{len(rows)}"
        work.mkdir()
        rows.append((f"write: {name}", run_case(R.copy_of(art, work), "write", name, work)))
    bad = tmp / "bad.safetensors"
    bad.write_bytes(random.Random(0).randbytes(4096))
    fifo_art = tmp / "fifo-art"
    R._break("fifo", _copy(R, art, fifo_art))
    out = str(tmp / "cli-out")
    base = ["compile", "--model", "tiny", "--backend", "tvm", "-o", out]
    for name, argv in [
        ("compile --max-len 0", [*base, "--max-len", "0"]),
        ("compile --max-len -5", [*base, "--max-len", "-5"]),
        ("compile --methods prefill,bogus", [*base, "--methods", "prefill,bogus"]),
        ("compile --methods ,", [*base, "--methods", ","]),
        ("compile --weights random bytes", [*base, "--weights", str(bad)]),
        ("compile --weights missing", [*base, "--weights", str(tmp / "none.safetensors")]),
        ("compile --model nope", ["compile", "--model", "nope", "-o", out]),
        ("run on a FIFO manifest artifact", ["run", str(fifo_art)]),
        ("run on a non-preset artifact", ["run", str(art)]),
        ("report on a FIFO artifact", ["report", str(fifo_art)]),
    ]:
        row = cli_case(argv)
        if Path(out).exists():
            row = {"outcome": "debris", "detail": f"{out} written"}
        rows.append((f"cli: {name}", row))
    return rows


def _copy(R: Any, art: Path, dest: Path) -> Path:
    shutil.copytree(art, dest)
    return dest


def fuzz(art: Path, tmp: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """`n` mutations, half of graph.ir (parser + verifier), half of manifest.json (re-signed;
    schema). Returns counts: refused (DsvError), accepted (a valid graph / manifest), other."""
    from dsv4c.artifact import MANIFEST, SIDECAR, read_manifest, sha256
    from dsv4c.errors import DsvError
    from dsv4c.loader import _parse

    rng = random.Random(seed)
    graph = (art / "graph.ir").read_bytes()
    manifest = (art / MANIFEST).read_bytes()
    work = tmp / "fuzz"
    shutil.copytree(art, work)
    counts: dict[str, Any] = {"mutations": n, "refused": 0, "accepted": 0, "other": []}
    start = time.perf_counter()
    for i in range(n):
        try:
            if i % 2 == 0:
                _parse({"graph.ir": mutate(graph, rng)}, "graph.ir", work)
            else:
                text = mutate(manifest, rng)
                (work / MANIFEST).write_bytes(text)
                (work / SIDECAR).write_text(f"{sha256(text)}  {MANIFEST}\n")
                read_manifest(work)
            counts["accepted"] += 1
        except DsvError:
            counts["refused"] += 1
        except Exception as e:  # noqa: BLE001  (the finding: anything that is not a DsvError)
            counts["other"].append(f"{i}: {type(e).__name__}: {str(e)[:100]}")
    counts["seconds"] = round(time.perf_counter() - start, 1)
    return counts


TOKENS = [b"%", b":", b"[", b"]", b",", b"B", b"T", b"-1", b"0", b"1e400", b"nan", b"{", b"}",
          b'"', b"\x00", b"\xff", b"99999999999999999999999999", b"f32", b"i64", b"=", b"(", b")",
          b"\n", b"  ", b"null", b"true", b"[]", b"{}", b"-", b"*", b"//"]  # fmt: skip


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random edits: flip a byte, delete / duplicate a span, insert a token, swap
    two lines, truncate."""
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data))
        op = rng.randrange(6)
        if op == 0:
            data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
        elif op == 1:
            data = data[:i] + data[i + rng.randint(1, 40) :]
        elif op == 2:
            j = min(len(data), i + rng.randint(1, 40))
            data = data[:j] + data[i:j] + data[j:]
        elif op == 3:
            data = data[:i] + rng.choice(TOKENS) + data[i:]
        elif op == 4:
            lines = data.split(b"\n")
            a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[a], lines[b] = lines[b], lines[a]
            data = b"\n".join(lines)
        else:
            data = data[:i]
        if not data:
            data = b"x"
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fuzz", type=int, default=10_000, help="mutations (default 10,000)")
    ap.add_argument("--json", default="reliability.json")
    args = ap.parse_args()
    R = _test_module()
    with tempfile.TemporaryDirectory(prefix="dsv4c-reliability-") as d:
        tmp = Path(d)
        art = tmp / "art"
        R.compile_toy(art)
        rows = cases(R, art, tmp)
        fuzzed = fuzz(art, tmp, args.fuzz)
    table = {k: sum(1 for _, r in rows if r["outcome"] == k) for k in
             ("clear", "correct", "crash", "silent", "debris")}  # fmt: skip
    doc = {
        "cases_tried": len(rows),
        "clear_errors": table["clear"],
        "correct": table["correct"],
        "crashes": table["crash"],
        "silent_accepts": table["silent"],
        "debris": table["debris"],
        "fuzz": {k: (v if k != "other" else len(v)) for k, v in fuzzed.items()},
        "fuzz_other": fuzzed["other"][:20],
        "cases": [{"case": name} | row for name, row in rows],
    }
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k not in ("cases", "fuzz_other")}))
    bad = [f"{name}: {r}" for name, r in rows if r["outcome"] not in ("clear", "correct")]
    for line in bad:
        print("  ", line)
    return 1 if bad or fuzzed["other"] else 0


if __name__ == "__main__":
    sys.exit(main())
