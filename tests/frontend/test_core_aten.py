"""Composite ops reach the IR through torch's core-ATen decompositions; the core ops they leave
have translators; an op with none still fails with the op, the module path and the source line.
Each capture is interpreted and compared with eager PyTorch."""

from __future__ import annotations

import pytest
import torch

import ir
from frontend import UnsupportedOpError, capture


class _Composite(torch.nn.Module):
    """The composite ops Hugging Face models use (issue 14's list), each in one line."""

    def forward(self, h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate, up = h.chunk(2, dim=-1)
        a, _, c = h.split([3, 3, 2], dim=-1)
        first, second = h.unbind(0)
        top, where = h.max(dim=-1)
        fresh = h.new_zeros(2, 3) + h.new_ones(2, 3) + h.new_full((2, 3), 2.0)
        like = torch.empty_like(h).fill_(1.0) * h
        counts = torch.histc(ids.float(), bins=4, min=0, max=3)
        patched = h.clone()
        patched[:, 1:3] = gate[:, :2]
        return (
            gate * up, a + c[..., :1], first - second, top, where, fresh, like,
            torch.diff(h, dim=-1), h.repeat_interleave(2, dim=0), counts, patched,
        )  # fmt: skip


def test_composite_ops_decompose_and_interpret_like_eager() -> None:
    h = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 3, 3, 1], [2, 3, 0, 0]])
    graph = capture(_Composite(), (h, ids))
    got = ir.interpret(graph, h, ids)
    want = _Composite()(h, ids)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


class _Inner(torch.nn.Module):
    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.grid_sample(x, grid, align_corners=False) + 1


class _Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Inner()

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return self.block(x, grid)


def test_an_aten_op_without_translator_names_op_module_and_line() -> None:
    # (custom ops without a translator stay whole instead: tests/frontend/test_custom_ops.py)
    with pytest.raises(UnsupportedOpError) as info:
        capture(_Outer(), (torch.randn(1, 1, 3, 3), torch.rand(1, 2, 2, 2)))
    err = info.value
    assert err.op == "aten.grid_sampler_2d.default" and err.module_path == "block"
    assert err.source.startswith("test_core_aten.py:")
    assert "grid_sample(x, grid" in str(err)


class _ZeroDim(torch.nn.Module):
    """Reductions over dim 0 / -1 of a 0-d tensor and index_select from one (torch allows both)."""

    def forward(self, x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            x.sum(0, keepdim=True) * 2, x.mean(-1) + 1, x.amax(0) - x.amin(-1),
            torch.index_select(x, 0, i) * 3,
        )  # fmt: skip


def test_zero_dim_reductions_and_index_select_compile_like_eager(monkeypatch) -> None:
    # (both crashed the fusion pipeline: index on a 0-d tensor, a reduction over dim 0 of one)
    import dsv4c

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, i = torch.tensor(1.75), torch.tensor([0])
    compiled = dsv4c.compile(_ZeroDim(), (x, i), backend="triton", target="cpu")
    for got, want in zip(compiled(x, i), _ZeroDim()(x, i), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
