"""The real K-EXAONE-236B-A23B shape, for planning without downloading the checkpoint.

Taken from the published model card (transformers' EXAONE MoE page): hidden 6144; 48 main layers as
12 x (3 sliding-window + 1 global); 64 query / 8 key-value heads of dim 128; window 128; 128 routed experts,
top-8, 1 shared, expert width 2048; first layer dense with width 18432; vocabulary 153,600; 256K context.
Fields the card does not state (rope base, router scaling, special token ids) are transformers' defaults;
they change no parameter count. The MTP layer is not modelled by transformers and is not counted.
"""

from __future__ import annotations

from typing import Any

from transformers import ExaoneMoeConfig

K_EXAONE_236B_ARCHITECTURE: dict[str, Any] = {
    "vocab_size": 153600,
    "hidden_size": 6144,
    "num_hidden_layers": 48,
    "layer_types": (["sliding_attention"] * 3 + ["full_attention"]) * 12,
    "sliding_window": 128,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "first_k_dense_replace": 1,
    "intermediate_size": 18432,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 2048,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
}


def k_exaone_236b_config(**overrides: Any) -> ExaoneMoeConfig:
    """ExaoneMoeConfig of K-EXAONE-236B-A23B (build it with ``meta_model`` to plan; never materialise it)."""
    return ExaoneMoeConfig(**{**K_EXAONE_236B_ARCHITECTURE, **overrides})
