"""The tuning database: schedule choices (`backends.tvm.schedule_cpu.Knobs`) per kernel.

An entry is keyed by (kernel, shape bucket, target, versions):

    kernel    the kernel's symbol `<name>_<signature key>` (the key is the op's structural hash,
              so 24 identical layers share one entry), or "*" for every kernel
    bucket    the bindings of the symbolic dims the method is compiled for, each rounded up to a
              power of two: "B<=1" (decode), "B<=1,T<=4096" (prefill); "*" for any
    target    "cpu:<LLVM CPU name>" (schedules do not carry across CPUs) or a GPU target name
    versions  "tvm <version>; schedules <SCHEDULES>" — an entry from another TVM or another
              revision of the schedule recipes is not applied

Files are JSON (no pickle), written atomically; every entry carries the sha256 of its own
canonical JSON, and an entry whose hash, fields or knobs do not check out is dropped with a
warning, never trusted. Two files are read, the later winning: the defaults shipped beside this
module (`tuning_defaults.json`) and the user's (`$DSV4C_TUNING_DB`, else
`$DSV4C_CACHE_DIR/tuning.json`, else `~/.cache/dsv4c/tuning.json`), which `dsv4c tune` writes.

Compile reads it: `applied(backend, target, bindings)` wraps the TVM CPU backend's compile and
sets `schedule_cpu.TUNED` to the entries matching this machine, versions and bucket; a kernel so
scheduled has `dsv4c.tuned` in its TVMScript. GPU entries are derived from the cost model
(`gpu_defaults`) and marked `source: "cost model (untuned)"`: nothing here has measured them on
a GPU, and the TVM GPU schedules (backends/tvm/codegen.py) do not read them yet.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.tvm.schedule_cpu import Knobs
from dsv4c.artifact import atomic_write

__all__ = [
    "ANY",
    "DEFAULTS",
    "Entry",
    "TuningDB",
    "TuningKey",
    "applied",
    "bucket_of",
    "cpu_target_key",
    "gpu_defaults",
    "shipped_defaults",
    "user_db_path",
    "versions",
]

FORMAT = "dsv4c-tuning"
SCHEMA = 1
SCHEDULES = 1  # bump when schedule_cpu / matmul change what a knob means
ANY = "*"
DEFAULTS = Path(__file__).with_name("tuning_defaults.json")
SOURCES = ("measured", "cost model (untuned)", "default")


@dataclass(frozen=True, order=True)
class TuningKey:
    kernel: str
    bucket: str
    target: str
    versions: str


@dataclass(frozen=True)
class Entry:
    """One choice: `knobs` for `key`; `seconds` / `baseline_s` the measured time of the chosen
    and the default knobs (None when not measured), `source` how the choice was made."""

    key: TuningKey
    knobs: Knobs
    source: str = "measured"
    seconds: float | None = None
    baseline_s: float | None = None

    def body(self) -> dict[str, Any]:
        """The entry as JSON data, without its hash."""
        return {
            "kernel": self.key.kernel,
            "bucket": self.key.bucket,
            "target": self.key.target,
            "versions": self.key.versions,
            "knobs": self.knobs.as_dict(),
            "source": self.source,
            "seconds": self.seconds,
            "baseline_s": self.baseline_s,
        }

    def to_json(self) -> dict[str, Any]:
        body = self.body()
        return body | {"sha256": _digest(body)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Entry:
        """The entry `d` describes; ValueError saying what is wrong (hash, field, knob)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"an entry must be a JSON object, got {type(d).__name__}")
        body = {k: v for k, v in d.items() if k != "sha256"}
        if d.get("sha256") != _digest(body):
            raise ValueError("its sha256 does not match its content (edited or corrupted)")
        try:
            key = TuningKey(*(str(body[f]) for f in ("kernel", "bucket", "target", "versions")))
            knobs = Knobs.from_dict(body["knobs"])
            source = body["source"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"missing or malformed field: {e}") from None
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        return Entry(key, knobs, source, body.get("seconds"), body.get("baseline_s"))


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class TuningDB:
    """Entries by key. `load` never raises on a bad file: what cannot be trusted is dropped with
    a warning (a tuning database only makes code faster; a wrong one must not make it wrong)."""

    def __init__(self, entries: Mapping[TuningKey, Entry] | None = None) -> None:
        self.entries: dict[TuningKey, Entry] = dict(entries or {})

    def put(self, entry: Entry) -> None:
        self.entries[entry.key] = entry

    def merged(self, other: TuningDB) -> TuningDB:
        """This database with `other`'s entries added (other's win on equal keys)."""
        return TuningDB(self.entries | other.entries)

    def lookup(self, kernel: str, bucket: str, target: str, version: str) -> Entry | None:
        """The entry for this kernel and bucket, else its any-bucket one, else the any-kernel
        one for the bucket, else any-kernel any-bucket; None when none matches."""
        for k, b in ((kernel, bucket), (kernel, ANY), (ANY, bucket), (ANY, ANY)):
            found = self.entries.get(TuningKey(k, b, target, version))
            if found is not None:
                return found
        return None

    def for_compile(self, target: str, version: str) -> list[Entry]:
        return [e for k, e in self.entries.items() if (k.target, k.versions) == (target, version)]

    def to_json(self) -> dict[str, Any]:
        entries = [self.entries[k].to_json() for k in sorted(self.entries)]
        return {"format": FORMAT, "schema": SCHEMA, "entries": entries}

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @staticmethod
    def load(path: str | Path) -> TuningDB:
        """The entries of `path` that check out (a missing file: an empty database)."""
        path = Path(path)
        if not path.exists():
            return TuningDB()
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            warnings.warn(f"tuning database {path} ignored: not readable JSON ({e})", stacklevel=2)
            return TuningDB()
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("schema") != SCHEMA:
            warnings.warn(
                f"tuning database {path} ignored: expected format {FORMAT!r} schema {SCHEMA}; "
                "delete it or run `dsv4c tune` again",
                stacklevel=2,
            )
            return TuningDB()
        db = TuningDB()
        for i, item in enumerate(doc.get("entries") or []):
            try:
                db.put(Entry.from_json(item))
            except ValueError as e:
                what = item.get("kernel", "?") if isinstance(item, dict) else "?"
                warnings.warn(
                    f"tuning database {path}: entry {i} ({what}) ignored: {e}; "
                    "run `dsv4c tune` again to replace it",
                    stacklevel=2,
                )
        return db


