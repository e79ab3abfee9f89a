"""Liveness-based buffer plan over a scheduled graph of kernel ops.

Every value an op produces needs a buffer from its op until its last reader (graph outputs live
to the end); graph inputs (parameters, activations, caches) belong to the caller and are not
planned. Views (reshape, squeeze, unsqueeze, expand, and permutes only a GEMM reads through its
strides) alias their operand's buffer and extend its life; 0-d constants are host scalars.
Values inside `fused.kernel` bodies never reach memory. A kernel's outputs are allocated before
its dead operands are freed, except that a result may take the buffer of a same-typed operand
dying at its op when the launch reads each element only where it writes it (elementwise ops,
the whole-tile inputs of fused kernels, a GEMM epilogue's extra inputs): in place.

Two plans, both greedy in schedule order:
- *symbolic* (valid for every binding): a freed buffer is reused by a value whose size is the
  same expression (canonical sympy forms compare equal);
- *concrete* (for `bindings`, e.g. B=1, T=4096): sizes are ints; best fit among freed buffers,
  else the largest freed one grows, else a new buffer — once plain and once with freed buffers
  restricted to within 2x of the size; the smaller pool is kept.

Cache updates are written in place (`alias_updates`): a graph output that is a cache input with
some elements rewritten — `index_put`, `index_put_multi`, or a state or cache result of
`attn.compress_step` — gets `Graph.aliases[i] = input`, when that input is read by its writer
alone (verifier rule 9). An executable running in place then updates the caller's tensor where it
is (only the written rows move); in the functional mode it copies the input first. Aliased outputs
live in the caller's buffers and take no planned buffer (`aliased_bytes`: what the functional
mode allocates on top of the plan).

Reported: `no_reuse_bytes` (one buffer per value), `peak_bytes` (the concrete pool), `live_bytes`
(the most bytes live at once: a lower bound for any plan of this order), and the symbolic pool
evaluated at the bindings. Symbols missing from `bindings` are taken as 1 and listed in `assumed`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from ir import Graph, Kind, Node, TensorType, Value
from ir.symbolic import Dim
from passes.context import PassContext
from passes.cost import FREE, evaluate, gemm_operand_views
from passes.fuse_elementwise import broadcast_shape

__all__ = [
    "DEFAULT_BINDINGS",
    "UPDATES",
    "Lifetime",
    "MemoryPlan",
    "alias_updates",
    "lifetimes",
    "plan",
    "plan_memory",
    "update_bytes",
]

DEFAULT_BINDINGS = {"B": 1, "T": 4096}


@dataclass(frozen=True)
class Lifetime:
    """A buffer-owning value: defined by op `start`, last read by op `end` (inclusive)."""

    value: Value
    start: int
    end: int
    aliases: tuple[str, ...]  # views sharing the buffer


@dataclass
class MemoryPlan:
    bindings: dict[str, int]
    assumed: list[str]
    assignment: dict[str, int]  # value name (aliases included) -> concrete buffer index
    buffers: list[int]  # concrete buffer sizes in bytes
    symbolic_buffers: list[Dim] = field(default_factory=list)
    no_reuse_bytes: int = 0
    live_bytes: int = 0
    aliased_bytes: int = 0  # outputs written into the caller's buffers (graph.aliases)

    @property
    def peak_bytes(self) -> int:
        return sum(self.buffers)

    @property
    def symbolic_bytes(self) -> int:
        return sum(evaluate(d, self.bindings) for d in self.symbolic_buffers)

    def summary(self) -> str:
        mib = 1 << 20
        return (
            f"activations at {self.bindings}: no reuse {self.no_reuse_bytes / mib:.1f} MiB, "
            f"planned {self.peak_bytes / mib:.1f} MiB in {len(self.buffers)} buffers "
            f"(symbolic plan {self.symbolic_bytes / mib:.1f} MiB in "
            f"{len(self.symbolic_buffers)}), live peak {self.live_bytes / mib:.1f} MiB, "
            f"written in place into caller buffers {self.aliased_bytes / mib:.1f} MiB"
        )


def lifetimes(g: Graph) -> list[Lifetime]:
    """The buffer-owning values of `g` in definition order, with views folded into owners."""
    owner: dict[str, str] = {}  # value -> the value owning its buffer
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    values: dict[str, Value] = {}
    views = gemm_operand_views(g)
    caller = {g.outputs[k].name for k in g.aliases}  # written into the caller's buffers
    for i, n in enumerate(g.ops):
        for v in n.operands:
            if v.name in owner:
                end[owner[v.name]] = i
        if n.name == "constant" and not n.operands:
            continue
        view = n.name in FREE or (n.results and n.results[0].name in views)
        src = n.operands[0].name if view and n.operands else None
        for r in n.results:
            if src is not None and src in owner:
                owner[r.name] = owner[src]
                members[owner[src]].append(r.name)
                continue
            if src is not None or r.name in caller:  # a view of an input, or an input updated
                continue  # in place: the caller's memory
            owner[r.name] = r.name
            start[r.name] = end[r.name] = i
            members[r.name] = []
            values[r.name] = r
    last = len(g.ops)
    for v in g.outputs:
        if v.name in owner:
            end[owner[v.name]] = last
    return [Lifetime(values[k], start[k], end[k], tuple(members[k])) for k in start]


@functools.lru_cache(maxsize=4096)
def _nbytes(t: TensorType) -> Dim:
    return t.nbytes  # symbolic arithmetic is slow; a model has few distinct types


@functools.lru_cache(maxsize=4096)
def _bytes_at(t: TensorType, env: tuple) -> int:
    return evaluate(_nbytes(t), dict(env))


def _names(life: Lifetime) -> list[str]:
    return [life.value.name, *life.aliases]


def plan(g: Graph, bindings: Mapping[str, int] | None = None) -> MemoryPlan:
    """Plan buffers for `g` in its op order (see the module docstring)."""
    env = {str(k): int(v) for k, v in (DEFAULT_BINDINGS if bindings is None else bindings).items()}
    lives = lifetimes(g)
    symbols = {s.name for life in lives for d in life.value.shape if not isinstance(d, int)
               for s in d.free_symbols}  # fmt: skip
    assumed = sorted(symbols - set(env))
    env.update({s: 1 for s in assumed})
    key = tuple(sorted(env.items()))
    sizes = [_bytes_at(life.value.type, key) for life in lives]
    events = _events(lives, len(g.ops), _donors(g, lives))
    tries = [_concrete(events, sizes, slack) for slack in (None, 2)]
    owner_of, buffers = min(tries, key=lambda t: sum(t[1]))
    assignment = {name: owner_of[k] for k, life in enumerate(lives) for name in _names(life)}
    out = MemoryPlan(env, assumed, assignment, buffers, no_reuse_bytes=sum(sizes))
    out.aliased_bytes = sum(_bytes_at(g.outputs[k].type, key) for k in g.aliases)
    out.symbolic_buffers = _symbolic(events, [_nbytes(life.value.type) for life in lives])
    live = 0
    for starts, ends, donated in events:
        live += sum(sizes[k] for k in starts if k not in donated)
        out.live_bytes = max(out.live_bytes, live)
        live -= sum(sizes[k] for k in ends if k not in donated.values())
    return out


def _inplace_operands(n: Node) -> tuple[Value, ...]:
    """Operands a launch may overwrite with a result of the same type: it reads each of their
    elements only in the program that writes that element, before writing it (elementwise ops;
    a fused kernel's inputs, loaded before its stores; a GEMM epilogue's extra inputs, not A, B)."""
    if n.kind in (Kind.ELEMENTWISE, Kind.BROADCAST):
        return n.operands
    if n.name != "fused.kernel":
        return ()
    body = n.attrs["body"]
    if body.ops and body.ops[0].name == "matmul":
        return n.operands[2:]
    shapes = [v.shape for v in body.inputs] + [r.shape for b in body.ops for r in b.results]
    domain = broadcast_shape(
        shapes
    )  # a whole tile of the domain: never a row stored by many programs
    return tuple(v for v in n.operands if domain is not None and tuple(v.shape) == domain)


def _donors(g: Graph, lives: list[Lifetime]) -> dict[int, list[int]]:
    """Lifetime of a result -> lifetimes of operands whose buffer it may take in place: the
    operand dies at this op and has the result's type (so do all its views)."""
    index = {name: k for k, life in enumerate(lives) for name in _names(life)}
    out: dict[int, list[int]] = {}
    for i, n in enumerate(g.ops):
        dying = [
            index[v.name]
            for v in _inplace_operands(n)
            if v.name in index and lives[index[v.name]].end == i
        ]
        for r in n.results:
            k = index.get(r.name)
            if k is None or lives[k].value.name != r.name:
                continue
            out[k] = [d for d in dying if lives[d].value.type == r.type]
    return out


