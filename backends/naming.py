"""Names in generated code, shared by every backend: kernels, values, files.

- `identifier(text)`: a name that is valid in Python, Triton and TVMScript source alike (letters,
  digits, `_`; not a keyword such as `def` or `lambda`, not TVMScript's `T`/`I` prefixes).
- `kernel_name(ops, fallback)`: what a fused kernel computes — a recognised pattern (`rmsnorm`,
  `swiglu`, `rope`, `softmax`, ...) or `fused_<first ops>`.
- `short_name(value_name)`: a value's name without its site: `layers.3.attn_norm.weight` ->
  `weight`, so kernels that identical layers share never name their parameters after layer 0.
- `locations(nodes, fallback)`: the source lines (`layers.py:35`) of the fused ops, without the
  module path (which names one layer).
- `file_stem(name, key)`: `<name>_<key>` with safe characters only.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterable, Sequence

import ir

__all__ = [
    "canonical_names",
    "file_stem",
    "identifier",
    "kernel_name",
    "locations",
    "short_name",
]

# names a generated module defines or imports: TVMScript's `T` (tir) and `I` (ir) prefixes
RESERVED = frozenset({"T", "I", "R", "tl", "triton", "tvm"})
_UNSAFE = re.compile(r"[^0-9A-Za-z_]")


def identifier(text: str, fallback: str = "v") -> str:
    """`text` as an identifier: unsafe characters become `_`, a leading digit gets `fallback_`
    in front, a Python keyword or a reserved module name gets `_` behind."""
    name = _UNSAFE.sub("_", text)
    if not name:
        name = fallback
    elif name[0].isdigit():
        name = f"{fallback}_{name}"
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in RESERVED:
        name += "_"
    return name


def short_name(value_name: str) -> str | None:
    """The last dotted segment of a named value (`layers.0.ffn.w1` -> `w1`), None for a numbered
    one (`%196`, `%layers.0.3`): those are named after the op that makes them."""
    last = value_name.rsplit(".", 1)[-1]
    return None if not last or last[0].isdigit() else last


def file_stem(name: str, key: str) -> str:
    """`<name>_<key>`, letters, digits and `_` only (a `:` in a variant key becomes `_`)."""
    return f"{_UNSAFE.sub('_', name)}_{_UNSAFE.sub('_', key)}"


# families of (pattern name, mnemonics that must all occur, mnemonics of which one must occur):
# the first match of each family names the kernel
_PATTERNS: tuple[tuple[tuple[str, frozenset[str], frozenset[str]], ...], ...] = (
    (
        ("layernorm", frozenset({"rsqrt", "sub"}), frozenset({"mean", "var"})),
        ("rmsnorm", frozenset({"rsqrt"}), frozenset({"mean", "sum"})),
    ),
    (("softmax", frozenset({"exp", "sum"}), frozenset({"amax", "max"})),),
    (
        ("swiglu", frozenset({"mul"}), frozenset({"silu"})),
        ("swiglu", frozenset({"sigmoid", "mul"}), frozenset({"mul"})),
    ),
    (("rope_table", frozenset({"cos", "sin"}), frozenset({"mul"})),),
)
# a whole RoPE in a body that takes data movement (TVM on the CPU): both halves of each pair
# selected, rotated (x·cos - y·sin, x·sin + y·cos) and concatenated back
_ROTATION = frozenset({"select", "mul", "sub", "add", "concat"})
_NOISE = frozenset({"constant", "full", "iota", "cast", "reshape", "view", "expand", "squeeze"})
_NOISE |= frozenset({"unsqueeze", "broadcast_to", "permute", "transpose", "slice", "select"})


def kernel_name(ops: Sequence[str], fallback: str = "fused") -> str:
    """A kernel name saying what `ops` (a fused body's mnemonics, in order) compute.

    Recognised patterns name it, one per family, joined (`rmsnorm`: rsqrt of a mean;
    `softmax`: exp over a max-shifted row and its sum; `swiglu`: silu times a gate;
    `rope_table`: cos and sin of positions; `rope`: a whole rotation, pairs selected, rotated
    and concatenated back, or just its half x·cos - y·sin): `rmsnorm_rope`. A GEMM with an
    epilogue is `matmul_<pattern or epilogue ops>`; anything else `fused_<up to four distinct
    ops>`."""
    present = set(ops)
    rotation = _ROTATION <= present  # its sub and add are not a norm's
    seen = present - {"sub", "add"} if rotation else present
    parts = []
    for family in _PATTERNS:
        found = next((name for name, need, one_of in family if need <= seen and seen & one_of), None)
        if found is not None:
            parts.append(found)
    if rotation:
        parts.append("rope")
    if parts:
        name = "_".join(parts)
        return name if "matmul" not in present else f"matmul_{name}"
    if _is_rotation(ops):
        return "rope"
    stems = [op.split(".")[-1] for op in ops if op not in _NOISE]
    distinct = list(dict.fromkeys(stems))
    if distinct and distinct[0] == "matmul":
        rest = distinct[1:4]
        return "_".join(["matmul", *rest]) if rest else "matmul"
    if len(distinct) == 1 and len(ops) == 1 and fallback != "fused":
        return identifier(fallback)
    return identifier("_".join([fallback, *distinct[:4]]) if distinct else f"{fallback}_copy")


def _is_rotation(ops: Sequence[str]) -> bool:
    """x·cos ∓ y·sin: exactly two muls and one add or sub (RoPE's rotation, one half)."""
    core = [op for op in ops if op not in _NOISE]
    return sorted(core) in (["mul", "mul", "sub"], ["add", "mul", "mul"])


def locations(nodes: Iterable[ir.Node], fallback: ir.Loc | None = None) -> tuple[str, ...]:
    """Distinct source lines of `nodes` in order (`fallback`'s, the fused op's, for nodes
    without one). Module paths are left out: a kernel shared by 24 layers is one source."""
    out: dict[str, None] = {}
    for n in nodes:
        loc = n.loc or fallback
        if loc is not None and loc.source:
            out.setdefault(loc.source, None)
    if not out and fallback is not None and fallback.source:
        out[fallback.source] = None
    return tuple(out)


def canonical_names(body: ir.Graph) -> ir.Graph:
    """`body` with site-specific names removed: numbered values renumbered 0, 1, ... in order of
    appearance, dotted names cut to their last segment (`layers.3.attn_norm.weight` ->
    `weight`, keywords escaped: `def` -> `def_`), provenance cut to the source line (the module
    path names one site). The same computation at two sites of a model, say two layers, then
    gives byte-identical kernel sources and so one kernel."""
    mapping: dict[str, ir.Value] = {}
    used: set[str] = set()
    counter = 0

    values = [*body.inputs, *(v for n in body.ops for v in (*n.operands, *n.results))]
    for v in values:  # named values first, so numbers never take their names
        stem = short_name(v.name)
        if stem is None or v.name in mapping:
            continue
        stem = identifier(stem)
        name, i = stem, 1
        while name in used:
            name, i = f"{stem}_{i}", i + 1
        used.add(name)
        mapping[v.name] = ir.Value(name, v.type)

    def rename(v: ir.Value) -> ir.Value:
        nonlocal counter
        if v.name not in mapping:
            while str(counter) in used:
                counter += 1
            mapping[v.name] = ir.Value(str(counter), v.type)
            counter += 1
        return mapping[v.name]

    inputs = [rename(v) for v in body.inputs]
    nodes = [
        ir.Node(n.op, tuple(map(rename, n.operands)), tuple(map(rename, n.results)), _line(n))
        for n in body.ops
    ]
    roles = {mapping[k].name: r for k, r in body.roles.items() if k in mapping}
    return ir.Graph(inputs, nodes, [rename(v) for v in body.outputs], body.name, roles)


def _line(n: ir.Node) -> ir.Loc | None:
    return ir.Loc("", n.loc.source) if n.loc is not None and n.loc.source else None
