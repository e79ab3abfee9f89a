"""`dsv4c.load(dir)`: an artifact directory back to a runnable `Compiled`.

Every check happens before anything runs: the manifest's own sha256, its schema, format and tool
versions, the size and sha256 of every file (read as regular files inside the directory only),
the target (when the caller names one), and that the IR graphs parse and verify.

TVM CPU artifacts carry their kernels built (`backends.tvm.library`): the executable is put
together from the IR and the library's functions, nothing is lowered or compiled, and the library
is loaded from the already verified bytes. Every other artifact (or a TVM library built for a CPU
this one cannot run) is compiled again from its `graph.ir`, and must regenerate exactly the
kernels the artifact lists (same content hashes).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ir
from backends.targets import Target, get_target
from dsv4c.artifact import read_artifact
from dsv4c.compiled import Compiled, EntryPoint
from dsv4c.driver import kernel_list, make_backend
from dsv4c.errors import ArtifactError, TargetMismatchError

__all__ = ["load", "refuse_source_only"]


def load(
    path: str | Path,
    *,
    target: str | None = None,
    params: Mapping[str, Any] | None = None,
    check_versions: bool = True,
    inplace: bool = False,
) -> Compiled:
    """Load and verify an artifact (see the module docstring). `target`: fail unless the artifact
    was compiled for it; `params`: bind parameter tensors for every call (or pass them per call);
    `inplace`: calls write the cache updates into the caller's tensors (`dsv4c.compiled`)."""
    manifest, files = read_artifact(path, check_versions_=check_versions)
    built_for = manifest["target"]
    if target is not None and target != built_for:
        get_target(target)  # an unknown name is its own error
        raise TargetMismatchError(
            f"{path}: compiled for target {built_for} ({manifest.get('target_description')}), "
            f"expected {target}; recompile with --target {target}"
        )
    refuse_source_only(manifest, path)  # before a graph is parsed or a kernel generated
    try:
        tgt = get_target(built_for)
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}") from None
    entries: dict[str, EntryPoint] = {}
    for spec in manifest["entry_points"]:
        graph = _parse(files, spec["graph"], path)
        exe = _executable(manifest, files, spec["name"], graph, tgt, path)
        entries[spec["name"]] = EntryPoint(spec["name"], graph, exe, tgt, params)
    return Compiled(
        entries,
        backend=manifest["backend"],
        target=tgt,
        manifest=manifest,
        files=files,
        path=Path(path),
        inplace=inplace,
    )


def refuse_source_only(manifest: Mapping[str, Any], path: str | Path) -> None:
    """Raise `DeviceUnavailable` when `manifest` is of an OpenCL or WebGPU artifact (TVM source
    that the device's driver compiles): dsv4c runs none of it, so loading it would only
    regenerate every kernel to build an executable that refuses each call. Reads the manifest's
    target only; the message is the executable's (device needed, where the sources are, how to
    compile for this machine)."""
    from backends.targets import TARGETS

    tgt = TARGETS.get(str(manifest.get("target")))
    if tgt is None or not tgt.source_only:
        return
    from backends.tvm.device import unavailable

    raise unavailable(tgt, f"{path}/kernels/{tgt.name}")


def _executable(
    manifest: dict, files: Mapping[str, bytes], name: str, graph: ir.Graph, tgt: Target, path: Any
) -> Any:
    """The entry point's executable: from the built library when there is a usable one."""
    backend = make_backend(manifest["backend"])
    if manifest["backend"] == "tvm" and not tgt.is_gpu:
        from backends.tvm.kernel import MissingKernel
        from backends.tvm.library import Unusable, load_library

        try:
            library = load_library(files, f"kernels/{tgt.name}", name)
            return backend.load(graph, tgt, library)
        except Unusable as e:  # another CPU: build the kernels here (needs the compiler)
            print(f"dsv4c: {path}: {e}; compiling its kernels again", file=sys.stderr)
        except MissingKernel as e:
            raise ArtifactError(
                f"{path}: entry point {name} needs kernel {e} which the artifact's library lacks; "
                "it was compiled by a different code generator — recompile it"
            ) from None
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise ArtifactError(
                f"{path}: entry point {name}: the kernel library cannot be loaded "
                f"({type(e).__name__}: {_first_line(e)}); recompile the artifact"
            ) from None
    exe = backend.compile(graph, tgt)
    listed = {k.get("key") for k in manifest.get("kernels", [])}
    made = {k.key for k in kernel_list(exe)}
    if made - listed:
        raise ArtifactError(
            f"{path}: entry point {name}: this dsv4c generates {len(made - listed)} "
            f"kernel(s) the artifact does not list (e.g. {min(made - listed)}); "
            "it was compiled by a different code generator — recompile it"
        )
    return exe


def _parse(files: Mapping[str, bytes], name: str, path: str | Path) -> ir.Graph:
    if name not in files:
        raise ArtifactError(f"{path}: the manifest names graph file {name} but does not hash it")
    try:
        graph = ir.parse(files[name].decode())
        ir.verify(graph)
    except (ir.ParseError, ir.VerifyError, UnicodeDecodeError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}/{name}: not a valid IR graph: {first}") from None
    return graph


def _first_line(e: Exception, limit: int = 240) -> str:
    """The first line of `e`'s message (a table field and its value; a dlopen error)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
