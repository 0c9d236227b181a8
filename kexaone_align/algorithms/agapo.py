"""AGAPO: off-policy policy gradient with truncated importance sampling (K-EXAONE report, Eq. 1-2).

For a prompt q and G responses o_1..o_G sampled from the rollout policy, each with a verifiable
reward r_i in [0, 1]:

    A_group,i  = r_i - 1/(G-1) * sum_{j != i} r_j                        (leave-one-out baseline)
    A_global,i = (A_group,i - mean_k A_group,k) / std_k A_group,k        (over the whole batch)
    rho_i,t    = pi_theta(o_i,t | q, o_i,<t) / pi_rollout(o_i,t | q, o_i,<t)
    J_AGAPO    = E[ 1/G sum_i 1/|o_i| sum_t sg(min(rho_i,t, eps)) * A_global,i * log pi_theta(o_i,t | ...) ]

Prompts whose G rewards are all equal carry no signal and are dropped before the global
normalisation (zero-variance filtering). "Equal" means within ``REWARD_ATOL`` (1e-6): a judge's
weighted means that differ by float noise are a tie, not a preference. There is no KL term and no
reference model. Everything here is a pure tensor function: no I/O, no distribution.

Which distributions rho compares (``agapo.ratio_distribution``). pi_rollout is what the rollout engine
reports per sampled token and pi_theta what the learner computes; an on-policy ratio is 1 only if both
are the same function of the logits:

- ``model_at_temperature``: both are ``softmax(z / T)`` over the full vocabulary at the rollout
  temperature T. rho then measures staleness and engine mismatch only; the top-p truncation of the
  sampler is not corrected for (tokens come from the nucleus, the ratio treats them as drawn from the
  untruncated softmax at T), and the gradient is that of the model's log-likelihood at T.
- ``sampler``: both are the processed sampler's: ``softmax(z / T)`` restricted to the top-k / top-p
  set and renormalised (the learner applies the same truncation to its own logits, keeping the sampled
  token in the set). pi_theta in Eq. 1 is then the policy as sampled, and log pi_theta includes the
  nucleus renormaliser.
"""

from __future__ import annotations

import torch
from torch import Tensor

REWARD_ATOL = 1e-6  # rewards (in [0, 1]) closer than this are tied; float32 noise is ~6e-8 at 1.0


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


def zero_variance_mask(rewards: Tensor, atol: float = REWARD_ATOL) -> Tensor:
    """``[P, G] -> bool [P]``: True for prompts whose rewards spread more than ``atol`` (they are kept)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) > atol


def global_normalize(advantages: Tensor, atol: float = REWARD_ATOL) -> Tensor:
    """Standardise every entry given by the batch mean and (Bessel-corrected) standard deviation.

    Call it on the advantages that survived zero-variance filtering. With fewer than two entries the
    centred values are returned; when the standard deviation is at most ``atol`` (all entries equal up
    to float noise) there is no signal to scale up, and zeros are returned instead of noise / ~0.
    """
    flat = advantages.reshape(-1)
    if flat.numel() == 0:
        return advantages.clone()
    centred = advantages - flat.mean()
    if flat.numel() < 2:
        return centred
    std = flat.std()
    if not torch.isfinite(std) or std <= atol:
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
    """Rollout/learner mismatch over response tokens, as partial results that add up across micro-batches
    and ranks (``runtime.metric_reduce``): sums and token count, and the true min / max of rho.

    ``mismatch_kl_k3_sum`` sums the k3 estimator ``(rho - 1) - log rho`` (tokens drawn from the rollout
    policy, so its mean estimates KL(pi_rollout || pi_theta), >= 0 per token). ``summarize_ratio_stats``
    turns the combined partials into means.
    """
    keep = mask.to(torch.bool)
    if not keep.any():
        return {}
    log_ratio = logprobs.detach()[keep].double() - rollout_logprobs.detach()[keep].double()
    ratio = torch.exp(log_ratio)
    return {
        "ratio_tokens_sum": float(ratio.numel()),
        "is_ratio_sum": ratio.sum().item(),
        "is_ratio_min": ratio.min().item(),
        "is_ratio_max": ratio.max().item(),
        "is_truncated_sum": (ratio > is_cap).sum().item(),
        "mismatch_kl_k3_sum": ((ratio - 1.0) - log_ratio).sum().item(),
    }


def summarize_ratio_stats(partials: dict[str, float]) -> dict[str, float]:
    """Per-step ratio metrics from combined ``importance_ratio_stats`` partials: ``is_ratio_mean``,
    ``is_ratio_min``, ``is_ratio_max``, ``is_truncated_frac``, ``mismatch_kl_k3`` (empty with no tokens)."""
    tokens = partials.get("ratio_tokens_sum", 0.0)
    if tokens <= 0:
        return {}
    return {
        "is_ratio_mean": partials["is_ratio_sum"] / tokens,
        "is_ratio_min": partials["is_ratio_min"],
        "is_ratio_max": partials["is_ratio_max"],
        "is_truncated_frac": partials["is_truncated_sum"] / tokens,
        "mismatch_kl_k3": partials["mismatch_kl_k3_sum"] / tokens,
    }


def agapo_advantages(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Rewards ``[P, G]`` to ``(kept_prompt_mask [P], advantages [P_kept, G])``.

    The paper's order: zero-variance filtering, leave-one-out group advantage, then global
    normalisation over the surviving prompts only.
    """
    keep = zero_variance_mask(rewards)
    group_adv = leave_one_out_advantages(rewards[keep])
    return keep, global_normalize(group_adv)
