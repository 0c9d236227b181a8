"""GROUPER: group-wise SimPER preference learning (K-EXAONE report, Eq. 3-4).

G responses per prompt are sampled once from the initial policy and scored with a preference reward
(rule-based checks plus rubric-based generative rewards). Within each group:

    z_i      = (r_i - mean_j r_j) / std_j r_j
    A_pref,i = 2 * (z_i - min_j z_j) / (max_j z_j - min_j z_j) - 1      in [-1, 1]
    L        = -E[ 1/G sum_i A_pref,i * exp( (1/|o_i|) log pi_theta(o_i | x) ) ]

exp of the length-normalised log-likelihood is the response's per-token geometric-mean probability
(SimPER's hyper-parameter-free objective): no reference model, no temperature, no margin.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexaone_align.algorithms.agapo import REWARD_ATOL


def preference_advantages(rewards: Tensor, atol: float = REWARD_ATOL) -> Tensor:
    """``[P, G] -> [P, G]`` in [-1, 1]: standardise within each group, then min-max scale.

    A group whose rewards all tie has no preference signal: its advantages are 0 (never NaN). Rewards
    tie when they spread at most ``atol`` (``agapo.REWARD_ATOL``, 1e-6): a judge's weighted means that
    differ by float noise must not become a +1 / -1 preference.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    tied = (rewards.amax(dim=1, keepdim=True) - rewards.amin(dim=1, keepdim=True)) <= atol
    z = (rewards - mean) / torch.where(tied, torch.ones_like(std), std)
    z_min = z.amin(dim=1, keepdim=True)
    z_range = z.amax(dim=1, keepdim=True) - z_min
    flat = z_range == 0
    scaled = 2.0 * (z - z_min) / torch.where(flat, torch.ones_like(z_range), z_range) - 1.0
    return torch.where(tied | flat, torch.zeros_like(scaled), scaled)


def mean_token_logprob(logprobs: Tensor, mask: Tensor) -> Tensor:
    """``[N, T] -> [N]``: (1/|o_i|) sum_t log pi(o_i,t), padding excluded."""
    keep = mask.to(torch.bool)
    summed = torch.where(keep, logprobs, torch.zeros_like(logprobs)).sum(dim=1)
    return summed / keep.sum(dim=1).clamp(min=1).to(logprobs.dtype)


def grouper_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """The loss to minimise: ``-(1/N) sum_i A_i * exp((1/|o_i|) sum_t log pi_theta(o_i,t))``.

    Args:
        logprobs: ``[N, T]`` token log-probabilities under the policy being trained (carries grad).
        advantages: ``[N]`` preference advantages in [-1, 1] (from ``preference_advantages``).
        mask: ``[N, T]`` 1 on response tokens, 0 past each response's end.
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs and mask shapes differ: {tuple(logprobs.shape)} vs {tuple(mask.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [N]={logprobs.shape[0]}, got {tuple(advantages.shape)}")
    likelihood = torch.exp(mean_token_logprob(logprobs, mask))
    return -(advantages.to(logprobs.dtype) * likelihood).mean()
