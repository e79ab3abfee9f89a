"""Triton templates of the MoE ops (v4-architecture.md §3.6, §5 K14-K17): `moe.route` and
`moe.experts`, with their host side (`Launch`: tiles, grids, AOT variants).

The kernels are hand-written modules next to this file, read as source text (`KernelSource`):
`moe_route_kernel.py` (one program per block of tokens: gate GEMM, scores, top-k in registers)
and `moe_experts_kernel.py` (dispatch, grouped clamped-SwiGLU GEMMs, combine). A header line
naming the operand dtypes makes each dtype combination its own kernel for the cache and AOT.

`moe.experts` is five launches of one kernel, told apart by the constexpr PHASE (count, place,
up, down, combine; see the kernel's docstring), so one `KernelSource` covers the op and
`aot_compile` compiles each phase as a variant. Grids come from static sizes only (N, k, E,
the weight shapes): no count of rows per expert ever reaches the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ir
from backends.targets import Target, get_target
from backends.triton.emitters import TRITON_EMITTERS, AotVariant, OneKernel, cdiv
from backends.triton.kernel import KernelSource, Param, load_jit, next_pow2
from ir.symbolic import subs_dim

__all__ = ["EXPERTS_PHASES", "MAX_EXPERTS", "ExpertsLaunch", "RouteLaunch"]

MAX_EXPERTS = 1024  # one row of scores (route) / of group counts (experts) per block
EXPERTS_PHASES = ("count", "place", "up", "down", "combine")
_DOT_DTYPES = (ir.DType.f32, ir.DType.bf16, ir.DType.f16)
_HERE = Path(__file__).parent
_CPU = get_target("cpu")  # the interpreter's tiles, for CPU tensors whatever the compile target


def _template(file: str, name: str, params: list[Param], op: str) -> KernelSource:
    """The kernel module `file` with a header naming the dtypes of its pointer parameters."""
    dtypes = ", ".join(f"{p.name[:-4]} {p.dtype.value}" for p in params if p.kind == "ptr")
    header = f"# dsv4c template backends/triton/templates/{file} for {dtypes}\n"
    text = header + (_HERE / file).read_text()
    return KernelSource(name, text, tuple(params), (op,))


def _size(dim: Any, env: dict) -> int:
    return int(subs_dim(dim, env))


def _stages(stage_bytes: int, target: Target) -> int:
    """As many copies of one K step's tiles as three quarters of a block's shared memory hold."""
    return max(1, min(4, int(0.75 * target.smem_per_block) // stage_bytes))


def _hints(values: dict[str, int]) -> dict[str, int]:
    """AOT specialisations of integer parameters: 1 for unit values, 16 for multiples of 16."""
    return {k: (1 if v == 1 else 16) for k, v in values.items() if v == 1 or v % 16 == 0}


# --- moe.route --------------------------------------------------------------------------------


def _route_check(node: ir.Node) -> bool | str:
    x, gate = node.operands[:2]
    if x.dtype not in _DOT_DTYPES or gate.dtype not in _DOT_DTYPES:
        return f"moe.route of x {x.dtype}, gate {gate.dtype}: the gate GEMM takes f32, bf16, f16"
    experts = gate.shape[0]
    if not isinstance(experts, int):
        return f"moe.route needs a static expert count (gate rows), got {experts}"
    if experts > MAX_EXPERTS:
        return f"moe.route over {experts} experts: at most {MAX_EXPERTS} scores fit one block"
    return True


@TRITON_EMITTERS.register("moe.route", check=_route_check)
def emit_route(node: ir.Node, target: Target | None) -> RouteLaunch:
    op = node.op
    x, gate = node.operands[:2]
    ptrs = [("x_ptr", x.dtype), ("gate_ptr", gate.dtype)]
    ptrs.append(("bias_ptr", node.operands[2].dtype if op.bias else ir.DType.f32))
    ids = node.operands[3].dtype if op.hash else ir.DType.i64
    ptrs += [("tid2eid_ptr", ir.DType.i64), ("ids_ptr", ids)]
    ptrs.append(("logit_bias_ptr", node.operands[-1].dtype if op.logit_bias else ir.DType.f32))
    ptrs += [("weights_ptr", ir.DType.f32), ("experts_ptr", ir.DType.i64)]
    ints = ("N", "E", "D", "stride_xn", "stride_xd", "stride_ge", "stride_gd")
    consts = ("K", "SCORE", "HAS_BIAS", "HASH", "RENORM", "EPS", "N_GROUP", "TOPK_GROUP")
    consts += ("GROUP_FILL", "ROUTE_SCALE", "LOGIT_BIAS", "DOT_IN_F32")
    consts += ("BLOCK_N", "BLOCK_E", "BLOCK_D", "K_PAD")
    params = [Param(n, "ptr", t) for n, t in ptrs]
    params += [Param(n, "int") for n in ints] + [Param(n, "constexpr") for n in consts]
    source = _template("moe_route_kernel.py", "moe_route", params, "moe.route")
    return RouteLaunch(source, node, target or _CPU)


@dataclass
class RouteLaunch(OneKernel):
    """One program per BLOCK_N tokens; all BLOCK_E >= E scores of a token in registers."""

    source: KernelSource
    node: ir.Node
    target: Target

    def config(self, target: Target, n_experts: int) -> tuple[dict[str, Any], dict[str, int]]:
        """(tile constexprs, num_warps/num_stages) for `target`."""
        x, gate = self.node.operands[:2]
        block_e = next_pow2(n_experts)
        tiles = {"BLOCK_N": 16, "BLOCK_E": block_e, "BLOCK_D": 32}
        if not target.is_gpu:
            return tiles, {}
        item = 4 if _route_dot_in_f32(x.dtype, gate.dtype, gpu=True) else 2
        # the largest step over d whose x and gate tiles fit shared memory twice (double buffer)
        for block_d in (64, 32, 16):
            if _stages((16 + block_e) * block_d * item, target) >= 2 or block_d == 16:
                break
        tiles["BLOCK_D"] = block_d
        stages = min(2, _stages((16 + block_e) * block_d * item, target))
        return tiles, {"num_warps": 8 if block_e >= 256 else 4, "num_stages": stages}

    def constexprs(self, gpu: bool) -> dict[str, Any]:
        op = self.node.op
        x, gate = self.node.operands[:2]
        return {
            "K": op.k,
            "SCORE": op.score,
            "HAS_BIAS": op.bias,
            "HASH": op.hash,
            "RENORM": op.renorm,
            "EPS": float(op.eps),
            "N_GROUP": op.n_group,
            "TOPK_GROUP": op.topk_group,
            "GROUP_FILL": float(op.group_fill),
            "ROUTE_SCALE": float(op.route_scale),
            "LOGIT_BIAS": op.logit_bias,
            "DOT_IN_F32": _route_dot_in_f32(x.dtype, gate.dtype, gpu),
            "K_PAD": next_pow2(op.k),
        }

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        op = self.node.op
        x, gate, *rest = inputs
        n, d = x.shape
        n_experts = gate.shape[0]
        weights = torch.empty(n, op.k, dtype=torch.float32, device=x.device)
        experts = torch.empty(n, op.k, dtype=torch.int64, device=x.device)
        if n == 0:
            return (weights, experts)
        rest = [t.contiguous() for t in rest]  # bias, or tid2eid and ids: indexed as dense
        logit_bias = rest.pop() if op.logit_bias else weights  # placeholders are never read
        bias = rest[0] if op.bias else weights
        table, ids = rest if op.hash else (experts, experts)
        gpu = x.device.type != "cpu"
        tiles, options = self.config(self.target if gpu else _CPU, n_experts)
        grid = (cdiv(n, tiles["BLOCK_N"]),)
        load_jit(self.source)[grid](
            x_ptr=x,
            gate_ptr=gate,
            bias_ptr=bias,
            tid2eid_ptr=table,
            ids_ptr=ids,
            logit_bias_ptr=logit_bias,
            weights_ptr=weights,
            experts_ptr=experts,
            N=n,
            E=n_experts,
            D=d,
            stride_xn=x.stride(0),
            stride_xd=x.stride(1),
            stride_ge=gate.stride(0),
            stride_gd=gate.stride(1),
            **self.constexprs(gpu),
            **tiles,
            **options,
        )
        return (weights, experts)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        n_experts, d = (_size(s, env) for s in self.node.operands[1].shape)
        tiles, options = self.config(target, n_experts)
        hints = _hints({"E": n_experts, "D": d, "stride_xn": d, "stride_ge": d})
        hints |= {"stride_xd": 1, "stride_gd": 1}
        return [AotVariant({**self.constexprs(True), **tiles}, options, hints)]


def _route_dot_in_f32(x: ir.DType, gate: ir.DType, gpu: bool) -> bool:
    """IEEE fp32 products unless x and gate share a 16-bit dtype on a GPU (products of bf16/f16
    are exact in fp32, as in the reference's x.float() @ gate.float()ᵀ)."""
    return not gpu or x != gate or x == ir.DType.f32


# --- moe.experts ------------------------------------------------------------------------------


def _experts_check(node: ir.Node) -> bool | str:
    x, w1 = node.operands[0], node.operands[3]
    if node.op.weight_format not in WFMT:
        return f"moe.experts weight_format {node.op.weight_format!r} has no Triton lowering"
    if x.dtype not in _DOT_DTYPES:
        return f"moe.experts of {x.dtype}: the expert GEMMs take f32, bf16, f16"
    shapes = [v.shape for v in node.operands[3:]]
    if not all(isinstance(s, int) for shape in shapes for s in shape):
        return f"moe.experts needs static weight shapes, got {shapes}"
    groups = w1.shape[0] + int(node.op.shared)
    if groups > MAX_EXPERTS:
        return f"moe.experts with {groups} groups: at most {MAX_EXPERTS} counts fit one block"
    return True


@TRITON_EMITTERS.register("moe.experts", check=_experts_check)
def emit_experts(node: ir.Node, target: Target | None) -> ExpertsLaunch:
    x, weights, experts = node.operands[:3]
    dt, op = x.dtype, node.op
    ptrs = [("x_ptr", dt), ("weights_ptr", weights.dtype), ("experts_ptr", experts.dtype)]
    ptrs += [(f"{w}_ptr", node.operands[3].dtype) for w in ("w1", "w3", "w2")]
    ptrs += [(f"{w}_ptr", dt) for w in ("s1", "s3", "s2")]
    start = 6 + 3 * op.shared  # the biases follow the shared weights
    biases = [v.dtype for v in node.operands[start : start + 3]] if op.expert_bias else [dt] * 3
    ptrs += [(f"{b}_ptr", t) for b, t in zip(("b1", "b3", "b2"), biases)]
    scales = [v.dtype for v in node.operands[-3:]] if op.quantised else [dt] * 3
    ptrs += [(f"{s}_ptr", t) for s, t in zip(("w1s", "w3s", "w2s"), scales)]
    ptrs += [(f"{b}_ptr", ir.DType.i32) for b in ("counts", "row_of_pair", "pair_of_row")]
    ptrs += [(f"{b}_ptr", dt) for b in ("hidden", "out_rows", "y")]
    ints = ("N", "E", "D", "I", "J", *(f"stride_{s}" for s in _EXPERTS_STRIDES))
    consts = ("PHASE", "K", "LIMIT", "GPT_OSS", "ALPHA", "HAS_BIAS", "HAS_SHARED", "DOT_IN_F32")
    consts += ("WFMT", *_EXPERTS_TILES)
    params = [Param(n, "ptr", t) for n, t in ptrs]
    params += [Param(n, "int") for n in ints] + [Param(n, "constexpr") for n in consts]
    source = _template("moe_experts_kernel.py", "moe_experts", params, "moe.experts")
    return ExpertsLaunch(source, node, target or _CPU)


_EXPERTS_STRIDES = ("xn", "w1e", "w1i", "w2e", "w2d", "s1j", "s2d", "hm", "om", "yn",
                    "w1se", "w1si", "w2se", "w2sd")
# the kernel's WFMT per moe.experts weight_format (routed weights read as stored)
WFMT = {"dense": 0, "fp4_e2m1": 1, "fp8_e4m3": 2}
_EXPERTS_TILES = ("BLOCK_P", "BLOCK_E", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_T", "BLOCK_C")


@dataclass(frozen=True)
class ExpertsSizes:
    """The static sizes of one call: tokens N, slots K, experts E, d, I, shared width J."""

    n: int
    k: int
    e: int
    d: int
    inter: int
    j: int
    shared: bool
    weight_format: str = "dense"

    @property
    def pairs(self) -> int:
        return self.n * self.k

    @property
    def rows(self) -> int:
        """All rows: the shared expert's N first (when there is one), then the N·k routed."""
        return self.pairs + self.n * self.shared

    @property
    def hidden(self) -> int:
        """Width of the hidden buffer: routed (I) and shared (J) rows share it."""
        return max(self.inter, self.j)

    def ints(self) -> dict[str, int]:
        """The kernel's integer arguments: sizes, and the strides of contiguous operands."""
        d, i, j = self.d, self.inter, self.j
        per = 2 if self.weight_format == "fp4_e2m1" else 1  # weight elements per stored byte
        return {"N": self.n, "E": self.e, "D": d, "I": i, "J": j, "stride_xn": d,
                "stride_w1e": i * d // per, "stride_w1i": d // per, "stride_w2e": d * i // per,
                "stride_w2d": i // per, "stride_s1j": d, "stride_s2d": j,
                "stride_hm": self.hidden, "stride_om": d, "stride_yn": d,
                **self.scale_strides()}  # fmt: skip

    def scale_strides(self) -> dict[str, int]:
        """Strides of the scales (contiguous): FP4 [E, rows, ceil(cols/32)] per weight row, FP8
        [E, ceil(rows/128), ceil(cols/128)] per 128-row block; 0 for dense weights."""
        d, i = self.d, self.inter
        if self.weight_format == "fp4_e2m1":
            g1, g2 = cdiv(d, 32), cdiv(i, 32)
            return {"stride_w1se": i * g1, "stride_w1si": g1, "stride_w2se": d * g2,
                    "stride_w2sd": g2}  # fmt: skip
        if self.weight_format == "fp8_e4m3":
            c1, c2 = cdiv(d, 128), cdiv(i, 128)
            return {"stride_w1se": cdiv(i, 128) * c1, "stride_w1si": c1,
                    "stride_w2se": cdiv(d, 128) * c2, "stride_w2sd": c2}  # fmt: skip
        return {"stride_w1se": 0, "stride_w1si": 0, "stride_w2se": 0, "stride_w2sd": 0}

    def tiles(self, block_m: int) -> int:
        """Upper bound of row tiles over all groups: Σ cdiv(count_e, BLOCK_M) over experts is
        at most cdiv(P, BLOCK_M) + E, plus the shared expert's cdiv(N, BLOCK_M)."""
        shared = cdiv(self.n, block_m) if self.shared else 0
        return cdiv(self.pairs, block_m) + self.e + shared


@dataclass
class ExpertsLaunch(OneKernel):
    source: KernelSource
    node: ir.Node
    target: Target

    @property
    def launches(self) -> int:
        return len(EXPERTS_PHASES)  # `__call__` launches the kernel once per phase

    def sizes(self, n: int) -> ExpertsSizes:
        """The sizes of a call on `n` tokens (everything else is static in the node's types)."""
        x, weights, w1 = self.node.operands[0], self.node.operands[1], self.node.operands[3]
        shared = bool(self.node.op.shared)
        j = self.node.operands[6].shape[0] if shared else w1.shape[1]
        e, inter = w1.shape[:2]  # w1 is [E, I, d/2] when packed FP4
        return ExpertsSizes(n, weights.shape[1], e, x.shape[1], inter, j, shared,
                            self.node.op.weight_format)

    def phases(self, sz: ExpertsSizes, target: Target) -> dict[str, tuple[dict, dict]]:
        """Per phase: (tile constexprs, num_warps/num_stages). UP and DOWN share BLOCK_M and
        BLOCK_E (the row tiles); the rest differ per phase."""
        base = {
            "BLOCK_P": 64,
            "BLOCK_E": next_pow2(sz.e + sz.shared),
            "BLOCK_M": 16,
            "BLOCK_N": 64,
            "BLOCK_D": 32,
            "BLOCK_T": 16,
            "BLOCK_C": 64,
        }
        if not target.is_gpu:
            return {phase: (base, {}) for phase in EXPERTS_PHASES}
        item = self.node.operands[0].dtype.itemsize
        # rows per tile: about the mean rows per expert, 16 (decode) to 64 (prefill)
        base["BLOCK_M"] = max(16, min(64, next_pow2(cdiv(sz.pairs, sz.e))))
        m, step = base["BLOCK_M"], 64 if item == 2 else 32
        # fp32 takes IEEE dots, operands in registers: two 64-wide weight tiles spill at m=64;
        # so do quantised weights' tiles, whose decode (codes, scales, products) is in registers
        quant = self.node.op.quantised
        up = {"BLOCK_N": 64 if (item == 2 and not quant) or m < 64 else 32, "BLOCK_D": step}
        down = {"BLOCK_N": 128 if item == 2 and not quant else 64, "BLOCK_D": step}
        up_stage = (m + 2 * up["BLOCK_N"]) * step * item  # x tile, w1 and w3 tiles
        down_stage = (m + down["BLOCK_N"]) * step * item
        return {
            "count": ({**base, "BLOCK_P": 256}, {"num_warps": 4}),
            "place": ({**base, "BLOCK_P": 16}, {"num_warps": 4}),
            "up": ({**base, **up}, {"num_warps": 4, "num_stages": _stages(up_stage, target)}),
            "down": ({**base, **down}, {"num_warps": 4, "num_stages": _stages(down_stage, target)}),
            "combine": ({**base, "BLOCK_T": 16, "BLOCK_C": 256}, {"num_warps": 4}),
        }

    def grid(self, phase: str, sz: ExpertsSizes, tiles: dict) -> tuple[int, ...]:
        if phase in ("count", "place"):
            return (cdiv(sz.pairs, tiles["BLOCK_P"]),)
        if phase == "up":
            return (sz.tiles(tiles["BLOCK_M"]), cdiv(sz.hidden, tiles["BLOCK_N"]))
        if phase == "down":
            return (sz.tiles(tiles["BLOCK_M"]), cdiv(sz.d, tiles["BLOCK_N"]))
        return (cdiv(sz.n, tiles["BLOCK_T"]), cdiv(sz.d, tiles["BLOCK_C"]))

    def constexprs(self, sz: ExpertsSizes, gpu: bool) -> dict[str, Any]:
        dot_in_f32 = not gpu or self.node.operands[0].dtype == ir.DType.f32
        op = self.node.op
        return {
            "K": sz.k,
            "LIMIT": float(op.clamp),  # inf: SwiGLU without clamps
            "GPT_OSS": op.activation == "gpt_oss",
            "ALPHA": float(op.alpha),
            "HAS_BIAS": int(op.expert_bias),
            "HAS_SHARED": int(sz.shared),
            "DOT_IN_F32": dot_in_f32,
            "WFMT": WFMT[op.weight_format],
        }

    def __call__(self, inputs: list[Any], env: dict) -> tuple[Any, ...]:
        import torch

        x, weights, experts, w1, w3, w2, *rest = (t.contiguous() for t in inputs)
        sz = self.sizes(x.shape[0])
        y = torch.empty_like(x)
        if sz.n == 0:
            return (y,)
        op = self.node.op
        # placeholders (x: its dtype is the one the kernel's signature names for them), read
        # only with a shared expert / biases / quantised weights
        start = 3 * op.shared
        s1, s3, s2 = rest[:3] if op.shared else (x, x, x)
        b1, b3, b2 = rest[start : start + 3] if op.expert_bias else (x, x, x)
        w1s, w3s, w2s = rest[-3:] if op.quantised else (x, x, x)
        args = {"x_ptr": x, "weights_ptr": weights, "experts_ptr": experts, "w1_ptr": w1,
                "w3_ptr": w3, "w2_ptr": w2, "s1_ptr": s1, "s3_ptr": s3, "s2_ptr": s2,
                "b1_ptr": b1, "b3_ptr": b3, "b2_ptr": b2, "w1s_ptr": w1s, "w3s_ptr": w3s,
                "w2s_ptr": w2s, "y_ptr": y, **_scratch(sz, x), **sz.ints()}  # fmt: skip
        gpu = x.device.type != "cpu"
        consts = self.constexprs(sz, gpu)
        kernel = load_jit(self.source)
        for phase, (tiles, options) in self.phases(sz, self.target if gpu else _CPU).items():
            grid = self.grid(phase, sz, tiles)
            kernel[grid](**args, PHASE=phase, **consts, **tiles, **options)
        return (y,)

    def aot_variants(self, env: dict, target: Target) -> list[AotVariant]:
        sz = self.sizes(_size(self.node.operands[0].shape[0], env))
        consts = self.constexprs(sz, True)
        hints = _hints({k: v for k, v in sz.ints().items() if k != "N"})
        return [
            AotVariant({"PHASE": phase, **consts, **tiles}, options, hints)
            for phase, (tiles, options) in self.phases(sz, target).items()
        ]


def _scratch(sz: ExpertsSizes, x: Any) -> dict[str, Any]:
    """The kernel's buffers between phases: rows per expert (zeroed), the pair <-> row maps,
    the hidden activations and the output of every row."""
    import torch

    def empty(*shape: int, dtype: Any = x.dtype) -> Any:
        return torch.empty(*shape, dtype=dtype, device=x.device)

    return {
        "counts_ptr": torch.zeros(sz.e, dtype=torch.int32, device=x.device),
        "row_of_pair_ptr": empty(sz.pairs, dtype=torch.int32),
        "pair_of_row_ptr": empty(sz.rows, dtype=torch.int32),  # shared rows' entries unused
        "hidden_ptr": empty(sz.rows, sz.hidden),
        "out_rows_ptr": empty(sz.rows, sz.d),
    }
