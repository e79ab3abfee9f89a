"""The groups `passes.fuse_elementwise` forms run in the Triton backend (CPU interpreter): random
DAGs of elementwise, broadcast, reduction, view, GEMM and opaque ops, fused, compiled, and
compared with the reference interpreter on the unfused graph. Every fused.kernel launches
generated code (no fallback)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import ir
from backends.triton import TritonBackend
from passes.fuse_elementwise import fuse_elementwise

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "passes"))
from passes_helpers import random_inputs
from test_passes_fuse_elementwise import random_graph


def close(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal up to fp32 reassociation, relative to the finite values (random chains of exp
    overflow; where the reference is inf/nan the kernel may round differently)."""
    finite = torch.isfinite(want)
    if not finite.any():
        return True
    scale = max(1.0, want[finite].abs().max().item())
    return (want[finite] - got[finite]).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("seed", range(12))
def test_random_fused_groups_equal_the_reference(seed: int) -> None:
    g = random_graph(seed, n_ops=40)
    fused = fuse_elementwise(g)
    exe = TritonBackend().compile(fused, "cpu")
    assert "fused.kernel" not in {op for op, _ in exe.fallbacks()}, exe.fallbacks()
    inputs = random_inputs(g, seed, sizes={"T": 5})
    for want, got in zip(ir.interpret(g, *inputs), exe(*inputs)):
        assert want.shape == got.shape and close(want, got), f"seed {seed}\n{ir.to_text(fused)}"
