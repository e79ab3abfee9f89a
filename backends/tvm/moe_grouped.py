"""`moe.experts` on the CPU as grouped GEMMs (TensorIR written directly): each expert a call
touches has its weights read once, whatever the number of tokens that chose it.

    offsets, order  counting sort of the R = N·k (token, slot) pairs by expert (stable), serial
    h[r, :]         act(x[t]·w1[e]ᵀ + b1, x[t]·w3[e]ᵀ + b3) · weight for each row r (the pairs in
                    expert order; t its token), in x's dtype
    down[p, :]      h[r]·w2[e]ᵀ (+ weight · b2[e]) at the pair p = t·k + j of row r, fp32
    ys[t, :]        with `shared`: the shared expert's FFN of every token
    y[t, :]         Σ_j down[t·k + j, :] (+ ys[t, :]) in x's dtype

The GEMM stages are weight-stationary: a parallel task owns (chunk of `CHUNK` weight rows,
expert); it loads each weight row once (vectorised along K, `VECTOR` fp32 lanes) and dots it
against every row its expert got (`offsets[e]` to `offsets[e + 1]`, data-dependent bounds: an
expert no token chose costs one comparison). The shared expert is the same loop over all N
tokens. No count leaves the kernel: no host loop, no sync.

Every weight element is read through an `Accessor` `w(e, i, k)` -> fp32 (`dense` for weights
stored in x's dtype), the one place a quantised weight format plugs its decode in
(`backends.tvm.dequant.expert_weight`; FP4 rows are decoded once into a tile, `staged`).

Numerics are the op's (ir/ops/moe.py `Experts`): each dot product in fp32 rounded to x's dtype
(a GEMM in x's dtype), biases, activation and routing weight in fp32, the hidden rows in x's
dtype, the slots summed in fp32 (slot order), the shared expert's result added in x's dtype.
Pairs whose expert index is outside [0, E) contribute nothing, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ir
from backends.tvm.lower import Unsupported, convert, tvm_dtype

__all__ = [
    "CHUNK",
    "Accessor",
    "ExpertsSpec",
    "dense",
    "experts_func",
    "experts_spec",
    "gated",
    "operand_names",
]

F32 = "float32"
VECTOR = 16  # fp32 lanes of one AVX-512 register: the dot products' partial sums
CHUNK = 32  # weight rows per parallel task
BLOCK = 4  # weight rows dotted together (their partial sums interleave)

# (expert, weight row, k) -> the fp32 value of one weight element
Accessor = Callable[[Any, Any, Any], Any]
# (weight row of the block, k) -> one fp32 product of a dot
Term = Callable[[Any, Any], Any]


def dense(buf: Any) -> Accessor:
    """Weights stored as [E, rows, K] in a float dtype (shared ones as [rows, K]: e unused)."""
    if len(buf.shape) == 2:
        return lambda e, i, k: convert(buf[i, k], F32)
    return lambda e, i, k: convert(buf[e, i, k], F32)


def gated(op: Any, gate: Any, up: Any) -> Any:
    """The experts' activation (ir/ops/moe.py `Experts`) on fp32 gate and up values."""
    from tvm import tirx

    one = tirx.const(1.0, F32)
    g = tirx.min(gate, tirx.const(op.clamp, F32))
    u = tirx.min(tirx.max(up, tirx.const(-op.clamp, F32)), tirx.const(op.clamp, F32))
    if op.activation != "gpt_oss":
        return g / (one + tirx.exp(-g)) * u
    return g / (one + tirx.exp(-g * tirx.const(op.alpha, F32))) * (u + one)


def operand_names(op: Any) -> list[str]:
    """The names of a `moe.experts` node's operands, in order (ir/ops/moe.py `Experts`)."""
    names = ["x", "weights", "experts", "w1", "w3", "w2"]
    names += ["s1", "s3", "s2"] if op.shared else []
    names += ["b1", "b3", "b2"] if op.expert_bias else []
    return names + (["w1s", "w3s", "w2s"] if op.quantised else [])


@dataclass(frozen=True)
class ExpertsSpec:
    """What the kernel's code depends on: the op, the operands' shapes (None for the token dim
    N of x, weights and experts; every other size static) and dtypes (TVM names), and the
    logical sizes E, I, d, k and J (the shared expert's hidden size, 0 without one)."""

    op: Any
    shapes: tuple[tuple[int | None, ...], ...]
    dtypes: tuple[str, ...]
    experts: int
    inter: int
    width: int
    k: int
    shared_inter: int


