"""Fuse the compressor's decode step (models/attention.py `Compressor.decode` + the cache write)
into `attn.compress_step`; its rule is one of `fuse_attention`'s.

Matches the canonical form, rooted at the cache update:

    slot    = (pos % m [+ m]);  KVS = index_put(kv_state, slot, x·wkvᵀ);
            ZS  = index_put(score_state, slot, x·wgateᵀ + ape[pos % m])
    pooled  = Σ_rows window(KVS) ⊙ softmax(window(ZS), rows)      window: last m rows, or with
                                                                  overlap [rows :m, ch :c] ++
                                                                  [rows -m:, ch c:]
    entry   = rope(rmsnorm(pooled))
    cache'  = where((pos+1) % m == 0, index_put(cache, min(pos // m, L-1), entry), cache)
    states' = where(emit, repeat(KVS[:, -m:], 2), KVS) with overlap, else KVS

Rule (and counter): `fuse_attention.attn.compress_step`.
"""

from __future__ import annotations

from typing import Any

from ir import Value
from passes.fuse_common import Checks, FusionView, fusion_rule, narrow, replace, rounded, scalar
from passes.fuse_rope import RMS, match_rope
from passes.pattern import Match, const, op, var
from passes.rewrite import Replace, Rewriter

__all__ = ["STEP_RULE", "compress_step"]

CACHE_WRITE = op(
    "where",
    op("eq", op("remainder", op("add", var("pos", rank=0), const(1)), const(name="m")), const(0)),
    op(
        "index_put",
        var("cache", rank=3),
        op("reshape", op("clamp", op("floordiv", var("pos"), const(name="m2")), name="row")),
        var("entry"),
        attrs={"dim": 1, "accumulate": False},
    ),
    var("cache"),
    name="root",
)
POOL = op(
    "sum",
    op("mul", var("kv"), op("softmax", var("z"), attrs={"dim": 1}), commute=True),
    attrs={"dims": (1,), "keepdim": True},
)
KVS = op(
    "index_put",
    var("kv_state", rank=3),
    op("reshape", var("slot", rank=0)),
    op("matmul", var("x", rank=3), op("permute", var("wkv"), attrs={"dims": (1, 0)})),
    attrs={"dim": 1, "accumulate": False},
)
ZS = op(
    "index_put",
    var("score_state", rank=3),
    op("reshape", var("slot", rank=0)),
    op(
        "add",
        op("matmul", var("x"), op("permute", var("wgate"), attrs={"dims": (1, 0)})),
        op("index", var("ape"), op("remainder", op("reshape", var("pos")), const(name="m3"))),
    ),
    attrs={"dim": 1, "accumulate": False},
)
SLOT_OVERLAP = op("add", op("remainder", var("pos"), const(name="m4")), const(name="m5"))
SLOT_PLAIN = op("remainder", var("pos"), const(name="m4"))


def _slice(view: FusionView, v: Value, dim: int) -> tuple[Value, tuple] | None:
    n = view.producer(v)
    if n is None or n.name != "slice" or n.attrs["dim"] != dim or n.attrs["step"] != 1:
        return None
    return n.operands[0], (n.attrs["start"], n.attrs["end"])


def _current(view: FusionView, v: Value, m: int) -> Value | None:
    """The state `s` when v = s[:, -m:] (or s itself when it has m rows)."""
    cut = _slice(view, v, 1)
    if cut is None:
        return v if v.type.shape[1] == m else None
    state, (start, end) = cut
    rows = state.type.shape[1]
    return state if start in (-m, rows - m) and end in (rows, None) else None


def _window(view: FusionView, v: Value, m: int, c: Any, overlap: bool) -> Value | None:
    """The updated state a pooled window reads (module docstring), or None."""
    if not overlap:
        return _current(view, v, m)
    n = view.producer(v)
    if n is None or n.name != "concat" or n.attrs["dim"] != 1 or len(n.operands) != 2:
        return None
    prev_ch, cur_ch = _slice(view, n.operands[0], 2), _slice(view, n.operands[1], 2)
    if prev_ch is None or cur_ch is None or prev_ch[1] != (0, c) or cur_ch[1][0] != c:
        return None
    prev_rows = _slice(view, prev_ch[0], 1)
    state = _current(view, cur_ch[0], m)
    if prev_rows is None or state is None or prev_rows != (state, (0, m)):
        return None
    return state


