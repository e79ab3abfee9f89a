"""A cache of pipeline results (final IR text + pipeline summary), keyed by content hash.

Capture and the pass pipeline are most of a compile (v4-pro: about a minute of each). When the
caller can name what fully determines the module — the CLI passes the preset's `Config` — the
key is the sha256 of that name, the method, the example inputs' shapes and dtypes, the dynamic
dims, the bindings, the target, the tool versions and the source of every package capture and
the passes depend on (ir, frontend, passes, models, dsv4c), so any change there is a miss. Entries live in
`$DSV4C_CACHE_DIR/graphs/<key>/` (default `~/.cache/dsv4c`) as `graph.ir` + `summary.json` (which
records graph.ir's sha256; summary.json is written last), and a hit is re-hashed and re-verified
(`ir.verify`) before use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ir

__all__ = ["cache_key", "get", "put", "source_digest"]

PACKAGES = ("ir", "frontend", "passes", "models", "dsv4c")  # what capture + passes depend on
_SHA = "graph_ir_sha256"  # summary.json's record of graph.ir's content


def _root() -> Path:
    base = os.environ.get("DSV4C_CACHE_DIR") or Path.home() / ".cache" / "dsv4c"
    return Path(base) / "graphs"


@functools.cache
def source_digest() -> str:
    """sha256 over the source files of the compiler and model packages."""
    top = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((top / pkg).rglob("*.py")):
            h.update(path.relative_to(top).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cache_key(identity: str, method: str, inputs: Any, spec: Mapping[str, Any]) -> str:
    import torch.utils._pytree as pytree

    from dsv4c.artifact import versions

    shapes = [
        [list(t.shape), str(t.dtype)] if hasattr(t, "shape") else repr(t)
        for t in pytree.tree_leaves(list(inputs))
    ]
    blob = json.dumps(
        [identity, method, shapes, spec, versions(), source_digest()], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def get(key: str) -> tuple[ir.Graph, dict[str, Any]] | None:
    """The cached (graph, summary) for `key`, or None: absent, damaged (its text no longer has
    the sha256 recorded when it was written) or not a valid graph are all misses."""
    folder = _root() / key
    try:
        data = (folder / "graph.ir").read_bytes()
        summary = json.loads((folder / "summary.json").read_text())
        if summary.pop(_SHA, None) != hashlib.sha256(data).hexdigest():
            return None
        graph = ir.parse(data.decode())
        ir.verify(graph)
    except (OSError, ValueError, ir.ParseError, ir.VerifyError):
        return None
    return graph, summary


def put(key: str, graph: ir.Graph, summary: Mapping[str, Any]) -> None:
    from dsv4c.artifact import atomic_write

    folder = _root() / key
    data = ir.to_text(graph).encode()
    atomic_write(folder / "graph.ir", data)
    summary = dict(summary) | {_SHA: hashlib.sha256(data).hexdigest()}
    atomic_write(folder / "summary.json", json.dumps(summary, default=str).encode())
