"""The value ranges an entry point accepts, checked before anything runs.

Compiled kernels index tables with their inputs (token ids into the embedding and the hash
router's table, positions into caches and rope tables); an index outside the table is a read out
of bounds in native code — a segfault at best, a silently wrong answer at worst. So every call
checks, on the host, before any kernel runs:

- an integer input that indexes a table (through reshapes) lies in [0, rows) of every table it
  indexes: `embedding`, `index`, `index_select`, and `moe.route`'s hash table;
- the limits the compiled model declares (`model.input_limits` in the manifest, written by
  `dsv4c compile`): e.g. decode's `position` in [0, max_len) and prefill's `T` in
  [1, max_len] (a prefill of 0 tokens has nothing to compute).

Failures raise `InputError` naming the input, the value found, the limit and where it comes from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ir
from dsv4c.errors import InputError

__all__ = ["Limit", "Limits", "derive_limits"]

# mnemonic -> (index operand, table operand); the table's indexed dim is attr `dim` (default 0)
_INDEXING = {
    "embedding": (1, 0),
    "index": (1, 0),
    "index_select": (1, 0),
    "moe.route": (3, 2),  # hash routing: tid2eid[token]
}
# ops that pass their operand's values through unchanged (a view of the same ids)
_SAME_VALUES = {"reshape", "squeeze", "unsqueeze", "expand", "permute", "flatten", "view"}


@dataclass(frozen=True)
class Limit:
    """lo <= value <= hi (inclusive), and why."""

    lo: int
    hi: int
    why: str


@dataclass(frozen=True)
class Limits:
    values: Mapping[str, Limit]  # runtime input name -> range of every element
    sizes: Mapping[str, Limit]  # shape symbol -> range

    def check(
        self, entry: str, inputs: Sequence[ir.Value], tensors: Sequence[Any], env: Mapping
    ) -> None:
        """Raise `InputError` for the first size or value outside its limit."""
        bound = {str(s): int(n) for s, n in env.items()}
        for sym, n in sorted(bound.items()):
            lim = self.sizes.get(sym)
            if lim is not None and not lim.lo <= n <= lim.hi:
                where = _first_with(inputs, sym)
                raise InputError(
                    f"{entry}: {sym} = {n} (from input {where}) is outside [{lim.lo}, {lim.hi}]: "
                    f"{lim.why}"
                )
        for v, t in zip(inputs, tensors):
            lim = self.values.get(v.name)
            if lim is None or t.numel() == 0:
                continue
            lo, hi = int(t.min()), int(t.max())
            if lo < lim.lo or hi > lim.hi:
                bad = lo if lo < lim.lo else hi
                raise InputError(
                    f"{entry}: input {v.name} holds {bad}, outside [{lim.lo}, {lim.hi}]: {lim.why}"
                )


def _first_with(inputs: Sequence[ir.Value], sym: str) -> str:
    for v in inputs:
        if any(str(d) == sym for d in v.shape):
            return f"{v.name}: {v.type}"
    return "?"


def derive_limits(g: ir.Graph, model: Mapping[str, Any] | None = None) -> Limits:
    """The limits of graph `g` (see the module docstring); `model` is the manifest's model info."""
    runtime = [v for v in g.inputs if g.roles.get(v.name) != "parameter"]
    values: dict[str, Limit] = {}
    for v in runtime:
        if not v.type.dtype.is_float:
            lim = _index_limit(g, v)
            if lim is not None:
                values[v.name] = lim
    sizes: dict[str, Limit] = {}
    for name, row in (model or {}).get("input_limits", {}).items():
        lim = Limit(int(row["min"]), int(row["max"]), str(row.get("why", "the compiled limit")))
        if any(v.name == name for v in runtime):
            values[name] = _tighter(values.get(name), lim)
        elif any(str(d) == name for v in runtime for d in v.shape):
            sizes[name] = lim
    return Limits(values, sizes)


def _tighter(a: Limit | None, b: Limit) -> Limit:
    if a is None:
        return b
    return Limit(max(a.lo, b.lo), min(a.hi, b.hi), a.why if a.hi <= b.hi else b.why)


def _index_limit(g: ir.Graph, v: ir.Value) -> Limit | None:
    """[0, rows - 1] of the smallest static table `v` (or a reshape of it) indexes, or None."""
    alias = {v.name}
    best: Limit | None = None
    for node in g.ops:
        names = [o.name for o in node.operands]
        if not alias.intersection(names):
            continue
        if node.name in _SAME_VALUES and names[0] in alias:
            alias.update(r.name for r in node.results)
            continue
        at = _INDEXING.get(node.name)
        if at is None or len(names) <= max(at) or names[at[0]] not in alias:
            continue
        if node.name == "moe.route" and not node.attrs.get("hash", False):
            continue
        table = node.operands[at[1]]
        dim = int(node.attrs.get("dim", 0)) % max(table.type.rank, 1)
        rows = table.type.shape[dim] if table.type.rank else None
        if isinstance(rows, int):
            lim = Limit(0, rows - 1, f"it indexes {rows} rows of {table.name} ({node.name})")
            best = lim if best is None or lim.hi < best.hi else best
    return best
