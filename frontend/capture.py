"""Capture a PyTorch module into an `ir.Graph`.

    graph = capture(model, (tokens,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")

Three steps:
1. `torch.export` (non-strict) traces `module.<method>` with every dimension named in `dynamic`
   left symbolic (`Dim.AUTO`). Works on the `meta` device, so the largest presets capture without
   allocating weights.
2. `run_decompositions` lowers to core ATen, except for the ops fusion wants to see whole
   (`KEEP`: linear, softmax, silu, softplus, ...).
3. Every fx node goes through `frontend.aten.TABLE`. Parameters and buffers become graph inputs
   named as in `module.state_dict()`; user inputs are named after the method's parameters
   (`tokens`, `cache.layers.0.attn.window_kv`). Each op keeps its module path and the user's
   source line as provenance, and each result type is checked against torch's own shape
   propagation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import operator
import os
from collections.abc import Mapping, Sequence, Set
from typing import Any, ClassVar

import sympy
import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

import ir
from frontend import aten as aten_table
from frontend import custom_ops
from frontend import outputs as outputs_lib
from frontend import regions as regions_lib
from frontend.symbolic import to_ir_expr
from ir.core import check_value_name

_getitem = operator.getitem

# Ops fusion needs to see whole; everything else lowers to core ATen.
KEEP = (
    torch.ops.aten.linear.default,
    torch.ops.aten.softmax.int,
    torch.ops.aten._softmax.default,
    torch.ops.aten.log_softmax.int,
    torch.ops.aten._log_softmax.default,
    torch.ops.aten.silu.default,
    torch.ops.aten.softplus.default,
    torch.ops.aten.embedding.default,
    torch.ops.aten.matmul.default,
)

DynamicSpec = Mapping[str, Mapping[int, str]] | None


class CaptureError(RuntimeError):
    """The module could not be captured; the message says where and how to fix it."""


class UnsupportedOpError(CaptureError):
    """An ATen op has no translator. Carries the op, the module path and the user's source."""

    def __init__(self, op: str, module_path: str, source: str, code: str, hint: str) -> None:
        self.op, self.module_path, self.source = op, module_path, source
        where = f"  in module {module_path or '<root>'}, at {source or '<unknown source>'}"
        kind = "ATen op" if op.startswith("aten.") or "::" not in op else "custom op"
        lines = [f"unsupported {kind} {op}", where]
        if code:
            lines.append(f"    {code}")
        lines.append(f"  hint: {hint}")
        super().__init__("\n".join(lines))


def capture(
    module: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    dynamic: DynamicSpec = None,
    method: str = "forward",
    name: str | None = None,
    reuse_layers: bool = True,
    outputs: str = "auto",
) -> ir.Graph:
    """Trace `module.<method>(*example_inputs)` into a verified IR graph.

    `dynamic` maps an input's parameter name to `{dim index: symbol name}`; for a dict or list
    input the same dims are symbolic in every tensor inside it (`{"cache": {0: "B"}}`).
    `reuse_layers` traces one layer of each kind in a `ModuleList` and replays it for the others
    (`frontend/regions.py`); the graph is the same either way, only faster to get.
    `outputs` says what a Hugging Face `ModelOutput` result becomes (`frontend/outputs.py`):
    "auto" its logits, "logits+cache" the logits and the cache's tensors, flattened.
    """
    arg_names = _argument_names(module, method, len(example_inputs))
    scope = (
        regions_lib.replay_repeated(module, method) if reuse_layers else contextlib.nullcontext()
    )
    with scope as regions:
        program = _export(module, tuple(example_inputs), arg_names, dynamic, method, outputs)
        missing = _untranslatable(program)
        if missing:
            # torch.export keeps some composite ops whole; the table covers the common ones, and
            # core-ATen decomposition (slower: it retraces the program) handles the rest, custom
            # ops' registered decompositions included.
            program = _decompose(program, {n.target for n in missing})
        graph = _Translator(program, arg_names, dynamic or {}, name or method, regions).run()
    ir.verify(graph)
    custom_ops.report_opaque(graph)  # custom ops kept whole: printed with STATS=1
    return graph


