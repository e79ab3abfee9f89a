"""A second frontend through torch-mlir: PyTorch -> `torch` dialect MLIR -> `ir.Graph`.

    graph = capture_mlir(model, (tokens,), dynamic={"tokens": {0: "B", 1: "T"}}, method="prefill")

The module is exported as in `frontend.capture`, but statelessly (parameters and buffers are
arguments, so torch-mlir's importer does not freeze them into literals), imported with
torch-mlir's `FxImporter`, and the resulting `func.func` is walked op by op. Every
`torch.aten.*` op goes through the same translator table as the torch.export path
(`frontend.aten.TABLE`), so both frontends share one definition of each op's meaning; only the
plumbing differs: MLIR passes every schema argument positionally, spells dtypes as ScalarType
integers, builds lists with `torch.prim.ListConstruct` and sizes with `torch.aten.size.int`.

torch-mlir is imported on first use, so `import frontend` works without it.
"""

from __future__ import annotations

import importlib
import operator
import os
import re
from collections.abc import Sequence
from typing import Any

import sympy
import torch
from torch.export.graph_signature import InputKind

import ir
from frontend import aten as aten_table

# The module (the package's `capture` name is the function): its export and input helpers.
_capture = importlib.import_module("frontend.capture")
CaptureError, UnsupportedOpError = _capture.CaptureError, _capture.UnsupportedOpError

__all__ = ["capture_mlir", "capture_onnx", "lower_to_linalg", "onnx_weights", "parse_mlir"]

_STATE = "state"  # the stateless wrapper's first argument: every state_dict entry

# c10::ScalarType codes (how MLIR spells dtypes) for the dtypes the IR has.
_SCALAR_TYPES = {
    0: torch.uint8, 1: torch.int8, 3: torch.int32, 4: torch.int64, 5: torch.float16,
    6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16,
    23: torch.float8_e5m2, 24: torch.float8_e4m3fn,
}  # fmt: skip

# MLIR element types -> IR dtype names
_ELEMENT_TYPES = {
    "f32": "f32", "bf16": "bf16", "f16": "f16", "si64": "i64", "si32": "i32", "si8": "i8",
    "i1": "bool", "f8E4M3FN": "f8e4m3", "f8E5M2": "f8e5m2",
}  # fmt: skip

# Integer arithmetic on sizes (`!torch.int`), evaluated on ints or symbolic dims.
_INT_OPS = {
    "torch.aten.add.int": operator.add,
    "torch.aten.sub.int": operator.sub,
    "torch.aten.mul.int": operator.mul,
    "torch.aten.floordiv.int": lambda a, b: (
        a // b if isinstance(a * b, int) else sympy.floor(a / b)
    ),
    "torch.aten.neg.int": operator.neg,
}

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRONTEND_DIR = os.path.dirname(os.path.abspath(__file__))
_FRAME = re.compile(r'"([^"]+)":(\d+):\d+')
_ONNX_NODE = re.compile(r'loc\("(/[^"]*)"\)')


class _Stateless(torch.nn.Module):
    """`forward(state, *args)` runs `module.<method>(*args)` with `state` as its tensors."""

    def __init__(self, module: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, state: dict[str, torch.Tensor], *args: Any) -> Any:
        with torch.nn.utils.stateless._reparametrize_module(self.module, state):
            return getattr(self.module, self.method)(*args)


def capture_mlir(
    module: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    dynamic: _capture.DynamicSpec = None,
    method: str = "forward",
    name: str | None = None,
) -> ir.Graph:
    """Like `frontend.capture`, through torch-mlir's `torch` dialect. Same graph contract:
    parameters named as in `module.state_dict()`, symbolic dims from `dynamic`."""
    arg_names = _capture._argument_names(module, method, len(example_inputs))
    state = dict(module.state_dict())
    program = _export(module, state, tuple(example_inputs), arg_names, dynamic, method)
    func = _import(program)
    translator = _MlirTranslator(program, [_STATE, *arg_names], dynamic or {}, name or method)
    graph = translator.run_mlir(func)
    ir.verify(graph)
    return graph


def _export(module, state, inputs, arg_names, dynamic, method) -> torch.export.ExportedProgram:
    unknown = set(dynamic or {}) - set(arg_names)
    if unknown:
        raise CaptureError(f"dynamic= names {sorted(unknown)}, which are not inputs of {method}")
    shapes = (
        {k: None for k in state},
        tuple(
            _capture._auto_dims(x, (dynamic or {}).get(n, {})) for n, x in zip(arg_names, inputs)
        ),
    )
    try:
        return torch.export.export(
            _Stateless(module, method), (state, *inputs), dynamic_shapes=shapes, strict=False
        )
    except Exception as err:
        raise CaptureError(
            f"torch.export could not trace {type(module).__name__}.{method}:\n{err}"
        ) from err