Events = list[tuple[list[int], list[int], dict[int, int]]]


def _events(lives: list[Lifetime], n_ops: int, donors: dict[int, list[int]]) -> Events:
    """Per op (and one step for the graph's end): lifetimes starting, lifetimes ending, and
    which starting lifetime takes which ending one's buffer in place."""
    events: Events = [([], [], {}) for _ in range(n_ops + 1)]
    for k, life in enumerate(lives):
        events[life.start][0].append(k)
        events[life.end][1].append(k)
    for starts, _, donated in events:
        for k in starts:
            free = [d for d in donors.get(k, ()) if d not in donated.values()]
            if free:
                donated[k] = free[0]
    return events


def _concrete(events, sizes: list[int], slack: int | None) -> tuple[dict[int, int], list[int]]:
    """Greedy in order: outputs are placed before dead operands are freed (no in-place)."""
    buffers: list[int] = []
    free: list[int] = []
    owner_of: dict[int, int] = {}
    for starts, ends, donated in events:
        for k in starts:
            if k in donated:
                owner_of[k] = owner_of[donated[k]]
            else:
                owner_of[k] = _take(buffers, free, sizes[k], slack)
        free.extend(owner_of[k] for k in ends if k not in donated.values())
    return owner_of, buffers


def _take(buffers: list[int], free: list[int], need: int, slack: int | None) -> int:
    """Best fit among free buffers, else grow the largest free one, else a new buffer. With a
    `slack`, only buffers within a factor `slack` of the need qualify (small values do not pin
    big buffers)."""
    hi = None if slack is None else need * slack
    lo = 0 if slack is None else need // slack
    fits = [b for b in free if need <= buffers[b] and (hi is None or buffers[b] <= hi)]
    grow = [b for b in free if lo <= buffers[b] < need]
    if fits:
        b = min(fits, key=lambda b: (buffers[b], b))
    elif grow:
        b = max(grow, key=lambda b: (buffers[b], -b))
        buffers[b] = need
    else:
        buffers.append(need)
        return len(buffers) - 1
    free.remove(b)
    return b


