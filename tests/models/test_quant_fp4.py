"""models/quant.py routed experts in FP4 (MXFP4) and FP8: the eager dequantising spelling is exact
(equal to models/weights.py's independent decoder, every e2m1 code and edge scale byte), the
forward is `models.moe.Experts` on the dequantised weights, weights stay compressed in memory, and
bad input is rejected in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.config import Config
from models.moe import Experts
from models.quant import (
    QuantExperts,
    decode_e2m1,
    decode_ue8m0,
    dequantize_fp4_experts,
    dequantize_fp8_experts,
    quantize_experts,
    quantize_fp4_experts,
)
from models.weights import E2M1_VALUES, dequantize_fp4, dequantize_fp8


def _experts(seed: int = 0, d: int = 40, inter: int = 24, e: int = 4) -> Experts:
    cfg = dataclasses.replace(Config.preset("tiny"), dim=d, moe_inter_dim=inter,
                              n_routed_experts=e)
    torch.manual_seed(seed)
    ex = Experts(cfg)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape) * torch.logspace(-2, 1, p.shape[-1]))
    return ex.eval()


def test_e2m1_and_ue8m0_decode_exactly() -> None:
    codes = torch.arange(16, dtype=torch.int32)
    want = torch.cat([E2M1_VALUES, -E2M1_VALUES])
    assert torch.equal(decode_e2m1(codes), want)
    u = torch.tensor([0, 1, 126, 127, 128, 254], dtype=torch.uint8).view(torch.int8)
    exps = torch.tensor([-127, -126, -1, 0, 1, 127])
    assert torch.equal(decode_ue8m0(u), torch.ldexp(torch.ones(6), exps))


def test_fp4_spelling_equals_weights_decoder_on_every_byte() -> None:
    """All 256 bytes (every code pair) under scale bytes 0 (2^-127, subnormal) to 254, with a
    row width (40) that pads its last 32-block."""
    q = (torch.arange(480) % 256).to(torch.uint8).view(torch.int8).view(2, 12, 20)  # 40 columns
    scale_bytes = torch.tensor([0, 1, 100, 127, 140, 254], dtype=torch.uint8)
    s = scale_bytes.repeat(8)[: 2 * 12 * 2].view(2, 12, 2).view(torch.int8)
    got = dequantize_fp4_experts(q, s)
    for e in range(2):
        want = dequantize_fp4(q[e], s[e].view(torch.uint8).view(torch.float8_e8m0fnu))
        assert torch.equal(got[e], want)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_experts_on_dequantised_weights(fmt: str, dtype: torch.dtype) -> None:
    dense = _experts()
    quant = QuantExperts.from_experts(dense, fmt)
    with torch.no_grad():  # the dense module holding the dequantised weights
        for name in ("w1", "w3", "w2"):
            getattr(dense, name).copy_(getattr(quant, name))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 40, generator=gen).to(dtype)
    weights = torch.rand(9, 2, generator=gen) + 0.1
    experts = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    with torch.no_grad():
        assert torch.equal(quant(x, weights, experts), dense.to(dtype)(x, weights, experts))


def test_stored_bytes_and_dequantised_weights() -> None:
    dense = _experts()
    fp4 = QuantExperts.from_experts(dense, "fp4_e2m1")
    assert fp4.w1_q.dtype == torch.int8 and tuple(fp4.w1_q.shape) == (4, 24, 20)
    assert tuple(fp4.w2_scale.shape) == (4, 40, 1) and fp4.w2_scale.dtype == torch.int8
    assert not list(fp4.parameters())  # no dense copy kept
    stored = sum(b.numel() * b.element_size() for b in fp4.buffers())
    assert stored == 3 * 4 * 24 * 40 // 2 + 4 * (24 * 2 * 2 + 40 * 1)  # 0.5 B + scales
    # nearest e2m1 within a 1x32 block: error <= half the top step (1) at scale amax / 6 * 2
    for name in ("w1", "w3", "w2"):
        w, deq = getattr(dense, name).detach(), getattr(fp4, name)
        scale = decode_ue8m0(getattr(fp4, name + "_scale")).repeat_interleave(32, -1)
        assert ((deq - w).abs() <= scale[..., : w.shape[-1]]).all()
    fp8 = QuantExperts.from_experts(dense, "fp8_e4m3")
    assert fp8.w1_q.dtype == torch.float8_e4m3fn and tuple(fp8.w1_scale.shape) == (4, 1, 1)
    assert torch.equal(fp8.w2, dequantize_fp8_experts(fp8.w2_q, fp8.w2_scale))
    assert torch.equal(fp8.w2[1], dequantize_fp8(fp8.w2_q[1], fp8.w2_scale[1]))


def test_quantize_model_replaces_routed_experts_only() -> None:
    from models.deepseek_v4 import Transformer

    model = Transformer(Config.preset("tiny"))
    names = quantize_fp4_experts(model)
    assert names and all(n.endswith("ffn.experts") for n in names)
    assert all(type(model.get_submodule(n)) is QuantExperts for n in names)
    assert type(model.get_submodule(names[0].replace("experts", "shared_experts"))).__name__ == \
        "SharedExpert"
    assert quantize_experts(model, "fp8_e4m3") == []  # nothing dense left to quantise


def test_bad_input_errors() -> None:
    dense = _experts()
    fp4 = QuantExperts.from_experts(dense, "fp4_e2m1")
    stored = {n: getattr(fp4, n) for n in ("w1_q", "w1_scale", "w3_q", "w3_scale", "w2_q")}
    bad = stored | {"w2_scale": torch.zeros(4, 40, 2, dtype=torch.int8)}
    with pytest.raises(ValueError, match=r"w2_scale must be torch.int8 \[4, 40, 1\] \(one per "
                       r"block of w2 \[4, 40, 24\]\), got torch.int8 \[4, 40, 2\]"):
        QuantExperts("fp4_e2m1", 10.0, bad)
    bad = stored | {"w2_scale": fp4.w2_scale.float()}
    with pytest.raises(ValueError, match="w2_scale must be torch.int8"):
        QuantExperts("fp4_e2m1", 10.0, bad)
    with pytest.raises(ValueError, match="format must be one of"):
        quantize_experts(torch.nn.Sequential(), "int4")


def test_checkpoint_experts_requantise_to_their_values(tmp_path) -> None:
    """A checkpoint's FP4 experts, loaded (dequantised) and quantised again by
    `quantize_fp4_experts`, hold exactly the checkpoint's values (models/weights.py docstring)."""
    from models.deepseek_v4 import Transformer
    from models.weights import load_safetensors, save_safetensors

    torch.manual_seed(0)
    saved = Transformer(Config.preset("tiny"))
    save_safetensors(saved, tmp_path / "ckpt.safetensors", fp8=False, fp4_experts=True)
    model = Transformer(Config.preset("tiny"))
    load_safetensors(model, tmp_path / "ckpt.safetensors")
    loaded = {n: m.w1.detach().clone() for n, m in model.named_modules() if type(m) is Experts}
    assert not torch.equal(loaded["layers.0.ffn.experts"], saved.layers[0].ffn.experts.w1)
    quantize_fp4_experts(model)
    for name, w1 in loaded.items():
        assert torch.equal(model.get_submodule(name).w1, w1)
