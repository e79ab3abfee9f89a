"""Generic fusion: group the elementwise, broadcast, view and reduction ops left after the
semantic fusions into `fused.kernel` ops (TVM OpPatternKind style), and fold elementwise GEMM
epilogues into the matmul they follow.

Op kinds say what may fuse (`role`): elementwise/broadcast ops ("compute"), the four
layout-keeping views (reshape, squeeze, unsqueeze, expand), single-dim reductions (sum, mean,
amax, amin, softmax, log_softmax) and `matmul` (which only *starts* a group: its elementwise
consumers become its epilogue). Everything else — semantic ops (attn.*, moe.*, hc.*), data
movement (slice, select, concat, permute, gather, ...), opaque ops, ops without operands — stays
a launch of its own, with the reason counted.

Grouping walks the ops in order; an op joins the groups of its producers when the union stays
legal (`Grouping.check`):
- one *domain* (iteration shape): the operand shape of its reductions (all over the same shape
  and the same single dim), or the matmul's result shape, or else the broadcast of all shapes;
- every operand and result fits the domain (broadcasts into it, or is a per-row value); a
  per-row value without the reduced dim only meets values of its own shape or scalars;
- every value used outside the group (a group output) is a whole tile or a per-row value;
  a smaller value (say a [D] column) may only be computed inside if all its users are inside;
- a GEMM group has one output and no reductions or views; its matmul result is not used outside,
  the matmul's operands come from outside and its B operand is 2-D (no batched epilogues);
- every symbol of the domain is bound by the shapes of the group's inputs;
- no cycle: no path leaves the group and comes back, also through other groups (each counted as
  one kernel: two groups feeding each other would deadlock the launch order).
These mirror what `backends/triton/fused.py` and `matmul.py` emit (tile / row / column layouts of
one 2-D domain; matmul first, then an elementwise epilogue).

A backend that lowers each body op to a loop nest of its own (TVM on the CPU) names data-movement
ops that may join too (`FusionPolicy.movement`: slice, select, concat, permute). A group holding
one has no single domain, so only the rules that do not depend on it apply: no GEMM, some input,
every symbol bound, no cycle. Then a RoPE spelled with slices, selects and concats (and the norm
before it) is one kernel instead of a dozen launches and copies.

Work is never duplicated: each op lands in at most one group. Only literal 0-d constants are
cloned into every body that reads them (they become literals). A group is emitted as a
`fused.kernel` when it holds at least two computing ops (a lone op plus views is left as is: it is
one launch either way). The body's ops keep their value names and source locations (the kernel
op's own location is its anchor's); a GEMM body starts with the matmul of its first two inputs
(the backend's epilogue convention).

Counters (`STATS=1`): `fuse_elementwise.kernels`, `.gemm_epilogues`, `.ops_fused`; for every op
left unfused `fuse_elementwise.no.<reason>`; for every refused merge `fuse_elementwise.refused.
<reason>` (cycle, domain, outside_domain, stores_broadcast, row_mixes_layouts, gemm_*,
unbound_symbol, ...).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import sympy

from ir import Graph, Kind, Node, Value
from ir.ops.fused import FusedKernel
from ir.symbolic import Dim
from passes.context import PassContext

__all__ = ["FusionPolicy", "Grouping", "broadcast_shape", "fuse_elementwise", "group_ops", "role"]

VIEWS = frozenset({"reshape", "squeeze", "unsqueeze", "expand"})
REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "softmax", "log_softmax"})
# elementwise ops the Triton body emitter has no rule for (backends/triton/body.py): fusing them
# would only make the whole kernel fall back to the reference
NO_BODY_RULE = frozenset({"log1p", "sign", "floordiv", "remainder"})
SEMANTIC_PREFIXES = ("attn.", "moe.", "hc.")
P = "fuse_elementwise"


@dataclass(frozen=True)
class FusionPolicy:
    """What the generic fusion may form. Defaults fit the Triton backend."""

    gemm_epilogues: bool = True
    max_ops: int = 64  # computing ops per kernel (register pressure, compile time)
    no_body_rule: frozenset[str] = NO_BODY_RULE
    # data-movement ops (slice, select, concat, ...) that may join a group: for a backend that
    # lowers each body op to a stage of its own and inlines them (TVM on the CPU). A group that
    # holds one has no common domain, so only the rules that do not depend on one apply to it
    # (`Grouping.check`): a RoPE spelled with slices and concats becomes one kernel.
    movement: frozenset[str] = frozenset()


def role(node: Node, policy: FusionPolicy = FusionPolicy()) -> str:
    """compute | view | reduction | gemm | constant, or `no.<reason>` for an op that stays alone."""
    m, kind = node.name, node.kind
    if m == "constant" or (m == "full" and not node.results[0].shape):
        return "constant"
    if m.startswith(SEMANTIC_PREFIXES):
        return "no.semantic_op"
    if m == "fused.kernel":
        return "no.already_fused"
    if kind in (Kind.ELEMENTWISE, Kind.BROADCAST):
        if not node.operands:
            return "no.no_operands"  # iota, full: computed by their own launch
        if m in policy.no_body_rule:
            return "no.no_body_rule"
        return "compute"
    if kind == Kind.INJECTIVE:
        if m in VIEWS:
            return "view"
        return "move" if m in policy.movement else "no.data_movement"
    if kind == Kind.REDUCTION:
        if m not in REDUCTIONS or len(reduced_dims(node)) != 1:
            return "no.reduction_form"
        return "reduction"
    if m == "matmul":
        return "gemm"
    return "no.gemm" if kind == Kind.GEMM else "no.opaque"


def reduced_dims(node: Node) -> list[int]:
    rank = node.operands[0].type.rank
    attrs = node.attrs
    dims = attrs["dims"] if "dims" in attrs else (attrs.get("dim", -1),)
    return sorted(d % rank for d in dims) if dims else list(range(rank))


# --- domains and layouts --------------------------------------------------------------------


def broadcast_shape(shapes: Sequence[Sequence[Dim]]) -> tuple[Dim, ...] | None:
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = [1] * rank
    for s in shapes:
        for i, d in enumerate(s, start=rank - len(s)):
            if d == 1 or d == out[i]:
                continue
            if out[i] != 1:
                return None
            out[i] = d
    return tuple(out)


def layout(shape: Sequence[Dim], domain: tuple[Dim, ...], axis: int, reduce: bool) -> str | None:
    """How a value sits in the domain: tile (whole), row (one per row), bcast (other broadcast),
    or None (does not fit). A row without the reduced dim (`keepdim=False`) fits reductions only:
    elsewhere the backend's domain is the right-aligned broadcast of the body's shapes."""
    row = [d for i, d in enumerate(domain) if i != axis]
    if reduce and list(shape) == row and len(shape) < len(domain):
        return "row"
    if len(shape) > len(domain):
        return None
    padded = [1] * (len(domain) - len(shape)) + list(shape)
    if any(s != 1 and s != d for s, d in zip(padded, domain)):
        return None
    if padded == list(domain):
        return "tile"
    if all(s == 1 for s in padded):
        return "bcast"  # a scalar of the domain: the backend cannot store it
    if all(s == d for i, (s, d) in enumerate(zip(padded, domain)) if i != axis):
        return "row"
    return "bcast"


def _storable(shape: Sequence[Dim], domain: tuple[Dim, ...], axis: int, lay: str) -> bool:
    """A kernel stores whole tiles (the domain's exact shape) and per-row values (the domain with
    the reduced dim as 1, or without it)."""
    if list(shape) == list(domain):
        return True
    keep = [1 if i == axis else d for i, d in enumerate(domain)]
    return lay == "row" and (list(shape) == keep or len(shape) == len(domain) - 1)


def _symbols(shape: Sequence[Dim]) -> set:
    return {s for d in shape if not isinstance(d, int) for s in d.free_symbols}


def _bound(shapes: Sequence[Sequence[Dim]]) -> set | None:
    """Symbols the interpreter binds from inputs of these shapes: bare dims, then dims linear in
    their one unbound symbol (`B*T` once `B` is known). None: some other dim (`T//4`) would
    have to be solved, which the interpreter cannot do."""
    dims = [d for s in shapes for d in s if not isinstance(d, int)]
    bare = {d for d in dims if d.is_Symbol}
    bound, changed = set(bare), True
    while changed:
        changed = False
        for d in dims:
            free = d.free_symbols - bound
            if len(free) == 1 and d.is_polynomial(*free) and sympy.degree(d, *free) == 1:
                bound |= free
                changed = True
    if any(not d.free_symbols <= bare and not d.is_polynomial() for d in dims):
        return None
    return bound


# --- grouping -------------------------------------------------------------------------------


@dataclass
class Grouping:
    """Groups of node indices of `graph` and, for every op left alone, why."""

    graph: Graph
    policy: FusionPolicy
    roles: list[str] = field(default_factory=list)
    group_of: dict[int, int] = field(default_factory=dict)
    groups: dict[int, list[int]] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    last_refusal: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = self.graph
        self.roles = [role(n, self.policy) for n in g.ops]
        self.producer: dict[str, int] = {r.name: i for i, n in enumerate(g.ops) for r in n.results}
        for i, n in enumerate(g.ops):  # bodies raise only to literal powers (x**2, rsqrt, ...)
            if n.name == "pow" and not self.cloned(n.operands[1]):
                self.roles[i] = "no.pow_exponent"
        self.users: dict[str, list[int]] = {}
        for i, n in enumerate(g.ops):
            for v in n.operands:
                self.users.setdefault(v.name, []).append(i)
        self.graph_outputs = {v.name for v in g.outputs}
        self.succs: list[list[int]] = [[] for _ in g.ops]
        for i in range(len(g.ops)):
            for p in set(self.preds(i)):
                self.succs[p].append(i)

    def preds(self, i: int) -> list[int]:
        return [
            self.producer[v.name] for v in self.graph.ops[i].operands if v.name in self.producer
        ]

    def cloned(self, v: Value) -> bool:
        """A literal 0-d constant: copied into each body instead of becoming an input."""
        i = self.producer.get(v.name)
        if i is None or self.roles[i] != "constant":
            return False
        return isinstance(self.graph.ops[i].attrs.get("value"), (bool, int, float))

    def outside_use(self, v: Value, members: set[int]) -> bool:
        if v.name in self.graph_outputs:
            return True
        return any(u not in members for u in self.users.get(v.name, ()))

    # -- legality --

    def check(self, members: list[int]) -> str | None:
        """Why `members` cannot be one kernel, or None."""
        nodes = [self.graph.ops[i] for i in members]
        roles = [self.roles[i] for i in members]
        if sum(r != "view" for r in roles) > self.policy.max_ops:
            return "max_ops"
        mset = set(members)
        if "move" in roles:
            why = self._fit_stages(nodes, roles, mset)
            return "cycle" if why is None and self._creates_cycle(mset) else why
        dom = self._domain(nodes, roles)
        if isinstance(dom, str):
            return dom
        domain, axis = dom
        why = self._fit(nodes, roles, mset, domain, axis, "reduction" in roles)
        if why is None and "gemm" in roles:
            why = self._gemm(nodes, roles, mset)
        if why is None and self._creates_cycle(mset):
            why = "cycle"
        return why

    def _domain(self, nodes: list[Node], roles: list[str]) -> tuple[tuple, int] | str:
        reds = [n for n, r in zip(nodes, roles) if r == "reduction"]
        gemm = [n for n, r in zip(nodes, roles) if r == "gemm"]
        if gemm:
            if len(gemm) > 1 or reds:
                return "gemm_epilogue_form"
            domain = tuple(gemm[0].results[0].shape)
        elif reds:
            if len({tuple(n.operands[0].shape) for n in reds}) > 1:
                return "reduction_shapes_differ"
            if len({tuple(reduced_dims(n)) for n in reds}) > 1:
                return "reduction_dims_differ"
            domain = tuple(reds[0].operands[0].shape)
            return (domain, reduced_dims(reds[0])[0]) if domain else "zero_d"
        else:
            shapes = [r.shape for n in nodes for r in n.results]
            found = broadcast_shape(shapes)
            if found is None:
                return "domain"
            domain = found
        return (domain, len(domain) - 1) if domain else "zero_d"

    def _fit(
        self, nodes, roles, mset: set[int], domain: tuple, axis: int, reduce: bool
    ) -> str | None:
        needed = _symbols(domain)
        for n, r in zip(nodes, roles):
            ops_in = [] if r == "gemm" else n.operands
            for v in (*ops_in, *n.results):
                lay = layout(v.shape, domain, axis, reduce)
                if lay is None:
                    return "outside_domain"
                stored = v in n.results and self.outside_use(v, mset)
                if stored and not _storable(v.shape, domain, axis, lay):
                    return "stores_broadcast"
                needed |= _symbols(v.shape)
            if r == "compute" and reduce and self._mixes_rows(n, domain, axis):
                return "row_mixes_layouts"
            if r == "view" and n.name != "expand":
                before = layout(n.operands[0].shape, domain, axis, reduce)
                if before != layout(n.results[0].shape, domain, axis, reduce):
                    return "view_changes_layout"
        return self._launchable(nodes, mset, needed)

    def _fit_stages(self, nodes: list[Node], roles: list[str], mset: set[int]) -> str | None:
        """The rules for a group with data movement (`FusionPolicy.movement`), whose backend
        gives each op a loop nest of its own: no GEMM inside, some input to launch it on, and
        every symbol of its values bound by the inputs' shapes."""
        if "gemm" in roles:
            return "gemm_view"
        needed = {s for n in nodes for v in (*n.operands, *n.results) for s in _symbols(v.shape)}
        return self._launchable(nodes, mset, needed)

    def _launchable(self, nodes: list[Node], mset: set[int], needed: set) -> str | None:
        """Why the group's inputs (operands from outside it, cloned constants aside) cannot
        launch it: none (made from constants alone), or they leave a `needed` symbol unbound."""
        inputs = [
            v.shape
            for n in nodes
            for v in n.operands
            if (v.name not in self.producer or self.producer[v.name] not in mset)
            and not self.cloned(v)
        ]
        if not inputs:
            return "no_inputs"
        bound = _bound(inputs)
        return None if bound is not None and needed <= bound else "unbound_symbol"

    @staticmethod
    def _mixes_rows(n: Node, domain: tuple, axis: int) -> bool:
        """A per-row value without the reduced dim (`keepdim=False`) combined with anything but
        the same shape or a scalar: the IR broadcasts it right-aligned, the backend per row."""
        row = [d for i, d in enumerate(domain) if i != axis]
        shapes = [list(v.shape) for v in (*n.operands, *n.results)]
        if row not in shapes:
            return False
        return any(s != row and s for s in shapes)

    def _gemm(self, nodes: list[Node], roles: list[str], mset: set[int]) -> str | None:
        if len(nodes) == 1:
            return None
        if not self.policy.gemm_epilogues:
            return "gemm_epilogues_off"
        mm = nodes[roles.index("gemm")]
        a, b = mm.operands
        if b.type.rank != 2 or a.name == b.name:
            return "gemm_batched"
        if "view" in roles:
            return "gemm_view"
        if any(self.producer.get(v.name) in mset for v in mm.operands):
            return "gemm_operand_inside"
        outs = [r for n in nodes for r in n.results if self.outside_use(r, mset)]
        if len(outs) > 1 or (outs and outs[0].name == mm.results[0].name):
            return "gemm_outputs"
        return None

    def _creates_cycle(self, mset: set[int]) -> bool:
        """Is there a path from the group out and back in, with the other groups contracted
        (two groups feeding each other would be a cycle of kernels)? Searched forward from the
        group's readers; ops after the newest member are not grouped yet and cannot lead back."""
        newest = max(mset)
        stack = [u for m in mset for u in self.succs[m] if u not in mset]
        seen: set[int] = set()
        while stack:
            x = stack.pop()
            if x > newest:
                continue
            gid = self.group_of.get(x)
            unit = self.groups[gid] if gid is not None else [x]
            if unit[0] in seen:
                continue
            seen.add(unit[0])
            for m in unit:
                for u in self.succs[m]:
                    if u in mset:
                        return True
                    stack.append(u)
        return False

    # -- the walk --

    def run(self) -> Grouping:
        for i, r in enumerate(self.roles):
            if r.startswith("no.") or r == "constant":
                continue
            if r == "gemm":
                self._new([i])
                continue
            cands = []
            for p in self.preds(i):
                gid = self.group_of.get(p)
                if gid is not None and gid not in cands:
                    cands.append(gid)
            self._place(i, cands)
        return self

    def _place(self, i: int, cands: list[int]) -> None:
        gemms = [c for c in cands if self._is_gemm(c)]
        for gid in gemms:  # an epilogue first: saves the GEMM's store and reload
            if self._try([gid], i):
                return
        members, merged = [i], []
        for gid in cands:
            if gid in gemms:
                continue
            trial = sorted([*members, *self.groups[gid]])
            why = self.check(trial)
            if why is None:
                members, merged = trial, [*merged, gid]
            else:
                self._refuse(i, why)
        self._merge(merged, members)

    def _is_gemm(self, gid: int) -> bool:
        return any(self.roles[m] == "gemm" for m in self.groups[gid])

    def _try(self, gids: list[int], i: int) -> bool:
        trial = sorted([i, *(m for g in gids for m in self.groups[g])])
        why = self.check(trial)
        if why is not None:
            self._refuse(i, why)
            return False
        self._merge(gids, trial)
        return True

    def _refuse(self, i: int, why: str) -> None:
        self.refused[why] += 1
        self.last_refusal[i] = why

    def _new(self, members: list[int]) -> int:
        gid = members[0]
        self.groups[gid] = members
        for m in members:
            self.group_of[m] = gid
        return gid

    def _merge(self, gids: list[int], members: list[int]) -> None:
        for g in gids:
            del self.groups[g]
        self._new(members)

    # -- results --

    def kernels(self) -> list[list[int]]:
        """Groups worth a `fused.kernel`: two or more computing ops, some result used (dead
        groups are left to dead-code elimination)."""
        out = []
        for members in self.groups.values():
            mset = set(members)
            used = any(
                self.outside_use(r, mset) for m in members for r in self.graph.ops[m].results
            )
            if used and sum(self.roles[m] != "view" for m in members) >= 2:
                out.append(members)
        return sorted(out)

    def reasons(self) -> Counter[str]:
        """Why each op left outside a kernel stayed alone (views alone are free: not counted;
        a GEMM's refusals are counted at the consumers it could not take)."""
        fused = {m for k in self.kernels() for m in k}
        out: Counter[str] = Counter()
        for i, r in enumerate(self.roles):
            if i in fused or r in ("constant", "view"):
                continue
            if r == "gemm":
                out["no.gemm_without_epilogue"] += 1
                continue
            out[r if r.startswith("no.") else "no." + self.last_refusal.get(i, "no_partner")] += 1
        return out


