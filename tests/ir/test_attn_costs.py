"""The cost model's bytes for `attn.sparse_mqa` and `attn.compress_step` (ir/ops/attn.py `cost`)
against the rows one decode query must touch (benchmarks/sparse_bytes.py), at the sparse-scaling
benchmark's CSA geometry (head_dim 512, window 128, ratio 4, top-512, index keys 128, d 256).

Margins: sparse_mqa's cost adds q, the output, sink, cos/sin and the picks to the key rows the
analytic figure counts: within 5 % (measured 1.028 at every L). compress_step's analytic figure
counts the state rows once; the step reads and writes them (x 2) and reads its weights, its
token and one cache row: the cost is exactly that, and flat in L.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import ir
from ir import DType, TensorType
from ir.ops.attn import CompressStep, SparseMQA

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.sparse_bytes import analytic  # noqa: E402
from benchmarks.sparse_scaling import config  # noqa: E402

LENGTHS = (4096, 16384, 65536)
F32, I64 = DType.f32, DType.i64


def t(*shape, dtype: DType = F32) -> TensorType:
    return TensorType(tuple(shape), dtype)


def cost_bytes(op: ir.Op, operands: list[TensorType]) -> int:
    return int(op.cost(operands, list(op.infer_type(*operands))).bytes)


def mqa_decode(variant: str, length: int) -> tuple[SparseMQA, list[TensorType]]:
    """The decode attention of a ratio-4 layer at max_len = length, batch 1."""
    cfg = config("csa", length)
    c, h, w, half = cfg.head_dim, cfg.n_heads, cfg.window_size, cfg.rope_head_dim // 2
    types = [t(1, 1, h, c), t(1, w, c), t(h), t(1, half), t(1, half), t(1, length // 4, c)]
    types += [t(1, 1, cfg.index_topk, dtype=I64)] if variant == "csa" else []
    op = SparseMQA(variant=variant, window=w, ratio=4, scale=c**-0.5, decode=True)
    return op, [*types, t(dtype=I64)]


def step(length: int, c: int) -> tuple[CompressStep, list[TensorType], int]:
    """A ratio-4 overlapping compressor step writing c-wide entries; (op, operands, the bytes
    of its weights wkv and wgate)."""
    cfg = config("csa", length)
    m, d, half = 4, cfg.dim, cfg.rope_head_dim // 2
    state, weight = t(1, 2 * m, 2 * c), t(2 * c, d)
    types = [t(1, 1, d), t(dtype=I64), state, state, weight, weight, t(m, 2 * c), t(c)]
    types += [t(1, half), t(1, half), t(1, length // m, c)]
    return CompressStep(ratio=m, overlap=True), types, 2 * weight.nbytes


@pytest.mark.parametrize("length", LENGTHS)
def test_csa_attention_counts_the_window_and_the_picks(length: int) -> None:
    op, types = mqa_decode("csa", length)
    want = analytic("csa", config("csa", length), length)["attn.sparse_mqa"]
    got = cost_bytes(op, types)
    assert want <= got <= 1.05 * want, (length, got / want)


@pytest.mark.parametrize("length", LENGTHS)
def test_hca_attention_counts_the_visible_entries(length: int) -> None:
    """At position L - 1 every one of the L/4 compressed entries is visible: all are read."""
    op, types = mqa_decode("hca", length)
    cfg = config("csa", length)
    want = (cfg.window_size + length // 4) * cfg.head_dim * 4
    got = cost_bytes(op, types)
    assert want <= got <= 1.05 * want, (length, got / want)


@pytest.mark.parametrize("length", LENGTHS)
def test_compress_step_counts_its_states_weights_and_one_row(length: int) -> None:
    cfg = config("csa", length)
    states = analytic("csa", cfg, length)["attn.compress_step"]
    got = weights = small = 0
    for c in (cfg.head_dim, cfg.index_head_dim):  # the main and the indexer's compressor
        op, types, w = step(length, c)
        got, weights = got + cost_bytes(op, types), weights + w
        # the token, ape, norm, cos/sin, pos, and one cache row read and written
        small += sum(int(x.nbytes) for x in (types[0], types[1], *types[6:10])) + 2 * c * 4
    assert got == 2 * states + weights + small, (length, got, states, weights, small)


def test_compress_step_cost_is_flat_in_the_context() -> None:
    cfg = config("csa", LENGTHS[0])
    costs = {cost_bytes(*step(n, cfg.head_dim)[:2]) for n in LENGTHS}
    assert len(costs) == 1, costs


def test_prefill_csa_reads_each_picked_row_at_most_once() -> None:
    """Prefill: T queries pick k rows each from S entries: min(S, T·k) rows are touched."""
    op = SparseMQA(variant="csa", window=4, ratio=4, scale=1.0)
    b, tt, h, c, s, k = 2, 3, 2, 8, 16, 4
    base = [t(b, tt, h, c), t(b, tt, c), t(h), t(tt, 2), t(tt, 2)]
    rest = sum(int(x.nbytes) for x in base) + b * tt * h * c * 4  # + the output
    few = cost_bytes(op, [*base, t(b, s, c), t(b, tt, k, dtype=I64)])
    assert few == rest + b * tt * k * 8 + b * (tt * k) * c * 4  # 12 of 16 rows
    many = cost_bytes(op, [*base, t(b, s, c), t(b, tt, 2 * s, dtype=I64)])
    assert many == rest + b * tt * 2 * s * 8 + b * s * c * 4  # every row, once
