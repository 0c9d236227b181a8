"""GROUPER: group-wise SimPER preference learning (K-EXAONE report, Eq. 3-4), as the recipe reads.

G responses per prompt are sampled from the *initial* policy (the stage's starting checkpoint) by the
rollout workers and scored by the preference reward: per task, gates x weighted sum of rule verifiers
(e.g. ``ifeval`` for style instructions) and, only if configured, the rubric judge. A prompt's group is
sampled the first time the prompt is used and reused after that; with ``refresh_every > 0`` the current
policy is pushed to the workers every N steps and groups are resampled from it. Each step turns a
batch of groups into ``preference_advantages`` and takes one learner step of ``grouper_loss``.
Held-out preference reward is measured before and after by sampling at T=1.0, top-p 0.95.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from kexaone_align.algorithms.grouper import preference_advantages
from kexaone_align.config import Recipe
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.base import SamplingConfig
from kexaone_align.stages import rl
from kexaone_align.stages.common import (
    StageRun,
    finish_stage,
    load_stage_tokenizer,
    make_learners,
    prepare_policy,
    start_ray,
    tokenizer_source,
)

logger = logging.getLogger(__name__)


def build_judge(recipe: Recipe) -> Any | None:
    """The rubric judge of ``grouper.reward.judge`` (None when the backend is ``none``)."""
    from kexaone_align.reward_models import OpenAICompatibleBackend, RubricJudge, TransformersJudgeBackend

    judge = recipe.grouper.reward.judge
    if judge.backend == "none":
        return None
    if judge.backend == "openai":
        backend: Any = OpenAICompatibleBackend(
            judge.base_url, judge.model, max_concurrency=judge.max_concurrency, timeout_s=judge.timeout_s
        )
    else:
        backend = TransformersJudgeBackend(judge.model)
    return RubricJudge(
        backend, judge.rubric, retries=judge.retries, timeout_s=judge.timeout_s,
        max_concurrency=judge.max_concurrency, name="judge",
    )  # fmt: skip


def build_preference_reward(recipe: Recipe) -> Any:
    """A ``RewardCombiner`` for the recipe: ``grouper.reward.per_task``, and for every other task in
    ``verifiers`` that task's verifier alone (weight 1)."""
    from kexaone_align.reward_models import RewardCombiner
    from kexaone_align.verifiers import resolve_verifier

    reward = recipe.grouper.reward
    config: dict[str, Any] = {}
    for task, spec in reward.per_task.items():
        config[task] = {
            "components": [{"name": c.source, "weight": c.weight} for c in spec.components],
            "gates": [{"name": g.verifier, "threshold": g.threshold} for g in spec.gates],
        }
    combiner = RewardCombiner.from_config(config, judges=_judges(recipe)) if config else None
    alone = {t: ref for t, ref in recipe.verifiers.items() if t not in reward.per_task}
    if combiner is None and not alone:
        raise KexaoneError("grouper: no preference reward; set grouper.reward.per_task or verifiers")
    if alone:
        from kexaone_align.reward_models import CombinationSpec

        extra = {t: CombinationSpec([(resolve_verifier(ref), 1.0)]) for t, ref in alone.items()}
        if combiner is None:
            return RewardCombiner(extra)
        combiner.per_task.update(extra)
        for spec in extra.values():
            combiner._resolve(spec.components[0][0])
    return combiner


def _judges(recipe: Recipe) -> dict[str, Any]:
    judge = build_judge(recipe)
    return {"judge": judge} if judge is not None else {}


def grade_preference(combiner: Any, samples: list[Any]) -> list[float]:
    """Preference rewards in [0, 1] for verifier samples."""
    return [r.reward for r in combiner.score_batch(samples)] if samples else []


