"""The built CPU kernels of a TVM executable as artifact files, and back without a compiler.

`export_files(exe, folder, entry)` writes each LLVM module holding the executable's kernels as a
shared library (`<folder>/lib/<sha256[:16]>.so`, shared by the entry points that use it) and a
table `<folder>/library.<entry>.json`: kernel key -> (library, symbol), the keys whose lowering
failed (their ops run the reference), the LLVM target and the CPU it was built on.

`load_library(files, folder, entry)` maps those files back to packed functions. A shared library
is native code that runs when it is loaded, so it is loaded only from the bytes the caller has
already checked (the artifact's sha256 table), copied to a private temporary file — never from
the artifact directory, where it could be swapped after the check. It needs the TVM runtime
(`libtvm_runtime`, 3 MB), not the compiler: when TVM's Python package is not imported yet, only
the runtime libraries are loaded. A library built for a CPU with features this one lacks is not
loaded (`Unusable`: the caller recompiles from the IR instead).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from backends.tvm import kernel as K

__all__ = ["Library", "Unusable", "export_files", "load_library", "table_name"]

TABLE_FORMAT = 1


class Unusable(Exception):
    """The artifact's library cannot run here (other CPU, no table); recompile from the IR."""


@dataclass(frozen=True)
class Library:
    """Packed functions by kernel key, and what `make_kernel` needs to skip lowering."""

    llvm: str
    functions: Mapping[str, Any]
    prebuilt: K.Prebuilt


def table_name(folder: str, entry: str) -> str:
    return f"{folder}/library.{entry}.json"


def export_files(exe: Any, folder: str, entry: str) -> dict[str, bytes]:
    """The shared libraries and the table of `exe`'s kernels (module docstring)."""
    tkey = str(exe.llvm_target)
    files: dict[str, bytes] = {}
    kernels: dict[str, dict[str, str]] = {}
    for k in exe.kernels():
        data = _exported(K.module_of(tkey, k.key))
        rel = f"{folder}/lib/{hashlib.sha256(data).hexdigest()[:16]}.so"
        files[rel] = data
        kernels[k.key] = {"library": rel, "symbol": K.symbol_of(k)}
    table = {
        "format": TABLE_FORMAT,
        "llvm": tkey,
        "machine": platform.machine(),
        "cpu_flags": sorted(cpu_flags()),
        "kernels": kernels,
        "unsupported": K.unsupported_kernels(),
    }
    files[table_name(folder, entry)] = (json.dumps(table, indent=1) + "\n").encode()
    return files


_EXPORTED: dict[int, bytes] = {}  # id(module) -> its shared library (modules live all session)


def _exported(module: Any) -> bytes:
    if id(module) not in _EXPORTED:
        with tempfile.TemporaryDirectory(prefix="dsv4c-tvm-") as d:
            path = Path(d) / "kernels.so"
            module.export_library(str(path))
            _EXPORTED[id(module)] = path.read_bytes()
    return _EXPORTED[id(module)]


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def load_library(files: Mapping[str, bytes], folder: str, entry: str) -> Library:
    """The packed functions of entry point `entry` from verified artifact `files` (module
    docstring). Raises `Unusable` when they cannot run here, `ValueError` on a malformed table."""
    raw = files.get(table_name(folder, entry))
    if raw is None:
        raise Unusable(f"no {table_name(folder, entry)} (no built library)")
    table = _table(raw, files)
    if table["machine"] != platform.machine():
        raise Unusable(f"built for {table['machine']}, this machine is {platform.machine()}")
    missing = sorted(set(table["cpu_flags"]) - cpu_flags())
    if missing or not table["cpu_flags"]:
        raise Unusable(f"built for a CPU with {', '.join(missing[:5]) or 'unknown'} features")
    libraries = {r["library"] for r in table["kernels"].values()}
    modules = {rel: _load_module(files[rel]) for rel in libraries}
    functions = {key: modules[r["library"]][r["symbol"]] for key, r in table["kernels"].items()}
    symbols = {key: r["symbol"] for key, r in table["kernels"].items()}
    return Library(table["llvm"], functions, K.Prebuilt(symbols, table["unsupported"]))


def _table(raw: bytes, files: Mapping[str, bytes]) -> dict[str, Any]:
    table = json.loads(raw)
    ok = (
        isinstance(table, dict)
        and table.get("format") == TABLE_FORMAT
        and all(isinstance(table.get(f), str) for f in ("llvm", "machine"))
        and isinstance(table.get("cpu_flags"), list)
        and isinstance(table.get("unsupported"), dict)
        and isinstance(table.get("kernels"), dict)
        and all(
            isinstance(r, dict)
            and r.get("library") in files
            and str(r.get("library")).endswith(".so")
            and isinstance(r.get("symbol"), str)
            for r in table["kernels"].values()
        )
    )
    if not ok:
        raise ValueError("the kernel library table is malformed")
    return table


def _load_module(data: bytes) -> Any:
    """Load a shared library from `data` (already verified) through a private file."""
    with tempfile.TemporaryDirectory(prefix="dsv4c-lib-") as d:
        path = Path(d) / "kernels.so"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o500)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if "tvm" in sys.modules:  # the full TVM is loaded anyway
            import tvm

            return tvm.runtime.load_module(str(path))
        import tvm_ffi  # before the runtime libraries, which link against libtvm_ffi

        _load_runtime()
        return tvm_ffi.load_module(str(path))  # mapped: the file may go once this returns


@cache
def _load_runtime() -> None:
    """TVM's runtime libraries (parallel launch, workspace, the contrib sort top-k calls), not
    its compiler: what a built kernel library needs, loaded the way `tvm` itself loads them."""
    spec = find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise Unusable("TVM is not installed")
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    for name in ("libtvm_runtime.so", "libtvm_runtime_extra.so"):
        if (lib / name).is_file():
            ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
