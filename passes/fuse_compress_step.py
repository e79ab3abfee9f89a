"""Fuse the compressor's decode step (models/attention.py `Compressor.decode` + the cache write)
into `attn.compress_step`; run by `fuse_attention`.

Matches the canonical form, rooted at the cache update:

    slot    = (pos % m [+ m]);  KVS = index_put(kv_state, slot, x·wkvᵀ);
            ZS  = index_put(score_state, slot, x·wgateᵀ + ape[pos % m])
    pooled  = Σ_rows window(KVS) ⊙ softmax(window(ZS), rows)      window: last m rows, or with
                                                                  overlap [rows :m, ch :c] ++
                                                                  [rows -m:, ch c:]
    entry   = rope(rmsnorm(pooled))
    cache'  = where((pos+1) % m == 0, index_put(cache, min(pos // m, L-1), entry), cache)
    states' = where(emit, repeat(KVS[:, -m:], 2), KVS) with overlap, else KVS

Counter: `fuse_attention.attn.compress_step`.
"""

from __future__ import annotations

from typing import Any

from ir import Node, Value
from passes.fuse_attention import RMS, _fits, match_rope
from passes.fuse_common import Fusion, FusionView, narrow, rounded, scalar
from passes.pattern import const, op, var

__all__ = ["fuse_step"]

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


def _match_states(view: FusionView, kv_w: Value, z_w: Value, m: int, c, overlap: bool):
    kvs, zs = _window(view, kv_w, m, c, overlap), _window(view, z_w, m, c, overlap)
    km = kvs and view.match(KVS, kvs)
    zm = zs and view.match(ZS, zs)
    if not km or not zm or km["slot"] != zm["slot"] or km["x"] != zm["x"]:
        return None
    sm = view.match(SLOT_OVERLAP if overlap else SLOT_PLAIN, km["slot"])
    if sm is None or scalar(sm, "m4") != m or (overlap and scalar(sm, "m5") != m):
        return None
    if scalar(zm, "m3") != m:
        return None
    return km, zm, sm["pos"], zm["pos"]


def fuse_step(view: FusionView, root: Node) -> Fusion | None:
    """The `attn.compress_step` fusion rooted at a cache update `where`, or None."""
    cm = view.match(CACHE_WRITE, root.results[0])
    m = cm and scalar(cm, "m")
    if not cm or m is None or m != int(m) or scalar(cm, "m2") != m:
        return None
    m, cache, pos = int(m), cm["cache"], cm["pos"]
    if cm.node("row").attrs["min"] is not None or cm.node("row").attrs["max"] not in (
        cache.type.shape[1] - 1,
    ):
        return None
    rope = match_rope(view, cm["entry"])
    if rope is None or rope["inverse"]:
        return None
    normed = rounded(view, rope["x"])
    rm = view.match(RMS, normed)
    pooled = rm and rounded(view, rm["p"])
    pm = rm and view.match(POOL, pooled)
    rounds = narrow(rope["x"])
    if not pm or (normed != rope["x"]) != rounds or (pooled != rm["p"]) != rounds:
        return None
    c = rm["norm"].type.shape[0]
    for overlap in (True, False):
        found = _match_states(view, pm["kv"], pm["z"], m, c, overlap)
        if found is not None:
            break
    else:
        return None
    km, zm, slot_pos, ape_pos = found
    if not (slot_pos == ape_pos == pos):
        return None
    emit = root.operands[0]
    kv_new = _new_state(view, km.root.results[0], emit, m, overlap)
    z_new = _new_state(view, zm.root.results[0], emit, m, overlap)
    if kv_new is None or z_new is None:
        return None
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
    replaced = [root.results[0], kv_new, z_new]
    if attrs["eps"] is None or not _fits("attn.compress_step", operands, attrs, replaced):
        return None
    return Fusion("attn.compress_step", operands, attrs, replaced, root.loc)
