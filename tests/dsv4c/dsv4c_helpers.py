"""Small modules and compiled objects shared by the dsv4c tests (compiled once per session)."""

from __future__ import annotations

import functools

import torch

import dsv4c


class MLP(torch.nn.Module):
    """Not a DeepSeek-V4 module: linear, GELU-free ReLU MLP with a softmax head and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 8)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.norm(x)))).softmax(-1)


@functools.cache
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def x(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed))


@functools.cache
def compiled(backend: str = "reference", target: str = "cpu") -> dsv4c.Compiled:
    return dsv4c.compile(mlp(), (x(),), backend=backend, target=target, dynamic={"x": {0: "B"}})


def eager(inp: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return mlp()(inp)
