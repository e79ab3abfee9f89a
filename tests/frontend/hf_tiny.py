"""Tiny random-weight Hugging Face models for the capture tests (no download, fp32).

Each config keeps the model's structure (its attention kind, MoE routing, hash/dense layers) at
the smallest sizes that still exercise it: hidden 32-64, 2 layers, 4-8 experts, vocab 96.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 96


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def deepseek_v4() -> nn.Module:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
        num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe"], sliding_window=8, o_groups=2, o_lora_rank=16,
        index_n_heads=4, index_head_dim=16, index_topk=4, qk_rope_head_dim=16,
        num_nextn_predict_layers=0, max_position_embeddings=256, use_cache=False,
    )  # fmt: skip
    return _seeded(lambda: DeepseekV4ForCausalLM(cfg))


def deepseek_v32() -> nn.Module:
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg = DeepseekV32Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16,
        v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, mlp_layer_types=["dense", "sparse"],
        layer_types=["indexed_attention"] * 2, index_topk=4, index_head_dim=16,
        index_n_heads=16, head_dim=16, max_position_embeddings=256, use_cache=False,
    )  # fmt: skip
    # 16 index heads: a key's score Σ_h w_h·relu(q_h·k) is exactly 0 only when every head's dot is
    # <= 0; with 4, whole rows tie at 0 and two correct top-ks pick different keys
    return _seeded(lambda: DeepseekV32ForCausalLM(cfg))


def mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, use_cache=False,
    )  # fmt: skip
    return _seeded(lambda: MixtralForCausalLM(cfg))


MODELS = {"deepseek_v4": deepseek_v4, "deepseek_v32": deepseek_v32, "mixtral": mixtral}


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