def group_ops(g: Graph, policy: FusionPolicy = FusionPolicy()) -> Grouping:
    """Decide the groups of `g` without rewriting it (for tests and explanations)."""
    return Grouping(g, policy).run()


# --- rewriting ------------------------------------------------------------------------------


def _body(grouping: Grouping, members: list[int]) -> tuple[Graph, list[Value], list[Value]]:
    g = grouping.graph
    mset = set(members)
    nodes = [g.ops[i] for i in members]
    gemm = [n for n in nodes if n.name == "matmul"]
    if gemm:  # the backend's convention: matmul first, its operands the first two inputs
        nodes = gemm + [n for n in nodes if n is not gemm[0]]
    inputs: list[Value] = []
    consts: list[Node] = []
    seen: set[str] = set()
    for n in nodes:
        for v in n.operands:
            if v.name in seen or grouping.producer.get(v.name) in mset:
                continue
            seen.add(v.name)
            if grouping.cloned(v):
                consts.append(g.ops[grouping.producer[v.name]])
            else:
                inputs.append(v)
    body_ops = nodes[:1] + consts + nodes[1:] if gemm else consts + nodes
    outputs = [r for n in nodes for r in n.results if grouping.outside_use(r, mset)]
    outputs.sort(key=lambda v: grouping.producer[v.name])
    # each body op keeps its source location: kernel headers and reports name the fused lines
    body = Graph(inputs, [Node(n.op, n.operands, n.results, n.loc) for n in body_ops], outputs)
    return body, inputs, outputs