def _import(program: torch.export.ExportedProgram):
    """The `func.func` op torch-mlir's importer makes of `program`."""
    from torch_mlir import ir as mlir
    from torch_mlir.dialects import torch as torch_dialect
    from torch_mlir.extras.fx_importer import FxImporter

    context = mlir.Context()
    torch_dialect.register_dialect(context)
    importer = FxImporter(context=context)
    importer.import_frozen_program(program, func_name="main")
    # Keep the context alive with the function (the bindings do not hold it for us).
    func = importer.module.body.operations[0]
    func._dsv4c_keepalive = (context, importer)
    return func


class _FakeNode:
    """What the translators read of an fx node (`cx.node.target`)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.meta: dict[str, Any] = {}  # MLIR carries no torch shape propagation (`val`)


class _MlirTranslator(_capture._Translator):
    """Walks one imported `func.func`; inputs and helpers are the torch.export path's."""

    def run_mlir(self, func) -> ir.Graph:
        placeholders = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        self._bind_symbols(placeholders)
        return self.walk(func, self._mlir_inputs(placeholders))

    def walk(self, func, inputs: list[ir.Value]) -> ir.Graph:
        """Translate the body of `func`, whose arguments are `inputs`."""
        block = func.regions[0].blocks[0]
        self.values: dict[Any, Any] = dict(zip(block.arguments, inputs, strict=True))
        for op in block.operations:
            self._translate_mlir(op.operation)
        return self.builder.build(verify=False)

    def _mlir_inputs(self, placeholders) -> list[ir.Value]:
        """One IR input per function argument: state entries as parameters, then user inputs."""
        by_name = {n.name: n for n in placeholders}
        specs = [
            s for s in self.program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT
        ]
        values = []
        for spec, (arg_name, (path, _leaf)) in zip(specs, self._user_leaves()):
            fake = by_name[spec.arg.name].meta["val"]
            if arg_name == _STATE:
                name, role = path[0].key, "parameter"
            else:
                name = _capture._path_name(arg_name, path)
                role = "cache" if name.startswith("cache") else "activation"
            value = self.builder.input(name, self._type_of_fake(fake, name), role=role)
            values.append(value)
        return values

    # one op

    def _translate_mlir(self, op) -> None:
        name = op.name
        self.loc = _location(op)
        if name.startswith("torch.constant."):
            self._set(op, _constant(op))
        elif name == "torch.prim.ListConstruct":
            self._set(op, [self.values[v] for v in op.operands])
        elif name == "torch.aten.size.int":
            x, dim = (self.values[v] for v in op.operands)
            self._set(op, self.type_of(x).shape[dim])
        elif name in _INT_OPS:
            self._set(op, _INT_OPS[name](*(self.values[v] for v in op.operands)))
        elif name == "torch.prim.NumToTensor.Scalar":
            self._set(op, self.operands(self.values[op.operands[0]])[0])
        elif name == "func.return":
            self.builder.output(*(self._materialize(self.values[v]) for v in op.operands))
        elif name == "torch.vtensor.literal":
            literal = _literal(op)  # a host tensor until an op needs it in the graph
            if literal is None:
                raise CaptureError(
                    f"a tensor constant at {self.loc.source if self.loc else '<unknown source>'} "
                    "was frozen into the program; register it as a buffer "
                    "(module.register_buffer) so it becomes an input"
                )
            self._set(op, literal)
        else:
            self._translate_aten(op)

    def _translate_aten(self, op) -> None:
        target = _overload(op)
        if target in aten_table.IGNORED_OPS:  # runtime asserts, metadata checks
            return
        operands = [self.values[v] for v in op.operands]
        if target is not None and _host_only(operands):
            # Shape arithmetic on constants (ONNX axes, `item` of a literal): fold it here.
            args, kwargs = _schema_args(target, operands)
            result = target(*args, **kwargs)
            for r, value in zip(op.results, result if isinstance(result, tuple) else (result,)):
                self.values[r] = value
            return
        translator = None if target is None else aten_table.lookup(target)
        if translator is None and target is not None and target._overloadname == "Scalar":
            # MLIR splits `x * 2.0` into mul.Scalar; the .Tensor translator takes scalars too.
            target = getattr(target.overloadpacket, "Tensor", target)
            translator = aten_table.lookup(target)
        if translator is None:
            source = self.loc.source if self.loc else ""
            raise UnsupportedOpError(
                _op_label(op), "", source, "", "add a translator for it to frontend/aten.py"
            )
        self.node = _FakeNode(target)
        self._result_types = [_mlir_type(r.type) for r in op.results]
        args, kwargs = _schema_args(target, [self._materialize(v) for v in operands])
        try:
            result = translator(self, *args, **kwargs)
        except (ir.IRTypeError, TypeError, ValueError) as err:
            where = self.loc.source if self.loc else "<unknown source>"
            raise CaptureError(f"could not translate {_op_label(op)} at {where}:\n  {err}") from err
        results = result if isinstance(result, tuple) else (result,)
        self._check_mlir_types(op, results)
        for r, value in zip(op.results, results):
            self.values[r] = value

    def _set(self, op, value: Any) -> None:
        self.values[op.results[0]] = value

    def _materialize(self, value: Any) -> Any:
        """A host tensor used by a graph op becomes a `constant` (0-d) or `full` (splat) op."""
        if isinstance(value, list):
            return [self._materialize(v) for v in value]
        if not isinstance(value, torch.Tensor):
            return value
        flat = value.flatten()
        if flat.numel() and not bool((flat == flat[0]).all()):
            source = self.loc.source if self.loc else "<unknown source>"
            raise CaptureError(
                f"a non-uniform constant tensor {list(value.shape)} at {source} reaches a graph "
                "op, and the IR has no literal tensors; register it as a buffer "
                "(module.register_buffer) so it becomes an input"
            )
        dtype = ir.DType.from_torch(value.dtype)
        scalar = flat[0].item() if flat.numel() else 0
        if value.dim() == 0:
            return self.op("constant", value=scalar, dtype=dtype)
        return self.op("full", shape=tuple(value.shape), value=scalar, dtype=dtype)

    def expected_dtype(self) -> ir.DType:
        for t in self._result_types:
            if t is not None:
                return t[1]
        raise CaptureError(f"{self.node.target} has no tensor result to take a dtype from")

    def _check_mlir_types(self, op, results: tuple) -> None:
        for value, want in zip(results, self._result_types):
            if want is None or not isinstance(value, ir.Value):
                continue
            shape, dtype = want
            got = value.type
            static_ok = len(got.shape) == len(shape) and all(
                w is None or w == g for w, g in zip(shape, got.shape)
            )
            if got.dtype != dtype or not static_ok:
                raise CaptureError(
                    f"frontend bug: {_op_label(op)} translated to {got} but MLIR says "
                    f"{_type_text(shape, dtype)} at {self.loc.source if self.loc else '?'}; "
                    "please report this"
                )


