"""Temperature + nucleus (top-p) processing and per-sample seeding, shared by the hf backend and tests.

The log-probs returned here are those of the distribution a token is actually drawn from, which
is what AGAPO's importance ratio needs as the "old policy" probability.
"""

from __future__ import annotations

import hashlib

import torch


def processed_logprobs(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int = -1
) -> torch.Tensor:
    """Log-probs after temperature, top-k, then top-p filtering and renormalisation (-inf where removed).

    The nucleus is the smallest set of most-likely tokens whose probability mass reaches ``top_p``;
    ``top_p == 1`` and ``top_k == -1`` keep the whole vocabulary, so the result is the plain
    ``log_softmax(logits / T)``.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if 0 < top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
    probs = sorted_logp.exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p  # the most likely token has mass_before == 0 and always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    logp = logp.masked_fill(drop, float("-inf"))
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


def sample_seed(seed: int, request_id: str, sample_index: int) -> int:
    """A stable 63-bit seed per (run seed, request, sample): results do not depend on batch layout."""
    digest = hashlib.sha256(f"{seed}:{request_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
