"""A small TVM plan runs `Plan.reusing`: kernel results in buffers allocated once, a launch's
argument list kept while the same tensors come back, reference views of those buffers kept.
Each test checks the executable against eager after what could make a reused value wrong: a
second call with other data (in place, or new tensors), results the caller still holds, an
operand `aligned` had to copy, a call while another one runs, a plan too large to reuse."""

from __future__ import annotations

import pytest
import torch

import ir

pytest.importorskip("tvm")

F32 = ir.DType.f32


def _exe():
    """h = x @ w.T, g = tanh(h), y = neg(reshape(g)) and z = reshape(sin(h)): h, g and the
    reshape of g live in reused buffers; sin(h) escapes through the output z's reshape."""
    from backends.tvm import TVMBackend

    b = ir.Builder(name="reuse")
    x = b.input("x", ir.TensorType((4, 16), F32))
    w = b.input("w", ir.TensorType((8, 16), F32), role="parameter")
    h = b.op("matmul", [x, b.op("permute", [w], dims=(1, 0))])
    g = b.op("tanh", [h])
    b.output(b.op("neg", [b.op("reshape", [g], shape=(32,))]))
    b.output(b.op("reshape", [b.op("sin", [h])], shape=(32,)))
    return TVMBackend().compile(b.build(), "cpu", blas="never")


def _want(x, w):
    h = x.double() @ w.double().T
    return -torch.tanh(h).reshape(32), torch.sin(h).reshape(32)


def _close(got, want) -> None:
    """f32 against f64 (sin of |h| up to ~10 loses ~1e-6); a stale buffer is off by O(1)."""
    for g, e in zip(got, want, strict=True):
        assert ((g.double() - e).abs().max() / e.abs().max()).item() < 1e-5


def _data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, generator=gen), torch.randn(8, 16, generator=gen)


def test_reused_buffers_follow_new_data_and_results_stay_the_callers() -> None:
    exe = _exe()
    x, w = _data(0)
    first = exe(x, params={"w": w})
    want_first = _want(x, w)
    _close(first, want_first)
    (plan,) = exe.plans.values()
    assert plan.reusing is not None and plan.reused_bytes == 2 * 4 * 8 * 4  # h and g (sin(h) escapes)
    assert exe.report()["reused_bytes"] == plan.reused_bytes
    x.copy_(torch.randn(4, 16))  # the same tensor objects, new data: kept arguments follow it
    second = exe(x, params={"w": w})
    _close(second, _want(x, w))
    _close(first, want_first)  # the first call's results were not overwritten
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, second, strict=True))
    x2, w2 = _data(1)  # new tensor objects: the arguments are made again
    _close(exe(x2, params={"w": w2}), _want(x2, w2))


def test_an_operand_aligned_copies_is_read_again_on_every_call() -> None:
    exe = _exe()
    x, w = _data(2)
    xt = x.T.contiguous().T  # [4, 16], column-major: `aligned` copies it for the kernel
    _close(exe(xt, params={"w": w}), _want(xt, w))
    xt.copy_(torch.randn(4, 16))
    _close(exe(xt, params={"w": w}), _want(xt, w))


def test_a_call_while_the_plan_is_busy_runs_fresh_buffers() -> None:
    """A second thread's call meanwhile (the lock taken here) gets the plan's `calls`."""
    exe = _exe()
    x, w = _data(3)
    first = exe(x, params={"w": w})
    (plan,) = exe.plans.values()
    assert plan._busy.acquire(blocking=False)
    try:
        x2 = torch.randn(4, 16)
        _close(exe(x2, params={"w": w}), _want(x2, w))
    finally:
        plan._busy.release()
    _close(first, _want(x, w))
    _close(exe(x, params={"w": w}), _want(x, w))


def test_a_plan_past_the_byte_limit_reuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.tvm import runtime

    monkeypatch.setattr(runtime, "REUSE_MAX_BYTES", 255)  # h and g take 256
    exe = _exe()
    x, w = _data(4)
    _close(exe(x, params={"w": w}), _want(x, w))
    (plan,) = exe.plans.values()
    assert plan.reusing is None and plan.reused_bytes == 0


def test_plans_holding_buffers_are_dropped_least_recent_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan per batch size (h and g reused: 64·B bytes): past the executable's budget the
    least recently used one goes, and comes back (built again) when its size is called."""
    from backends.tvm import TVMBackend, runtime

    monkeypatch.setattr(runtime, "REUSE_MAX_BYTES", 450)
    b = ir.Builder(name="sizes")
    x = b.input("x", ir.TensorType((ir.sym("B"), 16), F32))
    w = b.input("w", ir.TensorType((8, 16), F32), role="parameter")
    h = b.op("matmul", [x, b.op("permute", [w], dims=(1, 0))])
    b.output(b.op("neg", [b.op("tanh", [h])]))
    exe = TVMBackend().compile(b.build(), "cpu", blas="never")
    w_ = torch.randn(8, 16)

    def run(batch: int) -> list[int]:
        xb = torch.randn(batch, 16)
        (y,) = exe(xb, params={"w": w_})
        torch.testing.assert_close(y, -torch.tanh(xb @ w_.T), rtol=1e-5, atol=1e-5)
        return [dict(k)["B"] for k in exe.plans]

    assert run(2) == [2] and run(3) == [2, 3]  # 128 + 192 bytes
    assert run(4) == [3, 4]  # + 256 passes 450: B = 2 dropped
    assert run(3) == [4, 3]  # most recent last
    assert run(2) == [3, 2]  # built again; B = 4 (least recent) dropped
    assert sum(p.reused_bytes for p in exe.plans.values()) <= 450


def test_a_reshape_that_copies_is_run_on_every_call() -> None:
    """reshape(permute(tanh(x))) copies (the permuted view is not contiguous): a kept copy would
    go stale when x changes in place, so only the view before it is kept."""
    from backends.tvm import TVMBackend

    b = ir.Builder(name="copying")
    x = b.input("x", ir.TensorType((4, 16), F32))
    p = b.op("permute", [b.op("tanh", [x])], dims=(1, 0))
    b.output(b.op("neg", [b.op("reshape", [p], shape=(64,))]))
    exe = TVMBackend().compile(b.build(), "cpu")
    x_ = torch.randn(4, 16)
    for _ in range(2):
        (y,) = exe(x_)
        torch.testing.assert_close(y, -torch.tanh(x_).T.reshape(64), rtol=1e-6, atol=1e-6)
        x_.copy_(torch.randn(4, 16))  # the same tensor object, new data
    (plan,) = exe.plans.values()
    assert plan.reusing is not None