# --- MLIR plumbing -----------------------------------------------------------------------


def _overload(op) -> torch._ops.OpOverload | None:
    """`torch.aten.mul.Scalar` -> aten.mul.Scalar; `torch.operator "ns.op"` -> the custom op."""
    if op.name == "torch.operator":
        # ops torch-mlir has no definition for: "dsv4c_models.grouped_mm", "torch.aten.argsort.stable"
        qualified = str(op.attributes["name"]).strip('"').removeprefix("torch.")
        namespace, _, rest = qualified.partition(".")
        op_name, _, overload = rest.partition(".")
        packet = getattr(getattr(torch.ops, namespace, None), op_name, None)
        return None if packet is None else getattr(packet, overload or "default", None)
    if not op.name.startswith("torch.aten."):
        return None
    parts = op.name.removeprefix("torch.aten.").split(".")
    packet = getattr(torch.ops.aten, parts[0], None)
    if packet is None:
        return None
    overload = parts[1] if len(parts) > 1 else "default"
    overload = overload.removesuffix("_hacked_twin").removesuffix("hacked_twin") or "default"
    return getattr(packet, overload, None)


def _schema_args(target, values: list[Any]) -> tuple[list, dict]:
    """MLIR passes every schema argument in order; fx leaves out trailing defaults and passes
    keyword-only ones by name. Do the same, so one translator serves both."""
    args, kwargs, positional = [], {}, []
    for spec, value in zip(target._schema.arguments, values):
        if "ScalarType" in str(spec.real_type) and isinstance(value, int):
            value = _SCALAR_TYPES[value]
        if not spec.kwarg_only:
            args.append(value)
            positional.append(spec)
        elif spec.name not in _capture._IGNORED_KWARGS and not _is_default(spec, value):
            kwargs[spec.name] = value
    while args and _is_default(positional[len(args) - 1], args[-1]):
        args.pop()
    return args, kwargs