# --- export --------------------------------------------------------------------------------


class _Method(torch.nn.Module):
    """Exposes `module.<method>` as `forward`, so torch.export can trace any entry point."""

    def __init__(self, module: torch.nn.Module, method: str, outputs: str = "auto") -> None:
        super().__init__()
        self.module = module
        self.method = method
        self.outputs = outputs

    def forward(self, *args: Any) -> Any:
        out = getattr(self.module, self.method)(*args)
        return outputs_lib.plain_outputs(out, self.outputs)


def _argument_names(module: torch.nn.Module, method: str, count: int) -> list[str]:
    fn = getattr(module, method, None)
    if fn is None or not callable(fn):
        raise CaptureError(
            f"{type(module).__name__} has no method {method!r} to capture; "
            f"pass method= one of its entry points (e.g. 'forward')"
        )
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = [p.name for p in params if p.kind is not p.VAR_POSITIONAL][:count]
    names += [f"arg{i}" for i in range(len(names), count)]
    for n in names:
        check_value_name(n, "input")
    return names


def _export(
    module, inputs, arg_names, dynamic: DynamicSpec, method: str, outputs: str = "auto"
) -> ExportedProgram:
    unknown = set(dynamic or {}) - set(arg_names)
    if unknown:
        raise CaptureError(
            f"dynamic= names {sorted(unknown)}, which are not inputs of {method}; "
            f"its inputs are {arg_names}"
        )
    shapes = None
    if dynamic:
        shapes = tuple(_auto_dims(x, dynamic.get(n, {})) for n, x in zip(arg_names, inputs))
    try:
        program = torch.export.export(
            _Method(module, method, outputs),
            inputs,
            dynamic_shapes=None if shapes is None else (shapes,),
            strict=False,
        )
    except Exception as err:  # torch's own message is the useful part; say what we were doing
        raise CaptureError(
            f"torch.export could not trace {type(module).__name__}.{method}:\n{err}"
        ) from err
    return program


def _auto_dims(arg: Any, dims: Mapping[int, str]) -> Any:
    """The dynamic_shapes entry of one argument: the named dims of every tensor in it."""
    return pytree.tree_map(lambda _leaf: {i: Dim.AUTO for i in dims} or None, arg)


def _decompose(program: ExportedProgram, missing: Set[Any] = frozenset()) -> ExportedProgram:
    """Lower to core ATen, keeping the ops in KEEP whole (the slow path: it retraces). Custom ops
    among `missing` decompose through their registered decompositions (CompositeImplicitAutograd
    kernels already do by default)."""
    table = torch.export.default_decompositions()
    for op in KEEP:
        if op in table:
            del table[op]
    for op, fn in custom_ops.decompositions_for(missing).items():
        table[op] = fn
    return program.run_decompositions(table)


def _untranslatable(program: ExportedProgram) -> list[torch.fx.Node]:
    return [
        n for n in program.graph.nodes
        if n.op == "call_function" and aten_table.lookup(n.target) is None
        and n.target not in aten_table.SIZE_OPS and n.target not in aten_table.IGNORED_OPS
        and n.target is not _getitem and n.target not in _Translator.REGION_OPS
    ]  # fmt: skip


# --- translation ---------------------------------------------------------------------------


