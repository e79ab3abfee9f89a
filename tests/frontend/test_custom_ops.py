"""Custom ops (`torch.library`) through capture: a registered translator wins, then a registered
decomposition (CompositeImplicitAutograd or `torch._decomp`), else the op stays whole as
`custom.call` running its own implementation (not compiled, said by STATS=1 and the report). A
custom op that mutates its inputs names op, module and line. Each result is checked against eager.
"""

from __future__ import annotations

import pytest
import torch
from torch._decomp import register_decomposition

import ir
from frontend import UnsupportedOpError, capture, translates

_LIB = torch.library.Library("dsv4c_t14", "FRAGMENT")


@torch.library.custom_op("dsv4c_t14::scale_rows", mutates_args=())
def _scale_rows(x: torch.Tensor, w: torch.Tensor, k: int, dims: list[int]) -> torch.Tensor:
    # deliberately something no translator knows: a per-row scale, then a sum over `dims`
    return (x * w[:, None] * k).sum(dim=dims, keepdim=True)


@_scale_rows.register_fake
def _(x, w, k, dims):
    return x.sum(dim=dims, keepdim=True)


@torch.library.custom_op("dsv4c_t14::pair", mutates_args=())
def _pair(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:n].clone() * 2, x.flip(0).clone()


@_pair.register_fake
def _(x, n):
    return x.new_empty((n, *x.shape[1:])), torch.empty_like(x)


@torch.library.custom_op("dsv4c_t14::decomposed", mutates_args=())
def _decomposed(x: torch.Tensor) -> torch.Tensor:
    return torch.cos(x) + 1


@_decomposed.register_fake
def _(x):
    return torch.empty_like(x)


@register_decomposition(torch.ops.dsv4c_t14.decomposed.default)
def _decomposed_decomp(x):
    return torch.cos(x) + 1


_LIB.define("implicit(Tensor x) -> Tensor")
_LIB.impl("implicit", lambda x: torch.sin(x) * 2, "CompositeImplicitAutograd")


@torch.library.custom_op("dsv4c_t14::translated", mutates_args=())
def _translated(x: torch.Tensor) -> torch.Tensor:
    return x.exp()


@_translated.register_fake
def _(x):
    return torch.empty_like(x)


@translates("dsv4c_t14::translated")
def _translate_exp(cx, x):
    return cx.op("exp", x)


@torch.library.custom_op("dsv4c_t14::in_place", mutates_args=("x",))
def _in_place(x: torch.Tensor) -> None:
    x.mul_(2)


@_in_place.register_fake
def _(x):
    return None


class _Opaque(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dsv4c_t14.scale_rows(x, self.w, 3, [1]).relu() + 1


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _params(m: torch.nn.Module) -> dict:
    return dict(m.state_dict())


def test_an_opaque_custom_op_stays_whole_and_runs_its_implementation() -> None:
    m, x = _Opaque(), _x(4, 5)
    g = capture(m, (x,))
    calls = [n for n in g.ops if n.name == "custom.call"]
    assert len(calls) == 1 and calls[0].attrs["target"] == "dsv4c_t14::scale_rows.default"
    assert calls[0].loc.source.startswith("test_custom_ops.py:")
    assert ir.parse(ir.to_text(g)) == g  # the call survives the text form
    got = ir.interpret(g, x, params=_params(m))[0]
    torch.testing.assert_close(got, m(x), rtol=0, atol=0)


def test_opaque_custom_op_with_two_results_and_a_symbolic_size() -> None:
    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = torch.ops.dsv4c_t14.pair(x, x.shape[0] // 2)
            return a + 1, b * b

    g = capture(Pair(), (_x(6, 3),), dynamic={"x": {0: "T"}})
    (call,) = [n for n in g.ops if n.name == "custom.call"]
    assert str(call.results[0].type.shape[0]) == "floor(T/2)"
    for t in (6, 9):
        x = _x(t, 3)
        for got, want in zip(ir.interpret(g, x), Pair()(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_registered_decompositions_replace_the_custom_op() -> None:
    class Both(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.dsv4c_t14.decomposed(x) * torch.ops.dsv4c_t14.implicit(x)

    x = _x(3, 4)
    g = capture(Both(), (x,))
    names = {n.name for n in g.ops}
    assert "custom.call" not in names and {"cos", "sin"} <= names, names
    torch.testing.assert_close(ir.interpret(g, x)[0], Both()(x), rtol=1e-6, atol=1e-6)


def test_a_user_translator_wins_over_keeping_the_op_whole() -> None:
    class Exp(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.dsv4c_t14.translated(x)

    x = _x(5)
    g = capture(Exp(), (x,))
    assert [n.name for n in g.ops] == ["exp"]
    torch.testing.assert_close(ir.interpret(g, x)[0], x.exp())


def test_a_mutating_custom_op_names_op_module_and_line() -> None:
    class Inner(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.clone()
            torch.ops.dsv4c_t14.in_place(y)
            return y

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    with pytest.raises(UnsupportedOpError) as info:
        capture(Outer(), (_x(3),))
    err = info.value
    assert "dsv4c_t14::in_place" in err.op and "mutates" in err.op
    assert err.module_path == "block" and err.source.startswith("test_custom_ops.py:")
    assert "mutates_args=()" in str(err)


def test_stats_prints_the_custom_ops_that_were_not_compiled(monkeypatch, capsys) -> None:
    monkeypatch.setenv("STATS", "1")
    capture(_Opaque(), (_x(4, 5),))
    err = capsys.readouterr().err
    assert "not compiled" in err and "dsv4c_t14::scale_rows.default x1" in err


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_backends_run_the_custom_op_and_the_report_says_not_compiled(
    backend: str, monkeypatch
) -> None:
    import dsv4c

    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    m, x = _Opaque(), _x(4, 5)
    compiled = dsv4c.compile(m, (x,), backend=backend, target="cpu")
    torch.testing.assert_close(compiled(x)[0], m(x), rtol=1e-6, atol=1e-6)
    entry = next(iter(compiled.report()["entries"].values()))
    row = entry["not_compiled"]["dsv4c_t14::scale_rows.default"]
    assert row["count"] == 1 and row["locations"][0].startswith("<root> (test_custom_ops.py:")
    from dsv4c.report_html import render

    page = render(compiled.manifest, compiled.report())
    assert "<h3>Not compiled (run eagerly)</h3>" in page
    assert "<td>dsv4c_t14::scale_rows.default</td>" in page


def test_torch_compile_keeps_the_custom_op_whole_without_falling_back(monkeypatch) -> None:
    import dsv4c.dynamo

    monkeypatch.setenv("DSV4C_STRICT", "1")
    torch._dynamo.reset()
    dsv4c.dynamo.reset_fallbacks()
    m, x = _Opaque(), _x(4, 5)
    try:
        with torch.no_grad():
            got = torch.compile(m, backend="dsv4c", dynamic=False)(x)
            torch.testing.assert_close(got, m(x), rtol=1e-6, atol=1e-6)
        r = dsv4c.dynamo.report()
    finally:
        torch._dynamo.reset()
    assert (r["compiled"], r["eager_fallbacks"]) == (1, 0)
    assert r["not_compiled"]["dsv4c_t14::scale_rows.default"]["count"] == 1
