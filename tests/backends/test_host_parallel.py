"""backends.tvm.host_parallel.parallel_blocks: every block once, on worker threads with torch at
1 thread when torch has several, the caller's thread count given back (also after an error)."""

from __future__ import annotations

import threading

import pytest
import torch

from backends.tvm.host_parallel import parallel_blocks


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_every_block_once_on_one_torch_thread(two_threads) -> None:
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    out = torch.empty(64, 32)
    seen: list[tuple[int, int, int]] = []

    def block(i: int) -> None:
        out[i : i + 8] = x[i : i + 8].exp()
        seen.append((i, torch.get_num_threads(), threading.get_ident()))

    parallel_blocks(range(0, 64, 8), block)
    assert sorted(i for i, _, _ in seen) == list(range(0, 64, 8))
    assert {n for _, n, _ in seen} == {1}
    assert threading.get_ident() not in {t for _, _, t in seen}
    assert torch.equal(out, x.exp())
    assert torch.get_num_threads() == 2


def test_few_blocks_or_one_thread_run_in_the_caller(two_threads) -> None:
    where: list[int] = []
    parallel_blocks(range(3), lambda i: where.append(threading.get_ident()))  # < 2n blocks
    torch.set_num_threads(1)
    parallel_blocks(range(8), lambda i: where.append(threading.get_ident()))
    assert set(where) == {threading.get_ident()} and len(where) == 11


def test_an_error_in_a_block_reaches_the_caller(two_threads) -> None:
    def block(i: int) -> None:
        if i == 5:
            raise ValueError("block 5")

    with pytest.raises(ValueError, match="block 5"):
        parallel_blocks(range(8), block)
    assert torch.get_num_threads() == 2
