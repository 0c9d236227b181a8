"""Temperature + nucleus (top-p) processing and per-sample seeding, shared by the hf backend and tests.

The log-probs returned here are those of the distribution a token is actually drawn from, which
is what AGAPO's importance ratio needs as the "old policy" probability.
"""

from __future__ import annotations

import hashlib

import torch

from kexaone_align.algorithms.logprobs import truncation_mask


def processed_logprobs(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int = -1
) -> torch.Tensor:
    """Log-probs after temperature, top-k, then top-p filtering and renormalisation (-inf where removed).

    The nucleus is the smallest set of most-likely tokens whose probability mass reaches ``top_p``;
    ``top_p == 1`` and ``top_k == -1`` keep the whole vocabulary, so the result is the plain
    ``log_softmax(logits / T)``. The kept set is ``algorithms.logprobs.truncation_mask``, the rule the
    learner applies when the importance ratio is taken under the sampler (``agapo.ratio_distribution``).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    keep = truncation_mask(logp, top_p, top_k)
    if keep is None:
        return logp
    logp = logp.masked_fill(~keep, float("-inf"))
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


def model_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the model at ``temperature`` over the full vocabulary (no top-k / top-p)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: ``uniforms[i]`` in [0, 1) picks row ``i``'s token.

    The whole batch is drawn in one vectorized step (no per-row ``multinomial`` call); each row's
    uniforms come from that sample's own seeded generator, so a sample does not depend on its batch.
    Tokens with probability 0 (outside the nucleus) are never drawn: the first index whose cumulative
    mass exceeds ``u * total`` always carries mass.
    """
    cdf = probs.float().cumsum(dim=-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return picked.clamp_(max=probs.shape[-1] - 1)


def sample_seed(seed: int, request_id: str, sample_index: int) -> int:
    """A stable 63-bit seed per (run seed, request, sample): results do not depend on batch layout."""
    digest = hashlib.sha256(f"{seed}:{request_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