def user_db_path() -> Path:
    explicit = os.environ.get("DSV4C_TUNING_DB")
    if explicit:
        return Path(explicit)
    root = os.environ.get("DSV4C_CACHE_DIR") or Path.home() / ".cache" / "dsv4c"
    return Path(root) / "tuning.json"


def default_db() -> TuningDB:
    """The shipped defaults with the user's database over them."""
    return TuningDB.load(DEFAULTS).merged(TuningDB.load(user_db_path()))


def versions() -> str:
    import tvm

    return f"tvm {tvm.__version__}; schedules {SCHEDULES}"


def cpu_target_key() -> str:
    import tvm

    return f"cpu:{tvm.target.codegen.llvm_get_system_cpu()}"


def bucket_of(bindings: Mapping[str, int]) -> str:
    """"B<=1,T<=4096": each binding rounded up to a power of two, sorted by name."""
    parts = [f"{k}<={1 << max(0, math.ceil(math.log2(max(1, v))))}" for k, v in bindings.items()]
    return ",".join(sorted(parts)) or ANY


@contextmanager
def applied(
    backend: str, target: Any, bindings: Mapping[str, int], db: TuningDB | None = None
) -> Iterator[dict[str, Knobs]]:
    """While the block runs, TVM CPU kernels are scheduled with the database's knobs for this
    machine, versions and `bindings`' bucket; yields {kernel symbol: knobs} (empty for other
    backends and GPU targets). Kernels built earlier in this process under other knobs are
    evicted from the TVM session caches on entry and exit, so neither compile reuses the
    other's schedule."""
    if backend != "tvm" or getattr(target, "is_gpu", False):
        yield {}
        return
    from backends.tvm import schedule_cpu

    db = db if db is not None else default_db()
    bucket = bucket_of(bindings)
    entries = db.for_compile(cpu_target_key(), versions())
    tuned = {}
    for e in entries:  # the exact bucket wins over "*"
        if e.key.bucket in (bucket, ANY) and (e.key.bucket != ANY or e.key.kernel not in tuned):
            tuned[e.key.kernel] = e.knobs
    _evict(set(tuned))
    token = schedule_cpu.TUNED.set(_ByKernel(tuned))
    try:
        yield tuned
    finally:
        schedule_cpu.TUNED.reset(token)
        _evict(set(tuned))


