"""The GROUPER stage: the preference reward built from the recipe, and a real run through Ray, DeepSpeed
and the hf rollout backend in which every group is sampled once, from the initial policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kexaone_align.verifiers import Sample

from kexaone_align.config import load_recipe
from kexaone_align.runtime.checkpoint import load_trainer_state
from kexaone_align.runtime.group_cache import CachePosition, GroupCache

RECIPE = Path(__file__).parents[1] / "recipes/tiny/grouper.yaml"
STYLE = {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}


def test_preference_reward_uses_rule_verifier_from_recipe():
    from kexaone_align.stages.grouper import build_preference_reward

    combiner = build_preference_reward(load_recipe(RECIPE))
    ok = Sample("q", "the answer is 5.", STYLE, "ifeval")
    bad = Sample("q", "The Answer Is 5.", STYLE, "ifeval")
    assert [r.reward for r in combiner.score_batch([ok, bad])] == [1.0, 0.0]
    # A task with no per_task entry is graded by its verifier alone.
    math = Sample("q", "\\boxed{5}", "5", "math")
    assert combiner.score_batch([math])[0].reward == 1.0


def test_judge_component_without_backend_is_refused():
    from kexaone_align.errors import KexaoneError

    with pytest.raises((KexaoneError, ValueError), match="judge"):
        load_recipe(RECIPE, ["grouper.reward.per_task.ifeval.components=[{source: judge, weight: 1.0}]"])


@pytest.mark.slow
def test_grouper_samples_once_from_initial_policy_and_trains(tmp_path):
    from kexaone_align.models.loading import load_policy
    from kexaone_align.stages import grouper

    overrides = [
        "grouper.steps=3", "grouper.prompts_per_step=2", "grouper.group_size=4", "grouper.lr=1e-3",
        "grouper.refresh_every=0", "rollout.max_new_tokens=6", "data.num_train=2", "data.num_eval=2",
        f"run_dir={tmp_path / 'run'}", "logging.progress_bar=false", "logging.plots=false",
    ]  # fmt: skip
    summary = grouper.run(load_recipe(RECIPE, overrides))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "sampled_prompts" in m]
    assert len(steps) == 3
    # Two training prompts, three steps: sampled at step 1 only, reused after (no resampling).
    assert [m["sampled_prompts"] for m in steps] == [2.0, 0.0, 0.0]
    assert summary["sampled_prompts"] == 2
    assert all(m["sample_policy_version"] == 0.0 for m in steps)  # the initial policy's samples
    assert "rollout/seconds" in steps[0] and "rollout/seconds" not in steps[1]
    assert all("weight_sync/seconds" not in m for m in steps)  # the workers keep pi_init
    for key in ("loss", "reward/ifeval", "learner_tokens_per_s", "tied_group_frac", "response_length"):
        assert all(key in m for m in steps), key
    assert {"reward", "accuracy", "ifeval"} <= set(summary["eval_before"])
    assert "reward" in summary["eval_after"]
    assert summary["reward_gain"] == summary["eval_after"]["reward"] - summary["eval_before"]["reward"]
    init = load_policy(tmp_path / "run/init").state_dict()
    after = load_policy(summary["export"]).state_dict()
    if any(m["tied_group_frac"] < 1.0 for m in steps):  # some preference signal: the policy moved
        assert any(not torch.equal(init[k], after[k]) for k in init)


@pytest.mark.slow
def test_crashed_grouper_run_resumes_with_the_same_cached_groups(tmp_path):
    """Two prompts, three steps: step 1 samples both groups, steps 2 and 3 reuse them. A crash after
    the step-2 checkpoint must not resample at step 3: the cache is part of the checkpoint."""
    from kexaone_align.runtime import faults
    from kexaone_align.stages import run_recipe

    def recipe(run_dir, *extra):
        overrides = [
            "grouper.steps=3", "grouper.prompts_per_step=2", "grouper.group_size=4", "grouper.lr=1e-3",
            "grouper.refresh_every=0", "rollout.max_new_tokens=6", "data.num_train=2", "data.num_eval=2",
            "checkpoint.every_steps=2", "checkpoint.export=false", f"run_dir={run_dir}",
            "logging.progress_bar=false", "logging.plots=false", *extra,
        ]  # fmt: skip
        return load_recipe(RECIPE, overrides)

    def steps(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [m for m in rows if "sampled_prompts" in m]

    class Crash(Exception):
        pass

    def crash_at_step_3(run, learners):
        if run.step == 3:
            raise Crash

    run_recipe(recipe(tmp_path / "ref"))
    with faults.injected("stage.step_done", crash_at_step_3), pytest.raises(Crash):
        run_recipe(recipe(tmp_path / "run"))
    summary = run_recipe(recipe(tmp_path / "run", "checkpoint.resume=auto"))
    assert summary["resumed_from"].endswith("2")
    got, want = steps(tmp_path / "run"), steps(tmp_path / "ref")
    assert [m["step"] for m in got] == [1, 2, 3]
    assert [m["sampled_prompts"] for m in got] == [2.0, 0.0, 0.0]  # step 3 reused the checkpointed groups
    for g, w in zip(got, want, strict=True):
        assert g["reward/mean"] == w["reward/mean"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6)
    # The checkpoint records where the on-disk cache stood, not the groups themselves.
    checkpoint = Path(summary["resumed_from"])
    state = load_trainer_state(checkpoint, restore_rng=False)
    assert "group_cache" not in state and state["group_cache_position"]["groups"] == 2
    assert not _holds_samples(state)
    assert (checkpoint / "trainer_state.pt").stat().st_size < 32 * 1024
    position = CachePosition.from_dict(state["group_cache_position"])
    with GroupCache(tmp_path / "run/group_cache", position) as cache:
        assert len(cache.load(cache.keys())) == 2


def _holds_samples(value) -> bool:
    """Whether a (nested) trainer state carries rollout samples or groups anywhere."""
    from kexaone_align.runtime.rollout.base import RolloutSample
    from kexaone_align.stages.rl import Group

    if isinstance(value, RolloutSample | Group):
        return True
    if isinstance(value, dict):
        return any(_holds_samples(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_samples(v) for v in value)
    return False


def tiny(run_dir: Path, *extra: str):
    """The tiny GROUPER recipe cut down to seconds a step."""
    overrides = [
        "grouper.prompts_per_step=2", "grouper.group_size=4", "grouper.lr=1e-3", "rollout.max_new_tokens=6",
        "data.num_eval=2", "checkpoint.export=false", f"run_dir={run_dir}", "logging.progress_bar=false",
        "logging.plots=false", *extra,
    ]  # fmt: skip
    return load_recipe(RECIPE, overrides)


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if "sampled_prompts" in m]


def cached_groups(run_dir: Path) -> dict:
    """Every group in the run's on-disk cache (newest generation), by prompt id."""
    from kexaone_align.stages.grouper import CACHE_POSITION_KEY

    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    state = load_trainer_state(checkpoints[-1], restore_rng=False)
    position = CachePosition.from_dict(state[CACHE_POSITION_KEY])
    with GroupCache(run_dir / "group_cache", position) as cache:
        return dict(zip(cache.keys(), cache.load(cache.keys()), strict=True))