class _Translator:
    """Walks one exported program and builds the IR graph (one instance per capture)."""

    REGION_OPS: ClassVar[dict] = {
        regions_lib.REGION_BEGIN: "_begin_region",
        regions_lib.REGION_END: "_end_region",
        regions_lib.REGION: "_replay_region",
    }

    def __init__(
        self,
        program: ExportedProgram,
        arg_names: list[str],
        dynamic: Mapping,
        name: str,
        regions: regions_lib.Regions | None = None,
    ):
        self.program = program
        self.arg_names = arg_names
        self.dynamic = dynamic
        self.regions = regions
        self.open_regions: dict[int, tuple[int, list[ir.Value]]] = {}
        self.recorded: dict[int, _Recorded] = {}
        self.params: dict[str, ir.Value] = {}
        self.builder = ir.Builder(name=name)
        self.env: dict[torch.fx.Node, Any] = {}
        self.symbols: dict[sympy.Symbol, sympy.Symbol] = {}
        self.node: torch.fx.Node | None = None
        self.loc: ir.Loc | None = None

    def run(self) -> ir.Graph:
        placeholders = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        self._bind_symbols(placeholders)
        self._add_inputs(placeholders)
        for node in self.program.graph.nodes:
            if node.op == "call_function":
                self._translate(node)
        self._add_outputs()
        return self.builder.build(verify=False)  # capture() verifies

    # inputs and outputs

    def _user_input_names(self) -> list[str]:
        """Flattened user-input names in export order: `tokens`, `cache.layers.0.attn.kv`."""
        names = []
        for arg_name, (path, _leaf) in self._user_leaves():
            names.append(_path_name(arg_name, path))
        return names

    def _user_leaves(self):
        args, _kwargs = self.program.example_inputs
        for arg_name, arg in zip(self.arg_names, args):
            for path, leaf in pytree.tree_flatten_with_path(arg)[0]:
                yield arg_name, (path, leaf)

    def _bind_symbols(self, placeholders: list[torch.fx.Node]) -> None:
        """Name torch's shape symbols after the user's `dynamic=` spec."""
        user = [
            s for s in self.program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT
        ]
        by_name = {n.name: n for n in placeholders}
        leaves = list(self._user_leaves())
        for spec, (arg_name, (path, _leaf)) in zip(user, leaves):
            fake = by_name[spec.arg.name].meta["val"]
            for dim, sym_name in self.dynamic.get(arg_name, {}).items():
                size = fake.shape[dim]
                where = f"dim {dim} of input {_path_name(arg_name, path)!r}"
                if not isinstance(size, torch.SymInt) or not size.node.expr.is_Symbol:
                    raise CaptureError(
                        f"{where} was declared dynamic ({sym_name}) but torch.export specialised "
                        f"it to {size}; use an example size other than 0 or 1 and check the model "
                        "has no code that branches on that size"
                    )
                target = ir.sym(sym_name)
                previous = self.symbols.get(size.node.expr)
                if previous is not None and previous != target:
                    raise CaptureError(
                        f"{where} is the same size as {previous} but was named {sym_name}"
                    )
                self.symbols[size.node.expr] = target

    def _add_inputs(self, placeholders: list[torch.fx.Node]) -> None:
        by_name = {n.name: n for n in placeholders}
        user_names = iter(self._user_input_names())
        prefix = "module."
        for spec in self.program.graph_signature.input_specs:
            node = by_name[spec.arg.name]
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                name, role = spec.target.removeprefix(prefix), "parameter"
            elif spec.kind == InputKind.USER_INPUT:
                name, role = next(user_names), "activation"
            elif spec.kind == InputKind.CONSTANT_TENSOR and self._uniform_constant(spec.target):
                self.env[node] = self._constant_tensor(spec.target)
                continue
            else:
                raise CaptureError(
                    f"input {spec.arg.name} is a {spec.kind.name.lower()} "
                    f"({spec.target}); tensors created inside forward with torch.tensor(...) "
                    "cannot be captured as parameters — register them as buffers instead"
                )
            if name.startswith("cache"):
                role = "cache"
            value = self.builder.input(name, self._type_of_fake(node.meta["val"], name), role=role)
            self.env[node] = value
            if role == "parameter":
                self.params[name] = value

    def _uniform_constant(self, target: str) -> bool:
        """A tensor made inside forward (`x[i] = 5.0`, `torch.tensor(0.5)`) that one value fills."""
        t = self.program.constants.get(target)
        return isinstance(t, torch.Tensor) and (t.numel() == 0 or bool((t == t.flatten()[0]).all()))

    def _constant_tensor(self, target: str) -> ir.Value:
        t = self.program.constants[target]
        dtype = ir.DType.from_torch(t.dtype)
        value = t.flatten()[0].item() if t.numel() else 0
        if t.dim() == 0:
            return self.builder.op("constant", [], value=value, dtype=dtype)
        return self.builder.op("full", [], shape=tuple(t.shape), value=value, dtype=dtype)

    def _add_outputs(self) -> None:
        output = next(n for n in self.program.graph.nodes if n.op == "output")
        results = pytree.tree_leaves(output.args[0])
        specs = self.program.graph_signature.output_specs
        mutated = [s.target for s in specs if s.kind != OutputKind.USER_OUTPUT]
        if mutated:
            raise CaptureError(
                f"the captured method mutates {mutated} in place; dsv4c graphs are pure — "
                "return the updated tensors instead"
            )
        self.builder.output(*[self.env[r] for r in results])

    # one node

    def _translate(self, node: torch.fx.Node) -> None:
        target = node.target
        val = node.meta.get("val")
        if target in aten_table.IGNORED_OPS:
            return
        if (
            isinstance(val, (torch.SymInt, int))
            and not isinstance(val, bool)
            and target in aten_table.SIZE_OPS
        ):
            self.env[node] = self._dim(val)
            return
        if target is _getitem:
            container, index = node.args
            self.env[node] = self.env[container][index]
            return
        if target in self.REGION_OPS:
            getattr(self, self.REGION_OPS[target])(node, *node.args)
            return
        translator = aten_table.lookup(target)
        module_path, source, code = _provenance(node)
        if translator is None and custom_ops.is_custom(target):
            translator = _Translator._opaque  # kept whole: runs the op's own implementation
        if translator is None:
            name = _op_name(target, node)
            raise UnsupportedOpError(name, module_path, source, code, _hint(target))
        self.node = node
        self.loc = ir.Loc(module=module_path, source=source)
        args = [self._arg(a) for a in node.args]
        # a custom op keeps all its kwargs (its `device=` is its own business)
        ignored = () if translator is _Translator._opaque else _IGNORED_KWARGS
        kwargs = {k: self._arg(v) for k, v in node.kwargs.items() if k not in ignored}
        try:
            result = translator(self, *args, **kwargs)
        except (ir.IRTypeError, TypeError, ValueError) as err:
            raise CaptureError(
                f"could not translate {_op_name(target)} in module {module_path or '<root>'} "
                f"at {source}:\n    {code}\n  {err}"
            ) from err
        self._check_types(result, val, target)
        self.env[node] = result

    def _opaque(self, *args: Any, **kwargs: Any) -> Any:
        """A custom op with no translator or decomposition as one `custom.call`."""
        target = self.node.target
        try:
            return custom_ops.opaque_call(self, target, args, kwargs)
        except TypeError as err:
            module_path, source, code = _provenance(self.node)
            raise UnsupportedOpError(_op_name(target), module_path, source, code, str(err)) from err

    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, torch.SymInt):
            return self._dim(a)
        return a

    def _dim(self, size: torch.SymInt | int) -> ir.Dim:
        if isinstance(size, int):
            return size
        return to_ir_expr(size.node.expr, self.symbols)

    def _type_of_fake(self, fake: torch.Tensor, where: str) -> ir.TensorType:
        shape = tuple(self._dim(s) for s in fake.shape)
        return ir.TensorType(shape, ir.DType.from_torch(fake.dtype))

    def _check_types(self, result: Any, val: Any, target: Any) -> None:
        """The IR's inferred types must agree with torch's (same dtype, same sizes)."""
        results = result if isinstance(result, tuple) else (result,)
        vals = val if isinstance(val, (tuple, list)) else (val,)
        for value, fake in zip(results, vals):
            if not isinstance(fake, torch.Tensor):
                continue
            want = self._type_of_fake(fake, value.name)
            got = value.type
            if got.dtype == want.dtype and _same_shape(got.shape, want.shape):
                continue
            module_path, source, code = _provenance(self.node)
            raise CaptureError(
                f"frontend bug: {_op_name(target)} translated to {got} but torch computes {want}\n"
                f"  in module {module_path or '<root>'}, at {source}:\n    {code}\n"
                "  please report this with the module that triggered it"
            )

    # repeated layers (frontend/regions.py)

    def _begin_region(self, node: torch.fx.Node, inputs: list, template: int) -> None:
        values = [self.env[a] for a in inputs]
        self.open_regions[template] = (len(self.builder.nodes), values)
        self.env[node] = values

    def _end_region(self, node: torch.fx.Node, outputs: list, template: int) -> None:
        start, inputs = self.open_regions.pop(template)
        values = [self.env[a] for a in outputs]
        self.recorded[template] = _Recorded(inputs, self.builder.nodes[start:], values)
        self.env[node] = values

    def _replay_region(
        self, node: torch.fx.Node, inputs: list, template: int, instance: int
    ) -> None:
        """Re-emit the template's ops with this instance's inputs and parameters."""
        recorded = self.recorded[template]
        src = self.regions.templates[template].prefix + "."
        dst = self.regions.instances[instance] + "."
        env = dict(zip(recorded.inputs, (self.env[a] for a in inputs)))
        for n in recorded.nodes:
            operands = [
                env[v] if v in env else self._instance_param(v, src, dst) for v in n.operands
            ]
            results = self.builder.op(n.op, operands, loc=_reprefix(n.loc, src, dst))
            env.update(zip(n.results, results if isinstance(results, tuple) else (results,)))
        result = tuple(env.get(v, v) for v in recorded.outputs)
        self.node = node
        self._check_types(result, node.meta.get("val"), node.target)
        self.env[node] = list(result)

    def _instance_param(self, v: ir.Value, src: str, dst: str) -> ir.Value:
        """A value the template used from outside: its own parameter, or a shared outer value."""
        if self.params.get(v.name) is not v or not v.name.startswith(src):
            return v
        name = dst + v.name[len(src) :]
        if name not in self.params:
            raise CaptureError(
                f"layer {dst[:-1]} was traced as a copy of {src[:-1]} but has no parameter {name}; "
                "capture with reuse_layers=False and report this"
            )
        return self.params[name]

    # helpers the translators call (the `cx` of frontend/aten.py)

    def op(self, mnemonic: str, *operands: Any, **attrs: Any) -> Any:
        return self.builder.op(mnemonic, list(operands), loc=self.loc, **attrs)

    def const(self, value: Any, dtype: ir.DType | None = None) -> ir.Value:
        if dtype is None:
            dtype = (
                ir.DType.bool
                if isinstance(value, bool)
                else ir.DType.i64
                if isinstance(value, int)
                else ir.DType.f32
            )
        return self.op("constant", value=value, dtype=dtype)

    def operands(self, *args: Any, like: Any = None) -> tuple[ir.Value, ...]:
        """Python scalars become 0-d constants: floats f32, ints i64, bools bool.

        As 0-d tensors they promote like torch's scalars (they only win across categories).
        A symbolic size used as a value (`x * T`) becomes an i64 constant expression.
        """
        out = []
        for a in args:
            if isinstance(a, ir.Value):
                out.append(a)
            elif isinstance(a, sympy.Basic):
                out.append(self.op("constant", value=a, dtype=ir.DType.i64))
            else:
                out.append(self.const(a))
        return tuple(out)

    def type_of(self, v: ir.Value) -> ir.TensorType:
        return v.type

    def fake_type(self, fake: torch.Tensor) -> ir.TensorType:
        """The IR type of one of torch's fake tensors (symbolic sizes named as in the graph)."""
        return self._type_of_fake(fake, "")

    def expected_shape(self) -> tuple[ir.Dim, ...]:
        """torch's shape for the node being translated (its first result)."""
        val = self.node.meta["val"]
        fake = val[0] if isinstance(val, (tuple, list)) else val
        return tuple(self._dim(s) for s in fake.shape)

    def expected_shapes(self) -> list[tuple[ir.Dim, ...]]:
        """torch's shapes for every tensor result of the node being translated."""
        val = self.node.meta["val"]
        vals = val if isinstance(val, (tuple, list)) else (val,)
        return [tuple(self._dim(s) for s in v.shape) for v in vals]

    def expected_dtype(self) -> ir.DType:
        val = self.node.meta["val"]
        fake = val[0] if isinstance(val, (tuple, list)) else val
        return ir.DType.from_torch(fake.dtype)


