"""DeepSeek-V4 hyper-parameters: the `Config` dataclass, its presets and the HF config reader.

Field names follow the official inference `ModelArgs` where one exists; `Config.from_hf` maps the
Hugging Face `config.json` keys (v4-architecture.md §2.1) onto them. Presets:

    v4-flash, v4-pro   the official models, exact §2.1 values (from_hf(config.json) == preset)
    tiny               every layer type (SWA-only, CSA ratio 4 + indexer, HCA ratio 8), hash and
                       score routing, shared expert, MTP — runs prefill + decode in seconds on a CPU
    tiny-512           the real head geometry (512 = 448 NoPE + 64 RoPE) on two small layers
    small              CPU-benchmark size: head dim 512, window 128, ratios 4 and 128, 32 experts

Attention variants (`attention`; the rest of the block — mHC, MoE, hash routing, MTP — is V4's):

    "csa"   DeepSeek-V4 hybrid CSA/HCA/SWA by `compress_ratios` (models/attention.py; default)
    "dsa"   DeepSeek-V3.2 sparse attention: MLA + lightning indexer over every previous token
            (models/attention_dsa.py). `head_dim` = NoPE + RoPE query/key dims, `kv_lora_rank`
            the latent width, `v_head_dim` the value width.
    "nsa"   Native Sparse Attention, Yuan et al. 2025 (models/attention_nsa.py): compressed,
            selected and sliding-window branches over `n_kv_heads` GQA groups.

Variant presets: tiny-dsa, tiny-nsa (CPU tests), and v4-flash-dsa, v4-pro-dsa, v4-flash-nsa,
v4-pro-nsa: the V4 backbones with the attention swapped (V3.2's MLA/indexer geometry and the NSA
paper's branch geometry) — for parameter counts and compile-only shapes; no such checkpoint exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Config:
    """Model shape and numerics. `compress_ratios` has one entry per main layer plus one per MTP
    layer: 0 = sliding window only, 4 = CSA (overlapping compressor + lightning indexer), any other
    m > 0 = HCA (non-overlapping compressor, every completed block attended). The variants "dsa"
    and "nsa" (module docstring) need every ratio 0; fields a variant does not use are ignored."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window_size: int
    compress_ratios: tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_hash_layers: int
    route_scale: float
    n_shared_experts: int = 1
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0  # YaRN, applied on layers with a compressor only
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    max_seq_len: int = 1048576
    n_mtp_layers: int = 1
    init_std: float = 0.02
    seed: int = 0  # seeds the hash-routing tables (tid2eid); parameters use torch's global RNG
    attention: str = "csa"  # "csa" | "dsa" | "nsa" (module docstring)
    kv_lora_rank: int = 0  # dsa: MLA latent width (V3.2: 512)
    v_head_dim: int = 0  # dsa, nsa: value head width
    n_kv_heads: int = 1  # nsa: GQA groups (one selection per group)
    nsa_cmp_block: int = 32  # nsa: l, tokens per compressed block
    nsa_cmp_stride: int = 16  # nsa: d, stride between compressed blocks (d | l)
    nsa_slc_block: int = 64  # nsa: l', tokens per selection block (d | l')
    nsa_slc_topn: int = 16  # nsa: n, selected blocks incl. the initial one and 2 local ones

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        if self.attention not in ("csa", "dsa", "nsa"):
            raise ValueError(
                f"Config: attention={self.attention!r} is unknown; use 'csa', 'dsa' or 'nsa'"
            )
        checks = self._common_checks() + getattr(self, f"_{self.attention}_checks")()
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Config: {message}")

    def _common_checks(self) -> list[tuple[bool, str]]:
        return [
            (
                len(self.compress_ratios) == self.n_layers + self.n_mtp_layers,
                (
                    f"compress_ratios needs n_layers + n_mtp_layers = "
                    f"{self.n_layers + self.n_mtp_layers} entries, got {len(self.compress_ratios)}"
                ),
            ),
            (all(r >= 0 for r in self.compress_ratios), "compress_ratios must be >= 0"),
            (
                all(r == 0 for r in self.compress_ratios[self.n_layers :]),
                "MTP layers must be sliding-window only (ratio 0)",
            ),
            (self.hc_mult >= 2, f"hc_mult must be >= 2, got {self.hc_mult}"),
            (self.n_mtp_layers in (0, 1), f"n_mtp_layers must be 0 or 1, got {self.n_mtp_layers}"),
            (
                self.rope_head_dim % 2 == 0 and 0 < self.rope_head_dim < self.head_dim,
                "rope_head_dim must be even and smaller than head_dim",
            ),
            (self.n_shared_experts == 1, "exactly one shared expert is supported"),
            (
                0 < self.n_activated_experts <= self.n_routed_experts,
                "n_activated_experts must be in [1, n_routed_experts]",
            ),
            (self.n_hash_layers <= self.n_layers, "n_hash_layers must be <= n_layers"),
        ]

    def _csa_checks(self) -> list[tuple[bool, str]]:
        return [
            (
                self.rope_head_dim <= self.index_head_dim,
                "index_head_dim must hold the rope_head_dim rotated dims",
            ),
            (
                (self.n_heads * self.head_dim) % self.o_groups == 0,
                "n_heads * head_dim must divide into o_groups",
            ),
        ]

    def _variant_checks(self) -> list[tuple[bool, str]]:
        return [
            (
                all(r == 0 for r in self.compress_ratios),
                (
                    f"attention={self.attention!r} needs every compress_ratios entry 0 (the "
                    f"variant selects with its own rule), got {self.compress_ratios}"
                ),
            ),
            (self.v_head_dim > 0, f"attention={self.attention!r} needs v_head_dim > 0"),
        ]

    def _dsa_checks(self) -> list[tuple[bool, str]]:
        return self._variant_checks() + [
            (self.kv_lora_rank > 0, "attention='dsa' needs kv_lora_rank > 0 (the MLA latent)"),
            (
                self.rope_head_dim <= self.index_head_dim,
                "index_head_dim must hold the rope_head_dim rotated dims",
            ),
            (self.index_topk >= 1, f"index_topk must be >= 1, got {self.index_topk}"),
        ]

    def _nsa_checks(self) -> list[tuple[bool, str]]:
        l, d, ls = self.nsa_cmp_block, self.nsa_cmp_stride, self.nsa_slc_block
        return self._variant_checks() + [
            (
                self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
            ),
            (
                0 < d <= l and l % d == 0 and ls % d == 0,
                f"nsa_cmp_stride ({d}) must divide nsa_cmp_block ({l}) and nsa_slc_block ({ls})",
            ),
            (
                self.nsa_slc_topn >= 3,
                f"nsa_slc_topn must be >= 3 (initial + 2 local blocks), got {self.nsa_slc_topn}",
            ),
        ]

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def preset(name: str) -> Config:
        """One of "tiny", "tiny-512", "small", "v4-flash", "v4-pro", and the variants "tiny-dsa",
        "tiny-nsa", "v4-flash-dsa", "v4-pro-dsa", "v4-flash-nsa", "v4-pro-nsa"."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return _PRESETS[name]

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> Config:
        """Read a Hugging Face DeepSeek-V4 config dict: the official `config.json`
        (`compress_ratios`, `num_hash_layers`, `rope_scaling`) or transformers 5.x's
        `DeepseekV4Config.to_dict()` (per-layer `layer_types` with `compress_rates`,
        `mlp_layer_types`, `rope_parameters`). Raises ValueError on settings this model does not
        implement (several KV heads, a KV LoRA, another scoring function, ...)."""
        unsupported = {
            "num_key_value_heads": (hf.get("num_key_value_heads", 1), 1),
            "kv_lora_rank": (hf.get("kv_lora_rank"), None),
            "scoring_func": (hf.get("scoring_func", "sqrtsoftplus"), "sqrtsoftplus"),
            "n_group": (hf.get("n_group"), None),
            "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
            "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(f"Config.from_hf: {key}={got!r} is not supported (need {want!r})")
        rope = hf.get("rope_scaling") or _yarn_parameters(hf)
        return Config(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            head_dim=hf["head_dim"],
            rope_head_dim=hf["qk_rope_head_dim"],
            q_lora_rank=hf["q_lora_rank"],
            o_groups=hf["o_groups"],
            o_lora_rank=hf["o_lora_rank"],
            window_size=hf["sliding_window"],
            compress_ratios=_compress_ratios(hf),
            index_n_heads=hf["index_n_heads"],
            index_head_dim=hf["index_head_dim"],
            index_topk=hf["index_topk"],
            n_routed_experts=hf["n_routed_experts"],
            n_activated_experts=hf["num_experts_per_tok"],
            moe_inter_dim=hf["moe_intermediate_size"],
            n_hash_layers=_hash_layers(hf),
            route_scale=float(hf["routed_scaling_factor"]),
            n_shared_experts=hf["n_shared_experts"],
            swiglu_limit=float(hf["swiglu_limit"]),
            hc_mult=hf["hc_mult"],
            hc_sinkhorn_iters=hf["hc_sinkhorn_iters"],
            hc_eps=float(hf["hc_eps"]),
            norm_eps=float(hf["rms_norm_eps"]),
            rope_theta=float(hf["rope_theta"]),
            compress_rope_theta=float(hf["compress_rope_theta"]),
            rope_factor=float(rope.get("factor", 1.0)),
            original_seq_len=int(rope.get("original_max_position_embeddings", 65536)),
            beta_fast=int(rope.get("beta_fast", 32)),
            beta_slow=int(rope.get("beta_slow", 1)),
            max_seq_len=hf["max_position_embeddings"],
            n_mtp_layers=hf.get("num_nextn_predict_layers", 0),
            init_std=float(hf.get("initializer_range", 0.02)),
        )


_ATTENTION_KINDS = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)


def _compress_ratios(hf: dict[str, Any]) -> tuple[int, ...]:
    """Per-layer compression ratio (0: window only), from either config spelling."""
    if "compress_ratios" in hf:
        return tuple(hf["compress_ratios"])
    rates = hf.get("compress_rates") or {}
    for i, kind in enumerate(hf["layer_types"]):
        if kind not in _ATTENTION_KINDS:
            raise ValueError(
                f"Config.from_hf: layer_types[{i}]={kind!r} is not one of {_ATTENTION_KINDS}"
            )
    mtp = (0,) * hf.get("num_nextn_predict_layers", 0)  # window-only, as the official config
    return tuple(rates.get(kind, 0) for kind in hf["layer_types"]) + mtp


def _hash_layers(hf: dict[str, Any]) -> int:
    """How many leading layers route by token hash, from either config spelling."""
    if "num_hash_layers" in hf:
        return hf["num_hash_layers"]
    kinds = list(hf["mlp_layer_types"])
    n = next((i for i, k in enumerate(kinds) if k != "hash_moe"), len(kinds))
    if "hash_moe" in kinds[n:] or any(k not in ("hash_moe", "moe") for k in kinds):
        raise ValueError(
            f"Config.from_hf: mlp_layer_types={kinds} is not supported (need hash_moe layers "
            "first, then moe layers)"
        )
    return n


def _yarn_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5.x's main RoPE parameters when they are YaRN, else none (factor 1)."""
    main = (hf.get("rope_parameters") or {}).get("main") or {}
    return main if main.get("rope_type") == "yarn" else {}


