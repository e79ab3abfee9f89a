"""Comparisons of boolean tensors and logical ops with a 0-d float operand, on both backends.

Found by the OpInfo sweep: TVM vectorised `!=` on two bool tensors into a float compare of i1
vectors (LLVM refused the module), and Triton's logical_and/or on a broadcast 0-d float applied a
bitwise op to floats. Each must equal eager.
"""

import pytest
import torch

import dsv4c


class BoolCompares(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pa, pb = a > 0, b > 0
        return (
            (pa != pb).float()
            + 2 * (pa == pb).float()
            + 4 * (pa < pb).float()
            + 8 * torch.logical_xor(a > 0.5, b > -0.5).float()
        )


class LogicalWithScalar(torch.nn.Module):
    def forward(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.logical_and(a, s).float() + 2 * torch.logical_or(a, s * 0).float()


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_comparisons_of_bool_tensors(backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 33, generator=gen), torch.randn(4, 33, generator=gen)
    a[0, :5] = 0.0  # exact zeros: a > 0 is false there
    compiled = dsv4c.compile(BoolCompares(), (a, b), backend=backend, target="cpu")
    (got,) = compiled(a, b)
    torch.testing.assert_close(got, BoolCompares()(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_logical_ops_with_a_zero_dim_float(backend: str) -> None:
    a = torch.tensor([[0.0, 1.5, -2.0, 0.0], [3.0, 0.0, 0.25, -1.0]])
    for s in (torch.tensor(0.0), torch.tensor(-0.5)):
        compiled = dsv4c.compile(LogicalWithScalar(), (a, s), backend=backend, target="cpu")
        (got,) = compiled(a, s)
        torch.testing.assert_close(got, LogicalWithScalar()(a, s), rtol=0, atol=0)


class SquareThenProduct(torch.nn.Module):
    """0-d ops stay single-op kernels: mul(x, x) (one kernel input) and mul(x, y) (two)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        q = a / b
        return torch.atan2(a, b) + (q * q) * (q * a)


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_an_op_with_a_repeated_operand_keeps_its_own_kernel(backend: str) -> None:
    a, b = torch.tensor(0.5), torch.tensor(-1.5)
    compiled = dsv4c.compile(SquareThenProduct(), (a, b), backend=backend, target="cpu")
    for x, y in ((a, b), (torch.tensor(-2.0), torch.tensor(0.25))):
        (got,) = compiled(x, y)
        torch.testing.assert_close(got, SquareThenProduct()(x, y), rtol=1e-6, atol=1e-6)
