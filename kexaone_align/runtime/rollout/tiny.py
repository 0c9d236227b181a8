"""A tiny K-EXAONE-shaped model for rollout and weight-sync tests on CPU.

Same architecture as the real policy (ExaoneMoe: sliding + global NoPE attention, 8 experts top-2
plus a shared expert) at a size that runs in milliseconds. ``kexaone_align.models`` owns the real
tiny kit with a tokenizer; this one needs no tokenizer because rollouts work on token ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

TINY_VOCAB = 512
TINY_EOS = 2


def tiny_exaone_moe(seed: int = 0) -> ExaoneMoeForCausalLM:
    """Build a randomly initialised 4-layer ExaoneMoe (hidden 64, vocab 512) deterministically."""
    config = ExaoneMoeConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=TINY_EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = ExaoneMoeForCausalLM(config).eval()
    # A spread-out output layer keeps sampling non-degenerate, so top-p actually truncates.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return model


def save_tiny_exaone_moe(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model with ``save_pretrained`` so backends can load it from a path."""
    out = Path(out_dir)
    tiny_exaone_moe(seed).save_pretrained(out)
    return out
