"""The artifact directory: writing it atomically and reading it back with every check.

    out/
      manifest.json        format, tool versions, target, entry points (input/output types),
                           kernels, and the sha256 of every other file
      graph.ir             final IR of the first entry point (graph.<name>.ir for the others)
      kernels/<target>/    kernel sources (and binaries: .ptx/.cubin, .amdgcn/.hsaco)
      report.json          compile times, fusion summary, per-kernel cost and AOT metadata

No pickle: JSON, IR text, kernel sources and compiler binaries only. `write_artifact` builds the
whole directory under a temporary name beside the destination (each file itself written to a
temporary file and renamed) and renames it into place, so a reader never sees half an artifact.
`read_artifact` checks the format, the versions and every hash before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from dsv4c.errors import ArtifactError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "atomic_write",
    "check_versions",
    "read_artifact",
    "sha256",
    "versions",
    "write_artifact",
]

FORMAT = "dsv4c-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# files a tool may add next to an artifact after it was written (not hashed)
DERIVED = ("report.html",)


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of dsv4c and its toolchains, read from package metadata (nothing is imported)."""
    return {
        "dsv4c": _dist_version("dsv4c") or "0.1.0",
        "torch": _dist_version("torch"),
        "triton": _dist_version("triton"),
        "tvm": _dist_version("apache-tvm"),
        "python": platform.python_version(),
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_artifact(
    dest: str | Path, manifest: Mapping[str, Any], files: Mapping[str, bytes]
) -> Path:
    """Write `files` (relative path -> bytes) and `manifest` (plus a `files` table of sizes and
    hashes) as the artifact directory `dest`, replacing an earlier artifact there."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ArtifactError(f"cannot write an artifact to {dest}: it is a file, not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST).is_file():
        raise ArtifactError(
            f"cannot write an artifact to {dest}: the directory is not empty and holds no "
            f"{MANIFEST} (refusing to replace something that is not a dsv4c artifact)"
        )
    table = {}
    for rel, data in sorted(files.items()):
        _check_relative(rel)
        table[rel] = {"sha256": sha256(data), "bytes": len(data)}
    full = dict(manifest) | {"files": table}
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel, data in files.items():
        atomic_write(tmp / rel, data)
    atomic_write(tmp / MANIFEST, (json.dumps(full, indent=1, sort_keys=False) + "\n").encode())
    if dest.exists():
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def _check_relative(rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel == MANIFEST:
        raise ValueError(f"artifact file name {rel!r} must be relative, inside the directory")


def read_artifact(
    src: str | Path, *, check_versions_: bool = True
) -> tuple[dict, dict[str, bytes]]:
    """The manifest and the verified contents of every file it lists.

    Raises `ArtifactError` naming the problem: no directory, no or unreadable manifest, another
    format, other tool versions, a missing file, or a file whose sha256 differs from the manifest.
    """
    src = Path(src)
    if not src.is_dir():
        what = "is a file, not an artifact directory" if src.exists() else "does not exist"
        raise ArtifactError(f"{src} {what} (expected a directory written by dsv4c compile)")
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{src} has no {MANIFEST}; it is not a dsv4c artifact") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src / MANIFEST} is not readable JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{src / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{src}: artifact format version {manifest.get('format_version')}, this dsv4c reads "
            f"version {FORMAT_VERSION}; recompile it with this dsv4c"
        )
    if check_versions_:
        check_versions(manifest, src)
    contents = {}
    for rel, entry in manifest.get("files", {}).items():
        try:
            _check_relative(rel)
        except ValueError as e:
            raise ArtifactError(f"{src / MANIFEST}: {e}") from None
        path = src / rel
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(
                f"{src}: file {rel} is missing (listed in {MANIFEST} with sha256 "
                f"{entry['sha256'][:16]}…); recompile the artifact"
            ) from None
        got = sha256(data)
        if got != entry["sha256"]:
            raise ArtifactError(
                f"{src}: file {rel} was altered: sha256 {got[:16]}…, expected "
                f"{entry['sha256'][:16]}… ({entry['bytes']} bytes, got {len(data)}); "
                "recompile the artifact"
            )
        contents[rel] = data
    return manifest, contents


def check_versions(manifest: Mapping[str, Any], where: str | Path = "artifact") -> None:
    """dsv4c must match exactly, torch by major.minor, and the backend's toolchain exactly
    (Triton/TVM binaries are only valid for the compiler version that made them)."""
    have, got = versions(), manifest.get("versions", {})
    checks = [("dsv4c", "exact"), ("torch", "minor")]
    toolchain = {"triton": "triton", "tvm": "tvm"}.get(manifest.get("backend", ""))
    if toolchain:
        checks.append((toolchain, "exact"))
    for name, how in checks:
        want, here = got.get(name), have.get(name)
        same = want == here if how == "exact" else _minor(want) == _minor(here)
        if not same:
            raise ArtifactError(
                f"{where}: compiled with {name} {want}, this environment has {name} {here}; "
                "recompile it here (or load with check_versions=False to try anyway)"
            )


def _minor(v: str | None) -> str | None:
    return None if v is None else ".".join(v.split("+")[0].split(".")[:2])