_V4_COMMON: dict[str, Any] = {
    "vocab_size": 129280,
    "head_dim": 512,
    "rope_head_dim": 64,
    "o_lora_rank": 1024,
    "window_size": 128,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "n_activated_experts": 6,
    "n_hash_layers": 3,
}

_PRESETS: dict[str, Config] = {
    "v4-flash": Config(
        **_V4_COMMON,
        dim=4096,
        n_layers=43,
        n_heads=64,
        q_lora_rank=1024,
        o_groups=8,
        compress_ratios=(0, 0, 4) + (128, 4) * 20 + (0,),
        index_topk=512,
        n_routed_experts=256,
        moe_inter_dim=2048,
        route_scale=1.5,
    ),
    "v4-pro": Config(
        **_V4_COMMON,
        dim=7168,
        n_layers=61,
        n_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
        index_topk=1024,
        n_routed_experts=384,
        moe_inter_dim=3072,
        route_scale=2.5,
    ),
    # Layers: 0 SWA-only (hash), 1 CSA (hash), 2 HCA m=8 (score routing), 3 CSA; MTP SWA-only.
    # Window 8, m' = 8 and top-k 4 make 40..64-token tests wrap the window, emit several entries
    # at both ratios and give the indexer more visible entries than it may pick. 8 index heads
    # (not 4) make exact score ties (every head's ReLU at 0) rare, so top-k picks are stable.
    "tiny": Config(
        vocab_size=128,
        dim=64,
        n_layers=4,
        n_heads=4,
        head_dim=32,
        rope_head_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        window_size=8,
        compress_ratios=(0, 4, 8, 4, 0),
        index_n_heads=8,
        index_head_dim=32,
        index_topk=4,
        n_routed_experts=8,
        n_activated_experts=2,
        moe_inter_dim=32,
        n_hash_layers=2,
        route_scale=1.5,
        max_seq_len=256,
    ),
    "tiny-512": Config(
        vocab_size=128,
        dim=64,
        n_layers=2,
        n_heads=2,
        head_dim=512,
        rope_head_dim=64,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=32,
        window_size=8,
        compress_ratios=(4, 8, 0),
        index_n_heads=4,
        index_head_dim=128,
        index_topk=4,
        n_routed_experts=4,
        n_activated_experts=2,
        moe_inter_dim=32,
        n_hash_layers=1,
        route_scale=1.5,
        max_seq_len=256,
    ),
    "small": Config(
        vocab_size=8192,
        dim=512,
        n_layers=4,
        n_heads=8,
        head_dim=512,
        rope_head_dim=64,
        q_lora_rank=256,
        o_groups=2,
        o_lora_rank=256,
        window_size=128,
        compress_ratios=(4, 128, 4, 128, 0),
        index_n_heads=16,
        index_head_dim=128,
        index_topk=128,
        n_routed_experts=32,
        n_activated_experts=6,
        moe_inter_dim=256,
        n_hash_layers=1,
        route_scale=1.5,
        max_seq_len=8192,
    ),
}

