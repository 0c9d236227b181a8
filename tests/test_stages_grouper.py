"""The GROUPER stage: the preference reward built from the recipe, and a real run through Ray, DeepSpeed
and the hf rollout backend in which every group is sampled once, from the initial policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kexaone_align.verifiers import Sample

from kexaone_align.config import load_recipe

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
