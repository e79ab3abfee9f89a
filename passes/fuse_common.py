"""Shared machinery of the semantic fusions (fuse_attention, fuse_moe, fuse_hc): every fusion is
a `Rule` run by the one rewrite driver (`passes.rewrite`).

A semantic fusion recognises a subgraph with *several* results (mHC pre -> input, post, comb;
routing -> weights, experts) and replaces it by one named op. Its rule's pattern names the root
op; its rewrite function (wrapped by `fusion_rule`) walks the rest with named sub-patterns and
checks (`Checks`), builds the op with the `Rewriter` and returns a `Replace` naming every value
the op's results stand for. When a sub-pattern or a check does not hold, the rule returns a
`Fail` naming it and saying why — what `STATS=1` counts as a near miss and `explain` prints.

Matching uses the pattern language (`passes.pattern`) for the backward structure of a subgraph
and small forward walks (`users`) where a subgraph fans out, on a `FusionView` of the graph. A
fusion never changes semantics beyond reassociation inside the op: interior values still used
elsewhere simply stay alive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ir
from ir import Graph, Node, Value
from passes.pattern import RULE_BASE, RULE_STEP, Fail, Match, Pat, Rule, checks, match_node
from passes.rewrite import GraphView, Replace, Rewriter

__all__ = [
    "Checks",
    "FusionView",
    "Miss",
    "const_value",
    "fusion_rule",
    "narrow",
    "replace",
    "rounded",
    "scalar",
    "settle",
]

BASE_SCORE, STEP = RULE_BASE, RULE_STEP  # how failures score (passes.pattern)
# A fusion rule's failure is a near miss once two named sub-patterns matched, or when it fails in
# a sub-pattern after three quarters of its checks.
NEAR = BASE_SCORE + 2 * STEP


class Miss(Exception):
    """Raised by `Checks` when a sub-pattern or check fails; `fusion_rule` returns its Fail."""

    def __init__(self, fail: Fail) -> None:
        super().__init__(f"{fail.path}: {fail.reason}")
        self.fail = fail


class Checks:
    """The progress of one fusion attempt: named sub-pattern matches (each adds a step to the
    score) and checks (each adds one); the first that fails raises `Miss` with a Fail naming it
    and the op where it failed, whose location `explain` prints."""

    def __init__(self, view: FusionView, root: Node) -> None:
        self.view = view
        self.root = root
        self.score = BASE_SCORE

    def match(self, name: str, pat: Pat, v: Value) -> Match:
        """Match sub-pattern `name` at `v`, or raise naming it and the failing part."""
        m = self.view.match(pat, v)
        if isinstance(m, Fail):
            path = name if m.path == "root" else f"{name}: {m.path.removeprefix('root.')}"
            node = m.node or self.view.producer(v) or self.root
            near = self.score >= NEAR or m.score >= 3 * checks(pat) // 4
            fail = Fail(self.score + min(m.score, STEP - 1), path, m.reason, node, m.value)
            fail.parent, fail.near = m.parent, near
            raise Miss(fail)
        self.score += STEP
        return m

    def need(self, ok: Any, name: str, reason: str, node: Node | None = None) -> None:
        """Check `ok` (truthy), or raise: sub-pattern `name` fails because `reason`."""
        if not ok:
            raise Miss(Fail(self.score, name, reason, node or self.root))
        self.score += 1

    def fits(self, mnemonic: str, operands: Sequence[Value], attrs: dict, replaced) -> None:
        """The op's types accept the operands, and its results have the replaced shapes."""
        try:
            types = ir.OPS[mnemonic](**attrs).infer_type(*(v.type for v in operands))
        except ir.IRTypeError as e:
            self.need(False, mnemonic, f"the op does not accept these operands: {e}")
            return
        for r, t in zip(replaced, types):
            ok = r is None or r.type.shape == t.shape
            self.need(ok, mnemonic, f"result {t} does not fit %{r.name if r else '?'}")


def fusion_rule(name: str, root: Pat, fn: Callable[[Checks, Match, Rewriter], Any]) -> Rule:
    """A `Rule` whose rewrite is `fn(checks, match, rw)` on a `FusionView`: a `Miss` raised by
    the checks becomes the rule's Fail."""

    def rewrite(m: Match, rw: Rewriter) -> Any:
        checks = Checks(rw.env, m.root)  # type: ignore[arg-type]
        try:
            return fn(checks, m, rw)
        except Miss as miss:
            return miss.fail

    rewrite.__name__ = fn.__name__
    summary = (fn.__doc__ or "").strip().split("\n")[0] or None
    return Rule(name, root, rewrite, view=FusionView, near=NEAR, summary=summary)


