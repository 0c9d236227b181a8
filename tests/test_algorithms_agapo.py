"""AGAPO values and gradients against hand-worked examples of the paper's Eq. (1)-(2)."""

import math

import pytest
import torch

from kexaone_align.algorithms import agapo


def test_leave_one_out_hand_example():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.25, 0.0, 1.0]])
    adv = agapo.leave_one_out_advantages(rewards)
    expected = torch.tensor(
        [
            [2 / 3, -2 / 3, -2 / 3, 2 / 3],
            [0.5 - 1.25 / 3, 0.25 - 1.5 / 3, 0.0 - 1.75 / 3, 1.0 - 0.75 / 3],
        ]
    )
    torch.testing.assert_close(adv, expected)
    # Leave-one-out advantages of a group always sum to zero.
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(2))


def test_leave_one_out_group_of_two():
    adv = agapo.leave_one_out_advantages(torch.tensor([[1.0, 0.0], [0.2, 0.8]]))
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0], [-0.6, 0.6]]))


def test_leave_one_out_needs_a_peer():
    with pytest.raises(ValueError, match="group_size >= 2"):
        agapo.leave_one_out_advantages(torch.tensor([[1.0], [0.0]]))


def test_zero_variance_mask_filters_all_equal_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    assert agapo.zero_variance_mask(rewards).tolist() == [False, True, False, False]


def test_global_normalize_standardizes_over_all_entries():
    adv = torch.tensor([[1.0, -1.0], [3.0, -3.0]])
    out = agapo.global_normalize(adv)
    std = math.sqrt((1 + 1 + 9 + 9) / 3)  # Bessel-corrected, mean is 0
    torch.testing.assert_close(out, adv / std)
    assert abs(out.mean().item()) < 1e-6


def test_global_normalize_degenerate_inputs_never_nan():
    assert torch.equal(agapo.global_normalize(torch.tensor([[0.0, 0.0]])), torch.zeros(1, 2))
    assert agapo.global_normalize(torch.tensor([2.0])).tolist() == [0.0]
    assert agapo.global_normalize(torch.empty(0, 4)).shape == (0, 4)


def test_agapo_advantages_filter_then_normalize():
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    keep, adv = agapo.agapo_advantages(rewards)
    assert keep.tolist() == [False, True, False, True]
    # survivors' LOO advantages are [1, -1], [-1, 1]; std (Bessel) = sqrt(4/3)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]) / math.sqrt(4 / 3))


