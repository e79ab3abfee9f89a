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
        (512, 512, 8, True, "tvm"),  # up to 16 rows (DOT_MAX_ROWS): the dot kernel's tiles
        (512, 512, 16, True, "tvm"),
        (512, 512, 17, True, "blas"),  # >= 256 KFLOP and 17 rows: MKL reuses the weight row
        (512, 504, 2, True, "blas"),  # K not a multiple of 16: the tiles, not the dots
        (512, 512, 1, False, "blas"),  # nn from 256 KFLOP, one row too
        (32, 128, 4, True, "tvm"),  # 32 KFLOP: the kernel
        (32, 128, 4, False, "tvm"),
        (2048, 1024, 1, True, "tvm"),  # 4 MFLOP, one row on the weight as stored: the dots
        (2048, 1024, 1, False, "blas"),  # 4 MFLOP nn: BLAS whatever the rows
        (2048, 1024, 32, True, "blas"),
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


@pytest.mark.parametrize("dtype", [ir.DType.f32, ir.DType.bf16])
@pytest.mark.parametrize("n", [64, 30])  # tiles of 4 weight rows; 30: one row at a time
@pytest.mark.parametrize("m", [1, 3, 16])
def test_grouped_skinny_matmul_runs_the_dot_kernel(dtype, n, m) -> None:
    """o[g, m, :] = x[g, m, :] @ w[g].T (the grouped o-projection's spelling, weight row-major):
    up to 16 rows per group it is the dot kernel, equal to eager in f64."""
    from backends.tvm import TVMBackend

    k, g = 128, 2
    b = ir.Builder(name="grouped")
    x = b.input("x", ir.TensorType((g, ir.sym("M"), k), dtype))
    w = b.input("w", ir.TensorType((g, n, k), dtype), role="parameter")
    b.output(b.op("matmul", [x, b.op("permute", [w], dims=(0, 2, 1))]))
    exe = TVMBackend().compile(b.build(), "cpu", blas="auto")
    gen = torch.Generator().manual_seed(m * 100 + n)
    wt = torch.randn(g, n, k, generator=gen).to(dtype.to_torch())
    xt = torch.randn(g, m, k, generator=gen).to(dtype.to_torch())
    (y,) = exe(xt, params={"w": wt})
    want = xt.double() @ wt.double().mT
    tol = 1e-6 if dtype == ir.DType.f32 else 1e-2  # bf16: the output's rounding
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < tol
    calls = [s.launch.calls for s in exe.steps if s.launch is not None and s.launch.calls]
    assert [set(c) for c in calls] == [{"tvm"}], calls


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_decode_projection_rows_share_the_weight_tile(batch) -> None:
    """y[b, 0, :] = x[b, 0, :] @ w.T, x [B, 1, K] as in decode: the B rows are rows of one weight
    (the dot kernel up to 16 of them), equal to eager in f64."""
    from backends.tvm import TVMBackend

    n, k = 40, 64
    b = ir.Builder(name="proj")
    x = b.input("x", ir.TensorType((ir.sym("B"), 1, k), F32))
    w = b.input("w", ir.TensorType((n, k), F32), role="parameter")
    b.output(b.op("matmul", [x, b.op("permute", [w], dims=(1, 0))]))
    exe = TVMBackend().compile(b.build(), "cpu", blas="auto")
    gen = torch.Generator().manual_seed(batch)
    wt, xt = torch.randn(n, k, generator=gen), torch.randn(batch, 1, k, generator=gen)
    (y,) = exe(xt, params={"w": wt})
    want = xt.double() @ wt.double().T
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    calls = [s.launch.calls for s in exe.steps if s.launch is not None and s.launch.calls]
    assert [set(c) for c in calls] == [{"tvm"}], calls