def _is_default(spec, value: Any) -> bool:
    if not spec.has_default_value() or isinstance(value, ir.Value):
        return False
    default = spec.default_value
    if default is None or value is None:
        return default is value
    if isinstance(default, bool) or isinstance(value, bool):
        return default is value
    return isinstance(default, (int, float, list)) and default == value


def _host_only(operands: list[Any]) -> bool:
    """Constant operands only, and at least one host tensor among them."""
    leaves = [x for v in operands for x in (v if isinstance(v, list) else [v])]
    return any(isinstance(x, torch.Tensor) for x in leaves) and not any(
        isinstance(x, (ir.Value, sympy.Basic)) for x in leaves
    )


def _literal(op) -> torch.Tensor | None:
    """`torch.vtensor.literal(dense<...>)` as a host tensor; None for opaque resource blobs."""
    import numpy as np
    from torch_mlir import ir as mlir

    try:
        attr = mlir.DenseElementsAttr(op.attributes["value"])
    except ValueError:  # dense_resource<...>: a frozen tensor the bindings cannot read
        return None
    shape, dtype = _mlir_type(op.results[0].type)
    if attr.is_splat:
        value = _element(attr.get_splat_value())
        return torch.full(shape, value, dtype=dtype.to_torch())
    return torch.from_numpy(np.array(attr)).to(dtype.to_torch()).reshape(shape)


def _element(attr) -> Any:
    from torch_mlir import ir as mlir

    for kind in (mlir.BoolAttr, mlir.IntegerAttr, mlir.FloatAttr):
        try:
            return kind(attr).value
        except (ValueError, TypeError):  # the bindings' checked cast
            continue
    raise CaptureError(f"unsupported literal element {attr}")


def _constant(op) -> Any:
    from torch_mlir import ir as mlir

    kind = op.name.removeprefix("torch.constant.")
    if kind == "none":
        return None
    attr = op.attributes["value"]
    if kind == "int":
        return mlir.IntegerAttr(attr).value
    if kind == "float":
        return mlir.FloatAttr(attr).value
    if kind == "bool":
        return mlir.BoolAttr(attr).value
    return mlir.StringAttr(attr).value  # str, device


def _mlir_type(t) -> tuple[tuple, ir.DType] | None:
    """`!torch.vtensor<[?,4],f32>` -> ((None, 4), f32); non-tensors -> None."""
    m = re.fullmatch(r"!torch\.vtensor<\[([^\]]*)\],(\w+)>", str(t))
    if m is None:
        return None
    dims = tuple(None if d == "?" else int(d) for d in m.group(1).split(",") if d)
    element = _ELEMENT_TYPES.get(m.group(2))
    if element is None:
        raise CaptureError(f"MLIR element type {m.group(2)} has no IR dtype")
    return dims, ir.DType(element)


def _type_text(shape: tuple, dtype: ir.DType) -> str:
    return f"{dtype.value}[{','.join('?' if d is None else str(d) for d in shape)}]"


def _location(op) -> ir.Loc | None:
    """The innermost user frame of an MLIR location (`callsite(... at ...)`)."""
    text = str(op.location)
    for path, line in _FRAME.findall(text):
        if path.startswith((_TORCH_DIR, "torch/", _FRONTEND_DIR)):
            continue
        return ir.Loc(module="", source=f"{os.path.basename(path)}:{line}")
    node = _ONNX_NODE.search(text)  # ONNX node names: "/layers.0/attn/MatMul" -> module path
    if node:
        parts = [p for p in node.group(1).split("/") if p][:-1]
        module = _ir_name(".".join(parts)) if parts else ""
        return ir.Loc(module=module, source="") if module else None
    return None


def _op_label(op) -> str:
    if op.name == "torch.operator":
        return str(op.attributes["name"]).strip('"')
    return op.name.removeprefix("torch.")


# --- ONNX ---------------------------------------------------------------------------------


