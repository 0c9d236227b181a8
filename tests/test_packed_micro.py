"""Packed RL micro-batches: AGAPO and GROUPER losses and gradients equal the padded ones."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from kexaone_align.algorithms.agapo import agapo_loss
from kexaone_align.algorithms.grouper import grouper_loss, mean_token_logprob
from kexaone_align.runtime.batching import collate
from kexaone_align.runtime.learner import TokenLogprobModel
from kexaone_align.runtime.packed_micro import make_micros, plan_packed

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 4,  # shorter than the responses: the sliding mask must stay per sequence too
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "head_dim": 16,
}


def test_plan_packed_places_every_sequence_once_within_budget():
    lengths = [5, 17, 3, 40, 9, 9, 1, 22, 0, 12]
    plan = plan_packed(lengths, budget=40)
    flat = sorted(i for micro in plan for row in micro for i in row)
    assert flat == list(range(len(lengths)))
    for micro in plan:
        width = max(sum(lengths[i] for i in row) for row in micro)
        assert width == max(lengths[i] for row in micro for i in row)  # rows as wide as the longest
        assert len(micro) * width <= 40
    assert plan == plan_packed(lengths, budget=40)  # deterministic
    # longer than the budget: a micro-batch of its own, as without packing
    assert plan_packed([50, 3, 3], budget=10)[0] == [[0]]


def test_plan_packed_fills_micro_batches():
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randn(200, generator=g) * 0.8 + 4.0).exp().clamp(1, 1000).int().tolist()
    plan = plan_packed(lengths, budget=2048)
    computed = sum(len(m) * max(lengths[i] for r in m for i in r) for m in plan)
    assert computed < 1.1 * sum(lengths)  # almost no padding is computed
    assert len(plan) <= -(-sum(lengths) // 2048) + 1  # micro-batches close to full
    assert sum(len(r) > 1 for m in plan for r in m) > 10  # short responses share rows


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from kexaone_align.models import build_tiny_checkpoint, load_policy

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "policy", seed=0, architecture=SMALL)
    torch.manual_seed(0)
    return TokenLogprobModel(load_policy(path), chunk_size=64, zero3=False)


def rl_batch(seed=3):
    """An RL-shaped batch: prompt + response rows of varied lengths, right-padded, with advantages."""
    g = torch.Generator().manual_seed(seed)
    ids, masks, old = [], [], []
    for n_prompt, n_resp in [(4, 3), (6, 14), (3, 1), (5, 9), (4, 21), (7, 5), (3, 2), (5, 11)]:
        ids.append(torch.randint(5, 500, (n_prompt + n_resp,), generator=g).tolist())
        masks.append([0] * n_prompt + [1] * n_resp)
        old.append([0.0] * n_prompt + (-torch.rand(n_resp, generator=g) * 3).tolist())
    batch = collate(ids, masks, pad_token_id=0)
    width = batch["input_ids"].shape[1]
    batch["rollout_logprobs"] = torch.tensor([o + [0.0] * (width - len(o)) for o in old])
    batch["advantages"] = torch.randn(len(ids), generator=g)
    return batch


def agapo_fn(logprobs, micro):
    return agapo_loss(logprobs, micro["rollout_logprobs"], micro["advantages"], micro["loss_mask"], 2.0)


def grouper_fn(logprobs, micro):
    return grouper_loss(logprobs, micro["advantages"], micro["loss_mask"])


def loss_and_grads(model, batch, loss_fn, packing, budget=48):
    """The learner's accumulation: each micro-batch's per-sequence mean weighted by its share of rows."""
    model.zero_grad()
    micros = make_micros(batch, budget, packing=packing)
    rows = batch["input_ids"].shape[0]
    total = torch.zeros(())
    means = torch.zeros(rows)
    computed = 0
    for m in micros:
        f = m.forward
        logprobs, _ = model(f["input_ids"], f["attention_mask"], f["loss_mask"], False, f.get("sequence_ids"))
        view = m.unpack(logprobs)
        loss = loss_fn(view, m.view) * (m.view["input_ids"].shape[0] / rows)
        loss.backward()
        total += loss.detach()
        means[list(m.plan.rows)] = mean_token_logprob(view.detach(), m.view["loss_mask"])
        computed += m.computed_tokens
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads, means, computed, len(micros)


@pytest.mark.parametrize("loss_fn", [agapo_fn, grouper_fn], ids=["agapo", "grouper"])
def test_packed_loss_and_gradients_equal_padded(model, loss_fn):
    batch = rl_batch()
    loss_pad, grads_pad, means_pad, computed_pad, n_pad = loss_and_grads(model, batch, loss_fn, False)
    loss_pack, grads_pack, means_pack, computed_pack, n_pack = loss_and_grads(model, batch, loss_fn, True)
    assert computed_pack < computed_pad  # padding really is skipped
    assert computed_pack <= 1.05 * int(batch["attention_mask"].sum())  # only row tails are padding
    assert n_pack <= n_pad
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-6)
    # GROUPER's per-sequence mean log-prob (and AGAPO's 1/|o_i|) are those of the padded rows
    torch.testing.assert_close(means_pack, means_pad, rtol=1e-5, atol=1e-5)
    assert grads_pack.keys() == grads_pad.keys() and grads_pad
    for name, grad in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_without_sequence_boundaries_would_differ(model):
    """The same packed rows with attention across sequences change the scores (the test above can fail)."""
    batch = rl_batch()
    (m,) = [m for m in make_micros(batch, 48, packing=True) if len(m.plan.rows) > 2][:1]
    f = m.forward
    good, _ = model(f["input_ids"], f["attention_mask"], f["loss_mask"], False, f["sequence_ids"])
    leaky_ids = torch.where(f["sequence_ids"] >= 0, torch.zeros_like(f["sequence_ids"]), f["sequence_ids"])
    leaky, _ = model(f["input_ids"], f["attention_mask"], f["loss_mask"], False, leaky_ids)
    assert not torch.allclose(m.unpack(good), m.unpack(leaky), atol=1e-4)