@pytest.mark.slow
def test_groups_sampled_after_a_periodic_eval_come_from_the_initial_policy(tmp_path):
    """Four prompts, two a step: step 2 samples new groups after the step-1 evaluation gave the workers
    the current policy. pi_init must be back first, so every group (tokens, log-probs, rewards) and
    every loss equals those of a run without evaluations."""
    from kexaone_align.stages import grouper

    base = ["grouper.steps=3", "grouper.refresh_every=0", "data.num_train=4", "checkpoint.every_steps=3"]
    grouper.run(tiny(tmp_path / "ref", *base))
    grouper.run(tiny(tmp_path / "run", *base, "grouper.eval_every_steps=1"))
    got, want = step_rows(tmp_path / "run"), step_rows(tmp_path / "ref")
    assert [m["sampled_prompts"] for m in got] == [2.0, 2.0, 0.0]
    assert "weight_sync/seconds" in got[0] and "weight_sync/seconds" in got[1]  # pushed for each evaluation
    assert all(m["sample_policy_version"] == 0.0 for m in got)
    for g, w in zip(got, want, strict=True):
        assert g["reward/mean"] == w["reward/mean"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6)
    assert cached_groups(tmp_path / "run") == cached_groups(tmp_path / "ref")
    evals = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if "eval/reward" in m]
    assert [m["step"] for m in evals] == [1, 2, 3]  # every step, the last one by the final evaluation
    assert all(0.0 <= m["eval/reward"] <= 1.0 and m["eval/train_seconds"] > 0 for m in evals)
    assert evals[0]["eval/train_seconds"] < evals[1]["eval/train_seconds"] < evals[2]["eval/train_seconds"]


