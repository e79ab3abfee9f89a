"""The manifest's schema, checked before any field is used.

`validate_manifest(m, where)` raises `ArtifactError` naming the first field that is missing or of
the wrong type or range (`manifest.json: files["graph.ir"].bytes: expected an integer in
[0, 2147483648], got 10000...0 (401 digits)`). It checks the structure the loader relies on:
the top-level fields, the `files` table `{path: {sha256, bytes}}`, the entry points and the
model info. Kernel rows are checked only as a list of JSON objects: their fields belong to the
backends' records (`backends.base.KernelRecord`) and are read from there, not from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from dsv4c.errors import ArtifactError

__all__ = ["MAX_FILE_BYTES", "MAX_LEN", "check_relative", "validate_manifest"]

MAX_FILE_BYTES = 1 << 31  # one artifact file (a kernel library, an IR text) is far below this
MAX_LEN = 1 << 24  # cache positions a model info may name (V4's context is 1M = 2^20)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
_PATH_CHARS = re.compile(r"[A-Za-z0-9_.+\-/]+")

# field -> (expected type, required)
_TOP: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "format": (str, True),
    "format_version": (int, True),
    "created": (str, False),
    "versions": (dict, True),
    "backend": (str, True),
    "target": (str, True),
    "target_description": (str, False),
    "runs_on": (str, False),
    "model": (dict, False),
    "entry_points": (list, True),
    "kernels": (list, False),
    "files": (dict, True),
}


def _fail(where: str, field: str, want: str, got: Any) -> ArtifactError:
    return ArtifactError(f"{where}: {field}: expected {want}, got {_show(got)}; recompile it")


def _show(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int) and abs(v) >= 10**12:
        return f"{str(v)[:8]}...0 ({len(str(abs(v)))} digits)"
    text = repr(v) if isinstance(v, str | int | float | tuple) else type(v).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _is(v: Any, want: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not an int (JSON true is not 1)."""
    return isinstance(v, want) and not (isinstance(v, bool) and want in (int, (int, float)))


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return _is(v, int) and lo <= v <= hi


def check_relative(rel: Any) -> str | None:
    """Why `rel` is not a plain relative file path inside the artifact (None when it is)."""
    if not isinstance(rel, str) or not rel:
        return "an empty or non-string path"
    if not _PATH_CHARS.fullmatch(rel) or len(rel) > 400:
        return "a path with characters outside [A-Za-z0-9_.+-/] (or longer than 400)"
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        return "a path that is absolute or leaves the directory (.., ., //)"
    return None


def validate_manifest(m: Any, where: str) -> None:
    """Raise `ArtifactError` unless `m` has the manifest's structure (module docstring)."""
    if not isinstance(m, dict):
        raise _fail(where, "manifest", "a JSON object", m)
    for name, (want, required) in _TOP.items():
        if name not in m:
            if required:
                raise ArtifactError(f"{where}: the field {name!r} is missing; recompile it")
            continue
        if not _is(m[name], want):
            raise _fail(where, name, f"a JSON {_json_name(want)}", m[name])
    _check_versions(m["versions"], where)
    _check_files(m["files"], where)
    _check_entries(m["entry_points"], m["files"], where)
    for i, row in enumerate(m.get("kernels", [])):
        if not isinstance(row, dict):
            raise _fail(where, f"kernels[{i}]", "a JSON object", row)
    _check_model(m.get("model", {}), where)


def _json_name(t: type | tuple[type, ...]) -> str:
    names: dict[Any, str] = {str: "string", int: "integer", dict: "object", list: "array"}
    return names.get(t, "value")


def _check_versions(versions: Mapping[str, Any], where: str) -> None:
    for k, v in versions.items():
        if v is not None and not isinstance(v, str):
            raise _fail(where, f"versions.{k}", "a version string or null", v)


def _check_files(files: Mapping[str, Any], where: str) -> None:
    for rel, entry in files.items():
        why = check_relative(rel)
        if why:
            raise ArtifactError(f"{where}: files: {rel!r} is {why}; recompile it")
        field = f"files[{rel!r}]"
        if not isinstance(entry, dict):
            raise _fail(where, field, "an object {sha256, bytes}", entry)
        digest, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise _fail(where, f"{field}.sha256", "64 lowercase hex digits", digest)
        if not _int_in(size, 0, MAX_FILE_BYTES):
            raise _fail(where, f"{field}.bytes", f"an integer in [0, {MAX_FILE_BYTES}]", size)


def _check_entries(entries: list[Any], files: Mapping[str, Any], where: str) -> None:
    if not entries:
        raise ArtifactError(f"{where}: entry_points is empty; recompile it")
    seen = set()
    for i, e in enumerate(entries):
        field = f"entry_points[{i}]"
        if not isinstance(e, dict):
            raise _fail(where, field, "an object", e)
        name, graph = e.get("name"), e.get("graph")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in seen:
            raise _fail(where, f"{field}.name", "a unique identifier", name)
        seen.add(name)
        if not isinstance(graph, str) or graph not in files:
            raise _fail(where, f"{field}.graph", "a file listed in files", graph)
        for key in ("inputs", "outputs"):
            if key in e and not isinstance(e[key], list):
                raise _fail(where, f"{field}.{key}", "an array", e[key])


def _check_model(model: Mapping[str, Any], where: str) -> None:
    if "preset" in model and not isinstance(model["preset"], str):
        raise _fail(where, "model.preset", "a preset name", model["preset"])
    if "max_len" in model and not _int_in(model["max_len"], 2, MAX_LEN):
        raise _fail(where, "model.max_len", f"an integer in [2, {MAX_LEN}]", model["max_len"])
    if model.get("weights") is not None and not isinstance(model["weights"], str):
        raise _fail(where, "model.weights", "a file name or null", model["weights"])
    limits = model.get("input_limits", {})
    if not isinstance(limits, dict):
        raise _fail(where, "model.input_limits", "an object {name: {min, max, why}}", limits)
    for name, row in limits.items():
        field = f"model.input_limits[{name!r}]"
        if not isinstance(row, dict):
            raise _fail(where, field, "an object {min, max, why}", row)
        lo, hi = row.get("min"), row.get("max")
        if not _int_in(lo, -(1 << 62), 1 << 62) or not _int_in(hi, -(1 << 62), 1 << 62) or lo > hi:
            raise _fail(where, f"{field}.min/max", "integers with min <= max", (lo, hi))
        if not isinstance(row.get("why", ""), str):
            raise _fail(where, f"{field}.why", "a string", row["why"])
