"""AGAPO's importance ratio under ``agapo.ratio_distribution``: on-policy it is 1, whichever distribution
is chosen, at temperatures other than 1 and with top-p / top-k truncation; and the per-step mismatch
metrics are true extremes and token means over micro-batches and ranks.

The rollout side is the real hf backend (KV-cached decoding, left padding); the learner side is the
learner's own log-prob module on the same weights (no Ray), then one in-process DeepSpeed learner.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from kexaone_align.algorithms import agapo
from kexaone_align.algorithms.logprobs import chunked_token_logprobs, naive_token_logprobs
from kexaone_align.losses import bind_loss
from kexaone_align.runtime.learner import TokenLogprobModel
from kexaone_align.runtime.metric_reduce import MetricAccumulator, combine
from kexaone_align.runtime.rollout.base import RolloutRequest, SamplingConfig
from kexaone_align.runtime.rollout.hf import HFRolloutBackend
from kexaone_align.runtime.rollout.sampling import processed_logprobs
from kexaone_align.runtime.rollout.tiny import tiny_exaone_moe
from kexaone_align.stages import rl

AGAPO_LOSS = bind_loss("agapo", section="agapo", stage_params={"is_cap": 2.0})  # as the stage binds it

REQUESTS = [
    RolloutRequest("a", [1, 17, 40], num_samples=3, metadata={"row": 0}),
    RolloutRequest("b", [1, *range(100, 114)], num_samples=3, metadata={"row": 1}),
    RolloutRequest("c", [1, 5, 6, 7, 8, 9], num_samples=2, metadata={"row": 2}),
]
# (temperature, top_p, top_k): none of them is the plain model at T = 1
SETTINGS = [(0.7, 0.8, -1), (1.3, 0.9, -1), (0.5, 1.0, -1), (1.0, 0.85, 20), (0.8, 0.9, 40)]


@pytest.fixture(scope="module")
def model():
    """The tiny random model with a sharpened LM head: a random model's next-token distribution is so
    flat that float noise could reorder the tokens at the nucleus edge between two forward passes."""
    m = tiny_exaone_moe(seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(6.0)
    return m.eval()


def _learner_logprobs(model, batch, temperature, top_p, top_k) -> torch.Tensor:
    module = TokenLogprobModel(
        model, chunk_size=7, zero3=False, temperature=temperature, top_p=top_p, top_k=top_k
    )
    with torch.no_grad():
        lp, _ = module(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return lp


def _rollout_batch(model, kind, temperature, top_p, top_k):
    backend = HFRolloutBackend.from_model(model, max_batch_size=4)
    sampling = SamplingConfig(
        max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k, seed=5, logprobs=kind
    )
    samples = backend.generate(REQUESTS, sampling)
    return rl.training_batch(samples, [0.0] * len(samples), pad_token_id=0)


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), SETTINGS)
@pytest.mark.parametrize("kind", ["sampler", "model_at_temperature"])
def test_on_policy_ratio_is_one_under_the_matching_distribution(model, kind, temperature, top_p, top_k):
    class Recipe:  # the two recipe sections agapo_sampling reads
        class rollout:
            max_new_tokens = 10

        seed = 5

    Recipe.rollout.temperature, Recipe.rollout.top_p, Recipe.rollout.top_k = temperature, top_p, top_k
    Recipe.agapo = type("A", (), {"ratio_distribution": kind})
    sampling, learner = rl.agapo_sampling(Recipe)
    assert sampling.logprobs == kind and learner["logprob_temperature"] == temperature
    batch = _rollout_batch(model, kind, temperature, top_p, top_k)
    mask = batch["loss_mask"]
    lp = _learner_logprobs(
        model, batch, learner["logprob_temperature"], learner["logprob_top_p"], learner["logprob_top_k"]
    )
    stats = agapo.summarize_ratio_stats(
        agapo.importance_ratio_stats(lp, batch["rollout_logprobs"], mask, is_cap=2.0)
    )
    assert mask.sum() >= 40
    assert stats["is_ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert stats["is_ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert stats["mismatch_kl_k3"] == pytest.approx(0.0, abs=1e-7)
    assert stats["is_truncated_frac"] == 0.0


def test_the_old_pairing_is_not_on_policy(model):
    """What the learner computed before (the model at T = 1, full vocabulary) against the sampler's
    processed log-probs at T = 0.7, top-p 0.8: the ratio is far from 1, which is what the choice fixes."""
    batch = _rollout_batch(model, "sampler", 0.7, 0.8, -1)
    lp = _learner_logprobs(model, batch, 1.0, 1.0, -1)
    stats = agapo.summarize_ratio_stats(
        agapo.importance_ratio_stats(lp, batch["rollout_logprobs"], batch["loss_mask"], is_cap=2.0)
    )
    assert abs(stats["is_ratio_mean"] - 1.0) > 0.05 and stats["mismatch_kl_k3"] > 1e-3


@pytest.mark.parametrize(("top_p", "top_k"), [(0.7, -1), (1.0, 5), (0.6, 9)])
def test_chunked_sampler_logprobs_match_the_rollout_sampler_and_their_gradients(top_p, top_k):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(13, 8, generator=g, dtype=torch.float64) * 2).requires_grad_()
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64).requires_grad_()
    logits = (hidden @ weight.t()).detach()
    processed = processed_logprobs(logits, 0.8, top_p, top_k).double()
    targets = processed.argmax(-1)  # a kept token per row: the most likely,
    edge = processed.masked_fill(torch.isinf(processed), float("inf")).argmin(-1)
    targets[::2] = edge[::2]  # or the least likely still in the nucleus
    trunc = {"temperature": 0.8, "top_p": top_p, "top_k": top_k}
    got = chunked_token_logprobs(hidden, weight, targets, chunk_size=4, **trunc)
    want = processed.gather(1, targets[:, None])[:, 0]
    assert torch.allclose(got, want, atol=1e-5)
    naive = naive_token_logprobs(hidden, weight, targets, **trunc)
    assert torch.allclose(got, naive, atol=1e-10)
    (gh, gw) = torch.autograd.grad(got.sum(), (hidden, weight))
    (nh, nw) = torch.autograd.grad(naive.sum(), (hidden, weight))
    assert torch.allclose(gh, nh, atol=1e-9) and torch.allclose(gw, nw, atol=1e-9)
    # a target outside the nucleus (the policy moved) keeps a finite log-prob
    outside = torch.sort(processed, -1).indices[:, 0]
    far = chunked_token_logprobs(hidden, weight, outside, chunk_size=4, **trunc)
    assert torch.isfinite(far).all()


def test_metric_extremes_and_sums_are_exact_over_micro_batches_and_ranks():
    keys = ("is_ratio_max", "is_ratio_min", "is_ratio_sum", "ratio_tokens_sum", "x")
    micro = [
        (dict(zip(keys, (3.0, 0.5, 4.0, 4, 1.0), strict=True)), 2.0),
        (dict(zip(keys, (1.5, 0.9, 2.0, 2, 4.0), strict=True)), 1.0),
    ]
    acc = MetricAccumulator()
    for metrics, weight in micro:
        acc.add(metrics, weight)
    rank0 = acc.result()
    assert rank0["is_ratio_max"] == 3.0 and rank0["is_ratio_min"] == 0.5 and rank0["is_ratio_sum"] == 6.0
    assert rank0["x"] == pytest.approx(2.0)  # other names stay weighted means
    rank1 = {"is_ratio_max": 7.0, "is_ratio_min": 0.8, "is_ratio_sum": 7.0, "ratio_tokens_sum": 1, "x": 0.0}
    both = combine([(rank0, 3.0), (rank1, 1.0)])
    assert both["is_ratio_max"] == 7.0 and both["is_ratio_min"] == 0.5 and both["ratio_tokens_sum"] == 7
    assert both["x"] == pytest.approx(1.5)
    summary = agapo.summarize_ratio_stats({**both, "is_truncated_sum": 1.0, "mismatch_kl_k3_sum": 0.7})
    assert summary["is_ratio_mean"] == pytest.approx(13.0 / 7) and summary["is_truncated_frac"] == 1 / 7
    assert summary["is_ratio_max"] == 7.0 and summary["mismatch_kl_k3"] == pytest.approx(0.1)


@pytest.mark.slow
def test_learner_train_step_reports_on_policy_ratio_and_true_extremes(model, tmp_path):
    """The in-process DeepSpeed learner, at T = 0.7 / top-p 0.8 under ``sampler``, over several
    micro-batches: the on-policy ratio is 1, and after one step the extremes are the batch's own."""
    from kexaone_align.runtime.learner import Learner, LearnerConfig

    model.save_pretrained(tmp_path / "policy")
    batch = _rollout_batch(model, "sampler", 0.7, 0.8, -1)
    batch["advantages"] = torch.linspace(-1, 1, batch["input_ids"].shape[0])
    cfg = LearnerConfig(
        lr=1e-2, micro_batch_tokens=40, loss_aggregation="sequences", logprob_temperature=0.7,
        logprob_top_p=0.8, lr_schedule="cosine", warmup_steps=2, decay_steps=4,
    )  # fmt: skip
    learner = Learner(tmp_path / "policy", cfg)
    learner.setup()
    first = learner.train_step(batch, AGAPO_LOSS)
    assert first["micro_batches"] >= 2
    stats = agapo.summarize_ratio_stats({k.removeprefix("loss/"): v for k, v in first.items()})
    assert stats["is_ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert stats["is_ratio_max"] == pytest.approx(1.0, abs=1e-4)
    lp = learner.forward_logprobs(batch)  # after one step: off-policy now
    want = agapo.importance_ratio_stats(lp, batch["rollout_logprobs"], batch["loss_mask"], 2.0)
    assert want["is_ratio_max"] > 1.0 + 1e-3
    second = learner.train_step(batch, AGAPO_LOSS)
    for key in ("is_ratio_max", "is_ratio_min", "ratio_tokens_sum"):  # the whole batch's, not averages
        assert second[f"loss/{key}"] == pytest.approx(want[key], rel=1e-5), key
    # A skipped step moves the schedule like a real one: warmup 1/2, then 2/2, then the cosine.
    assert first["lr"] == pytest.approx(5e-3) and second["lr"] == pytest.approx(1e-2)
    assert learner.advance_lr_schedule() == pytest.approx(1e-2)  # the LR step 3 would have used
    third = learner.train_step(batch, AGAPO_LOSS)
    assert third["lr"] == pytest.approx(cfg.lr_multiplier()(3) * 1e-2)


def test_vllm_logprobs_mode_follows_the_ratio_distribution():
    from kexaone_align.errors import KexaoneError
    from kexaone_align.runtime.rollout.vllm import delivers, engine_logprobs_mode, vllm_engine_kwargs

    assert engine_logprobs_mode("sampler", 0.7, 0.9) == "processed_logprobs"
    assert engine_logprobs_mode("model_at_temperature", 1.0, 0.95) == "raw_logprobs"  # the paper's T
    assert engine_logprobs_mode("model_at_temperature", 0.7, 1.0) == "processed_logprobs"  # untruncated
    with pytest.raises(KexaoneError, match="ratio_distribution=model_at_temperature"):
        engine_logprobs_mode("model_at_temperature", 0.7, 0.9)
    assert vllm_engine_kwargs("m", logprobs_mode="raw_logprobs")["logprobs_mode"] == "raw_logprobs"

    def asks(kind, t, p, k=-1):
        return SamplingConfig(temperature=t, top_p=p, top_k=k, logprobs=kind)

    assert delivers("raw_logprobs", asks("model_at_temperature", 1.0, 0.95))
    assert not delivers("raw_logprobs", asks("sampler", 1.0, 0.95))
    assert not delivers("processed_logprobs", asks("model_at_temperature", 1.0, 0.95))
    assert delivers("processed_logprobs", asks("model_at_temperature", 0.6, 1.0))
    assert delivers("raw_logprobs", asks(None, 0.6, 0.9))  # evaluation reads no log-probs


def test_recipe_refuses_what_vllm_cannot_report(tmp_path):
    from pathlib import Path

    from kexaone_align.config import load_recipe
    from kexaone_align.errors import KexaoneError

    tiny = Path(__file__).parents[1] / "recipes/tiny/agapo.yaml"
    base = ["rollout.backend=vllm", f"run_dir={tmp_path}"]
    with pytest.raises(KexaoneError, match="ratio_distribution"):
        load_recipe(tiny, [*base, "rollout.temperature=0.7", "rollout.top_p=0.9"])
    ok = load_recipe(tiny, [*base, "rollout.temperature=0.7", "agapo.ratio_distribution=sampler"])
    assert ok.agapo.ratio_distribution == "sampler"
    assert load_recipe(tiny, base).agapo.ratio_distribution == "model_at_temperature"  # T = 1.0 is fine