def _hand_example():
    logprobs = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    rollout = torch.tensor([[-1.0, -2.5, -1.0], [-0.1, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([1.0, -1.0])
    return logprobs, rollout, mask, advantages


def test_agapo_loss_value_and_gradient_hand_example():
    logprobs, rollout, mask, advantages = _hand_example()
    cap = 1.2
    loss = agapo.agapo_loss(logprobs, rollout, advantages, mask, cap)
    # rho_11 = 1, rho_12 = e^0.5 = 1.6487 -> truncated to 1.2, rho_21 = e^-0.4
    w21 = math.exp(-0.4)
    expected = -0.5 * (0.5 * (1.0 * 1.0 * -1.0 + 1.2 * 1.0 * -2.0) + 1.0 * (w21 * -1.0 * -0.5))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # Stop-gradient on the ratio: d loss / d logprob_it = -(1/N)(1/|o_i|) * min(rho, cap) * A_i.
    expected_grad = torch.tensor([[-0.25, -0.5 * 0.5 * 1.2, 0.0], [0.5 * w21, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad)


def test_agapo_gradient_differs_without_stop_gradient():
    """If the ratio were differentiated, the gradient would pick up an extra rho * log pi term."""
    logprobs, rollout, mask, advantages = _hand_example()
    loss = agapo.agapo_loss(logprobs, rollout, advantages, mask, 10.0)
    loss.backward()
    lp = logprobs.detach()
    rho = torch.exp(lp - rollout)
    no_sg_grad = -(rho * (1 + lp)) * advantages[:, None] * mask / mask.sum(1, keepdim=True) / 2
    assert not torch.allclose(logprobs.grad, no_sg_grad)
    torch.testing.assert_close(
        logprobs.grad, -(rho * advantages[:, None] * mask / mask.sum(1, keepdim=True) / 2)
    )


def test_agapo_ratio_above_cap_is_truncated():
    logprobs = torch.tensor([[0.0]], requires_grad=True)
    rollout = torch.tensor([[-3.0]])  # rho = e^3 ~ 20
    loss = agapo.agapo_loss(logprobs, rollout, torch.tensor([1.0]), torch.ones(1, 1), 2.0)
    loss.backward()
    assert logprobs.grad.item() == pytest.approx(-2.0)


def test_tokens_past_response_end_contribute_nothing():
    logprobs, rollout, mask, advantages = _hand_example()
    base = agapo.agapo_loss(logprobs, rollout, advantages, mask, 1.2)
    garbage = logprobs.detach().clone()
    garbage[0, 2] = float("-inf")
    garbage[1, 1:] = float("nan")
    garbage.requires_grad_(True)
    rollout_garbage = rollout.clone()
    rollout_garbage[1, 2] = float("inf")
    loss = agapo.agapo_loss(garbage, rollout_garbage, advantages, mask, 1.2)
    assert loss.item() == pytest.approx(base.item())
    loss.backward()
    assert torch.isfinite(garbage.grad).all()
    assert garbage.grad[0, 2] == 0 and (garbage.grad[1, 1:] == 0).all()


def test_on_policy_loss_is_negative_advantage_weighted_mean_logprob():
    torch.manual_seed(0)
    lp = torch.randn(4, 5)
    mask = torch.ones(4, 5)
    adv = torch.randn(4)
    loss = agapo.agapo_loss(lp, lp, adv, mask, 5.0)
    assert loss.item() == pytest.approx(-(adv * lp.mean(1)).mean().item(), rel=1e-5)


def test_agapo_loss_rejects_bad_inputs():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="is_cap"):
        agapo.agapo_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), -1.0)
    with pytest.raises(ValueError, match="advantages"):
        agapo.agapo_loss(lp, lp, torch.zeros(3), torch.ones(2, 3), 1.0)


def test_importance_ratio_stats():
    lp = torch.tensor([[0.0, 0.0, 0.0]])
    rollout = torch.tensor([[0.0, -1.0, -5.0]])
    partial = agapo.importance_ratio_stats(lp, rollout, torch.tensor([[1, 1, 0]]), 2.0)
    stats = agapo.summarize_ratio_stats(partial)
    assert stats["is_ratio_max"] == pytest.approx(math.e) and stats["is_ratio_min"] == pytest.approx(1.0)
    assert stats["is_ratio_mean"] == pytest.approx((1 + math.e) / 2)
    assert stats["is_truncated_frac"] == pytest.approx(0.5)
    # k3 = (rho - 1) - log rho per token: 0 for the on-policy token, e - 2 for the other
    assert stats["mismatch_kl_k3"] == pytest.approx((math.e - 2) / 2)
    assert agapo.importance_ratio_stats(lp, rollout, torch.zeros(1, 3), 2.0) == {}


# Rewards a judge's weighted means produce: equal up to float noise. Each of these failed when rewards
# were compared with ==.
NEAR_TIED = torch.tensor(
    [[0.5, 0.5 + 1e-9, 0.5, 0.5 - 1e-9], [0.1 + 0.2, 0.3, 0.3, 0.3], [0.7, 0.7, 0.7, 0.7]],
    dtype=torch.float64,
)


def test_zero_variance_mask_treats_near_tied_rewards_as_tied():
    assert agapo.zero_variance_mask(NEAR_TIED).tolist() == [False, False, False]
    assert agapo.zero_variance_mask(NEAR_TIED.float()).tolist() == [False, False, False]
    spread = torch.tensor([[0.5, 0.5 + 1e-5, 0.5, 0.5]], dtype=torch.float64)
    assert agapo.zero_variance_mask(spread).tolist() == [True]  # a real (if small) difference is kept
    keep, adv = agapo.agapo_advantages(torch.cat([NEAR_TIED, torch.tensor([[0.0, 1.0, 0.0, 1.0]])]))
    assert keep.tolist() == [False, False, False, True] and adv.shape == (1, 4)


def test_global_normalize_does_not_blow_up_float_noise():
    noise = agapo.leave_one_out_advantages(NEAR_TIED[:1])  # entries ~1e-9 apart
    out = agapo.global_normalize(noise)
    assert torch.equal(out, torch.zeros_like(noise))
    assert agapo.global_normalize(torch.tensor([1e-9, -1e-9, 3e-9])).abs().max() == 0
    signal = agapo.global_normalize(torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    assert signal.std().item() == pytest.approx(1.0)