@pytest.mark.slow
def test_refresh_generation_resumed_between_refreshes_reuses_its_groups(tmp_path):
    """refresh_every=2, four prompts, two a step: the groups of steps 3-4 (all four prompts, reshuffled)
    are sampled at step 3 by the policy after 2 steps. A crash after the step-3 checkpoint must not
    sample step 4's prompts with the step-3 policy: the resumed run trains on exactly the groups,
    labelled version 2, of an uninterrupted run."""
    from kexaone_align.runtime import faults
    from kexaone_align.stages import run_recipe

    base = ["grouper.steps=4", "grouper.refresh_every=2", "data.num_train=4", "checkpoint.every_steps=3",
            "grouper.eval_every_steps=1"]  # fmt: skip

    class Crash(Exception):
        pass

    def crash_at_step_4(run, learners):
        if run.step == 4:
            raise Crash

    run_recipe(tiny(tmp_path / "ref", *base))
    with faults.injected("stage.step_done", crash_at_step_4), pytest.raises(Crash):
        run_recipe(tiny(tmp_path / "run", *base))
    summary = run_recipe(tiny(tmp_path / "run", *base, "checkpoint.resume=auto"))
    assert summary["resumed_from"].endswith("3")
    got, want = step_rows(tmp_path / "run"), step_rows(tmp_path / "ref")
    assert [m["sampled_prompts"] for m in got] == [4.0, 0.0, 4.0, 0.0]  # all of a generation at its start
    assert [m["sample_policy_version"] for m in got] == [0.0, 0.0, 2.0, 2.0]
    for g, w in zip(got, want, strict=True):
        assert g["reward/mean"] == w["reward/mean"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6)
    assert cached_groups(tmp_path / "run") == cached_groups(tmp_path / "ref")


def test_old_checkpoint_groups_move_to_the_disk_cache(tmp_path):
    """A trainer state from before the on-disk cache carries the groups; they are migrated, except
    between two refreshes, where the rest of the generation could not be sampled any more."""
    from kexaone_align.data.prompts import PromptRow
    from kexaone_align.errors import KexaoneError
    from kexaone_align.runtime.rollout.base import RolloutSample
    from kexaone_align.stages.grouper import open_group_cache
    from kexaone_align.stages.rl import Group

    def legacy_group(key: str) -> Group:
        samples = [RolloutSample(f"s0-0-{key}", i, [1, 2], [3 + i], [-0.5], "stop", 0) for i in range(2)]
        row = PromptRow(key, [{"role": "user", "content": "q"}], "ifeval")
        return Group(row, samples, ["x", "y"], [1.0, 0.0])

    state = {"step": 2, "group_cache": {"a": legacy_group("a"), "b": legacy_group("b")}}
    with open_group_cache(tmp_path / "cache", state, refresh_every=0) as cache:
        assert cache.keys() == ["a", "b"] and cache.generation == 0
        got = cache.load(["b"])[0]
    assert got.samples == state["group_cache"]["b"].samples and got.rewards == [1.0, 0.0]
    with open_group_cache(tmp_path / "cache", {**state, "step": 4}, refresh_every=2) as cache:
        assert len(cache) == 2  # at a refresh: the next step starts a new generation anyway
    with pytest.raises(KexaoneError, match="between two refreshes"):
        open_group_cache(tmp_path / "cache", {**state, "step": 3}, refresh_every=2)
    with open_group_cache(tmp_path / "cache", {"step": 3}, refresh_every=2) as cache:
        assert len(cache) == 0  # no groups recorded: a clean cache
