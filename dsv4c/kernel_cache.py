"""Ahead-of-time Triton compilation through a kernel cache keyed by content hash.

A job is one (kernel source, tile constexprs, compile options, divisibility hints, target); its
key is the sha256 of those and the Triton version. A compiled job is stored under
`$DSV4C_CACHE_DIR/aot/<target>/<key>/` (default `~/.cache/dsv4c`): `result.json` (registers,
shared memory, spills, ...) and the kernel's assembly and binary. A second compile of the same
model finds every job there and starts no compiler at all. Misses go to
`backends.triton.aot.aot_compile` in chunks, so long compiles report progress. Each job becomes
a `KernelBinary` of its kernel's `KernelRecord`, its files named per variant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from backends.base import KernelBinary
from backends.targets import Target, parallel_jobs

__all__ = ["CHUNK", "AotJob", "aot_cache_dir", "aot_with_cache"]

CHUNK = 24  # kernels per compiler process and batch (one progress step)
Progress = Callable[[int, int], None]  # (done, total)


def aot_cache_dir() -> Path:
    root = os.environ.get("DSV4C_CACHE_DIR") or Path.home() / ".cache" / "dsv4c"
    return Path(root) / "aot"


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
    for start in range(0, len(misses), step):
        chunk = misses[start : start + step]
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


def _read_entry(folder: Path) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    try:
        row = json.loads((folder / "result.json").read_text())
        blobs = {name: (folder / name).read_bytes() for name in row["blobs"]}
    except (OSError, ValueError, KeyError):
        return None
    sums = row.pop("sha256")
    if any(hashlib.sha256(blobs[n]).hexdigest() != s for n, s in sums.items()):
        return None  # a damaged entry is a miss, recompiled and overwritten
    row.pop("blobs")
    return row, blobs


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