class _ByKernel(dict):
    """{symbol: knobs} that answers `get(symbol)` with the "*" entry when there is no exact one."""

    def get(self, symbol: Any, default: Any = None) -> Any:
        return super().get(symbol, super().get(ANY, default))


def _evict(symbols: set[str]) -> None:
    """Drop the named kernels (all, for "*") from the TVM backend's per-session caches."""
    from backends.tvm import kernel as tk

    if not symbols:
        return
    keys = {
        key
        for key, k in tk.KERNELS.items()
        if isinstance(k, tk.Kernel) and (ANY in symbols or k.symbol in symbols)
    }
    for key in keys:
        del tk.KERNELS[key]
    for built in [b for b in tk.BUILT if b[1] in keys]:
        del tk.BUILT[built]


# --- GPU defaults: from the cost model, untuned ------------------------------------------------


def gpu_defaults(target_name: str) -> Entry:
    """A matmul tile for a GPU target from the roofline: a t×t output tile over K reads 2·t·K
    bf16 values for 2·t²·K flops, an intensity of t/2 FLOP/byte; t is the smallest power of two
    whose intensity reaches the target's ridge point (peak FLOP/s / bandwidth), capped where
    its fp32 accumulators exceed `ACC_PER_THREAD` registers on each of `THREADS` threads, or
    two double-buffered t×32 bf16 operand tiles exceed the block's shared memory. On every
    listed GPU the register cap binds (t = 128). Untuned: never measured on that GPU."""
    from backends.targets import get_target

    t = get_target(target_name)
    if not t.is_gpu:
        raise ValueError(f"gpu_defaults: {target_name} is not a GPU target")
    tile = 16
    while tile / 2 < t.ridge_point and tile * tile < THREADS * ACC_PER_THREAD:
        tile *= 2
    while tile > 16 and 2 * 2 * tile * 32 * 2 > t.smem_per_block:
        tile //= 2
    knobs = Knobs(tile_i=tile, tile_j=tile, tile_k=32)
    key = TuningKey(ANY, ANY, t.name, f"schedules {SCHEDULES}")
    return Entry(key, knobs, "cost model (untuned)")


THREADS = 256  # threads per block of the TVM GPU schedules (backends/tvm/codegen.py)
ACC_PER_THREAD = 64  # fp32 accumulator registers a thread may hold without spilling


def shipped_defaults() -> TuningDB:
    """What `tuning_defaults.json` holds: the cost-model entry of every GPU target (the CPU's
    defaults are `Knobs()`, in the schedule code). Regenerate the file with
    `python -c "from dsv4c.tuning import *; shipped_defaults().save(DEFAULTS)"`."""
    from backends.targets import GPU_TARGETS

    db = TuningDB()
    for name in GPU_TARGETS:
        db.put(gpu_defaults(name))
    return db