def _new_state(view: FusionView, state: Value, emit: Value, m: int, overlap: bool):
    """The state value the step returns: the shifted one with overlap, else `state`."""
    if not overlap:
        return state
    for u in view.users(state):
        if u.name != "where" or u.operands[0] != emit or u.operands[2] != state:
            continue
        rep = view.producer(u.operands[1])
        if rep is None or rep.name != "repeat" or tuple(rep.attrs["repeats"]) != (1, 2, 1):
            continue
        if _current(view, rep.operands[0], m) == state:
            return u.results[0]
    return None


def _match_states(c: Checks, kv_w: Value, z_w: Value, m: int, width, overlap: bool):
    view = c.view
    kvs, zs = _window(view, kv_w, m, width, overlap), _window(view, z_w, m, width, overlap)
    what = "overlapping windows" if overlap else "windows"
    c.need(kvs is not None and zs is not None, "state.window",
           f"the pooled rows are not the {what} of the updated states", view.producer(kv_w))
    km = c.match("state.kv", KVS, kvs)
    zm = c.match("state.score", ZS, zs)
    c.need(km["slot"] == zm["slot"] and km["x"] == zm["x"], "state",
           "kv and score states are written at different slots or from different inputs")
    sm = c.match("state.slot", SLOT_OVERLAP if overlap else SLOT_PLAIN, km["slot"])
    ok = scalar(sm, "m4") == m and (not overlap or scalar(sm, "m5") == m)
    c.need(ok and scalar(zm, "m3") == m, "state.slot", f"slots and ape rows are not pos % {m}")
    return km, zm, sm["pos"], zm["pos"]


def compress_step(c: Checks, root: Match, rw: Rewriter) -> Replace:
    """cache = where(emit, cache[row] <- rope(rmsnorm(pool(states after the write))), cache)."""
    view, out = c.view, root.root.results[0]
    cm = c.match("cache_write", CACHE_WRITE, out)
    m = scalar(cm, "m")
    ok = m is not None and m == int(m) and scalar(cm, "m2") == m
    c.need(ok, "cache_write", "the emit test and the row use different ratios")
    m, cache, pos = int(m), cm["cache"], cm["pos"]
    row = cm.node("row").attrs
    c.need(row["min"] is None and row["max"] == cache.type.shape[1] - 1, "cache_write.row",
           "the cache row is not clamped to the cache's last row", cm.node("row"))
    rope = match_rope(c, "entry.rope", cm["entry"], inverse=False)
    normed = rounded(view, rope["x"])
    rm = c.match("entry.rmsnorm", RMS, normed)
    pooled = rounded(view, rm["p"])
    pm = c.match("entry.pool", POOL, pooled)
    rounds = narrow(rope["x"])
    ok = (normed != rope["x"]) == rounds and (pooled != rm["p"]) == rounds
    c.need(ok, "entry.rounding", "pooled/normed entries are rounded iff the entry is narrow")
    width = rm["norm"].type.shape[0]
    overlap = _window(view, pm["kv"], m, width, True) is not None
    km, zm, slot_pos, ape_pos = _match_states(c, pm["kv"], pm["z"], m, width, overlap)
    c.need(slot_pos == ape_pos == pos, "state.pos", "states, ape and cache use other positions")
    emit = root.root.operands[0]
    kv_new = _new_state(view, km.root.results[0], emit, m, overlap)
    z_new = _new_state(view, zm.root.results[0], emit, m, overlap)
    c.need(kv_new is not None and z_new is not None, "state.shift",
           "the states are not shifted by m rows when an entry is emitted")
    operands = [
        km["x"],
        pos,
        km["kv_state"],
        zm["score_state"],
        km["wkv"],
        zm["wgate"],
        zm["ape"],
        rm["norm"],
        rope["cos"],
        rope["sin"],
        cache,
    ]
    attrs = {"ratio": m, "overlap": overlap, "eps": scalar(rm, "eps")}
    replaced = [out, kv_new, z_new]
    c.need(attrs["eps"] is not None, "entry.rmsnorm", "ε is not a constant")
    c.fits("attn.compress_step", operands, attrs, replaced)
    new = rw.op("attn.compress_step", operands, **attrs)
    return replace(view, list(zip(replaced, new)))


# the compressor's decode step: pool the updated window, norm, rope, write the cache row
STEP_RULE = fusion_rule("fuse_attention.attn.compress_step", op("where"), compress_step)
