"""GROUPER (Eq. 3-4) and SFT loss against hand-worked examples."""

import math

import pytest
import torch

from kexaone_align.algorithms import grouper, sft


def test_preference_advantages_scale_to_unit_interval():
    rewards = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 1.0], [0.3, 0.9, 0.5]])
    adv = grouper.preference_advantages(rewards)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, 2 * (0.2 / 0.6) - 1]])
    torch.testing.assert_close(adv, expected)
    assert adv.min() >= -1 and adv.max() <= 1


def test_preference_advantages_tied_group_is_zero_not_nan():
    adv = grouper.preference_advantages(torch.tensor([[0.7, 0.7, 0.7, 0.7], [1.0, 0.0, 1.0, 0.0]]))
    assert torch.isfinite(adv).all()
    assert adv[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[1].tolist() == [1.0, -1.0, 1.0, -1.0]


def test_preference_advantages_near_tied_group_has_no_preference():
    # Equal up to float noise (a judge's weighted means): +1 / -1 advantages when compared with ==.
    near = torch.tensor([[0.5, 0.5 + 1e-9, 0.5 - 1e-9, 0.5], [0.1 + 0.2, 0.3, 0.3, 0.3]], dtype=torch.float64)
    assert torch.equal(grouper.preference_advantages(near), torch.zeros_like(near))
    assert torch.equal(grouper.preference_advantages(near.float()), torch.zeros(2, 4))
    # noise on top of a real difference does not matter: the two 0.5s are the same preference
    mixed = torch.tensor([[0.5, 0.5 + 1e-9, 1.0]], dtype=torch.float64)
    adv = grouper.preference_advantages(mixed)
    assert adv[0, 2].item() == pytest.approx(1.0) and adv[0, :2].tolist() == pytest.approx(
        [-1.0, -1.0], abs=1e-6
    )


def test_preference_advantages_group_of_two():
    adv = grouper.preference_advantages(torch.tensor([[0.2, 0.8]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 1.0]]))


def test_grouper_loss_value_and_gradient_hand_example():
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, -50.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss = grouper.grouper_loss(logprobs, adv, mask)
    expected = -0.5 * (1.0 * math.exp(-1.0) - 1.0 * math.exp(-2.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/d lp_it of -(1/N) A_i exp(mean_t lp_it) = -(1/N) A_i exp(m_i) / |o_i|
    expected_grad = torch.tensor(
        [[-0.5 * math.exp(-1) * 0.5, -0.5 * math.exp(-1) * 0.5], [0.5 * math.exp(-2), 0.0]]
    )
    torch.testing.assert_close(logprobs.grad, expected_grad)


def test_grouper_loss_ignores_padding_even_if_garbage():
    lp = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    loss = grouper.grouper_loss(lp, torch.tensor([1.0]), torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(-math.exp(-1.0))
    loss.backward()
    assert lp.grad[0, 1] == 0


def test_sft_loss_counts_assistant_tokens_only():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[0, 1], [1, 1]])
    loss = sft.sft_loss(lp, mask)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -1 / 3], [-1 / 3, -1 / 3]]))
