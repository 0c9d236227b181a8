"""Packed RL micro-batches: AGAPO and GROUPER losses and gradients equal the padded ones."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from kexaone_align.algorithms.agapo import agapo_loss
from kexaone_align.algorithms.grouper import grouper_loss, mean_token_logprob
from kexaone_align.runtime.batching import collate
from kexaone_align.runtime.learner import TokenLogprobModel, forward_args
from kexaone_align.runtime.packed_micro import make_micros, plan_packed, shared_prefix_units

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


def with_rollout_fields(ids, masks, old, g):
    """Right-padded rows plus the rollout log-probs (``old``, per token) and one advantage per row."""
    batch = collate(ids, masks, pad_token_id=0)
    width = batch["input_ids"].shape[1]
    batch["rollout_logprobs"] = torch.tensor([o + [0.0] * (width - len(o)) for o in old])
    batch["advantages"] = torch.randn(len(ids), generator=g)
    return batch


def rl_batch(seed=3):
    """An RL-shaped batch: prompt + response rows of varied lengths, right-padded, with advantages."""
    g = torch.Generator().manual_seed(seed)
    ids, masks, old = [], [], []
    for n_prompt, n_resp in [(4, 3), (6, 14), (3, 1), (5, 9), (4, 21), (7, 5), (3, 2), (5, 11)]:
        ids.append(torch.randint(5, 500, (n_prompt + n_resp,), generator=g).tolist())
        masks.append([0] * n_prompt + [1] * n_resp)
        old.append([0.0] * n_prompt + (-torch.rand(n_resp, generator=g) * 3).tolist())
    return with_rollout_fields(ids, masks, old, g)


def agapo_fn(logprobs, micro):
    return agapo_loss(logprobs, micro["rollout_logprobs"], micro["advantages"], micro["loss_mask"], 2.0)


def grouper_fn(logprobs, micro):
    return grouper_loss(logprobs, micro["advantages"], micro["loss_mask"])


def grouped_rl_batch(seed=5):
    """RL rows as a stage makes them: G responses per prompt (here 3 prompts x G=4), one of them a tool
    episode whose environment tokens are masked out, so shared prompts have several branches each."""
    g = torch.Generator().manual_seed(seed)
    ids, masks, old = [], [], []
    for n_prompt, responses in [(6, [3, 9, 1, 12]), (3, [7, 7, 2, 5]), (9, [4, 11, 6, 8])]:
        prompt = torch.randint(5, 500, (n_prompt,), generator=g).tolist()
        for n_resp in responses:
            ids.append(prompt + torch.randint(5, 500, (n_resp,), generator=g).tolist())
            mask = [1] * n_resp
            if n_resp > 6:
                mask[3:5] = [0, 0]  # a tool result inside the response: not trained, still attended to
            masks.append([0] * n_prompt + mask)
            old.append([0.0] * n_prompt + (-torch.rand(n_resp, generator=g) * 3).tolist())
    return with_rollout_fields(ids, masks, old, g)


def loss_and_grads(model, batch, loss_fn, packing, budget=48, share=False):
    """The learner's accumulation: each micro-batch's per-sequence mean weighted by its share of rows."""
    model.zero_grad()
    micros = make_micros(batch, budget, packing=packing, share_prefixes=share)
    rows = batch["input_ids"].shape[0]
    total = torch.zeros(())
    means = torch.zeros(rows)
    computed = 0
    for m in micros:
        f = m.forward
        logprobs, _ = model(*forward_args(f, False))
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


@pytest.mark.parametrize("loss_fn", [agapo_fn, grouper_fn], ids=["agapo", "grouper"])
@pytest.mark.parametrize("budget", [48, 20], ids=["whole-groups", "groups-split"])
def test_shared_prefix_loss_and_gradients_equal_padded(model, loss_fn, budget):
    """Each prompt computed once per unit, yet every response's log-probs and gradients are the padded
    rows' (sliding window 4 < prompt + response, so windows reach back into the shared prompt)."""
    batch = grouped_rl_batch()
    loss_pad, grads_pad, means_pad, _, _ = loss_and_grads(model, batch, loss_fn, False, budget)
    _, _, _, computed_flat, _ = loss_and_grads(model, batch, loss_fn, True, budget)
    loss_tree, grads_tree, means_tree, computed_tree, _ = loss_and_grads(
        model, batch, loss_fn, True, budget, True
    )
    assert computed_tree < computed_flat
    torch.testing.assert_close(loss_tree, loss_pad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means_tree, means_pad, rtol=1e-5, atol=1e-5)
    assert grads_tree.keys() == grads_pad.keys() and grads_pad
    for name, grad in grads_pad.items():
        torch.testing.assert_close(grads_tree[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prefix_units_share_only_identical_untrained_prefixes():
    batch = grouped_rl_batch()
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    units = shared_prefix_units(batch, budget=4096)
    assert sorted(i for u in units for i in u.rows) == list(range(12))
    groups = [range(0, 4), range(4, 8), range(8, 12)]
    for unit in units:
        (group,) = [g for g in groups if unit.rows[0] in g]
        assert set(unit.rows) <= set(group) and unit.prefix == [6, 3, 9][groups.index(group)]
        assert unit.length == unit.prefix + sum(lengths[i] - unit.prefix for i in unit.rows)
        assert unit.length <= 4096
    assert len(units) < 12 and any(len(u.rows) > 1 for u in units)
    assert units == shared_prefix_units(batch, budget=4096)  # deterministic
    # a changed prompt token, or a trained prompt token, ends the sharing for that row
    batch["input_ids"][1, 2] += 1
    batch["loss_mask"][5, 2] = 1
    rows = [u.rows for u in shared_prefix_units(batch, budget=4096)]
    assert (1,) in rows and (5,) in rows
    assert not any(1 in r and len(r) > 1 for r in rows) and not any(5 in r and len(r) > 1 for r in rows)
    # the budget caps a unit too, every unit keeping the whole prompt
    split = shared_prefix_units(grouped_rl_batch(), budget=12)
    assert sorted(i for u in split for i in u.rows) == list(range(12))
    assert all(u.length <= 12 or len(u.rows) == 1 for u in split)


def test_shared_prefix_without_the_prompt_link_would_differ(model):
    """Predicting a response's first token from the previous row token, not the prompt's last, changes
    its log-prob (the parent index is what the equality above depends on)."""
    batch = grouped_rl_batch()
    (m,) = make_micros(batch, 4096, packing=True, share_prefixes=True)
    f = dict(m.forward)
    good = m.unpack(model(*forward_args(f, False))[0])
    f["parent_index"] = (torch.arange(f["input_ids"].shape[1]) - 1).clamp(min=0).expand_as(f["input_ids"])
    wrong = m.unpack(model(*forward_args(f, False))[0])
    assert not torch.allclose(good, wrong, atol=1e-4)


def test_ranks_get_whole_prompt_units_when_prompts_are_shared():
    from kexaone_align.runtime.packed_micro import shard_rows_keeping_prefixes

    batch = grouped_rl_batch()
    plan = shard_rows_keeping_prefixes(batch, 2, balance=True, share_prefixes=True, budget=4096)
    assert sorted(i for rows in plan for i in rows) == list(range(12))
    units = shared_prefix_units(batch, 4096)
    assert all(any(set(u.rows) <= set(rows) for rows in plan) for u in units)  # no unit split over ranks
    # more ranks than units: rows are balanced one by one, so no rank idles
    wide = shard_rows_keeping_prefixes(batch, 4, balance=True, share_prefixes=True, budget=4096)
    assert all(wide)
