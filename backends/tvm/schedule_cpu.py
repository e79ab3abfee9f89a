"""CPU (llvm) schedules for lowered kernels.

`schedule_cpu(func)` applies one generic recipe, every step best effort (a primitive TVM refuses
leaves the loop nest as it was; the result is still correct, only slower):

1. inline every elementwise/broadcast stage that is not an output (one loop nest per output),
   except stages named `keep_*` (Sinkhorn steps: inlining them would grow exponentially);
2. compute the remaining producers (row statistics of softmax, norms) inside the outer loops of
   the output that reads them, so a row is reduced and normalised while it is in cache;
3. per root loop nest: fuse the outer spatial loops and run them in parallel over the cores
   (unless it has at most `SERIAL_MAX` iterations per batch row: tiny stages run serially);
   a parallel nest over a symbolic extent E (B, B·T) then gets a runtime guard,
   `if E · per <= SERIAL_WORK or E == 1: <the nest, serial> else: <the nest, parallel>` (`per`:
   the iterations of its innermost statements per value of E, static), so a stage whose whole work
   at the call's B is small never wakes the thread pool (decode b8's rmsnorm: 8 rows x 1040
   iterations); a nest over a static extent with at most SERIAL_WORK iterations runs serially;
   vectorise the innermost loop of spatial nests when its extent is static (AVX-512: 16 lanes of
   f32), unrolled by `VECTOR` lanes otherwise;
4. a reduction whose innermost loop runs over a static multiple of `VECTOR` (a dot product over
   channels) is split into `VECTOR` partial sums (rfactor) kept in one vector register, then
   summed: LLVM does not reassociate a float reduction by itself (16x on a 512-wide dot);
   `rows_*` reductions instead keep their last spatial loop (static, a multiple of `VECTOR`)
   innermost and vectorised, the reduction loop just outside it: Σ_j p[j]·E[j, :] accumulates
   contiguous rows, and hand-split dot products (`[..., lane]` partial sums) fill their lanes;
5. a reduction over a symbolic extent gets its initialisation hoisted out of the reduction loop
   (`decompose_reduction`): TensorIR runs `T.init()` on the loop's first iteration, so a loop
   that runs zero times (a sum over `x[:, :T // 4]` with T < 4) would leave the output unwritten.

Matmuls have their own tiled schedule (`backends.tvm.matmul`).

Tuning: the numbers above (`VECTOR` lanes per rfactor/vector split, `SERIAL_MAX`, `SERIAL_WORK`,
the matmul tiles) are `Knobs`. While `TUNED` maps a kernel's symbol to other knobs (dsv4c.tuning
sets it from the tuning database during a compile), that kernel is scheduled with them and its
PrimFunc carries the attribute `dsv4c.tuned` (printed in its TVMScript); untuned kernels are
unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["TUNED", "VECTOR", "Knobs", "knobs_for", "mark_tuned", "schedule_cpu"]

VECTOR = 16  # f32 lanes of one AVX-512 register
KEEP = "keep_"  # stages named so are never inlined (each reads many elements of the last)
ROWS = "rows_"  # reductions whose last spatial loop is vectorised with the reduction outside it
# a stage doing at most this many iterations per value of its outermost symbolic dim (B) runs
# serially: waking the thread pool costs more (hc.pre's Sinkhorn: 40 stages of 4×4 per token)
SERIAL_MAX = 256
# a parallel nest whose total iterations at the call's binding are at most this runs serially
# (recipe step 3's runtime guard): 2^15 vectorised iterations take ~4 us on one core, about what
# a launch on TVM's pool costs with its worker awake (rmsnorm 8x512: 3.3 us parallel vs 1.1 us
# serial, min of 200 calls, loaded 2-core box), far less than one whose worker must be woken
SERIAL_WORK = 1 << 15


@dataclass(frozen=True)
class Knobs:
    """The tunable choices of the CPU schedules; the defaults are the hand-picked values.

    `vector`: lanes of a vectorised split / rfactor partial sums (a power of two, 4..64);
    `serial_max`: iterations per batch row below which a stage runs serially; `serial_work`:
    total iterations (at the call's binding) below which a parallel nest runs serially; matmul:
    `tile_i` rows × `tile_j` columns per register tile (None: the layout's default, nn 8 × 32,
    nt 4 × 8), `tile_k` the unrolled reduction step, `dots` whether an nt matmul with a static K
    multiple of `vector` runs as rfactor dot products (else tiles)."""

    vector: int = VECTOR
    serial_max: int = SERIAL_MAX
    serial_work: int = SERIAL_WORK
    tile_i: int | None = None
    tile_j: int | None = None
    tile_k: int = 4
    dots: bool = True

    def __post_init__(self) -> None:
        if self.vector not in (4, 8, 16, 32, 64):
            raise ValueError(f"Knobs.vector must be a power of two in 4..64, got {self.vector}")
        for name in ("tile_i", "tile_j", "tile_k", "serial_max", "serial_work"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"Knobs.{name} must be a positive int or None, got {v!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Knobs:
        """Knobs from a JSON object; unknown names are an error (a database of another
        version must not be half-applied)."""
        known = {f.name for f in fields(Knobs)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown schedule knob(s) {unknown}; known: {sorted(known)}")
        return Knobs(**dict(d))

    def text(self) -> str:
        """The knobs that differ from the defaults, `name=value` separated by spaces."""
        default = Knobs().as_dict()
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items() if v != default[k])


# kernel symbol (`<name>_<key>`) -> its tuned knobs, for the compile in progress
TUNED: ContextVar[Mapping[str, Knobs]] = ContextVar("dsv4c_tvm_tuned", default={})


def knobs_for(func: Any) -> Knobs:
    """The knobs for PrimFunc `func` (by its global symbol): tuned ones, or the defaults."""
    return TUNED.get().get(str(func.attrs["global_symbol"]), Knobs())


def mark_tuned(func: Any, knobs: Knobs) -> Any:
    """`func` with attribute `dsv4c.tuned` = the knobs' text when they are not the defaults
    (so a tuned kernel says so in its source; untuned kernels stay byte-identical)."""
    if knobs == Knobs():
        return func
    return func.with_attr("dsv4c.tuned", knobs.text())


def _try(fn: Any, *args: Any) -> Any:
    """fn(*args), or None when the schedule primitive refuses."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001  (tvm.error.* are many classes; any refusal means skip)
        return None


def _ok(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        return False
    return True


def _static(extent: Any) -> int | None:
    return int(extent.value) if hasattr(extent, "value") else None


def _is_spatial(sch: Any, block: Any) -> bool:
    return all(iv.iter_type == 0 for iv in sch.get(block).iter_vars)  # 0: data parallel


def schedule_cpu(func: Any) -> Any:
    from tvm import s_tir

    knobs = knobs_for(func)
    sch = s_tir.Schedule(func)
    root = _try(sch.get_sblock, "root")
    if root is None:  # a lone extern call (e.g. tvm.contrib.sort.topk): nothing to schedule
        return func
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block in reversed(sch.get_child_blocks(root)):
        name = sch.get(block).name_hint
        if name not in outputs and not name.startswith(KEEP) and _is_spatial(sch, block):
            _try(sch.compute_inline, block)
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint in outputs:
            _attach_producers(sch, block)
    for block in sch.get_child_blocks(root):  # partial sums live next to their one reader
        name = sch.get(block).name_hint
        if name.startswith(ROWS) and name not in outputs:
            consumers = sch.get_consumers(block)
            if len(consumers) == 1:
                _attach_producers(sch, consumers[0], only=block)
    for block in sch.get_child_blocks(root):
        _parallelise(sch, block, knobs)
    for block in sch.get_child_blocks(root):
        _vectorise_reduction(sch, block, knobs.vector)
    for block in sch.get_child_blocks(root):
        _init_outside_empty_loops(sch, block)
    out = sch.mod["main"].with_attr("global_symbol", func.attrs["global_symbol"])
    return mark_tuned(serial_when_small(out, knobs.serial_work), knobs)


def _attach_producers(sch: Any, out_block: Any, only: Any = None) -> None:
    """compute_at every non-output producer of `out_block` (or just `only`) at the deepest outer
    loop that works."""
    loops = sch.get_loops(out_block)
    if len(loops) < 2:
        return
    extents = [str(sch.get(lp).extent) for lp in loops]
    for producer in reversed([only] if only is not None else sch.get_producers(out_block)):
        domain = [str(iv.dom.extent) for iv in sch.get(producer).iter_vars if iv.iter_type == 0]
        for depth in range(len(loops) - 1, 0, -1):
            # only where the producer's leading dims are the output's outer loops (a row
            # statistic): elsewhere it would be recomputed for every outer iteration
            if domain[:depth] != extents[:depth]:
                continue
            if _ok(sch.compute_at, producer, loops[depth - 1], True):
                break


def _static_volume(sch: Any, loops: list[Any], serial_max: int = SERIAL_MAX) -> int:
    """The product of the loop extents, the outermost one counted as 1 when symbolic (the batch
    B of a decode step); any other symbolic extent (T, keys) counts as large."""
    volume = 1
    for depth, lp in enumerate(loops):
        extent = _static(sch.get(lp).extent)
        if extent is None and depth > 0:
            return serial_max + 1
        volume *= extent or 1
    return volume


def _parallelise(sch: Any, block: Any, knobs: Knobs) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    serial = _static_volume(sch, loops, knobs.serial_max) <= knobs.serial_max
    spatial = _is_spatial(sch, block)
    iters = sch.get(block).iter_vars
    n_outer = 0
    for iv in iters:  # leading data-parallel iterators (one loop each, in order)
        if iv.iter_type != 0:
            break
        n_outer += 1
    inner = None
    if spatial and n_outer == len(loops):
        inner = loops[-1]
        n_outer -= 1
    elif sch.get(block).name_hint.startswith(ROWS) and n_outer >= 2:
        n_outer -= 1  # the last spatial loop stays for _accumulate_rows
    if n_outer >= 1 and not serial:
        outer = _try(sch.fuse, *loops[:n_outer]) if n_outer > 1 else loops[0]
        _try(sch.parallel, outer if outer is not None else loops[0])
    if inner is not None:
        _vectorise(sch, inner, knobs.vector)


def _vectorise_reduction(sch: Any, block: Any, vector: int = VECTOR) -> None:
    """Innermost reduction loop of static extent n·VECTOR -> VECTOR lanes of partial sums; for
    `rows_*` blocks, the reduction loop moves outside the innermost spatial loop instead, which
    is vectorised (a row of the output accumulates a row of the input: contiguous loads)."""
    if sch.get(block).name_hint.startswith(ROWS):
        _accumulate_rows(sch, block, vector)
        return
    loops = sch.get_loops(block)
    if len(loops) < 2 or _is_spatial(sch, block):
        return
    inner = sch.get(loops[-1])
    extent = _static(inner.extent)
    if extent is None or extent < 2 * vector or extent % vector:
        return
    iters = sch.get(block).iter_vars
    reductions = [iv for iv in iters if iv.iter_type == 2]  # 2: a reduction iterator
    if len(reductions) != 1 or _static(reductions[0].dom.extent) != extent:
        return
    parts = _try(sch.split, loops[-1], [None, vector])
    if parts is None:
        return
    rf = _try(sch.rfactor, parts[1], len(iters) - 1)  # lanes: a new last dim of the partials
    if rf is None:
        return
    rf_loops = sch.get_loops(rf)  # outer..., lane groups (reduction), lanes
    if len(rf_loops) >= 3:
        _try(sch.reverse_compute_at, block, rf_loops[-3])
    _try(sch.vectorize, sch.get_loops(rf)[-1])


def _init_outside_empty_loops(sch: Any, block: Any) -> None:
    """Move a reduction's init before its reduction loops when one of them may run zero times.

    TVM refuses `decompose_reduction` at a loop below a reduction loop, so the innermost loop it
    accepts is the one just outside them (the init stays next to the row it initialises)."""
    reductions = [iv for iv in sch.get(block).iter_vars if iv.iter_type == 2]
    if all(_static(iv.dom.extent) for iv in reductions):
        return  # no reduction, or every reduction loop runs at least once
    for loop in reversed(sch.get_loops(block)):
        if _ok(sch.decompose_reduction, block, loop):
            return


def _accumulate_rows(sch: Any, block: Any, vector: int = VECTOR) -> None:
    """loops (..., c, j) -> (..., c / VECTOR, j, VECTOR lanes of c): a vector of output channels
    accumulates a contiguous piece of each input row."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    red, spatial = loops[-1], loops[-2]
    extent = _static(sch.get(spatial).extent)
    if extent is None or extent % vector:
        return
    parts = _try(sch.split, spatial, [None, vector])
    if parts is None:
        return
    if _ok(sch.reorder, parts[0], red, parts[1]):
        _try(sch.vectorize, parts[1])


def _vectorise(sch: Any, loop: Any, vector: int = VECTOR) -> None:
    extent = _static(sch.get(loop).extent)
    if extent is None:
        parts = _try(sch.split, loop, [None, vector])
        if parts is not None:
            _try(sch.unroll, parts[1])
        return
    if extent == 0:  # a zero-sized dim (a prompt shorter than a compression ratio): no lanes
        return
    if extent <= 64:
        _try(sch.vectorize, loop)
        return
    if extent % vector == 0:
        parts = _try(sch.split, loop, [None, vector])
        if parts is not None:
            _try(sch.vectorize, parts[1])


def serial_when_small(func: Any, serial_work: int = SERIAL_WORK) -> Any:
    """`func` with each parallel root loop nest over a symbolic extent E guarded:
    `if E * per <= serial_work or E == 1:` the nest with a serial loop `else:` the nest as it
    was (one iteration has nothing to share); `per` is
    the iterations of the nest's innermost statements per value of E (a nest with another
    symbolic loop inside stays parallel). A parallel nest over a static extent with at most
    `serial_work` iterations becomes serial. The serial copy gets fresh definitions (TVM's
    ConvertSSA: a loop variable is defined once per function)."""
    import tvm
    from tvm import s_tir, tirx

    realize = func.body
    block = getattr(realize, "block", None)
    if block is None:
        return func
    nests = list(block.body.seq) if isinstance(block.body, tirx.SeqStmt) else [block.body]
    guarded = [_guard(s, serial_work) for s in nests]
    if all(g is s for g, s in zip(guarded, nests)):
        return func
    body = tirx.SeqStmt(guarded) if len(guarded) > 1 else guarded[0]
    root = s_tir.SBlock(
        block.iter_vars,
        block.reads,
        block.writes,
        block.name_hint,
        body,
        block.init,
        block.alloc_buffers,
        block.match_buffers,
        block.annotations,
    )
    out = func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, root))
    ssa = tvm.get_global_func("s_tir.transform.ConvertSSA")()
    return ssa(tvm.IRModule({"main": out}))["main"]


def _guard(nest: Any, serial_work: int) -> Any:
    """One root nest guarded as `serial_when_small` says, or `nest` itself."""
    from tvm import tirx

    if not isinstance(nest, tirx.For) or nest.kind != tirx.ForKind.PARALLEL:
        return nest
    per = _iterations(nest.body)
    if per is None:
        return nest
    serial = tirx.For(
        nest.loop_var, nest.min, nest.extent, tirx.ForKind.SERIAL, nest.body, None, nest.annotations
    )
    extent = _static(nest.extent)
    if extent is not None:
        return serial if extent * per <= serial_work or extent == 1 else nest
    # one iteration (a decode step's B = 1) has nothing to share: waking the pool is all it does
    small = tirx.Or(nest.extent * per <= serial_work, nest.extent == 1)
    return tirx.IfThenElse(small, serial, nest)


def _iterations(stmt: Any) -> int | None:
    """How many times the innermost statements under `stmt` run per run of `stmt` (vector lanes
    counted), or None when a loop inside has a symbolic extent."""
    from tvm import tirx

    if isinstance(stmt, tirx.For):
        extent = _static(stmt.extent)
        inner = _iterations(stmt.body)
        return None if extent is None or inner is None else extent * inner
    if isinstance(stmt, tirx.SeqStmt):
        counts = [_iterations(s) for s in stmt.seq]
        return None if None in counts else sum(counts)
    if isinstance(stmt, tirx.IfThenElse):
        cases = [_iterations(s) for s in (stmt.then_case, stmt.else_case) if s is not None]
        return None if None in cases else max(cases)
    if hasattr(stmt, "block"):  # a block realised here: its body (loops only above leaf blocks)
        return _iterations(stmt.block.body)
    if hasattr(stmt, "body"):  # let, attribute, allocation around a nest
        return _iterations(stmt.body)
    return 1
