"""models/quant.py: FP8Linear equals F.linear on the dequantised weight, keeps 1 byte per weight
element, swaps only the selected bias-free linears, and rejects bad input in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.quant import FP8Linear, quantize_fp8_linears
from models.weights import dequantize_fp8, quantize_fp8


def test_forward_is_linear_on_dequantised_weight() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(200, 130, bias=False)
    q8 = FP8Linear.from_linear(linear)
    assert q8.qweight.dtype == torch.float8_e4m3fn and q8.qweight.element_size() == 1
    q, scale = quantize_fp8(linear.weight.detach())
    deq = dequantize_fp8(q, scale)
    assert torch.equal(q8.weight, deq)
    x = torch.randn(3, 200).bfloat16()
    assert torch.equal(q8(x), F.linear(x.float(), deq).bfloat16())
    # half an e4m3 step: <= 16·scale (top binade [256, 448]), scale < block amax / 224
    assert (deq - linear.weight).abs().max() <= linear.weight.abs().max() / 14


def test_quantize_selected_linears_only() -> None:
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8), nn.Linear(8, 4, bias=False))
    names = quantize_fp8_linears(model, lambda name, m: name != "2")
    assert names == ["0"]
    assert isinstance(model[0], FP8Linear) and type(model[1]) is nn.Linear
    assert type(model[2]) is nn.Linear


def test_bad_input_errors() -> None:
    q = torch.zeros(130, 200).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale for weight \[130, 200\] must be \[2, 2\]"):
        FP8Linear(q, torch.ones(1, 2))
    with pytest.raises(ValueError, match="qweight must be float8_e4m3fn, got torch.bfloat16"):
        FP8Linear(q.bfloat16(), torch.ones(2, 2))
    with pytest.raises(ValueError, match="with a bias are not supported"):
        FP8Linear.from_linear(nn.Linear(4, 4))
