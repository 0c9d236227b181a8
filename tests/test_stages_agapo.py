"""The AGAPO stage: batch building and staleness accounting in isolation, then real runs through Ray,
DeepSpeed and the hf rollout backend on a tiny random model (a synthetic verifier gives rewards with
variance, since a random model never solves arithmetic)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from kexaone_align.data.prompts import PromptRow
from kexaone_align.runtime.rollout.base import RolloutSample
from kexaone_align.stages import rl

VERIFIER = '''
import itertools, threading
from kexaone_align.verifiers import VerifyResult

_calls = itertools.count()
_lock = threading.Lock()

class Parity:
    """Reward 1 when the response text has an even number of characters: random, but with variance."""
    name = "parity"
    def verify(self, sample):
        return VerifyResult(float(len(sample.response) % 2 == 0))

class ZeroFirst(Parity):
    """0 for the first SKIP calls (held-out eval + step 1 of the test run), then parity."""
    name = "zero_first"
    SKIP = 0
    def verify(self, sample):
        with _lock:
            n = next(_calls)
        return VerifyResult(0.0) if n < self.SKIP else super().verify(sample)

parity = Parity()
zero_first = ZeroFirst()
'''

USER_LOSS = """
from kexaone_align.algorithms.objectives import agapo_objective

def agapo_with_marker(logprobs, batch, *, is_cap, marker):
    loss, metrics = agapo_objective(logprobs, batch, is_cap=is_cap)
    return loss, {**metrics, "user_marker_max": marker}