def fuse_elementwise(
    g: Graph, ctx: PassContext | None = None, policy: FusionPolicy | None = None
) -> Graph:
    """Group elementwise/reduction chains and GEMM epilogues of `g` into `fused.kernel` ops.

    Before: any verified graph. After: the same computation, each group replaced by one
    `fused.kernel` whose results are the group's values used outside it (same names); ops are
    in a topological order that keeps the original order where it can.
    """
    policy = policy or (ctx.options.get("fusion_policy") if ctx else None) or FusionPolicy()
    grouping = group_ops(g, policy)
    kernels = grouping.kernels()
    if ctx is not None:
        for why, n in grouping.refused.items():
            ctx.count(f"{P}.refused.{why}", n)
        for why, n in grouping.reasons().items():
            ctx.count(f"{P}.{why}", n)
    if not kernels:
        return g
    replaced: dict[int, Node] = {}  # last member -> its kernel
    gone: set[int] = set()
    for members in kernels:
        body, inputs, outputs = _body(grouping, members)
        anchor = next((g.ops[m] for m in members if grouping.roles[m] != "compute"), None)
        loc = (anchor or g.ops[members[-1]]).loc
        replaced[members[-1]] = Node(FusedKernel(body=body), tuple(inputs), tuple(outputs), loc)
        gone.update(members)
        if ctx is not None:
            ctx.count(f"{P}.kernels")
            ctx.count(f"{P}.ops_fused", len(members))
            ctx.count(f"{P}.gemm_epilogues", int(body.ops[0].name == "matmul"))
    ops = [replaced.get(i, n) for i, n in enumerate(g.ops) if i not in gone or i in replaced]
    ops = _dead_constants(_topological(ops), g)
    return Graph(g.inputs, ops, g.outputs, name=g.name, roles=dict(g.roles))


def _topological(ops: list[Node]) -> list[Node]:
    """A topological order of `ops`, as close to the given order as dependencies allow."""
    producer = {r.name: i for i, n in enumerate(ops) for r in n.results}
    waiting = [0] * len(ops)
    users: dict[int, list[int]] = {}
    for i, n in enumerate(ops):
        deps = {producer[v.name] for v in n.operands if v.name in producer}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    out: list[Node] = []
    while ready:
        i = heapq.heappop(ready)
        out.append(ops[i])
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    assert len(out) == len(ops), "fuse_elementwise formed a cycle"
    return out


def _dead_constants(ops: list[Node], g: Graph) -> list[Node]:
    """Drop constants whose every reader now holds its own copy."""
    used = {v.name for n in ops for v in n.operands} | {v.name for v in g.outputs}
    return [n for n in ops if n.operands or n.name != "constant" or n.results[0].name in used]