def capture_onnx(path: str | os.PathLike, *, name: str | None = None) -> ir.Graph:
    """An ONNX file -> `ir.Graph`, through torch-mlir's ONNX importer and `torch` dialect.

    Initializers (the weights) become parameter inputs named as in the file (the PyTorch
    exporter uses `state_dict()` names), never literals; symbolic dims keep their ONNX names
    (`dim_param`). Names that are not IR names (`onnx::MatMul_12`) are rewritten with `_`
    (`onnx_MatMul_12`); the graph's inputs say which.
    """
    import onnx

    try:
        model = onnx.load(os.fspath(path))
    except Exception as err:
        raise CaptureError(f"{path}: not a readable ONNX model ({err})") from err
    weights = _lift_initializers(model)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    func = _import_onnx(model)
    translator = _MlirTranslator(None, [], {}, name or _ir_name(model.graph.name or "onnx"))
    inputs = []
    for info in model.graph.input:
        role = "parameter" if info.name in weights else "activation"
        value_type = _onnx_type(info, path)
        inputs.append(translator.builder.input(_ir_name(info.name), value_type, role=role))
    graph = translator.walk(func, inputs)
    ir.verify(graph)
    return graph


def onnx_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The initializers of an ONNX file, keyed by their IR input names: `params=` for
    `ir.interpret` of a `capture_onnx` graph (exporters may rename or transpose weights, e.g.
    `onnx::MatMul_25` for a Linear's weight in MatMul form, so a state_dict does not always fit)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(path))
    return {
        _ir_name(init.name): torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in model.graph.initializer
    }


def _lift_initializers(model) -> set[str]:
    """Turn every initializer into a graph input (so weights stay out of the graph)."""
    from onnx import helper

    graph = model.graph
    declared = {i.name for i in graph.input}
    names = set()
    for init in graph.initializer:
        names.add(init.name)
        if init.name not in declared:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    del graph.initializer[:]
    return names


def _import_onnx(model):
    from torch_mlir import ir as mlir
    from torch_mlir.compiler_utils import run_pipeline_with_repro_report
    from torch_mlir.dialects import torch as torch_dialect
    from torch_mlir.extras import onnx_importer

    context = mlir.Context()
    torch_dialect.register_dialect(context)
    info = onnx_importer.ModelInfo(model)
    module = info.create_module(context=context).operation
    onnx_importer.NodeImporter.define_function(info.main_graph, module).import_all()
    try:
        run_pipeline_with_repro_report(
            module, "builtin.module(func.func(convert-torch-onnx-to-torch))", "ONNX to torch"
        )
    except Exception as err:  # torch-mlir names the ONNX op it could not convert
        raise CaptureError(f"torch-mlir could not convert the ONNX model:\n{err}") from err
    func = module.regions[0].blocks[0].operations[0]
    func._dsv4c_keepalive = (context, module)
    return func


_ONNX_DTYPES = {1: "f32", 10: "f16", 16: "bf16", 7: "i64", 6: "i32", 3: "i8", 9: "bool"}


def _onnx_type(info, path) -> ir.TensorType:
    tensor = info.type.tensor_type
    dtype = _ONNX_DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise CaptureError(f"{path}: input {info.name} has ONNX element type {tensor.elem_type}")
    dims = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(ir.sym(_ir_name(d.dim_param)))
        else:
            raise CaptureError(f"{path}: input {info.name} has an unnamed dynamic dim")
    return ir.TensorType(tuple(dims), ir.DType(dtype))


def _ir_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.]", "_", name)
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip(".")
    return cleaned or "_"


# --- MLIR export ---------------------------------------------------------------------------


def parse_mlir(text: str):
    """Parse `ir.to_mlir` output with torch-mlir's bindings (raises on malformed text)."""
    from torch_mlir import ir as mlir
    from torch_mlir.dialects import torch as torch_dialect

    context = mlir.Context()
    torch_dialect.register_dialect(context)
    return mlir.Module.parse(text, context)  # the module holds its context


def lower_to_linalg(text: str) -> str:
    """`ir.to_mlir` text of a graph of primitives -> linalg-on-tensors MLIR, through torch-mlir's
    backend pipelines. Custom `dsv4c.*` ops (semantic ops, fused kernels) cannot lower."""
    from torch_mlir.compiler_utils import (
        OutputType,
        lower_mlir_module,
        run_pipeline_with_repro_report,
    )

    module = parse_mlir(text)
    try:
        run_pipeline_with_repro_report(
            module,
            "builtin.module(torchdynamo-export-to-torch-backend-pipeline{ extra-library=})",
            "torch dialect -> torch backend contract",
        )
        module = lower_mlir_module(False, OutputType.LINALG_ON_TENSORS, module)
    except Exception as err:
        raise CaptureError(f"torch-mlir could not lower the graph to linalg:\n{err}") from err
    return str(module)
