"""Supervised fine-tuning loss: negative log-likelihood of assistant tokens only."""

from __future__ import annotations

import torch
from torch import Tensor


def sft_loss(logprobs: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean negative log-probability over the tokens where ``loss_mask`` is 1.

    ``logprobs`` are the log-probabilities of each target token (``[N, T]``); system, user and
    role-header tokens carry ``loss_mask == 0`` and contribute nothing. Averaging over all assistant
    tokens of the batch (not per sequence) weights every supervised token equally.
    """
    if logprobs.shape != loss_mask.shape:
        raise ValueError(
            f"logprobs and loss_mask shapes differ: {tuple(logprobs.shape)} vs {tuple(loss_mask.shape)}"
        )
    keep = loss_mask.to(torch.bool)
    total = torch.where(keep, logprobs, torch.zeros_like(logprobs)).sum()
    return -total / keep.sum().clamp(min=1).to(logprobs.dtype)