def _symbolic(events, sizes: list[Dim]) -> list[Dim]:
    """Reuse only buffers of the same size expression: valid for every binding."""
    buffers: list[Dim] = []
    free: dict[Dim, list[int]] = {}
    owner_of: dict[int, int] = {}
    for starts, ends, donated in events:
        for k in starts:
            if k in donated:
                owner_of[k] = owner_of[donated[k]]
                continue
            size = sizes[k]
            same = free.get(size)
            if same:
                owner_of[k] = same.pop()
            else:
                buffers.append(size)
                owner_of[k] = len(buffers) - 1
        for k in ends:
            if k not in donated.values():
                free.setdefault(sizes[k], []).append(owner_of[k])
    return buffers


# --- cache updates written in place ---------------------------------------------------------

# op -> {result index: index of the operand it is a copy of, with some elements rewritten}
UPDATES: dict[str, dict[int, int]] = {
    "index_put": {0: 0},  # x with rows at idx replaced (or incremented)
    "index_put_multi": {0: 0},
    "attn.compress_step": {0: 10, 1: 2, 2: 3},  # cache (one row), kv_state, score_state
}


def alias_updates(g: Graph) -> tuple[Graph, dict[str, str]]:
    """`g` with `aliases` for every output that updates a cache input (see the module docstring),
    and for every other output produced by an update op, why it is not aliased."""
    producers = g.producers()
    readers: dict[str, set[int]] = {}
    for i, n in enumerate(g.ops):
        for v in n.operands:
            readers.setdefault(v.name, set()).add(id(n))
    aliases: dict[int, str] = {}
    why: dict[str, str] = {}
    for k, out in enumerate(g.outputs):
        n = producers.get(out.name)
        if n is None or n.name not in UPDATES:
            continue
        src = n.operands[UPDATES[n.name][n.results.index(out)]]
        reason = _not_aliasable(g, n, out, src, readers, aliases)
        if reason:
            why[out.name] = reason
        else:
            aliases[k] = src.name
    if aliases == g.aliases:
        return g, why
    return Graph(g.inputs, g.ops, g.outputs, name=g.name, roles=dict(g.roles), aliases=aliases), why


