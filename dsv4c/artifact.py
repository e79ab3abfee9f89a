"""The artifact directory: writing it atomically and reading it back with every check.

    out/
      manifest.json        format, tool versions, target, entry points (input/output types),
                           kernels, and the sha256 and size of every other file
      manifest.json.sha256 the manifest's own sha256 (`sha256sum -c` reads it)
      graph.ir             final IR of the first entry point (graph.<name>.ir for the others)
      kernels/<target>/    kernel sources and binaries (.ptx/.cubin, .amdgcn/.hsaco; the TVM CPU
                           kernels as one built shared library per LLVM module, `lib/`)
      report.json          compile times, fusion summary, per-kernel cost and AOT metadata

No pickle: JSON, IR text, kernel sources and compiler binaries only. `write_artifact` builds the
whole directory under a temporary name beside the destination (each file itself written to a
temporary file and renamed) and renames it into place, so a reader never sees half an artifact;
on failure the temporary directory is removed. `read_artifact` checks the manifest's sha256, its
schema (`dsv4c.schema`), the format, the versions, and every file before anything is used; it
opens only regular files inside the directory (no symbolic links, FIFOs or devices), checks their
size before reading and reads no more than the manifest lists.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import stat
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from dsv4c.errors import ArtifactError
from dsv4c.schema import check_relative, validate_manifest

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "atomic_write",
    "check_versions",
    "read_artifact",
    "read_manifest",
    "read_member",
    "sha256",
    "versions",
    "write_artifact",
]

FORMAT = "dsv4c-artifact"
FORMAT_VERSION = 2  # 2: the manifest's sha256 beside it; TVM CPU kernels as a built library
MANIFEST = "manifest.json"
SIDECAR = "manifest.json.sha256"  # "<sha256 of manifest.json>  manifest.json" (sha256sum -c)
MAX_MANIFEST_BYTES = 64 << 20
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
    """Write `data` to `path` through a temporary file and `os.replace` (the temporary file is
    removed when writing fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_artifact(
    dest: str | Path, manifest: Mapping[str, Any], files: Mapping[str, bytes]
) -> Path:
    """Write `files` (relative path -> bytes) and `manifest` (plus a `files` table of sizes and
    hashes, and the manifest's own sha256 beside it) as the artifact directory `dest`, replacing
    an earlier artifact there. On any failure nothing is left but what was there before."""
    dest = Path(os.path.abspath(dest))
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        what = "a symbolic link" if dest.is_symlink() else "a file, not a directory"
        raise ArtifactError(f"cannot write an artifact to {dest}: it is {what}")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST).is_file():
        raise ArtifactError(
            f"cannot write an artifact to {dest}: the directory is not empty and holds no "
            f"{MANIFEST} (refusing to replace something that is not a dsv4c artifact)"
        )
    table = {}
    for rel, data in sorted(files.items()):
        why = check_relative(rel)
        if why or rel in (MANIFEST, SIDECAR):
            raise ArtifactError(f"artifact file name {rel!r} is {why or 'reserved'}")
        table[rel] = {"sha256": sha256(data), "bytes": len(data)}
    text = (json.dumps(dict(manifest) | {"files": table}, indent=1) + "\n").encode()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for rel, data in files.items():
            atomic_write(tmp / rel, data)
        atomic_write(tmp / MANIFEST, text)
        atomic_write(tmp / SIDECAR, f"{sha256(text)}  {MANIFEST}\n".encode())
        _swap_in(tmp, dest, old)
    except OSError as e:
        raise ArtifactError(f"cannot write the artifact {dest}: {e}") from None
    finally:  # every failure path: no half-written copy left beside the destination
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _swap_in(tmp: Path, dest: Path, old: Path) -> None:
    """Rename `tmp` to `dest`; an earlier `dest` moves aside first and comes back if that fails."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_member(root: Path, rel: str, size: int, *, limit: int | None = None) -> bytes:
    """The bytes of the regular file `root/rel`, which must hold exactly `size` bytes (or, with
    `limit`, at most `limit`). Neither the file nor a folder on the way may be a symbolic link,
    so nothing outside `root` is read; a FIFO or a device is refused before a byte is read
    (opened non-blocking, checked with fstat), and no more than `size` bytes are read."""
    where = root / rel
    folder = root
    for part in rel.split("/")[:-1]:
        folder = folder / part
        st = os.lstat(folder)  # FileNotFoundError: the caller names the missing file
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise ArtifactError(f"{root}: {folder.relative_to(root)} is {kind}; {_REGULAR}")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(where, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactError(f"{root}: {rel} is a symbolic link; {_REGULAR}") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{root}: {rel} is {_kind(st.st_mode)}; {_REGULAR}")
        want = st.st_size if limit is not None else size
        if limit is not None and st.st_size > limit:
            raise ArtifactError(
                f"{root}: {rel} holds {st.st_size} bytes, at most {limit} expected; "
                "recompile the artifact"
            )
        if st.st_size != want:
            raise ArtifactError(
                f"{root}: file {rel} was altered: {st.st_size} bytes, expected {size}; "
                "recompile the artifact"
            )
        return _read_exactly(fd, want, f"{root}/{rel}")
    finally:
        os.close(fd)


_REGULAR = "an artifact holds only regular files (no links, FIFOs or devices); recompile it"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def _read_exactly(fd: int, n: int, where: str) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            raise ArtifactError(f"{where} shrank while it was read; recompile the artifact")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_manifest(src: str | Path) -> dict[str, Any]:
    """The manifest of artifact `src`, its sha256 checked against the sidecar and its structure
    against the schema (`dsv4c.schema`). Raises `ArtifactError` naming the problem."""
    src = Path(src)
    if not src.is_dir():
        what = "is a file, not an artifact directory" if src.exists() else "does not exist"
        raise ArtifactError(
            f"{src} {what}: not a dsv4c artifact directory (expected one written by dsv4c compile)"
        )
    try:
        text = read_member(src, MANIFEST, 0, limit=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ArtifactError(f"{src} has no {MANIFEST}; it is not a dsv4c artifact") from None
    except OSError as e:
        raise ArtifactError(f"{src / MANIFEST} is not readable: {e}") from None
    manifest = _parse_json(text, src / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{src / MANIFEST}: not a {FORMAT} manifest (a JSON object with format {FORMAT!r}); "
            "recompile the artifact"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{src}: artifact format version {_show(manifest.get('format_version'))}, this "
            f"dsv4c reads version {FORMAT_VERSION}; recompile it with this dsv4c"
        )
    _check_signature(src, text)
    validate_manifest(manifest, str(src / MANIFEST))
    return manifest


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_json(text: bytes, where: Path) -> Any:
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text.decode(), parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise ArtifactError(f"{where} is not readable JSON: {detail}") from None


def _check_signature(src: Path, text: bytes) -> None:
    try:
        line = read_member(src, SIDECAR, 0, limit=256).decode("ascii", "replace")
    except FileNotFoundError:
        raise ArtifactError(
            f"{src} has no {SIDECAR} (the manifest's own sha256); recompile the artifact"
        ) from None
    want = line.split()[0] if line.split() else ""
    if want != sha256(text):
        raise ArtifactError(
            f"{src}: {MANIFEST} was altered: sha256 {sha256(text)[:16]}…, {SIDECAR} says "
            f"{want[:16]}…; recompile the artifact"
        )


def read_artifact(
    src: str | Path, *, check_versions_: bool = True
) -> tuple[dict, dict[str, bytes]]:
    """The manifest and the verified contents of every file it lists.

    Raises `ArtifactError` naming the problem: no directory, no or unreadable manifest, a
    manifest altered or not matching the schema, another format, other tool versions, a missing
    file, a file that is not a regular file inside the directory, or a file whose size or sha256
    differs from the manifest.
    """
    src = Path(src)
    manifest = read_manifest(src)
    if check_versions_:
        check_versions(manifest, src)
    contents = {}
    for rel, entry in manifest["files"].items():
        try:
            data = read_member(src, rel, entry["bytes"])
        except FileNotFoundError:
            raise ArtifactError(
                f"{src}: file {rel} is missing (listed in {MANIFEST} with sha256 "
                f"{entry['sha256'][:16]}…); recompile the artifact"
            ) from None
        except OSError as e:
            raise ArtifactError(f"{src}: file {rel} is not readable: {e}") from None
        got = sha256(data)
        if got != entry["sha256"]:
            raise ArtifactError(
                f"{src}: file {rel} was altered: sha256 {got[:16]}…, expected "
                f"{entry['sha256'][:16]}…; recompile the artifact"
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
