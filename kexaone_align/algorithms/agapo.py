"""AGAPO: off-policy policy gradient with truncated importance sampling (K-EXAONE report, Eq. 1-2).

For a prompt q and G responses o_1..o_G sampled from the rollout policy, each with a verifiable
reward r_i in [0, 1]:

    A_group,i  = r_i - 1/(G-1) * sum_{j != i} r_j                        (leave-one-out baseline)
    A_global,i = (A_group,i - mean_k A_group,k) / std_k A_group,k        (over the whole batch)
    rho_i,t    = pi_theta(o_i,t | q, o_i,<t) / pi_rollout(o_i,t | q, o_i,<t)
    J_AGAPO    = E[ 1/G sum_i 1/|o_i| sum_t sg(min(rho_i,t, eps)) * A_global,i * log pi_theta(o_i,t | ...) ]

Prompts whose G rewards are all equal carry no signal and are dropped before the global
normalisation (zero-variance filtering). There is no KL term and no reference model.
Everything here is a pure tensor function: no I/O, no distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor


def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """``[P, G] -> [P, G]``: each response's reward minus the mean reward of its G-1 peers."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs group_size >= 2 (a response needs a peer)")
    rewards = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    peer_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
    return rewards - peer_mean


def zero_variance_mask(rewards: Tensor) -> Tensor:
    """``[P, G] -> bool [P]``: True for prompts whose rewards are not all identical (they are kept)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    return rewards.amax(dim=1) != rewards.amin(dim=1)


def global_normalize(advantages: Tensor) -> Tensor:
    """Standardise every entry given by the batch mean and (Bessel-corrected) standard deviation.

    Call it on the advantages that survived zero-variance filtering. With fewer than two entries, or
    when all entries are equal, the standard deviation is undefined or zero: the centred values
    (all zeros) are returned instead of NaN.
    """
    flat = advantages.reshape(-1)
    if flat.numel() == 0:
        return advantages.clone()
    centred = advantages - flat.mean()
    if flat.numel() < 2:
        return centred
    std = flat.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(advantages)
    return centred / std


def agapo_loss(
    logprobs: Tensor,
    rollout_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    is_cap: float,
) -> Tensor:
    """The loss to minimise: ``-J_AGAPO``.

    ``-(1/N) sum_i (1/|o_i|) sum_t sg(min(rho_i,t, is_cap)) * A_i * log pi_theta(o_i,t)``

    Args:
        logprobs: ``[N, T]`` token log-probabilities under the policy being trained (carries grad).
        rollout_logprobs: ``[N, T]`` log-probabilities of the same tokens under the rollout policy.
        advantages: ``[N]`` globally normalised advantages, one per response.
        mask: ``[N, T]`` 1 on response tokens, 0 on padding past each response's end.
        is_cap: the truncation cap epsilon (> 0) on the importance ratio.
    """
    if is_cap <= 0:
        raise ValueError(f"is_cap must be > 0, got {is_cap}")
    if logprobs.shape != rollout_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            "logprobs, rollout_logprobs and mask must share one [N, T] shape, got "
            f"{tuple(logprobs.shape)}, {tuple(rollout_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [N]={logprobs.shape[0]}, got {tuple(advantages.shape)}")
    keep = mask.to(torch.bool)
    # Padding may hold anything (even -inf); neutralise it so it cannot leak NaN into values or grads.
    logprobs = torch.where(keep, logprobs, torch.zeros_like(logprobs))
    rollout_logprobs = torch.where(keep, rollout_logprobs.to(logprobs.dtype), torch.zeros_like(logprobs))
    ratio = torch.exp(logprobs.detach() - rollout_logprobs)
    weight = torch.clamp(ratio, max=is_cap)  # sg(min(rho, eps)): built from detached values
    per_token = weight * advantages.to(logprobs.dtype).unsqueeze(1) * logprobs
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    lengths = keep.sum(dim=1).clamp(min=1).to(logprobs.dtype)
    per_response = per_token.sum(dim=1) / lengths
    return -per_response.mean()


def importance_ratio_stats(
    logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, is_cap: float
) -> dict[str, float]:
    """Diagnostics of rho over response tokens: mean, max, and the fraction truncated at ``is_cap``."""
    keep = mask.to(torch.bool)
    if not keep.any():
        return {"is_ratio_mean": float("nan"), "is_ratio_max": float("nan"), "is_truncated_frac": 0.0}
    ratio = torch.exp(logprobs.detach()[keep] - rollout_logprobs.detach().to(logprobs.dtype)[keep])
    return {
        "is_ratio_mean": ratio.mean().item(),
        "is_ratio_max": ratio.max().item(),
        "is_truncated_frac": (ratio > is_cap).float().mean().item(),
    }


def agapo_advantages(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Rewards ``[P, G]`` to ``(kept_prompt_mask [P], advantages [P_kept, G])``.

    The paper's order: zero-variance filtering, leave-one-out group advantage, then global
    normalisation over the surviving prompts only.
    """
    keep = zero_variance_mask(rewards)
    group_adv = leave_one_out_advantages(rewards[keep])
    return keep, global_normalize(group_adv)