def settle(view: FusionView, old: Value, new: Value) -> list[tuple[Value, Value]]:
    """The (old, new) pairs `new` stands for: `old` itself, or — when the op rounds its result to
    another float dtype, as the reference model does right after `old` — the casts of `old` to
    it. Raises `Miss` when neither holds."""
    if old.type == new.type:
        return [(old, new)]
    users = view.users(old)
    ok = (
        old.type.shape == new.type.shape
        and users
        and old.name not in view.outputs
        and all(u.name == "cast" and u.results[0].type == new.type for u in users)
    )
    if not ok:
        fail = Fail(BASE_SCORE, "result", f"the op gives {new.type}, %{old.name} is {old.type}")
        raise Miss(fail)
    return [(u.results[0], new) for u in users]


def replace(view: FusionView, pairs: Sequence[tuple[Value | None, Value]]) -> Replace:
    """A `Replace` of each old value (None: unused result) by its new one, casts settled."""
    out: list[tuple[Value, Value]] = []
    for old, new in pairs:
        if old is not None:
            out += settle(view, old, new)
    return Replace(tuple(out))


class FusionView(GraphView):
    """Producers, use counts and users of a graph, by value name — looking through upcasts.

    Matching sees the graph with every widening float cast (bf16/f16 -> f32) removed, its users
    reading the cast's operand: widening is exact, and the semantic ops compute in fp32 anyway,
    so one pattern matches an fp32 model and a bf16 model. Rounding casts stay visible: patterns
    allow them exactly where the reference model rounds (`rounded`), and `settle` moves a
    replacement past a final rounding cast.
    """

    def __init__(self, g: Graph) -> None:
        self.graph = g
        shadow = _cast_blind(g)
        super().__init__(shadow)
        self.users_of: dict[str, list[Node]] = shadow.users()
        self.graph_ops: list[Node] = shadow.ops
        self.outputs = {v.name for v in shadow.outputs}
        self._memo: dict[str, Any] = {}

    def users(self, v: Value) -> list[Node]:
        return self.users_of.get(v.name, [])

    def only_user(self, v: Value, mnemonic: str | None = None) -> Node | None:
        """The single op using `v` (and not a graph output), optionally of one mnemonic."""
        us = self.users(v)
        if len(us) != 1 or v.name in self.outputs:
            return None
        if mnemonic is not None and us[0].name != mnemonic:
            return None
        return us[0]

    def match(self, pat: Pat, v: Value) -> Match | Fail:
        """Match `pat` against the producer of `v` (a Fail when `v` is a graph input)."""
        n = self.producer(v)
        if n is None:
            return Fail(0, "root", f"expected {pat.describe()}, got graph input %{v.name}", None, v)
        return match_node(pat, n, self)

    def matches(self, pat: Pat, v: Value) -> Match | None:
        """`match`, when only whether it matched matters."""
        m = self.match(pat, v)
        return None if isinstance(m, Fail) else m

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """A value computed once per view (e.g. an index of every candidate of a kind)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def _is_upcast(n: Node) -> bool:
    if n.name != "cast":
        return False
    src, dst = n.operands[0].dtype, n.results[0].dtype
    return src.is_float and dst.is_float and dst.itemsize > src.itemsize and not src.is_f8


def narrow(v: Value) -> bool:
    """Whether `v` is a float narrower than fp32 (a model computing in it rounds its fp32
    intermediates back to it)."""
    return v.dtype.is_float and v.dtype.itemsize < 4


def rounded(view: GraphView, v: Value) -> Value:
    """The value before a float rounding cast (`cast` to a narrower float), else `v`."""
    n = view.producer(v)
    if n is None or n.name != "cast" or not n.operands[0].dtype.is_float:
        return v
    return (
        n.operands[0] if v.dtype.is_float and v.dtype.itemsize < n.operands[0].dtype.itemsize else v
    )


def _cast_blind(g: Graph) -> Graph:
    """`g` without widening float casts (types of later values are left as they were)."""
    through: dict[str, Value] = {}
    ops: list[Node] = []
    for n in g.ops:
        n = _redirect(n, through)
        if _is_upcast(n):
            through[n.results[0].name] = n.operands[0]
            continue
        ops.append(n)
    if not through:
        return g
    outputs = [through.get(v.name, v) for v in g.outputs]
    return Graph(g.inputs, ops, outputs, name=g.name, roles=dict(g.roles))


def const_value(view: GraphView, v: Value) -> Any:
    """The value of a uniform tensor (`constant`/`full` with a concrete value), else None."""
    n = view.producer(v)
    if n is None or n.name not in ("constant", "full"):
        return None
    value = n.attrs["value"]
    return value if isinstance(value, (bool, int, float)) else None


def scalar(m: Match, name: str) -> float | None:
    """The numeric value of capture `name` if it is a constant (`const(name=...)`)."""
    n = m.node(name)
    if n is None or n.name not in ("constant", "full"):
        return None
    value = n.attrs["value"]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _redirect(n: Node, remap: dict[str, Value]) -> Node:
    if not any(v.name in remap for v in n.operands):
        return n
    return Node(n.op, tuple(remap.get(v.name, v) for v in n.operands), n.results, n.loc)
