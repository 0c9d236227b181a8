"""A toy-sized K-EXAONE: same architecture class and layout, a few million parameters, built offline.

Everything that makes K-EXAONE different from a plain decoder is kept, scaled down:
  * hybrid attention, 3 sliding-window layers then 1 global layer (``layer_types``), repeated twice;
    ExaoneMoe applies RoPE only on the sliding-window layers, so the global layers are NoPE as in the real
    model (this follows from ``sliding_window`` being set; there is no separate config switch);
  * QK-norm (RMSNorm on queries and keys is built into ``ExaoneMoeAttention``; nothing to configure);
  * GQA with 4 query heads sharing 2 key/value heads;
  * the first layer is a dense MLP, every later layer is MoE: 8 routed experts, top-2, sigmoid router with
    a score-correction bias, plus 1 shared expert.
The MTP (multi-token prediction) layer of the real checkpoint is not part of transformers' model, so it is
not part of the tiny one either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM, GenerationConfig

from kexaone_align.errors import KexaoneError
from kexaone_align.models.tokenizer import build_tokenizer

TINY_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 8,
    "layer_types": (["sliding_attention"] * 3 + ["full_attention"]) * 2,
    "sliding_window": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "first_k_dense_replace": 1,
    "intermediate_size": 512,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_shared_experts": 1,
    "moe_intermediate_size": 128,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def tiny_config(vocab_size: int, **overrides: Any) -> ExaoneMoeConfig:
    """The tiny ExaoneMoe configuration for a tokenizer of ``vocab_size`` tokens; keywords override fields."""
    if vocab_size <= 0:
        raise KexaoneError(f"tiny_config: vocab_size must be positive, got {vocab_size}")
    kwargs = {**TINY_ARCHITECTURE, **overrides, "vocab_size": vocab_size}
    n_layers = kwargs["num_hidden_layers"]
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        # Keep the 3:1 pattern when only the depth is changed.
        kwargs["layer_types"] = [
            "full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n_layers)
        ]
    if len(kwargs["layer_types"]) != n_layers:
        raise KexaoneError(
            f"tiny_config: layer_types has {len(kwargs['layer_types'])} entries for {n_layers} layers"
        )
    if kwargs["num_experts_per_tok"] > kwargs["num_experts"]:
        raise KexaoneError("tiny_config: num_experts_per_tok cannot exceed num_experts")
    try:
        return ExaoneMoeConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise KexaoneError(f"tiny_config: invalid ExaoneMoe configuration: {exc}") from exc


def build_tiny_checkpoint(
    out_dir: str | Path, *, seed: int = 0, architecture: dict[str, Any] | None = None
) -> Path:
    """Write a randomly initialised tiny K-EXAONE (model + tokenizer) that loads like a real checkpoint.

    ``architecture`` overrides entries of ``TINY_ARCHITECTURE`` (a ``vocab_size`` larger than the
    tokenizer's pads the embedding). The weights depend only on ``seed`` and the
    architecture (the caller's global RNG state is left untouched). Returns ``out_dir``.
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    overrides = dict(architecture or {})
    vocab_size = overrides.pop("vocab_size", None) or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise KexaoneError(
            f"build_tiny_checkpoint: vocab_size {vocab_size} is smaller than the tiny tokenizer "
            f"({len(tokenizer)} tokens)"
        )
    overrides.update(  # the ids always come from the tokenizer that is saved next to the model
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = tiny_config(vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ExaoneMoeForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
