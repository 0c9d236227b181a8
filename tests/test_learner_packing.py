"""Packed rows through the learner: every sample scores as if it ran alone (no cross-sample leakage)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from kexaone_align.algorithms.sft import sft_loss
from kexaone_align.data.packing import collate_packed, pack_sequences
from kexaone_align.runtime.batching import collate
from kexaone_align.runtime.learner import Learner, LearnerConfig

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 4,  # shorter than the samples, so the sliding-window mask matters
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "head_dim": 16,
}


def sft_loss_fn(token_logprobs, batch):
    return sft_loss(token_logprobs, batch["loss_mask"]), {}


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    from kexaone_align.models import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "policy", seed=0, architecture=SMALL)
    lrn = Learner(path, LearnerConfig(zero_stage=2, lr=1e-2, micro_batch_tokens=64))
    lrn.setup()
    return lrn


def samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (9, 6, 11, 7, 5):
        ids = torch.randint(5, 500, (n,), generator=g).tolist()
        out.append((ids, [0, 0, 0] + [1] * (n - 3)))
    return out


def packed_batch(rows):
    packed = collate_packed(pack_sequences(rows, 20, sort_by_length=False))
    return {
        "input_ids": packed["input_ids"],
        "attention_mask": (packed["sequence_ids"] >= 0).long(),
        "loss_mask": packed["loss_mask"],
        "sequence_ids": packed["sequence_ids"],
    }, packed


def per_sample(logprobs, packed, rows):
    """Split packed log-probs back into each sample's loss-token values, in input order."""
    out = {}
    for r, row in enumerate(pack_sequences(rows, 20, sort_by_length=False)):
        for (start, end), index in zip(row.boundaries, row.example_indices, strict=True):
            mask = packed["loss_mask"][r, start:end].bool()
            out[index] = logprobs[r, start:end][mask]
    return [out[i] for i in range(len(rows))]


def test_packed_logprobs_equal_unpacked(learner):
    rows = samples()
    batch, packed = packed_batch(rows)
    assert batch["input_ids"].shape[0] < len(rows)  # several samples really share a row
    got = per_sample(learner.forward_logprobs(batch), packed, rows)
    plain = collate([r[0] for r in rows], [r[1] for r in rows])
    want = learner.forward_logprobs(plain)
    for i, (ids, mask) in enumerate(rows):
        expected = want[i, : len(ids)][torch.tensor(mask).bool()]
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)

    # The same packed rows without sequence_ids attend across samples: scores change (the test can fail).
    leaky = per_sample(
        learner.forward_logprobs({k: v for k, v in batch.items() if k != "sequence_ids"}), packed, rows
    )
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(leaky, got, strict=True))


def test_packed_train_step_loss_matches_unpacked(learner):
    rows = samples()
    batch, _ = packed_batch(rows)
    plain = collate([r[0] for r in rows], [r[1] for r in rows])
    # Same weights for both measurements: forward_logprobs does not step.
    expected = float(sft_loss(learner.forward_logprobs(plain), plain["loss_mask"]))
    before = learner.steps
    metrics = learner.train_step(batch, sft_loss_fn)
    assert learner.steps == before + 1
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4)


def agapo_loss_fn(token_logprobs, batch):
    from kexaone_align.algorithms.agapo import agapo_loss

    mask = batch["loss_mask"]
    return agapo_loss(token_logprobs, batch["rollout_logprobs"], batch["advantages"], mask, 2.0), {}


def agapo_step_and_expected_loss(learner, batch, padded_logprobs):
    """One AGAPO train step (per-sequence aggregation) and the loss the padded log-probs give."""
    from kexaone_align.algorithms.agapo import agapo_loss

    mask = batch["loss_mask"]
    expected = float(agapo_loss(padded_logprobs, batch["rollout_logprobs"], batch["advantages"], mask, 2.0))
    learner.config.loss_aggregation = "sequences"
    try:
        return learner.train_step(batch, agapo_loss_fn), expected
    finally:
        learner.config.loss_aggregation = "tokens"


def rl_batch():
    """RL rows (prompt + response, right-padded) with rollout log-probs and one advantage per row."""
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (9, 30, 6, 14, 5, 22)]
    batch = collate(ids, [[0] * 3 + [1] * (len(x) - 3) for x in ids])
    batch["rollout_logprobs"] = -torch.rand(batch["input_ids"].shape, generator=g) * batch["loss_mask"]
    batch["advantages"] = torch.randn(len(ids), generator=g)
    return batch


def test_sequence_packing_in_the_learner_matches_padded(learner):
    """``LearnerConfig.sequence_packing``: same log-probs and the same AGAPO loss, fewer computed tokens."""

    batch = rl_batch()
    learner.config.sequence_packing = False
    try:
        padded = learner.forward_logprobs(batch)
        learner.config.sequence_packing = True
        packed = learner.forward_logprobs(batch)
        torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)
        # rows that SFT already packed (with sequence_ids) pack again without leaking across samples
        sft_rows = samples()
        sft_batch, sft_packed = packed_batch(sft_rows)
        repacked = learner.forward_logprobs(sft_batch)
        learner.config.sequence_packing = False
        want = learner.forward_logprobs(sft_batch)
        learner.config.sequence_packing = True
        assert repacked.shape == want.shape
        for got, ref in zip(
            per_sample(repacked, sft_packed, sft_rows), per_sample(want, sft_packed, sft_rows), strict=True
        ):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        metrics, expected = agapo_step_and_expected_loss(learner, batch, padded)
    finally:
        learner.config.sequence_packing = False
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert metrics["learner_tokens"] == float(batch["attention_mask"].sum())
    assert metrics["computed_tokens"] < batch["input_ids"].numel()


def grouped_rl_batch():
    """Two prompts with G=3 responses each, as an RL stage hands them to the learner."""
    g = torch.Generator().manual_seed(4)
    ids, masks = [], []
    for n_prompt, lengths in [(7, (5, 12, 2)), (4, (9, 3, 15))]:
        prompt = torch.randint(5, 500, (n_prompt,), generator=g).tolist()
        for n in lengths:
            ids.append(prompt + torch.randint(5, 500, (n,), generator=g).tolist())
            masks.append([0] * n_prompt + [1] * n)
    batch = collate(ids, masks)
    batch["rollout_logprobs"] = -torch.rand(batch["input_ids"].shape, generator=g) * batch["loss_mask"]
    batch["advantages"] = torch.randn(len(ids), generator=g)
    return batch


def test_shared_prompts_in_the_learner_match_padded(learner):
    """``share_prefixes`` (the default with packing under sdpa): each prompt computed once per unit,
    the same log-probs and AGAPO loss as padded rows, and fewer computed tokens than plain packing."""

    batch = grouped_rl_batch()
    assert learner.policy.config._attn_implementation == "sdpa"
    padded = learner.forward_logprobs(batch)
    learner.config.sequence_packing = True
    try:
        flat_tokens = sum(m.computed_tokens for m in learner._micro_batches(batch))
        learner.config.share_prefixes = True
        shared = learner.forward_logprobs(batch)
        torch.testing.assert_close(shared, padded, rtol=1e-4, atol=1e-5)
        metrics, expected = agapo_step_and_expected_loss(learner, batch, padded)
    finally:
        learner.config.sequence_packing = False
        learner.config.share_prefixes = False
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert metrics["learner_tokens"] == float(batch["attention_mask"].sum())  # the rows' tokens, as before
    # two prompts of 7 and 4 tokens are computed once instead of three times each
    assert metrics["computed_tokens"] <= flat_tokens - 2 * (7 + 4)
