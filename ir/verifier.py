"""`verify(g)`: check a graph's invariants; raise `VerifyError` showing the surrounding ops.

Rules (each has a corrupted-IR test in tests/ir/test_ir_verifier.py; rule 9 in test_ir_aliases.py):
1. inputs: valid roles, unique names;
2. def-before-use: every operand is an input or an earlier result;
3. single assignment: no value defined twice (inputs included);
4. attribute schema: each attribute matches its field type;
5. operand count matches the op (`num_operands`);
6. types: `infer_type` accepts the operands and the recorded result types equal its answer,
   including the number of results;
7. outputs: every graph output is defined;
8. nested bodies (`Graph` attributes) are verified recursively;
9. aliases (`Graph.aliases`: output i may be written into input j's buffer): i is an output
   index, j a non-parameter input of the output's type, aliased by one output only, and j is read
   by no op except the one defining output i (so writing j's buffer there changes no other
   op's operand); an output that is input j itself needs nothing written.
"""

from __future__ import annotations

from ir.core import OPS, ROLES, Graph, Node, _Bad, attr_schema, coerce_attr, schema_name
from ir.errors import IRTypeError, VerifyError
from ir.printer import node_text, type_text

__all__ = ["verify"]

_CONTEXT = 5  # ops shown before and after the offending one


def verify(g: Graph) -> Graph:
    """Check `g`; returns it unchanged, or raises VerifyError."""
    _verify(g, path=g.name or "<anonymous>")
    return g


def _verify(g: Graph, path: str, memo: dict | None = None) -> None:
    # (op, operand types) -> result types already checked: identical layers verify once.
    memo = {} if memo is None else memo
    defined: dict[str, object] = {}
    for v in g.inputs:
        role = g.roles.get(v.name)
        if role not in ROLES:
            _fail(
                g,
                None,
                path,
                f"input %{v.name} has role {role!r}; expected one of {', '.join(ROLES)}",
            )
        if v.name in defined:
            _fail(g, None, path, f"input %{v.name} is declared twice", "rename one of the inputs")
        defined[v.name] = v
    for i, n in enumerate(g.ops):
        _verify_node(g, i, n, defined, path, memo)
    for v in g.outputs:
        if v.name not in defined:
            _fail(
                g,
                len(g.ops),
                path,
                f"graph output %{v.name} is never defined",
                "return a value defined by an input or an op",
            )
        elif defined[v.name] != v:
            _fail(
                g,
                len(g.ops),
                path,
                f"graph output %{v.name}: {type_text(v.type)} does not match "
                f"its definition {type_text(defined[v.name].type)}",
            )  # type: ignore[attr-defined]
    _verify_aliases(g, path)


def _verify_aliases(g: Graph, path: str) -> None:
    """Rule 9 (see the module docstring)."""
    if not g.aliases:
        return
    inputs = {v.name: v for v in g.inputs}
    taken: dict[str, int] = {}
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(g.ops):
        for v in n.operands:
            if v.name in inputs:
                readers.setdefault(v.name, []).append(i)
    defined_at = {r.name: i for i, n in enumerate(g.ops) for r in n.results}
    end = len(g.ops)
    for k, name in sorted(g.aliases.items()):
        if not isinstance(k, int) or not 0 <= k < len(g.outputs):
            _fail(g, end, path, f"alias of output {k!r}: the graph has {len(g.outputs)} outputs")
        out, src = g.outputs[k], inputs.get(name)
        where = f"output {k} (%{out.name}) into %{name}"
        if src is None:
            _fail(g, end, path, f"{where}: %{name} is not an input", "alias an input")
        if g.roles.get(name) == "parameter":
            _fail(g, end, path, f"{where}: %{name} is a parameter", "alias a cache input")
        if src.type != out.type:
            _fail(g, end, path, f"{where}: types {type_text(out.type)} and {type_text(src.type)}")
        if name in taken:
            _fail(g, end, path, f"{where}: output {taken[name]} is written there too")
        taken[name] = k
        if out.name == name:
            continue  # returned unchanged: nothing is written
        if out.name in inputs:
            _fail(g, end, path, f"{where}: the output is another input, %{out.name}")
        writer = defined_at[out.name]
        others = [i for i in readers.get(name, ()) if i != writer]
        if others:
            _fail(
                g,
                others[0],
                path,
                f"{where}: op {others[0]} reads %{name}, which op {writer} overwrites in place",
                "alias only an input that the op writing it alone reads",
            )


