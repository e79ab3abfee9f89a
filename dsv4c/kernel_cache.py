"""Ahead-of-time kernel compiles through a cache keyed by content hash: Triton and nvcc.

Triton: a job is one (kernel source, tile constexprs, compile options, divisibility hints,
target); its key is the sha256 of those and the Triton version. A compiled job is stored under
`$DSV4C_CACHE_DIR/aot/<target>/<key>/` (default `~/.cache/dsv4c`): `result.json` (registers,
shared memory, spills, ...) and the kernel's assembly and binary. A second compile of the same
model finds every job there and starts no compiler at all. Misses go to
`backends.triton.aot.aot_compile` in chunks, so long compiles report progress. Each job becomes
a `KernelBinary` of its kernel's `KernelRecord`, its files named per variant.

nvcc (`nvcc_with_cache`, the TVM backend's CUDA kernels): the key is the sha256 of the kernel's
CUDA source, the arch, nvcc's version line and its flags; an entry under
`$DSV4C_CACHE_DIR/nvcc/<target>/<key>/` holds `result.json` (the `KernelBinary`) and the cubin.

Entries are JSON and raw bytes (no pickle), written atomically (temporary file + rename), and
each blob's sha256 is checked on load: a damaged entry is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from backends.base import KernelBinary
from backends.targets import Target, parallel_jobs

__all__ = ["CHUNK", "AotJob", "aot_cache_dir", "aot_with_cache", "nvcc_cache_dir", "nvcc_key"]
__all__ += ["nvcc_with_cache"]

CHUNK = 24  # kernels per compiler process and batch (one progress step)
Progress = Callable[[int, int], None]  # (done, total)


def _cache_root() -> Path:
    return Path(os.environ.get("DSV4C_CACHE_DIR") or Path.home() / ".cache" / "dsv4c")


def aot_cache_dir() -> Path:
    return _cache_root() / "aot"


def nvcc_cache_dir() -> Path:
    return _cache_root() / "nvcc"


# part of every AOT cache key: 2 since entries written before `_rounds` may hold another
# variant's bytes (their sha256 matched what was stored, so they would still be read)
AOT_CACHE_FORMAT = 2


@dataclass(frozen=True)
class AotJob:
    source: Any  # backends.triton.kernel.KernelSource
    variant: Any  # backends.triton.emitters.AotVariant
    target: Target

    @property
    def key(self) -> str:
        from importlib import metadata

        blob = json.dumps(
            [
                self.source.source,
                sorted(self.variant.constexprs.items()),
                sorted(self.variant.options.items()),
                sorted(self.variant.hints.items()),
                self.target.name,
                metadata.version("triton"),
                AOT_CACHE_FORMAT,
            ],
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @property
    def variant_id(self) -> str:
        """8 hex digits telling this job from the kernel's other variants (tiles, options)."""
        parts = [sorted(self.variant.constexprs.items()), sorted(self.variant.options.items())]
        parts.append(sorted(self.variant.hints.items()))
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:8]

    def file_name(self, ext: str) -> str:
        """`<name>_<key>.<variant>.<ext>`: one file per kernel variant, never overwritten."""
        return f"{self.source.name}_{self.source.key}.{self.variant_id}.{ext}"


class _OneVariant:
    """A launch stand-in offering exactly one AOT variant, so `aot_compile` compiles one job."""

    def __init__(self, job: AotJob) -> None:
        self.source = job.source
        self._variant = job.variant

    def aot_variants(self, env: dict, target: Target) -> list[Any]:
        return [self._variant]


def jobs_of(exe: Any, target: Target, bindings: Mapping[str, int]) -> list[AotJob]:
    """Every distinct AOT job of a Triton executable, in first-use order."""
    from backends.triton.aot import distinct_variants

    return [AotJob(s, v, target) for s, v in distinct_variants([exe], target, bindings)]


