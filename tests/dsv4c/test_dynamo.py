"""torch.compile(module, backend="dsv4c"): through the registered name and with options, on a
small non-V4 module and on the tiny DeepSeek-V4 model; each graph really goes through dsv4c."""

from __future__ import annotations

import functools

import pytest
import torch
from dsv4c_helpers import eager, mlp, x

import dsv4c.driver


@pytest.fixture
def compiles(monkeypatch) -> list[str]:
    """Names of the backends dsv4c.compile was called with (the Dynamo backend imports it lazily)."""
    calls: list[str] = []
    real = dsv4c.driver.compile

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend", "reference"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dsv4c.driver, "compile", spy)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


@pytest.mark.parametrize("options", [None, {"backend": "triton", "target": "cpu"}])
def test_small_module(compiles: list[str], options) -> None:
    fn = torch.compile(mlp(), backend="dsv4c", dynamic=False, options=options)
    with torch.no_grad():
        got = fn(x(3))
    torch.testing.assert_close(got, eager(x(3)), rtol=1e-5, atol=1e-6)
    assert compiles == [(options or {}).get("backend", "reference")]


def test_unknown_option_is_an_error(compiles: list[str]) -> None:
    fn = torch.compile(mlp(), backend="dsv4c", dynamic=False, options={"tile": 64})
    with pytest.raises(Exception, match=r"unknown dsv4c option\(s\) \['tile'\]"), torch.no_grad():
        fn(x(3))


@functools.cache
def _tiny():
    from models.deepseek_v4 import Config, Transformer

    torch.manual_seed(0)
    return Transformer(Config.preset("tiny")).eval()


def test_tiny_model(compiles: list[str]) -> None:
    model = _tiny()
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    fn = torch.compile(model, backend="dsv4c", dynamic=False)
    with torch.no_grad():
        got = fn(tokens)
        want = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert compiles and all(b == "reference" for b in compiles)


class _Spectrum(torch.nn.Module):
    """A graph dsv4c cannot compile: an FFT (complex values; the IR has no complex dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x).abs()


def test_fallback_warns_once_per_graph_and_is_counted(compiles, monkeypatch) -> None:
    import dsv4c.dynamo

    monkeypatch.delenv("DSV4C_STRICT", raising=False)
    dsv4c.dynamo.reset_fallbacks()
    fn = torch.compile(_Spectrum(), backend="dsv4c", dynamic=False)
    data = torch.randn(4, 3)
    with pytest.warns(dsv4c.dynamo.EagerFallbackWarning, match="running this graph eagerly"):
        got = fn(data)
    torch.testing.assert_close(got, _Spectrum()(data))
    reasons = dsv4c.dynamo.fallbacks()
    assert len(reasons) == 1 and "complex" in reasons[0].lower() or "fft" in reasons[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", dsv4c.dynamo.EagerFallbackWarning)
        fn(data)  # the same graph again: no second warning, no second count
    assert len(dsv4c.dynamo.fallbacks()) == 1


def test_strict_makes_a_fallback_an_error(compiles, monkeypatch) -> None:
    monkeypatch.setenv("DSV4C_STRICT", "1")
    fn = torch.compile(_Spectrum(), backend="dsv4c", dynamic=False)
    with pytest.raises(Exception, match="DSV4C_STRICT=1 makes this an error"):
        fn(torch.randn(4, 3))


class _Mixed(torch.nn.Module):
    """Two graphs (a graph break between them): an MLP dsv4c compiles, then an FFT it cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        torch._dynamo.graph_break()
        return torch.fft.rfft(h).abs()


def test_report_counts_compiled_and_eager_graphs(compiles, monkeypatch, capsys) -> None:
    import dsv4c.dynamo

    monkeypatch.delenv("DSV4C_STRICT", raising=False)
    dsv4c.dynamo.reset_fallbacks()
    model = _Mixed()
    fn = torch.compile(model, backend="dsv4c", dynamic=False)
    with pytest.warns(dsv4c.dynamo.EagerFallbackWarning), torch.no_grad():
        got = fn(x(3))
    with torch.no_grad():
        torch.testing.assert_close(got, model(x(3)), rtol=1e-5, atol=1e-5)
    r = dsv4c.dynamo.report()
    assert (r["graphs"], r["compiled"], r["eager_fallbacks"]) == (2, 1, 1)
    assert r["fallback_reasons"][0]["graphs"] == 1 and r["launches"] > 0
    assert r["not_compiled"] == {}
    monkeypatch.setenv("STATS", "1")
    dsv4c.dynamo._print_report()  # what STATS=1 prints at exit
    assert "2 graph(s): 1 compiled, 1 ran eagerly" in capsys.readouterr().err
    dsv4c.dynamo.reset_fallbacks()
    assert dsv4c.dynamo.report()["graphs"] == 0
