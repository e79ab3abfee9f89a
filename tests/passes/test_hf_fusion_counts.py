"""Issue 15's counter tests in one place: the semantic ops the whole pipeline forms on Hugging
Face's models equal those it forms on ours (DeepSeek-V4, same config read by `Config.from_hf`),
and the expected per-layer ops on Mixtral and DeepSeek-V3.2. Interpreting each fused graph equals
HF eager. The per-family tests (test_hf_attention_forms, test_moe_forms, test_hf_hc_forms) cover
spellings, near misses and backends; this one counts every family on the whole model.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest
import torch

import ir
import passes
from frontend import capture

transformers = pytest.importorskip("transformers")
slow = pytest.mark.skipif(not os.environ.get("DSV4C_SLOW"), reason="minutes on 2 cores")
sys.path.insert(0, str(Path(__file__).parents[1] / "frontend"))
import hf_tiny  # noqa: E402

SEMANTIC = ("attn.", "moe.", "hc.")


def semantic_counts(g: ir.Graph) -> dict[str, int]:
    counts = collections.Counter(n.name for n in g.ops if n.name.startswith(SEMANTIC))
    return dict(sorted(counts.items()))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _hf_v4() -> torch.nn.Module:
    """Three layers, one of each attention kind, with compression rates a 16-token prompt fills."""
    cfg = transformers.DeepseekV4Config(
        vocab_size=hf_tiny.VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
        num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
        layer_types=["sliding_attention", "compressed_sparse_attention",
                     "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        mlp_layer_types=["hash_moe", "moe", "moe"], sliding_window=8, o_groups=2,
        o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=4, qk_rope_head_dim=16,
        num_nextn_predict_layers=0, max_position_embeddings=256, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():  # left at random init scale they saturate the softmaxes: keep them tame
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "sinks")):
                p.normal_(0, 0.5)
    return model


def _fused_and_checked(model: torch.nn.Module, ids: torch.Tensor) -> ir.Graph:
    fused = passes.pipeline(capture(model, (ids,)))
    params = {**dict(model.named_buffers()), **model.state_dict()}
    (got,) = ir.interpret(fused, ids, params=params)
    with torch.no_grad():
        want = model(ids).logits
    assert _relative(got, want) <= 1e-5
    return fused


@slow
def test_hf_deepseek_v4_forms_the_semantic_ops_of_ours() -> None:
    from models.config import Config
    from models.deepseek_v4 import Transformer

    hf, ids = _hf_v4(), hf_tiny.tokens(1, 16)
    torch.manual_seed(0)
    ours = Transformer(Config.from_hf(hf.config.to_dict())).eval()
    want = semantic_counts(passes.pipeline(capture(ours, (ids,), method="prefill")))
    # window, CSA (compressor, indexer compressor, indexer), HCA (compressor); hash + score routes
    assert want == {
        "attn.compress": 3, "attn.indexer_topk": 1, "attn.sparse_mqa": 3, "hc.head": 1,
        "hc.post": 6, "hc.pre": 6, "moe.experts": 3, "moe.route": 3,
    }  # fmt: skip
    assert semantic_counts(_fused_and_checked(hf, ids)) == want


@slow
def test_hf_mixtral_forms_one_attention_route_and_experts_per_layer() -> None:
    model = hf_tiny.mixtral()
    got = semantic_counts(_fused_and_checked(model, hf_tiny.tokens(1, 12)))
    layers = model.config.num_hidden_layers
    assert got == {"attn.sdpa": layers, "moe.experts": layers, "moe.route": layers}


@slow
def test_hf_deepseek_v32_forms_its_token_level_indexer() -> None:
    model = hf_tiny.deepseek_v32()  # 16 index heads: no exact ties among the indexer's picks
    got = semantic_counts(_fused_and_checked(model, hf_tiny.tokens(1, 12)))
    layers = model.config.num_hidden_layers
    assert got["attn.indexer_topk"] == layers, got
    assert got["moe.route"] == got["moe.experts"] == 1, got  # one sparse MoE layer (first is dense)
