"""Reductions over a dimension that is empty for some inputs: the sum of nothing is 0.

A symbolic slice `x[:, : T // 4]` is empty for T < 4 (a prompt shorter than a compression ratio).
TensorIR initialises a reduction on the first iteration of its loop, so an unscheduled init left
the output unwritten (garbage up to 1e38) when the loop ran zero times; each backend must give 0.
"""

import pytest
import torch

import dsv4c


class EmptyPrefixSum(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        return x[:, : t // 4].sum(1) + x.mean(1)


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_sum_over_an_empty_slice_is_zero(backend: str) -> None:
    model = EmptyPrefixSum()
    compiled = dsv4c.compile(
        model, (torch.randn(2, 8, 16),), backend=backend, target="cpu", dynamic={"x": {1: "T"}}
    )
    gen = torch.Generator().manual_seed(0)
    for t in (8, 3, 1, 5, 3):
        x = torch.randn(2, t, 16, generator=gen)
        (got,) = compiled(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