"""


def _sample(version: int, prompt: list[int], tokens: list[int], logps: list[float]) -> RolloutSample:
    return RolloutSample("r", 0, prompt, tokens, logps, "stop", version, {"row": 0})


def test_training_batch_aligns_rollout_logprobs_with_response_tokens():
    a = _sample(0, [5, 6, 7], [8, 9], [-0.5, -0.25])
    b = _sample(0, [5], [4, 3, 2], [-1.0, -2.0, -3.0])
    batch = rl.training_batch([a, b], [1.5, -0.5], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Column t of the learner's log-probs scores input_ids[t]: the rollout log-prob must sit there too.
    assert batch["rollout_logprobs"][0, 3:].tolist() == [-0.5, -0.25]
    assert batch["rollout_logprobs"][1, 1:4].tolist() == [-1.0, -2.0, -3.0]
    assert batch["advantages"].tolist() == [1.5, -0.5]


def test_split_stale_drops_and_counts_old_groups():
    rows = [PromptRow(f"p{i}", [{"role": "user", "content": "q"}], "math") for i in range(3)]
    groups = [
        rl.Group(rows[0], [_sample(3, [1], [2], [0.0]), _sample(3, [1], [2], [0.0])]),
        rl.Group(rows[1], [_sample(2, [1], [2], [0.0]), _sample(2, [1], [2], [0.0])]),
        rl.Group(rows[2], [_sample(1, [1], [2], [0.0]), _sample(2, [1], [2], [0.0])]),
    ]
    kept, dropped, staleness = rl.split_stale(groups, learner_version=3, max_staleness=1)
    assert [g.row.id for g in kept] == ["p0", "p1"] and dropped == 2 and staleness == 0.5
    kept, dropped, staleness = rl.split_stale(groups, learner_version=3, max_staleness=0)
    assert [g.row.id for g in kept] == ["p0"] and dropped == 4 and staleness == 0.0


# ------------------------------------------------------------------------------ end-to-end runs
def _run_agapo(tmp: Path, verifier: str, *extra: str) -> tuple[dict, list[dict]]:
    from kexaone_align.config import load_recipe
    from kexaone_align.stages import agapo

    overrides = [
        "agapo.steps=3", "agapo.prompts_per_step=2", "agapo.group_size=4", "agapo.lr=1e-3",
        "rollout.max_new_tokens=6", "data.num_train=16", "data.num_eval=2",
        f"verifiers.math={verifier}", f"run_dir={tmp / 'run'}",
        "logging.progress_bar=false", "logging.plots=false", *extra,
    ]  # fmt: skip
    recipe = load_recipe(Path(__file__).parents[1] / "recipes/tiny/agapo.yaml", overrides)
    summary = agapo.run(recipe)
    metrics = [json.loads(line) for line in (tmp / "run/metrics.jsonl").read_text().splitlines()]
    return summary, [m for m in metrics if m["step"] >= 1 and "rollout/seconds" in m]


@pytest.fixture(scope="module")
def verifier_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("verifier") / "synthetic_verifier.py"
    path.write_text(textwrap.dedent(VERIFIER))
    return path


def _router_names(model) -> set[str]:
    from kexaone_align.models import freeze_router

    return set(freeze_router(model).parameter_names)


@pytest.mark.slow
def test_pipelined_agapo_step_learns_logs_and_keeps_router_frozen(tmp_path, verifier_file):
    from kexaone_align.models.loading import load_policy

    summary, steps = _run_agapo(tmp_path, f"{verifier_file}:parity", "rollout.max_staleness=1")
    assert 0.0 <= summary["eval_before"]["accuracy"] <= 1.0 and "accuracy" in summary["eval_after"]
    assert len(steps) == 3 and summary["policy_version"] == 3 - summary["skipped_steps"] >= 1
    learned = [m for m in steps if "loss" in m]
    ratio_keys = ("is_ratio_mean", "is_ratio_min", "is_ratio_max", "is_truncated_frac", "mismatch_kl_k3")
    for key in (*ratio_keys, "learner_tokens_per_s", "grad_norm"):
        assert all(key in m for m in learned), key
    for key in (
        "reward/math",
        "zero_variance_frac",
        "response_length",
        "staleness",
        "rollout/tokens_per_s",
        "grading/tail_s",
    ):
        assert all(key in m for m in steps), key
    # The first batch was sampled by the initial policy; later ones are one version old (pipelined).
    assert steps[0]["staleness"] == 0.0
    if summary["skipped_steps"] == 0:
        assert [m["staleness"] for m in steps[1:]] == [1.0, 1.0]
    assert sum(m["dropped_stale"] for m in steps) == 0
    synced = [m for m in steps if "weight_sync/seconds" in m]
    assert synced and all(m["weight_sync/gb_per_s"] > 0 for m in synced)
    # The first batch is on-policy and both sides of the ratio are the model at T (ratio_distribution
    # model_at_temperature): rho is 1 on every token, not the top-p mass it was before.
    if steps[0].get("loss") is not None:
        assert steps[0]["is_ratio_min"] == pytest.approx(1.0, abs=1e-4)
        assert steps[0]["is_ratio_max"] == pytest.approx(1.0, abs=1e-4)
        assert steps[0]["mismatch_kl_k3"] == pytest.approx(0.0, abs=1e-6)
    assert not any(k.endswith("_sum") for m in steps for k in m)  # partials are summarised, not logged

    init = load_policy(tmp_path / "run/init").state_dict()
    after_model = load_policy(summary["export"])
    after = after_model.state_dict()
    routers = _router_names(after_model)
    assert routers
    assert all(torch.equal(init[k], after[k]) for k in routers), "router weights moved"
    changed = [k for k in init if k not in routers and not torch.equal(init[k], after[k])]
    assert len(changed) > len(init) // 2


@pytest.mark.slow
def test_synchronous_agapo_skips_all_filtered_step_cleanly(tmp_path, verifier_file):
    # Held-out eval grades 2 samples, step 1 grades 2 x 4: all of those score 0 (zero variance).
    text = verifier_file.read_text().replace("SKIP = 0", "SKIP = 10")
    skip_file = tmp_path / "skip_verifier.py"
    skip_file.write_text(text)
    summary, steps = _run_agapo(
        tmp_path, f"{skip_file}:zero_first", "rollout.max_staleness=0", "learners.warmup_steps=3"
    )
    first = steps[0]
    assert first["zero_variance_frac"] == 1.0 and first["skipped"] == 1.0 and "loss" not in first
    # The LR schedule is sized in stage steps: the skipped step 1 still takes warmup step 1 of 3, so the
    # next steps train at 2/3 and 3/3 of the peak (before, step 2 trained at 1/3).
    assert first["lr"] == pytest.approx(1e-3 / 3)
    for m in steps:  # every step, taken or skipped, logs the LR of its own place in the schedule
        assert m["lr"] == pytest.approx(1e-3 * min(1.0, m["step"] / 3)), m["step"]
    assert "weight_sync/seconds" not in first  # nothing new to push after a skipped step
    assert summary["skipped_steps"] >= 1 and summary["filtered_prompts"] >= 2
    assert summary["policy_version"] == 3 - summary["skipped_steps"]
    assert all(m["staleness"] == 0.0 for m in steps)  # synchronous: always the current policy


def _checking_pushes(monkeypatch) -> list[dict]:
    """Every push is followed by a check that the rollout workers' log-probs equal the learners' own."""
    import ray

    from kexaone_align.runtime.rollout.pool import RolloutPool

    pushes: list[dict] = []
    push = RolloutPool.push_weights

    def checked_push(pool, learners, version, bucket_bytes):
        out = push(pool, learners, version, bucket_bytes)
        ids = torch.tensor([[1, 9, 33, 70, 4, 200, 17, 3], [7, 41, 2, 300, 12, 9, 60, 5]])
        ones = torch.ones_like(ids)
        want = learners.forward_logprobs({"input_ids": ids, "attention_mask": ones, "loss_mask": ones})
        for logits in ray.get([w.logits.remote(ids.tolist()) for w in pool.workers]):
            got = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            assert (got - want[:, 1:]).abs().max() <= 1e-5, f"version {version}: rollout != learner"
        assert pool.versions() == [version] * len(pool.workers)
        pushes.append(out)
        return out

    monkeypatch.setattr(RolloutPool, "push_weights", checked_push)
    return pushes


def _assert_many_bucket_pushes(pushes: list[dict], steps: list[dict]) -> None:
    assert len(pushes) == 3  # after steps 1 and 2, and before the final evaluation
    assert all(p["weight_sync/buckets"] >= 10 for p in pushes), [p["weight_sync/buckets"] for p in pushes]
    assert [p["weight_sync/version"] for p in pushes] == [1.0, 2.0, 3.0]
    synced = [m for m in steps if "weight_sync/seconds" in m]
    assert len(synced) == 2 and all(m["weight_sync/gb_per_s"] > 0 for m in synced)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_zero3_learners_and_two_workers_take_the_one_actor_steps(tmp_path, verifier_file, monkeypatch):
    """The issue's multi-actor run: 2 ZeRO-3 learners + 2 rollout workers, weights pushed through the
    object store in 1 MiB buckets, train like 1 + 1.

    Sampling is seeded per prompt, so both layouts see the same rollouts and rewards; data-parallel
    learners then take the same optimizer steps as one learner over the whole batch. After every push
    both workers' log-probs equal the learners'.
    """
    common = (f"{verifier_file}:parity", "learners.zero_stage=3", "model.experts_implementation=eager")
    one, one_steps = _run_agapo(tmp_path / "one", *common)
    pushes = _checking_pushes(monkeypatch)
    two, two_steps = _run_agapo(
        tmp_path / "two", *common, "learners.num_learners=2", "rollout.num_workers=2",
        "rollout.weight_sync_bucket_mb=1", "rollout.weight_sync_transport=object_store",
    )  # fmt: skip
    assert two["policy_version"] == one["policy_version"] == 3
    for a, b in zip(two_steps, one_steps, strict=True):
        assert a["reward/mean"] == b["reward/mean"]
        if "loss" in b:
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert two["eval_after"]["accuracy"] == one["eval_after"]["accuracy"]
    _assert_many_bucket_pushes(pushes, two_steps)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_zero3_learners_push_many_buckets_over_the_collective(tmp_path, verifier_file, monkeypatch):
    """The same 2 ZeRO-3 learner run (1 MiB buckets) on the collective transport (the object store is
    covered by the parity run above); rollout equals learner after every push. The learners minimise a
    user's loss from a plugin file (``agapo.loss``, with an option), loaded again inside each actor."""
    loss_file = tmp_path / "team_loss.py"
    loss_file.write_text(USER_LOSS)
    pushes = _checking_pushes(monkeypatch)
    summary, steps = _run_agapo(
        tmp_path, f"{verifier_file}:parity", "agapo.prompts_per_step=4", "learners.num_learners=2",
        "learners.zero_stage=3", "rollout.weight_sync_bucket_mb=1", "checkpoint.export=false",
        "agapo.zero_variance_filter=false", "rollout.weight_sync_transport=collective",
        f"agapo.loss={loss_file}:agapo_with_marker", "agapo.loss_options.marker=7.0",
    )  # fmt: skip
    assert len(steps) == 3 and summary["policy_version"] == 3
    assert all(m["user_marker_max"] == 7.0 for m in steps)  # the user's function ran on the learners
    _assert_many_bucket_pushes(pushes, steps)
    # synchronous: every batch on-policy, and the pushed weights equal the learners' (checked above)
    assert all(m["is_ratio_min"] == pytest.approx(1.0, abs=1e-4) for m in steps)
    assert all(m["is_ratio_max"] == pytest.approx(1.0, abs=1e-4) for m in steps)