def experts_spec(node: ir.Node) -> ExpertsSpec:
    """The spec of a `moe.experts` node; `Unsupported` when a size other than N is symbolic."""
    op = node.op
    types = [v.type for v in node.operands]
    shapes = [(None, *t.shape[1:]) if i < 3 else tuple(t.shape) for i, t in enumerate(types)]
    if not all(isinstance(d, int) for s in shapes for d in s if d is not None):
        raise Unsupported(f"grouped moe.experts needs static sizes but N, got {shapes}")
    dtypes = tuple(
        "float8_e4m3fn" if t.dtype == ir.DType.f8e4m3 else tvm_dtype(t.dtype) for t in types
    )
    j = shapes[6][0] if op.shared else 0
    e, inter = shapes[3][:2]
    return ExpertsSpec(op, tuple(shapes), dtypes, e, inter, shapes[0][1], shapes[1][1], j)


def experts_func(spec: ExpertsSpec, symbol: str) -> Any:
    """The grouped kernel as a PrimFunc named `symbol`: the op's operands, then y [N, d]."""
    from tvm.script.ir_builder import IRBuilder

    with IRBuilder() as ib:
        _Builder(spec).emit()
    return ib.get().with_attr("global_symbol", symbol)


class _Builder:
    """Emits the kernel's statements into the current IRBuilder frame (`emit`)."""

    def __init__(self, spec: ExpertsSpec) -> None:
        self.spec = spec
        self.op = spec.op
        self.out = spec.dtypes[0]

    # --- small emitters --------------------------------------------------------------------

    @staticmethod
    def named(name: str, v: Any) -> Any:
        from tvm.script.ir_builder import IRBuilder

        return IRBuilder.name(name, v)

    @contextmanager
    def loop(self, kind: str, name: str, start: Any, stop: Any = None) -> Iterator[Any]:
        """A `serial` / `parallel` / `vectorized` loop whose variable is named `name`."""
        from tvm.script.ir_builder import tirx as T

        with getattr(T, kind)(start, stop) as v:
            yield self.named(name, v)

    @contextmanager
    def when(self, cond: Any) -> Iterator[None]:
        """An `if cond:` frame (none when `cond` is None)."""
        from tvm.script.ir_builder import tirx as T

        if cond is None:
            yield
            return
        with T.If(cond):
            with T.Then():
                yield

    def local(self, name: str, shape: tuple[int, ...], dtype: str = F32) -> Any:
        """A small buffer of one parallel task. Global scope on purpose: TVM turns a "local"
        buffer inside a parallel loop into a workspace allocation, a heap pointer LLVM must
        assume aliases x (measured: every FMA stored its partial sums back, 1.7x slower); this
        one is a stack array of the task, kept in registers."""
        from tvm.script.ir_builder import tirx as T

        return self.named(name, T.alloc_buffer(shape, dtype))

    def let(self, name: str, value: Any) -> Any:
        from tvm.script.ir_builder import tirx as T

        return self.named(name, T.Bind(value))

    def rounded(self, v: Any) -> Any:
        """fp32 `v` rounded to x's dtype (a GEMM's result in x's dtype), as fp32."""
        return convert(convert(v, self.out), F32)

    # --- the kernel ------------------------------------------------------------------------

    def emit(self) -> None:
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        s = self.spec
        with T.prim_func():
            T.func_name("moe_experts")
            n = tirx.Var("n", "int32")
            self.bufs = {}
            for name, shape, dtype in zip(operand_names(self.op), s.shapes, s.dtypes):
                dims = [n if d is None else d for d in shape]
                buf = T.match_buffer(T.arg(name, T.handle()), dims, dtype)
                self.bufs[name] = self.named(name, buf)
            y = self.named("y", T.match_buffer(T.arg("y", T.handle()), (n, s.width), self.out))
            self.n = n
            self.body(y)

    def routed_weights(self) -> list[Accessor]:
        """w1, w3, w2 as accessors: `dense`, or decoded from their `weight_format` with the
        scales (`backends.tvm.dequant.expert_weight`, rounded to x's dtype as the op says)."""
        if not self.op.quantised:
            return [dense(self.bufs[name]) for name in ("w1", "w3", "w2")]
        from backends.tvm.dequant import expert_weight

        s, fmt = self.spec, self.op.weight_format
        cols = {"w1": s.width, "w3": s.width, "w2": s.inter}
        reads = [
            expert_weight(self.bufs[name], self.bufs[name + "s"], fmt, cols[name], self.out)
            for name in ("w1", "w3", "w2")
        ]
        return [lambda e, i, k, read=read: convert(read(e, i, k), F32) for read in reads]

    def body(self, y: Any) -> None:
        from tvm.script.ir_builder import tirx as T

        s, pairs = self.spec, self.n * self.spec.k
        offsets = self.named("offsets", T.alloc_buffer((s.experts + 1,), "int32"))
        order = self.named("order", T.alloc_buffer((pairs,), "int32"))
        h = self.named("h", T.alloc_buffer((pairs, s.inter), self.out))
        down = self.named("down", T.alloc_buffer((pairs, s.width), F32))
        self.sort(offsets, order, down)
        w1, w3, w2 = self.routed_weights()
        self.up(offsets, order, h, w1, w3)
        self.down(offsets, order, h, down, w2)
        self.combine(down, self.shared() if self.op.shared else None, y)

    def expert_of(self, p: Any) -> Any:
        """The expert index of pair p = t·k + j, as int32."""
        from tvm import tirx

        k = self.spec.k
        return convert(self.bufs["experts"][tirx.floordiv(p, k), tirx.floormod(p, k)], "int32")

    def sort(self, offsets: Any, order: Any, down: Any) -> None:
        """Counting sort of the pairs by expert: offsets[e] .. offsets[e + 1] are expert e's
        rows, order[r] the pair of row r (stable: by token, then slot). A pair naming no
        expert gets no row; its `down` row is zero."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        s, pairs = self.spec, self.n * self.spec.k
        with self.loop("serial", "e", s.experts + 1) as e:
            T.buffer_store(offsets, 0, [e])
        with self.loop("serial", "p", pairs) as p:
            e = self.let("e", self.expert_of(p))
            with T.If(tirx.all(e >= 0, e < s.experts)):
                with T.Then():
                    T.buffer_store(offsets, offsets[e + 1] + 1, [e + 1])
                with T.Else():
                    with self.loop("serial", "c", s.width) as c:
                        T.buffer_store(down, tirx.const(0.0, F32), [p, c])
        with self.loop("serial", "e", s.experts) as e:
            T.buffer_store(offsets, offsets[e + 1] + offsets[e], [e + 1])
        cursor = self.named("cursor", T.alloc_buffer((s.experts,), "int32"))
        with self.loop("serial", "e", s.experts) as e:
            T.buffer_store(cursor, offsets[e], [e])
        with self.loop("serial", "p", pairs) as p:
            e = self.let("e", self.expert_of(p))
            with T.If(tirx.all(e >= 0, e < s.experts)):
                with T.Then():
                    T.buffer_store(order, p, [cursor[e]])
                    T.buffer_store(cursor, cursor[e] + 1, [e])

    def dots(self, names: list[str], length: int, block: int, terms: list[Term]) -> list[Any]:
        """For each term (named by `names`) and each of `block` weight rows b: Σ_k term(b, k)
        over k < `length`, as `VECTOR` fp32 partial sums per row (one vector register), then
        the lanes in order and the tail. The rows' chains interleave (no FMA waits on the
        last); one load of the other operand serves all of them. Returns [block] buffers."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        zero = tirx.const(0.0, F32)
        accs = [self.local(f"{name}_lanes", (block, VECTOR)) for name in names]
        with self.loop("unroll", "b", block) as b:
            with self.loop("vectorized", "lane", VECTOR) as lane:
                for acc in accs:
                    T.buffer_store(acc, zero, [b, lane])
        with self.loop("serial", "kb", length // VECTOR) as kb:
            with self.loop("unroll", "b", block) as b:
                with self.loop("vectorized", "lane", VECTOR) as lane:
                    for acc, term in zip(accs, terms):
                        T.buffer_store(acc, acc[b, lane] + term(b, kb * VECTOR + lane), [b, lane])
        width = VECTOR // 2
        while width:  # halve the lanes: acc[b, :w] += acc[b, w:2w], constant indices throughout
            with self.loop("unroll", "b", block) as b:
                with self.loop("vectorized", "lane", width) as lane:
                    for acc in accs:
                        T.buffer_store(acc, acc[b, lane] + acc[b, lane + width], [b, lane])
            width //= 2
        sums = [self.local(name, (block,)) for name in names]
        with self.loop("unroll", "b", block) as b:
            for s, acc in zip(sums, accs):
                T.buffer_store(s, acc[b, 0], [b])
        tail = length % VECTOR
        if tail:
            with self.loop("serial", "kt", length - tail, length) as kt:
                with self.loop("unroll", "b", block) as b:
                    for s, term in zip(sums, terms):
                        T.buffer_store(s, s[b] + term(b, kt), [b])
        return sums

    def tiles(self, *names: str, length: int) -> tuple:
        """(name, length) of the fp32 tiles `staged` fills: FP4 weights only."""
        return tuple((n, length) for n in names) if self.op.weight_format == "fp4_e2m1" else ()

    def staged(self, tile: Any, w: Accessor, e: Any, i: Any, block: int, length: int) -> Accessor:
        """FP4 weights: rows i .. i + block of expert e decoded once (per call) into the task's
        fp32 `tile`, which the dots read instead of `w`: read in the dots, the accessor's byte
        index k // 2 is no vector load (each lane's byte inserted on its own) and every token
        row decodes again. The tile is filled even and odd columns apart, k = 32·kb + 2·lane +
        parity: byte 16·kb + lane and scale block kb, a vector load and a broadcast. Measured
        (small's layer, bf16 x, 1 thread, hot): N=1 13.4 -> 3.3 ms (dense bf16 0.5 ms)."""
        from tvm.script.ir_builder import tirx as T

        step = 2 * VECTOR
        with self.loop("unroll", "b", block) as b:
            with self.loop("serial", "kb", length // step) as kb:
                for parity in (0, 1):
                    with self.loop("vectorized", "lane", VECTOR) as lane:
                        k = kb * step + 2 * lane + parity
                        T.buffer_store(tile, w(e, i + b, k), [b, k])
            if length % step:
                with self.loop("serial", "kt", length - length % step, length) as kt:
                    T.buffer_store(tile, w(e, i + b, kt), [b, kt])
        return lambda e_, row, k: tile[row - i, k]

    @contextmanager
    def weight_rows(
        self, tasks: int, rows: int, name: str, offsets: Any = None, tiles: tuple = ()
    ) -> Iterator[tuple[Any, Any, int, list[Any]]]:
        """A parallel loop over ceil(rows / CHUNK) x `tasks` (task q: expert q % tasks, rows of
        chunk q // tasks: TVM gives each thread a contiguous range of q, so each thread gets
        chunks of every expert, whichever experts the tokens chose), and in it a loop over the
        chunk's rows by blocks of `block` (4 when `rows` allows), skipped when `offsets` give
        the expert no rows. Yields (the
        expert, the block's first row, named `name`, block, the task's fp32 [block, length]
        buffers for the (name, length) `tiles`, see `staged`)."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        per = -(-rows // CHUNK)
        block = BLOCK if rows % BLOCK == 0 else 1
        with self.loop("parallel", "task", tasks * per) as q:
            e = self.let("e", tirx.floormod(q, tasks))
            lo = self.let(f"{name}0", tirx.floordiv(q, tasks) * CHUNK)
            blocks = tirx.floordiv(tirx.min(lo + CHUNK, rows) - lo, block)
            with self.when(None if offsets is None else offsets[e] < offsets[e + 1]):
                bufs = [self.named(t, T.alloc_buffer((block, n), F32)) for t, n in tiles]
                with self.loop("serial", "ib", blocks) as ib:
                    yield e, self.let(name, lo + ib * block), block, bufs

    def up(self, offsets: Any, order: Any, h: Any, w1: Accessor, w3: Accessor) -> None:
        """h[r, i] for expert e's rows r: each row of w1[e] and w3[e] loaded once per call."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        s, x, wts = self.spec, self.bufs["x"], self.bufs["weights"]
        tiles = self.tiles("w1_rows", "w3_rows", length=s.width)
        with self.weight_rows(s.experts, s.inter, "i", offsets, tiles) as (e, i, block, bufs):
            if bufs:
                w1 = self.staged(bufs[0], w1, e, i, block, s.width)
                w3 = self.staged(bufs[1], w3, e, i, block, s.width)
            with self.loop("serial", "r", offsets[e], offsets[e + 1]) as r:
                p = self.let("p", order[r])
                t = self.let("t", tirx.floordiv(p, s.k))
                xk = lambda kk: convert(x[t, kk], F32)  # noqa: E731
                gate, up = self.dots(["gate", "up"], s.width, block, [
                    lambda b, kk: xk(kk) * w1(e, i + b, kk),
                    lambda b, kk: xk(kk) * w3(e, i + b, kk),
                ])  # fmt: skip
                weight = convert(wts[t, p - t * s.k], F32)
                with self.loop("unroll", "b", block) as b:
                    g, u = self.rounded(gate[b]), self.rounded(up[b])
                    if self.op.expert_bias:
                        g = g + convert(self.bufs["b1"][e, i + b], F32)
                        u = u + convert(self.bufs["b3"][e, i + b], F32)
                    value = gated(self.op, g, u) * weight
                    T.buffer_store(h, convert(value, self.out), [r, i + b])

    def down(self, offsets: Any, order: Any, h: Any, down: Any, w2: Accessor) -> None:
        """down[p, c] for expert e's rows: each row of w2[e] loaded once per call."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        s, wts = self.spec, self.bufs["weights"]
        tiles = self.tiles("w2_rows", length=s.inter)
        with self.weight_rows(s.experts, s.width, "c", offsets, tiles) as (e, c, block, bufs):
            if bufs:
                w2 = self.staged(bufs[0], w2, e, c, block, s.inter)
            with self.loop("serial", "r", offsets[e], offsets[e + 1]) as r:
                p = self.let("p", order[r])
                (dot,) = self.dots(["down"], s.inter, block, [
                    lambda b, ki: convert(h[r, ki], F32) * w2(e, c + b, ki),
                ])  # fmt: skip
                with self.loop("unroll", "b", block) as b:
                    value = self.rounded(dot[b])
                    if self.op.expert_bias:
                        t = tirx.floordiv(p, s.k)
                        weight = convert(wts[t, p - t * s.k], F32)
                        value = value + weight * convert(self.bufs["b2"][e, c + b], F32)
                    T.buffer_store(down, value, [p, c + b])

    def shared(self) -> Any:
        """ys [N, d] fp32 (values in x's dtype): the shared expert's FFN of every token, each
        row of s1, s3, s2 loaded once per call."""
        from tvm.script.ir_builder import tirx as T

        s, x, n = self.spec, self.bufs["x"], self.n
        s1, s3, s2 = (dense(self.bufs[name]) for name in ("s1", "s3", "s2"))
        hs = self.named("hs", T.alloc_buffer((n, s.shared_inter), self.out))
        ys = self.named("ys", T.alloc_buffer((n, s.width), F32))
        with self.weight_rows(1, s.shared_inter, "i") as (e, i, block, _):
            with self.loop("serial", "t", n) as t:
                xk = lambda kk: convert(x[t, kk], F32)  # noqa: E731
                gate, up = self.dots(["gate", "up"], s.width, block, [
                    lambda b, kk: xk(kk) * s1(e, i + b, kk),
                    lambda b, kk: xk(kk) * s3(e, i + b, kk),
                ])  # fmt: skip
                with self.loop("unroll", "b", block) as b:
                    value = gated(self.op, self.rounded(gate[b]), self.rounded(up[b]))
                    T.buffer_store(hs, convert(value, self.out), [t, i + b])
        with self.weight_rows(1, s.width, "c") as (e, c, block, _):
            with self.loop("serial", "t", n) as t:
                (dot,) = self.dots(["down"], s.shared_inter, block, [
                    lambda b, ki: convert(hs[t, ki], F32) * s2(e, c + b, ki),
                ])  # fmt: skip
                with self.loop("unroll", "b", block) as b:
                    T.buffer_store(ys, self.rounded(dot[b]), [t, c + b])
        return ys

    def combine(self, down: Any, ys: Any, y: Any) -> None:
        """y[t, c] = Σ_j down[t·k + j, c] in fp32, in x's dtype (+ ys in x's dtype)."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        s = self.spec
        with self.loop("parallel", "t", self.n) as t:
            with self.loop("serial", "c", s.width) as c:
                total = self.local("total", (1,))
                T.buffer_store(total, tirx.const(0.0, F32), [0])
                with self.loop("serial", "j", s.k) as j:
                    T.buffer_store(total, total[0] + down[t * s.k + j, c], [0])
                value = convert(total[0], self.out)
                if ys is not None:
                    value = convert(convert(value, F32) + ys[t, c], self.out)
                T.buffer_store(y, value, [t, c])
