"""plan_memory writes cache updates in place: it aliases each output that updates a cache input
read by its writer alone (`Graph.aliases`), says why it leaves the others functional, plans no
buffer for aliased outputs, and counts the bytes a call moves with and without the copies."""

from __future__ import annotations

import io

import ir
from passes.context import PassContext
from passes.memory_plan import alias_updates, plan, plan_memory, update_bytes

# window ring (cache, updated at one row), a second cache read twice, an activation updated
STEP = """graph step(
    %ring: f32[B,8,4] cache,
    %seen: f32[B,8,4] cache,
    %act: f32[B,8,4] activation,
    %idx: i64[1] activation,
    %rows: f32[B,1,4] activation,
) {
  %new: f32[B,8,4] = index_put(%ring, %idx, %rows, dim=1, accumulate=false)
  %upd: f32[B,8,4] = index_put(%seen, %idx, %rows, dim=1, accumulate=false)
  %e: f32[B,8,4] = exp(%seen)
  %act2: f32[B,8,4] = index_put(%act, %idx, %rows, dim=1, accumulate=false)
  %s: f32[B,8,4] = add(%new, %e)
  return %s, %new, %upd, %act2
}
"""


def test_only_cache_updates_read_by_their_writer_alone_are_aliased() -> None:
    g, why = alias_updates(ir.parse(STEP))
    assert g.aliases == {1: "ring"}
    assert why == {
        "upd": "%seen is read by other ops than index_put",
        "act2": "index_put updates %act, not a cache input",
    }
    ir.verify(g)
    assert "return %s, %new into %ring, %upd, %act2" in ir.to_text(g)


def test_plan_memory_counts_and_logs_why_not() -> None:
    out = io.StringIO()
    ctx = PassContext(options={"bindings": {"B": 2}}, stats=True, stream=out)
    g = plan_memory(ir.parse(STEP), ctx)
    assert g.aliases == {1: "ring"}
    assert ctx.counters["plan_memory.aliased"] == 1
    assert ctx.counters["plan_memory.not_aliased"] == 2
    assert "output %upd stays functional: %seen is read by other ops than index_put" in (
        out.getvalue()
    )
    result = ctx.products["memory_plan"]
    assert result.aliased_bytes == 2 * 8 * 4 * 4  # %new: f32[2,8,4] lives in the caller's %ring
    assert "new" not in result.assignment  # no planned buffer for it
    assert "upd" in result.assignment


def test_aliases_take_no_planned_buffer() -> None:
    functional = plan(ir.parse(STEP), {"B": 2})
    inplace = plan(alias_updates(ir.parse(STEP))[0], {"B": 2})
    assert functional.no_reuse_bytes - inplace.no_reuse_bytes == 2 * 8 * 4 * 4


def test_update_bytes_counts_rows_or_the_copies() -> None:
    g, _ = alias_updates(ir.parse(STEP))
    moved = update_bytes(g, {"B": 3})
    rows, whole = 3 * 1 * 4 * 4, 3 * 8 * 4 * 4
    assert moved == {"inplace": rows, "functional": rows + 2 * whole}


CSTEP = """graph cstep(
    %x: f32[B,1,8] activation,
    %pos: i64[] activation,
    %kv: f32[B,8,8] cache,
    %sc: f32[B,8,8] cache,
    %wkv: f32[8,8] parameter,
    %wg: f32[8,8] parameter,
    %ape: f32[4,8] parameter,
    %norm: f32[4] parameter,
    %cos: f32[1,1] activation,
    %sin: f32[1,1] activation,
    %cache: f32[B,6,4] cache,
) {
  %c2: f32[B,6,4], %kv2: f32[B,8,8], %sc2: f32[B,8,8] = attn.compress_step(%x, %pos, %kv, %sc,
      %wkv, %wg, %ape, %norm, %cos, %sin, %cache, ratio=4, overlap=true, eps=1e-06)
  return %c2, %kv2, %sc2
}
"""


def test_compress_step_writes_one_cache_row_and_its_states() -> None:
    g, why = alias_updates(ir.verify(ir.parse(CSTEP)))
    assert g.aliases == {0: "cache", 1: "kv", 2: "sc"} and not why
    row, state, cache = 2 * 1 * 4 * 4, 2 * 8 * 8 * 4, 2 * 6 * 4 * 4
    moved = update_bytes(g, {"B": 2})
    assert moved["inplace"] == row + 2 * state
    assert moved["functional"] == row + 2 * state + 2 * (cache + 2 * state)
