"""Grouped-query SDPA that hands K/V heads to the kernel unrepeated, for CPU decoding.

transformers' ``sdpa`` attention copies each K/V head ``num_key_value_groups`` times (``repeat_kv``)
whenever a mask is passed, because on CUDA a masked GQA call falls back to the slow math kernel. On CPU
torch's kernel takes ``enable_gqa=True`` with a mask, gives the same numbers, and skips the copy of the
whole KV cache every layer and every decode step (``benchmarks/rollout_decode_paths.py`` measures the
decode path with and without it). Masks are built exactly as for ``sdpa``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.masking_utils import sdpa_mask

GQA_SDPA = "kexaone_gqa_sdpa"


def gqa_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``[b, heads, q, d]`` in, ``[b, q, heads, d]`` out."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=getattr(module, "num_key_value_groups", 1) > 1,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, gqa_sdpa_forward)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


def use_gqa_sdpa(model: PreTrainedModel) -> bool:
    """Switch a model that runs ``sdpa`` on CPU to :data:`GQA_SDPA`; True when it was switched.

    Models on other devices or other kernels (eager, flash) are left alone.
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return False
    model.set_attn_implementation(GQA_SDPA)
    return model.config._attn_implementation == GQA_SDPA
