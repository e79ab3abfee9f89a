"""`dsv4c.load(dir)`: an artifact directory back to a runnable `Compiled`.

Every check happens before anything runs: the manifest's format and tool versions, the sha256 of
every file, the target (when the caller names one), and that the backend regenerates exactly the
kernels the artifact lists (same content hashes) from its `graph.ir`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ir
from backends.targets import get_target
from dsv4c.artifact import read_artifact
from dsv4c.compiled import Compiled, EntryPoint
from dsv4c.driver import kernel_list, make_backend
from dsv4c.errors import ArtifactError, TargetMismatchError

__all__ = ["load"]


def load(
    path: str | Path,
    *,
    target: str | None = None,
    params: Mapping[str, Any] | None = None,
    check_versions: bool = True,
) -> Compiled:
    """Load and verify an artifact (see the module docstring). `target`: fail unless the artifact
    was compiled for it; `params`: bind parameter tensors for every call (or pass them per call)."""
    manifest, files = read_artifact(path, check_versions_=check_versions)
    built_for = manifest["target"]
    if target is not None and target != built_for:
        get_target(target)  # an unknown name is its own error
        raise TargetMismatchError(
            f"{path}: compiled for target {built_for} ({manifest.get('target_description')}), "
            f"expected {target}; recompile with --target {target}"
        )
    tgt = get_target(built_for)
    backend = make_backend(manifest["backend"])
    listed = {k["key"] for k in manifest.get("kernels", [])}
    entries: dict[str, EntryPoint] = {}
    for spec in manifest["entry_points"]:
        graph = _parse(files, spec["graph"], path)
        exe = backend.compile(graph, tgt)
        made = {k.key for k in kernel_list(exe)}
        if made - listed:
            raise ArtifactError(
                f"{path}: entry point {spec['name']}: this dsv4c generates {len(made - listed)} "
                f"kernel(s) the artifact does not list (e.g. {min(made - listed)}); "
                "it was compiled by a different code generator — recompile it"
            )
        entries[spec["name"]] = EntryPoint(spec["name"], graph, exe, tgt, params)
    return Compiled(
        entries,
        backend=manifest["backend"],
        target=tgt,
        manifest=manifest,
        files=files,
        path=Path(path),
    )


def _parse(files: Mapping[str, bytes], name: str, path: str | Path) -> ir.Graph:
    if name not in files:
        raise ArtifactError(f"{path}: the manifest names graph file {name} but does not hash it")
    try:
        graph = ir.parse(files[name].decode())
        ir.verify(graph)
    except (ir.ParseError, ir.VerifyError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}/{name}: not a valid IR graph: {first}") from None
    return graph