# Attention variants on the V4 backbones (see the module docstring). DSA takes V3.2's attention
# geometry (MLA: 128 NoPE + 64 RoPE query/key dims, latent 512, values 128; indexer 64 × 128,
# top-2048 tokens; YaRN factor 40 over 4096 with mscale² in the softmax scale); NSA the paper's
# §4.1 branch geometry (d_k 192, d_v 128, l = 32, d = 16, l' = 64, n = 16, w = 512, 4 groups on
# Flash's 64 heads; 8 on Pro's 128 heads keeps 16 heads per group).
_DSA: dict[str, Any] = {
    "attention": "dsa",
    "head_dim": 192,
    "kv_lora_rank": 512,
    "v_head_dim": 128,
    "o_groups": 1,
    "index_topk": 2048,
    "rope_factor": 40.0,
    "original_seq_len": 4096,
    "max_seq_len": 163840,
}
_NSA: dict[str, Any] = {
    "attention": "nsa",
    "head_dim": 192,
    "v_head_dim": 128,
    "o_groups": 1,
    "window_size": 512,
    "rope_factor": 1.0,
}


def _variant(base: str, changes: dict[str, Any], **more: Any) -> Config:
    cfg = _PRESETS[base]
    ratios = (0,) * len(cfg.compress_ratios)
    return cfg.replace(compress_ratios=ratios, **changes, **more)