def aot_with_cache(
    exe: Any,
    target: Target,
    bindings: Mapping[str, int],
    *,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> tuple[dict[str, list[KernelBinary]], dict[str, bytes], dict[str, int]]:
    """Compile every kernel of `exe` for `target`. Returns (binaries, files, stats): the
    `KernelBinary` of each job by kernel key (file names inside `kernels/<target>/`, one set per
    variant: `<name>_<key>.<variant>.<ext>`), the files' bytes by that name, and
    {"hits", "misses"}."""
    from backends.triton.aot import aot_compile

    jobs = jobs_of(exe, target, bindings)
    cache = aot_cache_dir() / target.name
    rows: list[KernelBinary | None] = [None] * len(jobs)
    files: dict[str, bytes] = {}
    misses = []
    for i, job in enumerate(jobs):
        hit = _read_entry(cache / job.key) if use_cache else None
        if hit is None:
            misses.append(i)
            continue
        rows[i] = _place(job, hit[0], hit[1], files)
    done = len(jobs) - len(misses)
    if progress:
        progress(done, len(jobs))
    step = CHUNK * parallel_jobs()
    for chunk in _rounds(misses, jobs, step):
        fake = SimpleNamespace(
            graph=exe.graph,
            steps=[SimpleNamespace(launch=_OneVariant(jobs[i])) for i in chunk],
        )
        with tempfile.TemporaryDirectory(prefix="dsv4c-aot-") as keep:
            results = aot_compile(fake, [target], bindings=bindings, keep_dir=keep)
            if len(results) != len(chunk):
                raise RuntimeError(f"AOT returned {len(results)} results for {len(chunk)} jobs")
            for i, result in zip(chunk, results):
                row = dataclasses.asdict(result)
                blobs = {Path(f).name: Path(f).read_bytes() for f in result.files}
                if use_cache and result.error is None:
                    _write_entry(cache / jobs[i].key, row, blobs)
                rows[i] = _place(jobs[i], row, blobs, files)
        done += len(chunk)
        if progress:
            progress(done, len(jobs))
    stats = {"hits": len(jobs) - len(misses), "misses": len(misses)}
    out: dict[str, list[KernelBinary]] = {}
    for job, binary in zip(jobs, rows):
        if binary is not None:
            out.setdefault(job.source.key, []).append(binary)
    return out, files, stats


def _rounds(misses: list[int], jobs: Sequence[AotJob], size: int) -> list[list[int]]:
    """The missed jobs in rounds of at most `size` with one variant of a kernel each:
    `aot_compile` writes a kernel's files as `<name>_<key>.<kind>` in its keep folder, so two
    variants compiled in one call overwrote each other and every variant got the bytes of the
    last one written (tiny's three sparse_mqa_prefill cubins were one file three times)."""
    rounds: list[list[int]] = []
    keys: list[set[str]] = []
    for i in misses:
        key = jobs[i].source.key
        n = next((r for r, have in enumerate(keys) if key not in have and len(rounds[r]) < size),
                 len(rounds))  # fmt: skip
        if n == len(rounds):
            rounds.append([])
            keys.append(set())
        rounds[n].append(i)
        keys[n].add(key)
    return rounds


def _place(
    job: AotJob, row: dict[str, Any], blobs: dict[str, bytes], files: dict[str, bytes]
) -> KernelBinary:
    """The job's `KernelBinary`, its blobs added to `files` under the variant's file names
    (a blob's extension is its kind: ptx, cubin, amdgcn, hsaco)."""
    names = []
    for blob, data in sorted(blobs.items()):
        name = job.file_name(blob.rsplit(".", 1)[-1])
        files[name] = data
        names.append(name)
    return KernelBinary(
        target=job.target.name,
        variant=job.variant_id,
        files=tuple(names),
        tiles=dict(row["constexprs"]),
        options=dict(row["options"]),
        registers=row.get("registers"),
        shared=row.get("shared"),
        spills=row.get("spills"),
        stack_bytes=row.get("stack_bytes"),
        binary_bytes=row.get("binary_bytes"),
        error=row.get("error"),
    )


def nvcc_key(source: str, arch: str, version: str, flags: tuple[str, ...]) -> str:
    """The cache key of one nvcc compile: sha256 of the CUDA source, arch, nvcc version line and
    flags (32 hex digits)."""
    blob = json.dumps([source, arch, version, list(flags)])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def nvcc_with_cache(
    exe: Any, *, use_cache: bool = True
) -> tuple[dict[str, list[KernelBinary]], dict[str, bytes], dict[str, int]]:
    """`exe.compile_binaries()` of a TVM `DeviceExecutable`, each CUDA kernel's cubin taken from
    the cache when its key (`nvcc_key`) is there. Returns (binaries by kernel key, files by name
    inside `kernels/<target>/`, {"hits", "misses"}). Failed compiles are not cached; without
    nvcc (or for OpenCL/WebGPU) this is `compile_binaries` with no hits or misses."""
    from backends.tvm.device import NVCC_FLAGS, nvcc_version

    version = nvcc_version()
    if exe.kind != "cuda" or version is None:
        binaries, files = exe.compile_binaries()
        return binaries, files, {"hits": 0, "misses": 0}
    arch = f"sm_{exe.target.arch}"
    cache = nvcc_cache_dir() / exe.target.name
    records = exe.kernel_records()
    keys = [nvcc_key(r.source, arch, version, NVCC_FLAGS) for r in records]
    binaries: dict[str, list[KernelBinary]] = {}
    files: dict[str, bytes] = {}
    misses = []
    for record, key in zip(records, keys):
        hit = _read_entry(cache / key) if use_cache else None
        if hit is None:
            misses.append((record, key))
            continue
        row, blobs = hit
        binaries[record.key] = [_binary(row, blobs)]
        files |= blobs
    with tempfile.TemporaryDirectory(prefix="dsv4c-nvcc-") as tmp:
        with ThreadPoolExecutor(max(1, parallel_jobs())) as pool:
            done = list(pool.map(lambda m: exe.nvcc(m[0], Path(tmp)), misses))
    for (record, key), (binary, blobs) in zip(misses, done):
        binaries[record.key] = [binary]
        files |= blobs
        if use_cache and binary.error is None:
            _write_entry(cache / key, binary.row(), blobs)
    return binaries, files, {"hits": len(records) - len(misses), "misses": len(misses)}


def _binary(row: Mapping[str, Any], blobs: Mapping[str, bytes]) -> KernelBinary:
    """A cached `KernelBinary.row()` back to the binary; its files are the entry's blobs."""
    fields = {f.name for f in dataclasses.fields(KernelBinary)}
    args = {k: v for k, v in row.items() if k in fields}
    return KernelBinary(**args | {"files": tuple(sorted(blobs))})


def _read_entry(folder: Path) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """An entry's row and blobs; None when there is none, or when it is damaged (unreadable,
    or a blob's sha256 differs: warned about, then recompiled and overwritten)."""
    if not (folder / "result.json").is_file():
        return None
    try:
        row = json.loads((folder / "result.json").read_text())
        blobs = {name: (folder / name).read_bytes() for name in row["blobs"]}
        sums = row.pop("sha256")
        bad = [n for n, s in sums.items() if hashlib.sha256(blobs[n]).hexdigest() != s]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return _damaged(folder, f"{type(e).__name__}: {e}")
    if bad:
        return _damaged(folder, f"the sha256 of {bad[0]} differs from result.json")
    row.pop("blobs")
    return row, blobs


def _damaged(folder: Path, why: str) -> None:
    warnings.warn(
        f"dsv4c: kernel cache entry {folder} is damaged ({why}); ignoring it and compiling "
        "again (the entry is overwritten)",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _write_entry(folder: Path, row: dict[str, Any], blobs: dict[str, bytes]) -> None:
    from dsv4c.artifact import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        atomic_write(folder / name, data)
    meta = dict(row) | {
        "files": [],
        "blobs": sorted(blobs),
        "sha256": {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()},
    }
    atomic_write(folder / "result.json", json.dumps(meta, default=list).encode())