def _not_aliasable(g: Graph, n: Node, out: Value, src: Value, readers, aliases) -> str:
    """Why `out` (a result of update op `n`) cannot be written into `src`'s buffer, or ""."""
    if g.roles.get(src.name) != "cache":
        return f"{n.name} updates %{src.name}, not a cache input"
    if src.type != out.type:
        return f"%{src.name} is {src.type}, the update {out.type}"
    if readers.get(src.name, set()) != {id(n)}:
        return f"%{src.name} is read by other ops than {n.name}"
    if src.name in aliases.values():
        return f"%{src.name} is already written by another output"
    return ""


def update_bytes(g: Graph, bindings: Mapping[str, int]) -> dict[str, int]:
    """Bytes the aliased cache updates move per call. "inplace": the elements written (the rows
    of `index_put`, one cache row of `attn.compress_step`, its states whole); "functional": the
    copy of each updated input (read and write it whole) on top of that."""
    env = {str(k): int(v) for k, v in bindings.items()}
    producers = g.producers()
    inplace = copies = 0
    for k in g.aliases:
        out = g.outputs[k]
        n = producers.get(out.name)
        if n is None:
            continue
        whole = evaluate(out.type.nbytes, env)
        copies += 2 * whole
        inplace += _written_bytes(n, n.results.index(out), whole, env)
    return {"inplace": inplace, "functional": inplace + copies}


def _written_bytes(n: Node, result: int, whole: int, env: dict[str, int]) -> int:
    if n.name.startswith("index_put"):
        return evaluate(n.operands[-1].type.nbytes, env)  # the values
    if n.name == "attn.compress_step" and result == 0:
        rows = evaluate(n.results[0].shape[1], env)
        return whole // max(rows, 1)  # one row per batch entry
    return whole


def plan_memory(g: Graph, ctx: PassContext | None = None) -> Graph:
    """Pass: alias cache updates to their inputs (`alias_updates`), then plan buffers at
    `ctx.options["bindings"]` (default B=1, T=4096); the plan goes to `ctx.products
    ["memory_plan"]` (its summary is logged with STATS=1). Returns `g` itself when it has no cache
    update to alias, else a copy with its aliases."""
    bindings = ctx.options.get("bindings") if ctx is not None else None
    g, why = alias_updates(g)
    if ctx is not None:
        ctx.count("plan_memory.aliased", len(g.aliases))
        for name, reason in why.items():
            ctx.count("plan_memory.not_aliased")
            if ctx.stats:
                ctx.log(f"plan_memory: output %{name} stays functional: {reason}")
    result = plan(g, bindings)
    if ctx is not None:
        ctx.products["memory_plan"] = result
        ctx.count("plan_memory.buffers", len(result.buffers))
        if ctx.stats:
            ctx.log(f"plan_memory: {result.summary()}")
    return g