@dataclasses.dataclass
class _Recorded:
    """The IR a region's first instance produced: replayed for every later instance."""

    inputs: list[ir.Value]
    nodes: list[ir.Node]
    outputs: list[ir.Value]


def _reprefix(loc: ir.Loc | None, src: str, dst: str) -> ir.Loc | None:
    """`layers.0.attn` -> `layers.7.attn` for src `layers.0.`, dst `layers.7.`."""
    if loc is None or not (loc.module + ".").startswith(src):
        return loc
    return dataclasses.replace(loc, module=(dst + (loc.module + ".")[len(src) :])[:-1])


_IGNORED_KWARGS = {"device", "layout", "pin_memory", "memory_format", "non_blocking", "copy"}


def _same_shape(a: tuple, b: tuple) -> bool:
    """Equal ranks and dims; symbolic dims compared by value at a few sample sizes."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        diff = sympy.sympify(x) - sympy.sympify(y)
        symbols = sorted(diff.free_symbols, key=str)
        if not symbols:
            return False
        for sample in (37, 64, 129, 1000):
            if diff.subs({s: sample for s in symbols}) != 0:
                return False
    return True


def _path_name(arg_name: str, path: tuple) -> str:
    parts = [arg_name]
    for key in path:
        k = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        parts.append(str(k))
    return ".".join(parts)


def _op_name(target: Any, node: torch.fx.Node | None = None) -> str:
    if isinstance(target, torch._ops.HigherOrderOperator) and target.name().startswith(
        "auto_functionalized"
    ):  # export wraps a custom op that mutates its inputs
        inner = node.args[0] if node is not None and node.args else None
        return f"{_op_name(inner) if inner is not None else 'a custom op'} (mutates its inputs)"
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else target.name()
    return getattr(target, "__name__", str(target))


def _hint(target: Any) -> str:
    base = getattr(target, "__name__", str(target)).split(".")[0]
    if base in aten_table.ALTERNATIVES:
        return aten_table.ALTERNATIVES[base]
    import difflib

    known = sorted(
        {
            _op_name(t).removeprefix("aten.").split(".")[0]
            for t in aten_table.TABLE
            if not isinstance(t, str)
        }
    )
    close = difflib.get_close_matches(base, known, n=3)
    suffix = f"; similar supported ops: {', '.join(close)}" if close else ""
    return (
        "rewrite this line with supported ops, or add a translator for it to "
        f"frontend/aten.py{suffix}"
    )


_TORCH_DIR = os.path.dirname(torch.__file__)
_FRONTEND_DIR = os.path.dirname(os.path.abspath(__file__))


def _provenance(node: torch.fx.Node | None) -> tuple[str, str, str]:
    """(module path, 'file.py:line', source code) of the innermost user frame of `node`."""
    if node is None:
        return "", "", ""
    stack = node.meta.get("nn_module_stack") or {}
    module_path = ""
    if stack:
        key, _ = list(stack.values())[-1]
        module_path = _clean_module_path(key)
    trace = node.meta.get("stack_trace") or ""
    source, code = "", ""
    lines = trace.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if not line.startswith("File "):
            continue
        path = line.split('"')[1] if '"' in line else ""
        if path.startswith((_TORCH_DIR, "torch/")) or _FRONTEND_DIR in path:
            continue
        lineno = line.split("line ")[1].split(",")[0] if "line " in line else "?"
        source = f"{os.path.basename(path)}:{lineno}"
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        break
    return module_path, source, code


def _clean_module_path(key: str) -> str:
    """`L['self'].module.layers[0].attn` or `module.layers.0.attn` -> `layers.0.attn`."""
    key = key.replace("L['self']", "").replace("['", ".").replace("']", "")
    key = key.replace("[", ".").replace("]", "").strip(".")
    if key == "module" or key.startswith("module."):
        key = key[len("module") :].lstrip(".")
    return key