def _verify_node(g: Graph, i: int, n: Node, defined: dict, path: str, memo: dict) -> None:
    op = n.op
    _verify_operands(g, i, n, defined, path)
    try:
        key = (op, tuple(v.type for v in n.operands))
        want = memo.get(key)
    except TypeError:  # an attribute that cannot be hashed: no memo
        key, want = None, None
    if want is None:
        want = _verify_op(g, i, n, path, memo)
        if key is not None:
            memo[key] = want
    _verify_results(g, i, n, want, defined, path)


def _verify_operands(g: Graph, i: int, n: Node, defined: dict, path: str) -> None:
    for v in n.operands:
        if v.name not in defined:
            _fail(
                g,
                i,
                path,
                f"operand %{v.name} is used before it is defined",
                "define it earlier or make it a graph input",
            )
        if defined[v.name] != v:
            _fail(
                g,
                i,
                path,
                f"operand %{v.name} has type {type_text(v.type)} here but is defined "
                f"as {type_text(defined[v.name].type)}",
            )


def _verify_op(g: Graph, i: int, n: Node, path: str, memo: dict) -> tuple:
    """Registration, attributes, arity and type inference: the checks that depend only on the
    op and its operand types. Returns the inferred result types."""
    op = n.op
    if OPS.get(op.mnemonic) is not type(op):
        _fail(
            g,
            i,
            path,
            f"op {op.mnemonic!r} is not registered in ir.OPS",
            "register it with @register",
        )
    schema = attr_schema(type(op))
    for name, value in op.attrs.items():
        if isinstance(coerce_attr(schema[name], value), _Bad):
            _fail(
                g,
                i,
                path,
                f"attribute {name} of {op.mnemonic}: expected {schema_name(schema[name])}, "
                f"got {type(value).__name__} {value!r}",
            )
    want_n = type(op).num_operands
    if want_n is not None and len(n.operands) != want_n:
        _fail(g, i, path, f"{op.mnemonic} takes {want_n} operand(s), got {len(n.operands)}")
    try:
        want = op.infer_type(*(v.type for v in n.operands))
    except IRTypeError as e:
        _fail(g, i, path, f"type error: {e}")
    for name, value in op.attrs.items():
        if isinstance(value, Graph):
            try:
                _verify(value, f"{path}/op {i} ({op.mnemonic}).{name}", memo)
            except VerifyError as e:
                _fail(g, i, path, f"nested graph `{name}` is invalid:\n{e}")
    return tuple(want)


def _verify_results(g: Graph, i: int, n: Node, want: tuple, defined: dict, path: str) -> None:
    op = n.op
    if len(want) != len(n.results):
        _fail(
            g,
            i,
            path,
            f"{op.mnemonic} produces {len(want)} result(s), but {len(n.results)} are recorded",
        )
    for r, t in zip(n.results, want):
        if r.type != t:
            _fail(
                g,
                i,
                path,
                f"result %{r.name} is recorded as {type_text(r.type)} but "
                f"{op.mnemonic} infers {type_text(t)}",
                "fix the recorded type or the operands",
            )
    for r in n.results:
        if r.name in defined:
            _fail(
                g, i, path, f"%{r.name} is defined twice (single assignment)", "rename one of them"
            )
        defined[r.name] = r


def _fail(g: Graph, index: int | None, path: str, msg: str, fix: str = "") -> None:
    raise VerifyError(format_error(g, index, path, msg, fix))


def format_error(g: Graph, index: int | None, path: str, msg: str, fix: str = "") -> str:
    """Message plus ~10 ops around op `index` (None: the inputs), the offending one marked >>>."""
    where = "inputs" if index is None else ("return" if index >= len(g.ops) else f"op {index}")
    lines = [f"verify: {msg}", f"  in graph {path}, at {where}:"]
    lo = 0 if index is None else max(0, index - _CONTEXT)
    hi = min(len(g.ops), (0 if index is None else index) + _CONTEXT + 1)
    if index is None:
        ins = ", ".join(f"%{v.name}: {type_text(v.type)} {g.roles.get(v.name)}" for v in g.inputs)
        lines.append(f"  >>> graph({ins})")
    elif lo > 0:
        lines.append("      ...")
    for j in range(lo, hi):
        mark = ">>> " if j == index else "    "
        text = node_text(g.ops[j]).split("\n")[0]
        lines.append(f"  {mark}{text}")
    if index is not None and index >= len(g.ops):
        lines.append(f"  >>> return {', '.join('%' + v.name for v in g.outputs)}")
    elif hi < len(g.ops):
        lines.append("      ...")
    if fix:
        lines.append(f"  fix: {fix}")
    return "\n".join(lines)
