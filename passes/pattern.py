"""A declarative pattern language over `ir` graphs.

A pattern is a tree of `Pat` nodes that matches a value and, through its producer, the ops
feeding it. It can constrain:

- the producer's mnemonic (`op="mul"` or a set `op={"reshape", "unsqueeze"}`) and kind;
- attributes, each a value (compared strictly: `1` is not `1.0`, NaN equals NaN) or a predicate;
- the value's dtype and rank, its use count (`uses=1`: single use, graph outputs count as uses);
- the operands, as nested sub-patterns (`None`: any operands); commutative ops try both orders;
- extra constraints (`where=`) over the captures made so far;
- alternatives: `either(p, q)` matches what `p` or `q` matches (tried in order, with
  backtracking: when a later part of the pattern fails, the next alternative is tried).

Named captures (`name="x"`) bind values; a name used twice must bind the same value, so
`op("mul", var("x"), op("sigmoid", var("x")))` matches `x * sigmoid(x)` and not `y * sigmoid(x)`.

    x = var("x")
    one = const(1.0)
    mul_one = op("mul", x, one)            # x * 1 (either operand order)

Matching returns a `Match` (captures) or a `Fail` that says how far the match got (`score`, used
by `explain` to pick the nearest candidate), where (`path`, the op) and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import ir
from ir import DType, Kind, Node, TensorType, Value

__all__ = [
    "COMMUTATIVE",
    "Fail",
    "Match",
    "MatchEnv",
    "Pat",
    "Rule",
    "RULE_BASE",
    "RULE_STEP",
    "checks",
    "const",
    "either",
    "match_node",
    "op",
    "progress",
    "var",
]

# Binary ops whose operands may be swapped without changing the result (type included).
COMMUTATIVE = frozenset(
    {"add", "mul", "maximum", "minimum", "eq", "ne", "logical_and", "logical_or", "bitwise_and"}
)

AttrSpec = Any  # a value, or a predicate `fn(value) -> bool`
Where = Callable[["Match"], bool | str]


@dataclass(frozen=True)
class Pat:
    """Matches one value. Every field left at its default is unconstrained.

    op: mnemonic or set of mnemonics of the producing op (None: any, or a graph input).
    operands: sub-patterns for the producer's operands, exact arity (None: not looked at).
    name: capture name for the value (the producer is `Match.node(name)`).
    kind: required `ir.Kind` (or a set) of the producer.
    attrs: attribute name -> required value or predicate `fn(value) -> bool`.
    type: the value's exact `TensorType`, or a predicate `fn(type) -> bool`.
    dtype, rank: required dtype/rank of the value (or collections of allowed ones).
    uses: required number of uses of the value (graph outputs count), or a predicate.
    result: which result of a multi-result producer the value must be (None: any).
    commute: try the operands of a binary op in both orders.
    where: extra constraint, checked once the operands matched, over the captures made so far
        (this value's subtree and everything matched before it); return True, or False or a
        reason string (shown by `explain`).
    """

    op: str | frozenset[str] | None = None
    operands: tuple[Pat, ...] | None = None
    name: str | None = None
    kind: Kind | frozenset[Kind] | None = None
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    type: TensorType | Callable[[TensorType], bool] | None = None
    dtype: DType | frozenset[DType] | None = None
    rank: int | frozenset[int] | None = None
    uses: int | Callable[[int], bool] | None = None
    result: int | None = None
    commute: bool = False
    where: Where | None = None
    either: tuple[Pat, ...] = ()

    def __post_init__(self) -> None:
        if self.either and (self.op is not None or self.operands is not None or self.name):
            raise ValueError("either(...) takes its constraints from its alternatives")

    @property
    def needs_node(self) -> bool:
        """Whether the value must be produced by an op (not a graph input)."""
        if self.either:
            return all(p.needs_node for p in self.either)
        return bool(
            self.op is not None
            or self.operands is not None
            or self.kind is not None
            or self.attrs
            or self.result is not None
        )

    def mnemonics(self) -> frozenset[str] | None:
        """Root mnemonics this pattern can match (None: any op); used to index rules."""
        if self.either:
            alts = [p.mnemonics() for p in self.either]
            return None if any(a is None for a in alts) else frozenset().union(*alts)
        if self.op is None:
            return None
        return frozenset([self.op]) if isinstance(self.op, str) else frozenset(self.op)

    def describe(self) -> str:
        """Short text of the pattern, e.g. `mul(x, s=sigmoid(x))` (`name=` marks captures)."""
        if self.either:
            return "either(" + " | ".join(p.describe() for p in self.either) + ")"
        head = self.name or "_"
        if self.op is not None:
            head = self.op if isinstance(self.op, str) else "{" + "|".join(sorted(self.op)) + "}"
        if self.attrs:
            head += "[" + ", ".join(f"{k}={_spec_text(v)}" for k, v in self.attrs.items()) + "]"
        if self.op is not None and self.name:
            head = f"{self.name}={head}"
        if self.operands is None:
            return head if self.op is None else f"{head}(...)"
        return f"{head}({', '.join(p.describe() for p in self.operands)})"


def op(mnemonic: str | Collection[str] | None, *operands: Pat, **kw: Any) -> Pat:
    """Pattern for a value produced by `mnemonic(operands...)`. Operands omitted: not checked.

    Known commutative binary ops (`COMMUTATIVE`) match in either operand order unless
    `commute=False` is given. Keyword arguments are `Pat` fields.
    """
    if mnemonic is not None and not isinstance(mnemonic, str):
        mnemonic = frozenset(mnemonic)
    for k in ("kind", "dtype", "rank"):
        if isinstance(kw.get(k), (set, list, tuple)):
            kw[k] = frozenset(kw[k])
    if isinstance(mnemonic, str) and "commute" not in kw:
        kw["commute"] = mnemonic in COMMUTATIVE and len(operands) == 2
    return Pat(op=mnemonic, operands=tuple(operands) if operands else None, **kw)


def either(*alternatives: Pat) -> Pat:
    """Pattern matching any of `alternatives` (other spellings of one value), tried in order."""
    if len(alternatives) < 2:
        raise ValueError("either(...) needs at least two alternatives")
    return Pat(either=tuple(alternatives))


def var(name: str | None = None, **kw: Any) -> Pat:
    """Any value (a graph input or any op's result), optionally captured and constrained."""
    for k in ("kind", "dtype", "rank"):
        if isinstance(kw.get(k), (set, list, tuple)):
            kw[k] = frozenset(kw[k])
    return Pat(name=name, **kw)


def const(value: AttrSpec = None, *, name: str | None = None, **kw: Any) -> Pat:
    """A uniform tensor: `constant` or `full`, with `value` equal (numerically) or a predicate.

    Numeric comparison here (`1 == 1.0`), unlike `attrs=`, since `x * 1` and `x * 1.0` are both
    identities; bool constants never equal numbers. Symbolic values never match a number.
    """
    attrs = {} if value is None else {"value": value if callable(value) else _numeric_eq(value)}
    return Pat(op=frozenset({"constant", "full"}), name=name, attrs=attrs, **kw)


class _numeric_eq:
    """Predicate: a Python number numerically equal to `want` (bools only equal bools)."""

    def __init__(self, want: bool | float) -> None:
        self.want = want

    def __call__(self, got: Any) -> bool:
        if isinstance(got, bool) or isinstance(self.want, bool):
            return isinstance(got, bool) and isinstance(self.want, bool) and got == self.want
        return isinstance(got, (int, float)) and got == self.want

    def __repr__(self) -> str:
        return repr(self.want)


def _spec_text(spec: AttrSpec) -> str:
    if callable(spec) and not isinstance(spec, _numeric_eq):
        return getattr(spec, "__name__", repr(spec))
    return repr(spec)


# --- matching ---------------------------------------------------------------------------------


class MatchEnv:
    """What the matcher needs from the graph: producers and use counts, by value name."""

    def producer(self, v: Value) -> Node | None:
        raise NotImplementedError

    def uses(self, v: Value) -> int:
        raise NotImplementedError


@dataclass
class Match:
    """A successful match: `m["x"]` is the captured value, `m.node("x")` its producer."""

    root: Node
    values: dict[str, Value]
    nodes: dict[str, Node | None]
    env: MatchEnv | None = None

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def node(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def producer(self, v: Value) -> Node | None:
        """The op defining `v` in the graph being matched (None for graph inputs)."""
        return None if self.env is None else self.env.producer(v)

    def attr(self, name: str, attr: str) -> Any:
        """Attribute `attr` of the op producing capture `name`."""
        n = self.nodes.get(name)
        if n is None:
            raise KeyError(f"capture {name!r} is not produced by an op")
        return n.attrs[attr]


@dataclass
class Fail:
    """Why a pattern did not match: `score` checks passed first; `path` like `root.operands[1]`."""

    score: int
    path: str
    reason: str
    node: Node | None = None
    value: Value | None = None
    parent: Node | None = None  # the op whose operand `value` is (None at the root)
    near: bool | None = None  # whether it is a near miss (None: the rule decides by score)


@dataclass(frozen=True)
class Rule:
    """A rewrite rule: when `pattern` matches at an op, `rewrite(match, rw)` builds the
    replacement — a value per result of the matched op, or a `Replace` naming the values it
    stands for (several results, values other than the root's) — or declines with a `Fail`
    saying which sub-pattern did not hold and why (None: declines without a reason).

    view: builds the match environment of a graph (None: the graph as it is); the semantic
        fusions match a view that looks through widening casts (`passes.fuse_common`).
    near: a failure that passed at least this many checks is a near miss (counted by the
        driver, shown by STATS=1); None: one check short of the whole pattern.
    summary: the computation the rule recognises, for `explain` (when the pattern alone, e.g. a
        root op, does not say it).
    """

    name: str
    pattern: Pat
    rewrite: Callable[..., Any]
    view: Callable[[Any], MatchEnv] | None = None
    near: int | None = None
    summary: str | None = None  # what a rule whose rewrite does the matching looks for

    def __post_init__(self) -> None:
        if not self.pattern.needs_node:
            raise ValueError(f"rule {self.name}: the root pattern must constrain the op")

    def near_miss(self, fail: Fail) -> bool:
        """Whether `fail` got close enough to count as a near miss."""
        if fail.near is not None:
            return fail.near
        near = self.near if self.near is not None else max(3, checks(self.pattern) - 1)
        return fail.score >= near


# A rule whose rewrite makes further checks (the semantic fusions) scores its failures from
# RULE_BASE: each step it passed (a named sub-pattern or a check) adds RULE_STEP, a failing
# sub-pattern adds the checks it passed. So `explain` prefers the candidate that got furthest.
RULE_BASE = 10_000
RULE_STEP = 100


def progress(score: int) -> str:
    """`score` in words: "N checks", or "S steps and N checks" for a rewrite's own failures."""
    if score < RULE_BASE:
        return f"{score} checks"
    steps, rest = divmod(score - RULE_BASE, RULE_STEP)
    return f"{steps} steps and {rest} checks" if rest else f"{steps} steps"


def checks(pat: Pat) -> int:
    """How many checks a full match of `pat` passes (an `either` counts its smallest branch)."""
    if pat.either:
        return min(checks(p) for p in pat.either)
    own = sum(
        x is not None for x in (pat.op, pat.kind, pat.type, pat.dtype, pat.rank, pat.uses)
    )
    own += len(pat.attrs) + (pat.name is not None) + (pat.where is not None)
    return own + sum(checks(p) for p in pat.operands or ())


def match_node(pat: Pat, node: Node, env: MatchEnv) -> Match | Fail:
    """Match `pat` with `node` as the root (its first result is the root value).

    Commutative operand orders are choice points: when a later part of the pattern fails, the
    other order is tried (captures made since are undone), so `op("f", op("mul", x, y), x)`
    finds `x` whichever side of the `mul` it is on. Of all failures the deepest is returned.
    """
    m = Match(node, {}, {}, env)
    parents: dict[str, Node] = {}
    if pat.either:
        out = _match_either(pat, node.results[0], env, m, "root", 0, _done, parents)
    else:
        out = _match_node(pat, node, node.results[0], env, m, "root", 0, _done, parents)
    if isinstance(out, Fail):
        out.parent = parents.get(out.path)
        return out
    return m


Cont = Callable[[int], "int | Fail"]  # what remains to match, given the score so far


def _done(score: int) -> int:
    return score


def _match_value(
    pat: Pat, v: Value, env: MatchEnv, m: Match, path: str, score: int, k: Cont, parents
):
    if pat.either:
        return _match_either(pat, v, env, m, path, score, k, parents)
    node = env.producer(v)
    if node is not None:
        return _match_node(pat, node, v, env, m, path, score, k, parents)
    if pat.needs_node:
        return Fail(score, path, f"expected {pat.describe()}, got graph input %{v.name}", None, v)
    out = _check_value(pat, v, None, env, m, path, score)
    if isinstance(out, Fail):
        return out
    out = _check_where(pat, m, None, v, path, out)
    return out if isinstance(out, Fail) else k(out)


def _match_node(
    pat: Pat, node: Node, v: Value, env, m: Match, path: str, score: int, k: Cont, parents
):
    if pat.op is not None:
        ok = node.name == pat.op if isinstance(pat.op, str) else node.name in pat.op
        if not ok:
            return Fail(score, path, f"expected op {_ops_text(pat.op)}, got {node.name}", node, v)
        score += 1
    if pat.kind is not None:
        kinds = pat.kind if isinstance(pat.kind, frozenset) else frozenset([pat.kind])
        if node.kind not in kinds:
            want = "|".join(sorted(k.value for k in kinds))
            return Fail(score, path, f"expected kind {want}, got {node.kind.value}", node, v)
        score += 1
    if pat.result is not None and node.results.index(v) != pat.result:
        return Fail(score, path, f"expected result {pat.result}", node, v)
    for name, spec in pat.attrs.items():
        got = getattr(node.op, name, _MISSING)
        if got is _MISSING:
            return Fail(score, path, f"op {node.name} has no attribute {name}", node, v)
        if not _attr_ok(spec, got):
            reason = f"attribute {name}={_attr_text(got)} does not satisfy {_spec_text(spec)}"
            return Fail(score, path, reason, node, v)
        score += 1
    out = _check_value(pat, v, node, env, m, path, score)
    if isinstance(out, Fail):
        return out

    def finish(s: int) -> int | Fail:
        r = _check_where(pat, m, node, v, path, s)
        return r if isinstance(r, Fail) else k(r)

    if pat.operands is None:
        return finish(out)
    return _match_operands(pat, node, v, env, m, path, out, finish, parents)


def _match_either(pat: Pat, v: Value, env, m: Match, path: str, score: int, k: Cont, parents):
    best: Fail | None = None
    for i, alt in enumerate(pat.either):
        saved = (dict(m.values), dict(m.nodes))
        out = _match_value(alt, v, env, m, f"{path}.either[{i}]", score, k, parents)
        if not isinstance(out, Fail):
            return out
        m.values, m.nodes = saved  # undo captures made under the failed alternative
        if best is None or out.score > best.score:
            best = out
    assert best is not None
    return best


def _match_operands(pat: Pat, node: Node, v: Value, env, m: Match, path: str, score, k, parents):
    subs = pat.operands
    assert subs is not None
    if len(node.operands) != len(subs):
        reason = f"expected {len(subs)} operands, got {len(node.operands)}"
        return Fail(score, path, reason, node, v)
    orders = [tuple(range(len(subs)))]
    if pat.commute and len(subs) == 2:
        orders.append((1, 0))
    best: Fail | None = None
    for order in orders:
        saved = (dict(m.values), dict(m.nodes)) if len(orders) > 1 else None

        def step(j: int, s: int, order=order) -> int | Fail:
            if j == len(subs):
                return k(s)
            i = order[j]
            sub_path = f"{path}.operands[{i}]"
            parents[sub_path] = node
            return _match_value(
                subs[j], node.operands[i], env, m, sub_path, s, lambda s2: step(j + 1, s2), parents
            )

        out = step(0, score)
        if not isinstance(out, Fail):
            return out
        if saved is not None:
            m.values, m.nodes = saved  # undo captures made under the failed order
        if best is None or out.score > best.score:
            best = out
    return best


def _check_value(pat: Pat, v: Value, node: Node | None, env: MatchEnv, m: Match, path, score):
    """Type, use-count and capture checks; returns the new score or a Fail."""
    if pat.type is not None:
        ok = pat.type(v.type) if callable(pat.type) else v.type == pat.type
        if not ok:
            want = getattr(pat.type, "__name__", str(pat.type))
            return Fail(score, path, f"type {v.type} does not satisfy {want}", node, v)
        score += 1
    if pat.dtype is not None:
        dts = pat.dtype if isinstance(pat.dtype, frozenset) else frozenset([pat.dtype])
        if v.dtype not in dts:
            want = "|".join(sorted(d.value for d in dts))
            return Fail(score, path, f"expected dtype {want}, got {v.dtype.value}", node, v)
        score += 1
    if pat.rank is not None:
        ranks = pat.rank if isinstance(pat.rank, frozenset) else frozenset([pat.rank])
        if v.type.rank not in ranks:
            want = "|".join(map(str, sorted(ranks)))
            return Fail(score, path, f"expected rank {want}, got {v.type.rank}", node, v)
        score += 1
    if pat.uses is not None:
        n = env.uses(v)
        ok = pat.uses(n) if callable(pat.uses) else n == pat.uses
        if not ok:
            want = getattr(pat.uses, "__name__", str(pat.uses))
            return Fail(score, path, f"%{v.name} has {n} use(s), expected {want}", node, v)
        score += 1
    if pat.name is not None:
        seen = m.values.get(pat.name)
        if seen is not None and seen != v:
            reason = f"capture {pat.name} is %{seen.name} here but %{v.name} there"
            return Fail(score, path, reason, node, v)
        m.values[pat.name] = v
        m.nodes[pat.name] = node
        score += 1
    return score


def _check_where(pat: Pat, m: Match, node: Node | None, v: Value, path: str, score: int):
    if pat.where is None:
        return score
    ok = pat.where(m)
    if ok is True:
        return score + 1
    reason = ok if isinstance(ok, str) else f"constraint {getattr(pat.where, '__name__', '?')}"
    return Fail(score, path, f"constraint failed: {reason}", node, v)


_MISSING = object()


def _attr_ok(spec: AttrSpec, got: Any) -> bool:
    if callable(spec):
        try:
            return bool(spec(got))
        except Exception:  # noqa: BLE001 - a predicate that raises is a predicate that fails
            return False
    return _same(spec, got)


def _same(a: Any, b: Any) -> bool:
    """Strict attribute equality: types must agree (1 != 1.0, True != 1), NaN == NaN."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is not type(b) and not (hasattr(a, "free_symbols") and hasattr(b, "free_symbols")):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def _ops_text(ops: str | frozenset[str]) -> str:
    return ops if isinstance(ops, str) else "|".join(sorted(ops))


def _attr_text(v: Any) -> str:
    from ir.printer import attr_text

    try:
        return attr_text(v)
    except Exception:  # noqa: BLE001 - messages fall back to repr
        return repr(v)


def node_line(n: Node) -> str:
    """The op's text (first line) with its location, for messages."""
    return ir.printer.node_text(n).split("\n")[0].strip()