def run(recipe: Recipe) -> dict[str, Any]:
    """Run the GROUPER stage; returns its summary with ``eval_before`` / ``eval_after`` preference reward."""
    cfg = recipe.grouper
    if cfg is None:
        raise KexaoneError("stage 'grouper' needs a grouper section")
    start_ray(recipe)
    model_path = prepare_policy(recipe)
    tok_path = tokenizer_source(recipe, model_path)
    tokenizer = load_stage_tokenizer(recipe, model_path)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    train_rows, held_rows = rl.load_prompt_rows(recipe)
    grade = functools.partial(grade_preference, build_preference_reward(recipe))
    roll = recipe.rollout
    sampling = SamplingConfig.from_recipe(roll, seed=recipe.seed)
    bucket_bytes = roll.weight_sync_bucket_mb << 20
    steps = cfg.steps

    with StageRun(recipe, steps) as run_:
        learners = make_learners(recipe, model_path, steps, overrides={"loss_aggregation": "sequences"})
        pool = None
        try:
            pool = rl.rollout_pool_for(recipe, model_path)
            state = run_.restore(learners)
            cursor = rl.restored_cursor(recipe, train_rows, state)
            version = run_.step  # one optimizer step per stage step
            sampled_from = 0  # the policy version the cached groups were sampled from
            if cfg.refresh_every and run_.step >= cfg.refresh_every:  # resumed past a refresh
                sampled_from = run_.step - run_.step % cfg.refresh_every
                if sampled_from:
                    pool.push_weights(learners, sampled_from, bucket_bytes)
            # groups sampled since the last refresh, reused when their prompt comes round again; part of
            # every checkpoint, so a resumed run reuses exactly the groups an uninterrupted one would
            cache: dict[str, rl.Group] = dict(state.get("group_cache") or {})
            total_sampled = int(state.get("sampled_prompts", 0))

            def evaluate(tag: str) -> dict[str, float]:
                out = rl.evaluate(
                    pool, tokenizer, held_rows, grade, samples_per_prompt=1,
                    max_new_tokens=roll.max_new_tokens, seed=recipe.seed + 7919, tag=tag,
                )  # fmt: skip
                # the mean preference reward: ``accuracy`` in the shared evaluator, ``reward`` here
                return {"reward": out["accuracy"], **out}

            eval_before = state.get("eval_before") or evaluate("eval")
            run_.log_eval({f"eval_before/{k}": v for k, v in eval_before.items()})
            logger.warning("grouper: held-out preference reward before = %.3f", eval_before["reward"])

            while run_.step < steps:
                metrics: dict[str, float] = {}
                if cfg.refresh_every and run_.step and run_.step % cfg.refresh_every == 0:
                    if version > sampled_from:
                        metrics.update(pool.push_weights(learners, version, bucket_bytes))
                        sampled_from = version
                    cache.clear()
                rows = cursor.next_batch(cfg.prompts_per_step)
                fresh = list({r.id: r for r in rows if r.id not in cache}.values())
                if fresh:
                    reqs = rl.build_requests(tokenizer, fresh, cfg.group_size, f"s{run_.step}")
                    samples, roll_metrics = pool.collect(pool.submit(reqs, sampling))
                    metrics.update(roll_metrics)
                    groups = rl.group_samples(fresh, samples)
                    rl.assign_rewards(groups, grade(rl.verifier_samples(tokenizer, groups)))
                    cache.update({g.row.id: g for g in groups})
                    total_sampled += len(fresh)
                groups = [cache[r.id] for r in rows]
                rewards = rl.assign_rewards(groups, [x for g in groups for x in g.rewards])
                adv = preference_advantages(rewards)
                flat = [s for g in groups for s in g.samples]
                batch = rl.training_batch(flat, adv.reshape(-1).tolist(), pad)
                train = learners.train_step(batch, rl.grouper_loss_fn)
                version += 1
                metrics.update({k.removeprefix("loss/"): v for k, v in train.items()})
                metrics["learner_tokens_per_s"] = metrics.pop("tokens_per_s", 0.0)
                metrics.update(rl.per_task_means(groups, "reward"))
                metrics.update(rl.response_stats([s for g in groups for s in g.samples]))
                metrics["reward/mean"] = float(rewards.mean())
                metrics["tied_group_frac"] = float((rewards.amax(1) == rewards.amin(1)).float().mean())
                metrics["sampled_prompts"] = float(len(fresh))
                metrics["total/sampled_prompts"] = float(total_sampled)
                metrics["sample_policy_version"] = float(
                    max(s.policy_version for g in groups for s in g.samples)
                )
                run_.log(metrics)
                resume = {"cursor": cursor.state_dict(), "eval_before": eval_before}
                run_.maybe_checkpoint(
                    learners, {**resume, "sampled_prompts": total_sampled, "group_cache": cache}
                )
            if version > sampled_from:
                pool.push_weights(learners, version, bucket_bytes)
            eval_after = evaluate("eval")
            run_.log_eval({f"eval_after/{k}": v for k, v in eval_after.items()})
            logger.warning("grouper: held-out preference reward after = %.3f", eval_after["reward"])
            summary = {
                "eval_before": eval_before,
                "eval_after": eval_after,
                "reward_gain": eval_after["reward"] - eval_before["reward"],
                "sampled_prompts": total_sampled,
            }
            return finish_stage(run_, learners, summary, tokenizer=tok_path)
        finally:
            if pool is not None:
                pool.shutdown()
            learners.shutdown()
