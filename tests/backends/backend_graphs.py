"""Graphs of a few ops built from example tensors, shared by the backend tests: each test
compiles one with a backend and compares it with `ir.interpret` (the ops' references)."""

from __future__ import annotations

import pytest
import torch

import ir

Nodes = list[tuple[str, list[str], dict]]  # (mnemonic, input names, attrs) per op


def tensor_type(t: torch.Tensor) -> ir.TensorType:
    return ir.TensorType(tuple(t.shape), ir.DType.from_torch(t.dtype))


def graph_of(nodes: Nodes, inputs: dict[str, torch.Tensor], name: str = "semantic") -> ir.Graph:
    """One graph: an input per entry of `inputs`, the `nodes` in order, every result an output."""
    b = ir.Builder(name=name)
    vals = {k: b.input(k, tensor_type(v)) for k, v in inputs.items()}
    outs = []
    for mnemonic, names, attrs in nodes:
        r = b.op(mnemonic, [vals[n] for n in names], **attrs)
        outs.extend(r if isinstance(r, tuple) else (r,))
    b.output(*outs)
    return b.build()


def rope_tables(gen: torch.Generator, rows: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of random angles in [0, 6) rad, [rows, half]."""
    angle = torch.rand(rows, half, generator=gen) * 6.0
    return angle.cos(), angle.sin()


_GUARDED: list = []  # the mappings behind guard_paged tensors stay alive for the session


def check_guard_paged(call, args: list, check, timeout: float = 120.0) -> None:
    """`check(call(*feed))` with every input against an unreadable page on either side, each side
    in a forked child: an out-of-bounds read crashes the child (SIGSEGV), and the test fails saying
    so instead of killing pytest. A child that fails `check` prints its traceback (captured)."""
    import os
    import signal
    import time
    import traceback

    for side in ("before", "after"):
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 0
            torch.set_num_threads(1)  # the parent's OpenMP pool did not survive the fork
            try:
                check(call(*[guard_paged(a, side) for a in args]))
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"inputs guard-paged {side}: no result in {timeout:.0f} s (killed)")
        status = done[1]
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            pytest.fail(f"inputs with an unreadable page {side} them: the kernels died of {name} "
                        "(an out-of-bounds read)")
        if os.WEXITSTATUS(status):
            pytest.fail(f"inputs guard-paged {side}: the results differ (traceback above)")


def guard_paged(t: torch.Tensor, side: str) -> torch.Tensor:
    """A copy of `t` whose bytes start right after (side="before") or end right before
    (side="after", up to the 64-byte alignment kernels need) a page that cannot be read: a kernel
    reading out of bounds on that side crashes instead of reading a neighbour's bytes."""
    import ctypes
    import mmap

    page, n = mmap.PAGESIZE, t.numel() * t.element_size()
    span = -(-max(n, 1) // page) * page
    buf = mmap.mmap(-1, span + 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    for start in (base, base + page + span):  # a locked page on each side
        if libc.mprotect(ctypes.c_void_p(start), page, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = page if side == "before" else page + (span - n) // 64 * 64
    out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
    _GUARDED.append(buf)
    return out.copy_(t)
