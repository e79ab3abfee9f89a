"""The TVM CPU runtime's threads (issue 19), against the interpreter.

- TVM's pool runs as many threads as torch (`torch.get_num_threads()` at the call), or
  `exe.threads`, or `$TVM_NUM_THREADS` when set;
- inside a call torch is held at 1 thread, except around steps with the work to use more
  (`torch_heavy`: a BLAS GEMM of at least 2^30 flops), and gets its threads back after;
- the CPU schedule's runtime guard runs a parallel nest serially when its total work at the
  call's B is small: both sides give the interpreter's results.
"""

from __future__ import annotations

import pytest
import torch

import ir

pytest.importorskip("tvm")

from backends.tvm import TVMBackend
from backends.tvm.runtime import pool_threads, use_threads
from backends.tvm.schedule_cpu import SERIAL_WORK, serial_when_small

F32 = ir.DType.f32
B = ir.sym("B")


@pytest.fixture
def two_torch_threads():
    """torch at 2 threads for the test (the hold only acts when the caller has more than 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _pool() -> int:
    import tvm

    return tvm.get_global_func("runtime.NumThreads")()


def _rows_graph() -> ir.Graph:
    """x * rsqrt(mean(x * x)) over rows of 512: elementwise and reduction nests parallel over B."""
    b = ir.Builder(name="rows")
    x = b.input("x", ir.TensorType((B, 1, 512), F32))
    ms = b.op("mean", [b.op("mul", [x, x])], dims=[2], keepdim=True)
    b.output(b.op("mul", [x, b.op("rsqrt", [ms])]))
    return b.build()


def _matmul_graph() -> ir.Graph:
    b = ir.Builder(name="gemm")
    x = b.input("x", ir.TensorType((B, 1024), F32))
    w = b.input("w", ir.TensorType((1024, 1024), F32))
    b.output(b.op("matmul", [x, w]))
    return b.build()


def test_pool_follows_torch_threads_threads_option_and_env(two_torch_threads, monkeypatch):
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    g = _rows_graph()
    exe = TVMBackend().compile(g, "cpu")
    x = torch.randn(3, 1, 512)
    exe(x)
    assert pool_threads() == 2 and _pool() == 2
    assert exe.report()["threads"] == 2
    exe.threads = 1
    exe(x)
    assert _pool() == 1
    exe.threads = None
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    exe(x)
    assert _pool() == 1
    monkeypatch.setenv("TVM_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="TVM_NUM_THREADS must be a positive integer"):
        exe(x)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        TVMBackend().compile(g, "cpu", threads=0)
    with pytest.raises(ValueError, match="TVM threads must be a positive int"):
        use_threads(0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 128])  # 1 x 512 runs serially, 128 x 512 in parallel
def test_results_equal_interpreter_on_both_sides_of_the_guard(threads, batch):
    g = _rows_graph()
    exe = TVMBackend().compile(g, "cpu", threads=threads)
    x = torch.randn(batch, 1, 512, generator=torch.Generator().manual_seed(batch)) + 0.1
    (got,) = exe(x)
    (want,) = ir.interpret(g, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _pool() == threads


def test_runtime_guard_in_the_schedule():
    """A parallel nest over symbolic B: `if B * per <= SERIAL_WORK or B == 1` serial, else
    parallel; a static nest of little work, or of one iteration: serial, no guard."""
    from tvm import te

    from backends.tvm.schedule_cpu import schedule_cpu

    n = te.var("B")
    x = te.placeholder((n, 512), "float32", name="x")
    y = te.compute((n, 512), lambda i, j: x[i, j] * 2.0, name="y")
    func = schedule_cpu(te.create_prim_func([x, y]).with_attr("global_symbol", "double"))
    text = func.script()
    assert f"if B * 512 <= {SERIAL_WORK} or B == 1:" in text and "else:" in text
    assert text.count("T.parallel(B)") == 1 and "for i, j_0 in T.grid(B, 32):" in text
    assert serial_when_small(func) is func  # a guarded nest is not guarded again

    xs = te.placeholder((16, 512), "float32", name="x")
    ys = te.compute((16, 512), lambda i, j: xs[i, j] * 2.0, name="y")
    static = schedule_cpu(te.create_prim_func([xs, ys]).with_attr("global_symbol", "double16"))
    assert "T.parallel" not in static.script() and "if " not in static.script()

    x1 = te.placeholder((1, 1 << 16), "float32", name="x")  # much work, one row: nothing to share
    y1 = te.compute((1, 1 << 16), lambda i, j: x1[i, j] * 2.0, name="y")
    one = schedule_cpu(te.create_prim_func([x1, y1]).with_attr("global_symbol", "double1"))
    assert "T.parallel" not in one.script()


def test_torch_held_at_one_thread_except_heavy_steps(two_torch_threads, monkeypatch):
    """torch.matmul (blas="always") sees 1 thread for a decode-sized GEMM, the caller's 2 for a
    GEMM of 2^30 flops; torch has its 2 threads back after the call; "always" never holds."""
    seen: list[int] = []
    real = torch.matmul

    def matmul(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(torch, "matmul", matmul)
    g = _matmul_graph()
    exe = TVMBackend().compile(g, "cpu", blas="always")
    w = torch.randn(1024, 1024)
    for batch in (1, 512):  # 2 * 512 * 1024 * 1024 flops = 2^30: heavy
        x = torch.randn(batch, 1024)
        (got,) = exe(x, w)
        torch.testing.assert_close(got, real(x, w))
    assert seen == [1, 2]
    assert torch.get_num_threads() == 2
    exe.torch_parallel = "always"  # torch keeps its threads, heavy steps or not
    for batch in (1, 512):
        exe(torch.randn(batch, 1024), w)
    assert seen[-2:] == [2, 2] and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="torch_parallel must be one of"):
        TVMBackend().compile(g, "cpu").__class__(g, exe.target, torch_parallel="never")


def test_torch_threads_restored_when_a_call_raises(two_torch_threads, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "matmul", broken)
    exe = TVMBackend().compile(_matmul_graph(), "cpu", blas="always")
    with pytest.raises(RuntimeError, match="boom"):
        exe(torch.randn(1, 1024), torch.randn(1024, 1024))
    assert torch.get_num_threads() == 2


def test_a_child_forked_after_a_parallel_call_runs_serially(two_torch_threads):
    """The pool's workers stay in the parent: the child's call must neither wait for them nor
    differ (it runs on 1 thread)."""
    import os
    import time

    g = _rows_graph()
    exe = TVMBackend().compile(g, "cpu")
    x = torch.randn(128, 1, 512) + 0.1
    exe(x)
    assert _pool() == 2
    (want,) = ir.interpret(g, x)
    pid = os.fork()
    if pid == 0:  # the child, torch still at 2 threads (the pool would follow)
        code = 1
        try:
            (got,) = exe(x)
            torch.set_num_threads(1)  # torch's own OpenMP pool did not survive the fork either
            code = 0 if torch.allclose(got, want, rtol=1e-5, atol=1e-5) and _pool() == 1 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's TVM call hung (waiting for the parent's pool workers)")
    assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0
