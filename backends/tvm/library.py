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

from backends import naming
from backends.tvm import kernel as K

__all__ = ["Library", "Unusable", "check_table", "export_files", "load_library", "table_name"]

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
    docstring). Raises `Unusable` when they cannot run here, `ValueError` naming the field when
    the table is malformed (`check_table`) or a library lacks a function the table names."""
    rel = table_name(folder, entry)
    raw = files.get(rel)
    if raw is None:
        raise Unusable(f"no {rel} (no built library)")
    table = check_table(raw, files, rel)
    if table["machine"] != platform.machine():
        raise Unusable(f"built for {table['machine']}, this machine is {platform.machine()}")
    missing = sorted(set(table["cpu_flags"]) - cpu_flags())
    if missing or not table["cpu_flags"]:
        raise Unusable(f"built for a CPU with {', '.join(missing[:5]) or 'unknown'} features")
    libraries = {r["library"] for r in table["kernels"].values()}
    modules = {lib: _load_module(files[lib]) for lib in sorted(libraries)}
    functions = {}
    for key, r in table["kernels"].items():
        try:
            functions[key] = modules[r["library"]][r["symbol"]]
        except AttributeError:  # tvm_ffi's answer for a symbol the module lacks
            raise ValueError(f"{r['library']} has no function {r['symbol']} ({rel})") from None
    symbols = {key: r["symbol"] for key, r in table["kernels"].items()}
    return Library(table["llvm"], functions, K.Prebuilt(symbols, table["unsupported"]))


def check_table(raw: bytes, files: Mapping[str, bytes], rel: str) -> dict[str, Any]:
    """The kernel table `rel`, checked field by field before anything is loaded: a symbol must
    name its key (`<name>_<key>`, as `naming.file_stem` makes it), so a table that points a
    kernel at another kernel's function is refused, not run; a library must be a listed `.so`;
    a key is either built or unsupported (with a reason), not both."""
    try:
        table = json.loads(raw)
    except RecursionError:
        raise ValueError(f"{rel} is nested too deeply") from None
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT:
        raise ValueError(f"{rel}: expected a JSON object with format {TABLE_FORMAT}")
    for field, want in (("llvm", str), ("machine", str), ("cpu_flags", list)):
        if not isinstance(table.get(field), want):
            raise ValueError(f"{rel}: {field}: expected a JSON {_JSON[want]}")
    if not all(isinstance(f, str) for f in table["cpu_flags"]):
        raise ValueError(f"{rel}: cpu_flags: expected an array of strings")
    kernels, unsupported = table.get("kernels"), table.get("unsupported")
    if not isinstance(kernels, dict) or not isinstance(unsupported, dict):
        raise ValueError(f"{rel}: kernels and unsupported: expected JSON objects")
    for key, r in kernels.items():
        _check_row(key, r, files, f"{rel}: kernels[{key!r}]")
    for key, why in unsupported.items():
        if not isinstance(why, str) or key in kernels:
            raise ValueError(f"{rel}: unsupported[{key!r}]: expected a reason, for a key not built")
    return table


_JSON = {str: "string", list: "array"}


def _check_row(key: str, row: Any, files: Mapping[str, bytes], where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object {{library, symbol}}")
    lib, symbol = row.get("library"), row.get("symbol")
    if not isinstance(lib, str) or lib not in files or not lib.endswith(".so"):
        raise ValueError(f"{where}.library: expected a .so file the artifact lists, got {lib!r}")
    if not isinstance(symbol, str) or not symbol.endswith(naming.file_stem("", key)):
        raise ValueError(f"{where}.symbol: expected a function named <name>_{key}, got {symbol!r}")


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


def runtime_function(name: str) -> Any:
    """A global function of TVM's runtime (e.g. `runtime.config_threadpool`), without importing
    TVM's compiler when it is not loaded yet (`import tvm` costs ~1.5 s; a loaded artifact needs
    only the runtime)."""
    if "tvm" in sys.modules:
        import tvm

        return tvm.get_global_func(name)
    import tvm_ffi

    _load_runtime()
    return tvm_ffi.get_global_func(name)


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
