"""The TVM matmul launch's BLAS policy ("auto"): which GEMMs call torch.matmul and which run the
TVM kernel, per layout and size (backends.tvm.emitters.MatmulLaunch), each result = eager."""

from __future__ import annotations

import pytest
import torch

import ir

pytest.importorskip("tvm")

F32 = ir.DType.f32


def _exe(n: int, k: int, transposed: bool):
    """y = x @ w.T (w [n, k] row-major: the nt kernel) or x @ v (v [k, n]: nn), M symbolic."""
    from backends.tvm import TVMBackend

    b = ir.Builder(name="mm")
    x = b.input("x", ir.TensorType((ir.sym("M"), k), F32))
    if transposed:
        w = b.input("w", ir.TensorType((n, k), F32), role="parameter")
        b.output(b.op("matmul", [x, b.op("permute", [w], dims=(1, 0))]))
    else:
        w = b.input("w", ir.TensorType((k, n), F32), role="parameter")
        b.output(b.op("matmul", [x, w]))
    return TVMBackend().compile(b.build(), "cpu", blas="auto")


@pytest.mark.parametrize(
    "n, k, m, transposed, impl",
    [
        (512, 512, 1, True, "tvm"),  # one-row GEMV on a row-major weight: the dot kernel
        (512, 512, 2, True, "blas"),  # >= 256 KFLOP and 2 rows: MKL reuses the weight row
        (512, 512, 8, True, "blas"),
        (512, 512, 1, False, "blas"),  # nn from 256 KFLOP, one row too
        (32, 128, 4, True, "tvm"),  # 32 KFLOP: the kernel
        (32, 128, 4, False, "tvm"),
        (2048, 1024, 1, True, "blas"),  # 4 MFLOP: BLAS whatever the rows
    ],
)
def test_auto_policy_picks_by_size_rows_and_layout(n, k, m, transposed, impl) -> None:
    gen = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=gen) if transposed else torch.randn(k, n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    exe = _exe(n, k, transposed)
    (y,) = exe(x, params={"w": w})
    want = x.double() @ (w.double().T if transposed else w.double())
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    calls = [s.launch.calls for s in exe.steps if s.launch is not None and s.launch.calls]
    assert [set(c) for c in calls] == [{impl}], calls
