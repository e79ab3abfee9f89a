"""A TVM plan hoists the steps that only view parameters (`Plan.invariant`: a weight's transpose,
its reshapes, constants): run once, kept while the same parameter tensors come back. Each test
checks the executable against eager after what could make kept values stale."""

from __future__ import annotations

import pytest
import torch

import ir

pytest.importorskip("tvm")

F32 = ir.DType.f32


def _exe():
    """y = (x @ w.T) · reshape(v, [1, 8]): two hoistable views of parameters."""
    from backends.tvm import TVMBackend

    b = ir.Builder(name="proj")
    x = b.input("x", ir.TensorType((ir.sym("B"), 16), F32))
    w = b.input("w", ir.TensorType((8, 16), F32), role="parameter")
    v = b.input("v", ir.TensorType((2, 4), F32), role="parameter")
    y = b.op("matmul", [x, b.op("permute", [w], dims=(1, 0))])
    b.output(b.op("mul", [y, b.op("reshape", [v], shape=(1, 8))]))
    return TVMBackend().compile(b.build(), "cpu", blas="auto")


def _want(x, w, v):
    return (x.double() @ w.double().T) * v.double().reshape(1, 8)


def _close(got, want) -> None:
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6


def test_views_of_parameters_are_hoisted_and_follow_the_parameters() -> None:
    gen = torch.Generator().manual_seed(0)
    exe = _exe()
    x = torch.randn(3, 16, generator=gen)
    w, v = torch.randn(8, 16, generator=gen), torch.randn(2, 4, generator=gen)
    (y,) = exe(x, params={"w": w, "v": v})
    _close(y, _want(x, w, v))
    (plan,) = exe.plans.values()
    assert len(plan.invariant) == 2 and plan._seen is not None  # permute(w), reshape(v): kept
    w.copy_(torch.randn(8, 16, generator=gen))  # updated in place: the kept view follows
    (y,) = exe(x, params={"w": w, "v": v})
    _close(y, _want(x, w, v))
    v2 = torch.randn(2, 4, generator=gen)  # another tensor object: the views are made again
    (y,) = exe(x, params={"w": w, "v": v2})
    _close(y, _want(x, w, v2))


def test_a_hoisted_step_that_copies_is_not_kept() -> None:
    """reshape of a non-contiguous parameter copies: its value would go stale when the parameter
    is updated in place, so the plan runs it on every call."""
    gen = torch.Generator().manual_seed(1)
    exe = _exe()
    x = torch.randn(2, 16, generator=gen)
    w = torch.randn(8, 16, generator=gen)
    v = torch.randn(4, 2, generator=gen).T  # [2, 4], not contiguous: reshape copies
    (y,) = exe(x, params={"w": w, "v": v})
    _close(y, _want(x, w, v))
    (plan,) = exe.plans.values()
    assert plan._seen is None  # nothing kept
    v.copy_(torch.randn(2, 4, generator=gen))
    (y,) = exe(x, params={"w": w, "v": v})
    _close(y, _want(x, w, v))


def test_profile_times_the_steps_left_in_the_plan() -> None:
    gen = torch.Generator().manual_seed(2)
    exe = _exe()
    x, w = torch.randn(2, 16, generator=gen), torch.randn(8, 16, generator=gen)
    v = torch.randn(2, 4, generator=gen)
    exe(x, params={"w": w, "v": v})
    exe.profile = True
    try:
        (y,) = exe(x, params={"w": w, "v": v})
    finally:
        exe.profile = False
    _close(y, _want(x, w, v))
    timed = {exe.steps[i].node.name for i in exe.step_times}
    assert timed == {"matmul", "mul"}, timed