# what tiny-dsa and tiny-nsa share: two small layers, window-only compression, 8 experts
_TINY_VARIANT: dict[str, Any] = {
    "vocab_size": 128,
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "rope_head_dim": 8,
    "q_lora_rank": 32,
    "o_groups": 1,
    "o_lora_rank": 16,
    "window_size": 8,
    "compress_ratios": (0, 0, 0),
    "index_head_dim": 16,
    "n_routed_experts": 8,
    "n_activated_experts": 2,
    "moe_inter_dim": 32,
    "n_hash_layers": 1,
    "route_scale": 1.5,
    "max_seq_len": 256,
    "rope_factor": 1.0,
    "v_head_dim": 16,
}

_PRESETS.update(
    {
        "v4-flash-dsa": _variant("v4-flash", _DSA),
        "v4-pro-dsa": _variant("v4-pro", _DSA),
        "v4-flash-nsa": _variant("v4-flash", _NSA, n_kv_heads=4),
        "v4-pro-nsa": _variant("v4-pro", _NSA, n_kv_heads=8),
        # 16 index heads and 24 = 16 NoPE + 8 RoPE query/key dims; top-6 of up to 48 tokens.
        "tiny-dsa": Config(
            **_TINY_VARIANT,
            head_dim=24,
            index_n_heads=16,
            index_topk=6,
            attention="dsa",
            kv_lora_rank=32,
        ),
        # 2 groups of 2 heads; compressed blocks of 8 every 4 tokens (overlapping), selection
        # blocks of 8, top-5 (initial + 2 local + 2 chosen), window 8: 48..64-token tests make
        # the indexer choose among up to 5 free blocks and wrap the window several times.
        "tiny-nsa": Config(
            **_TINY_VARIANT,
            head_dim=16,
            index_n_heads=1,
            index_topk=1,
            attention="nsa",
            n_kv_heads=2,
            nsa_cmp_block=8,
            nsa_cmp_stride=4,
            nsa_slc_block=8,
            nsa_slc_topn=5,
        ),
    }
)
