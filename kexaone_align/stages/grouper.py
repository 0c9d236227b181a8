"""GROUPER: group-wise SimPER preference learning (K-EXAONE report, Eq. 3-4), as the recipe reads.

G responses per prompt are sampled from the *initial* policy (the stage's starting checkpoint) by the
rollout workers and scored by the preference reward: per task, gates x weighted sum of rule verifiers
(e.g. ``ifeval`` for style instructions) and, only if configured, the rubric judge. A prompt's group is
sampled the first time the prompt comes round and reused after that. Each step turns a batch of groups
into ``preference_advantages`` and takes one learner step of ``grouper.loss`` (``grouper_loss``, Eq. 4,
unless the recipe names another).

The groups live on disk (``runtime.group_cache``); a checkpoint records only where that cache stands,
and a resume cuts it back there. Every step trains on groups read back from it.

Which policy samples: with ``refresh_every = 0`` (the paper) always pi_init. Should a held-out
evaluation (``eval_every_steps``) have given the workers the current policy, pi_init is streamed back
from the starting checkpoint before the next new prompt is sampled. With ``refresh_every = N > 0``
the current policy goes to the workers every N steps and the groups of all N steps are sampled right
then: that policy exists only at that moment (the learners move on), so nothing sampled later, nor a
resume between two refreshes, can need it again. Held-out preference reward is measured before and
after (and every ``eval_every_steps``) by sampling at T=1.0, top-p 0.95.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

from kexaone_align.algorithms.agapo import REWARD_ATOL
from kexaone_align.algorithms.grouper import preference_advantages
from kexaone_align.config import Recipe
from kexaone_align.errors import KexaoneError
from kexaone_align.losses import stage_loss
from kexaone_align.runtime.checkpoint_weights import checkpoint_weights
from kexaone_align.runtime.group_cache import CachedGroup, CachePosition, GroupCache
from kexaone_align.runtime.rollout.base import RolloutSample, SamplingConfig
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

GROUP_CACHE_DIR = "group_cache"  # under the run dir; see runtime.group_cache
CACHE_POSITION_KEY = "group_cache_position"  # trainer state: where the cache stood at the checkpoint
LEGACY_CACHE_KEY = "group_cache"  # trainer state of older checkpoints: the groups themselves


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
    loss = stage_loss(recipe, "grouper")  # grouper.loss, checked before Ray starts
    start_ray(recipe)
    model_path = prepare_policy(recipe)
    tok_path = tokenizer_source(recipe, model_path)
    tokenizer = load_stage_tokenizer(recipe, model_path)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    train_rows, held_rows, long_prompts = rl.prompt_sets(recipe, tokenizer)
    grade = functools.partial(
        rl.grade_mixed, functools.partial(grade_preference, build_preference_reward(recipe))
    )
    roll = recipe.rollout
    sampling = SamplingConfig.from_recipe(roll, seed=recipe.seed)
    steps, refresh = cfg.steps, cfg.refresh_every

    with StageRun(recipe, steps) as run_:
        learners = make_learners(recipe, model_path, steps, overrides={"loss_aggregation": loss.aggregation})
        pool = cache = None
        try:
            pool = rl.rollout_pool_for(recipe, model_path, learners)
            state = run_.restore(learners)
            cursor = rl.restored_cursor(recipe, train_rows, state)
            cache = open_group_cache(run_.run_dir / GROUP_CACHE_DIR, state, refresh)
            bucket_bytes = roll.weight_sync_bucket_mb << 20
            served = ServedPolicy(pool, learners, model_path, recipe.model.dtype, bucket_bytes)
            version = run_.step  # one optimizer step per stage step
            total_sampled = int(state.get("sampled_prompts", 0))
            clock, eval_seconds = 0.0, 0.0  # the training loop's clock (set below); evaluations excluded

            def evaluate(tag: str, label: str) -> dict[str, float]:
                out = rl.evaluate(
                    pool, tokenizer, held_rows, grade, samples_per_prompt=1,
                    max_new_tokens=roll.max_new_tokens, seed=recipe.seed + 7919, tag=tag,
                    enable_thinking=roll.enable_thinking, tool_limits=rl.tool_limits(recipe),
                    compression=rl.compression_spec(recipe),
                    on_samples=functools.partial(run_.log_samples, label),
                )  # fmt: skip
                # the mean preference reward: ``accuracy`` in the shared evaluator, ``reward`` here
                return {"reward": out["accuracy"], **out}

            def periodic_eval() -> tuple[dict[str, float], dict[str, float]]:
                """(push metrics, eval metrics): the current policy to the workers, then held-out reward."""
                nonlocal eval_seconds
                trained = time.perf_counter() - clock - eval_seconds
                started = time.perf_counter()
                pushed = served.learner_weights(version)
                reward = evaluate("eval", "eval")["reward"]
                eval_seconds += time.perf_counter() - started
                return pushed, {"eval/reward": reward, "eval/train_seconds": trained}

            def sample(batches: list[tuple[int, list[Any]]]) -> tuple[int, dict[str, float]]:
                """Sample, grade and store the groups the cache lacks for ``batches`` of (step, rows), from
                the generation's policy. Request ids (so sampling seeds) name the step that first uses a
                prompt, so a group does not depend on when it is sampled."""
                nonlocal eval_seconds
                count, metrics, parts = 0, {}, []
                for step, rows in batches:
                    fresh = [r for r in {r.id: r for r in rows}.values() if r.id not in cache]
                    if not fresh:
                        continue
                    if not refresh:  # pi_init back if an evaluation replaced it: evaluation time
                        started = time.perf_counter()
                        metrics.update(served.initial_weights())
                        eval_seconds += time.perf_counter() - started
                    reqs = rl.build_requests(
                        tokenizer, fresh, cfg.group_size, f"s{step}", roll.enable_thinking,
                        tool_limits=rl.tool_limits(recipe), compression=rl.compression_spec(recipe),
                    )  # fmt: skip
                    samples, roll_metrics = pool.collect(pool.submit(reqs, sampling))
                    parts.append(roll_metrics)
                    groups = rl.group_samples(fresh, samples)
                    rl.assign_rewards(groups, grade(rl.verifier_samples(tokenizer, groups)))
                    cache.append(CachedGroup(g.row.id, served.label(g.samples), g.rewards) for g in groups)
                    count += len(fresh)
                return count, {**metrics, **combine_rollout_metrics(parts)}

            eval_before = state.get("eval_before") or evaluate("eval", "eval_before")
            run_.log_eval({f"eval_before/{k}": v for k, v in eval_before.items()})
            logger.warning("grouper: held-out preference reward before = %.3f", eval_before["reward"])

            clock = time.perf_counter()
            while run_.step < steps:
                metrics: dict[str, float] = {}
                sampled = 0
                if refresh and run_.step % refresh == 0:  # the current policy samples N steps' groups
                    if run_.step:
                        cache.start_generation(run_.step // refresh)
                    metrics.update(served.learner_weights(version))
                    ahead = rl.restored_cursor(recipe, train_rows, {"cursor": cursor.state_dict()})
                    stop = min(run_.step + refresh, steps)
                    sampled, roll_metrics = sample(
                        [(k, ahead.next_batch(cfg.prompts_per_step)) for k in range(run_.step, stop)]
                    )
                    metrics.update(roll_metrics)
                rows = cursor.next_batch(cfg.prompts_per_step)
                if not refresh:  # pi_init samples a prompt's group the first time it comes round
                    sampled, roll_metrics = sample([(run_.step, rows)])
                    metrics.update(roll_metrics)
                total_sampled += sampled
                cached = cache.load([r.id for r in rows])  # read back from disk, fresh or not
                groups = [
                    rl.Group(r, c.samples, rewards=c.rewards) for r, c in zip(rows, cached, strict=True)
                ]
                rewards = rl.assign_rewards(groups, [x for g in groups for x in g.rewards])
                adv = preference_advantages(rewards)
                flat = [s for g in groups for s in g.samples]
                batch = rl.training_batch(flat, adv.reshape(-1).tolist(), pad)
                pool.release_memory()  # colocated vLLM engines hand their GPU memory to the learners
                train = learners.train_step(batch, loss)
                pool.resume()
                version += 1
                metrics.update({k.removeprefix("loss/"): v for k, v in train.items()})
                metrics["learner_tokens_per_s"] = metrics.pop("tokens_per_s", 0.0)
                metrics.update(rl.per_task_means(groups, "reward"))
                metrics.update(rl.response_stats(flat))
                metrics["reward/mean"] = float(rewards.mean())
                tied = (rewards.amax(1) - rewards.amin(1)) <= REWARD_ATOL  # as preference_advantages
                metrics["tied_group_frac"] = float(tied.float().mean())
                metrics["sampled_prompts"] = float(sampled)
                metrics["total/sampled_prompts"] = float(total_sampled)
                # as stored with the samples: the learner version of the policy that sampled them
                metrics["sample_policy_version"] = float(max(s.policy_version for s in flat))
                every = cfg.eval_every_steps
                periodic: dict[str, float] = {}
                if every and run_.step + 1 < steps and (run_.step + 1) % every == 0:
                    pushed, periodic = periodic_eval()
                    metrics.update(pushed)
                run_.log(metrics)
                if periodic:
                    run_.log_eval(periodic)
                resume = {"cursor": cursor.state_dict(), "eval_before": eval_before}
                position = {CACHE_POSITION_KEY: cache.position().as_dict()}  # the groups stay on disk
                run_.maybe_checkpoint(learners, {**resume, "sampled_prompts": total_sampled, **position})
            trained = time.perf_counter() - clock - eval_seconds
            served.learner_weights(version)
            eval_after = evaluate("eval", "eval_after")
            final = {"eval/reward": eval_after["reward"], "eval/train_seconds": trained}
            run_.log_eval({f"eval_after/{k}": v for k, v in eval_after.items()} | final)
            logger.warning("grouper: held-out preference reward after = %.3f", eval_after["reward"])
            summary = {
                "eval_before": eval_before,
                "eval_after": eval_after,
                "reward_gain": eval_after["reward"] - eval_before["reward"],
                "sampled_prompts": total_sampled,
                **long_prompts,
            }
            return finish_stage(run_, learners, summary, tokenizer=tok_path)
        finally:
            if cache is not None:
                cache.close()
            if pool is not None:
                pool.shutdown()
            learners.shutdown()


class ServedPolicy:
    """Which policy the rollout workers hold, as a learner version, and the pushes that change it.

    The workers refuse a weight version they have seen, yet GROUPER may need pi_init back after the
    current policy went out for an evaluation. So pushes are numbered 1, 2, ... within this process (a
    resumed run's workers start afresh from the starting checkpoint, at 0) and each number maps to the
    learner version its weights are (0: pi_init). ``label`` turns the push number a sample reports into
    that learner version before the sample is stored.
    """

    def __init__(self, pool: Any, learners: Any, model_path: Any, dtype: str, bucket_bytes: int) -> None:
        self.pool, self.learners = pool, learners
        self.model_path, self.dtype, self.bucket_bytes = model_path, dtype, bucket_bytes
        self.versions: dict[int, int] = {0: 0}  # push number -> learner version

    @property
    def version(self) -> int:
        """The learner version whose weights the workers serve."""
        return self.versions[self.pool.version]

    def learner_weights(self, version: int) -> dict[str, float]:
        """Push the learners' weights (learner ``version``) unless the workers hold them already."""
        return {} if self.version == version else self._push(self.learners, version)

    def initial_weights(self) -> dict[str, float]:
        """Stream pi_init back from the starting checkpoint unless the workers hold it already."""
        if self.version == 0:
            return {}
        with checkpoint_weights(self.model_path, self.dtype) as source:
            return self._push(source, 0)

    def _push(self, source: Any, version: int) -> dict[str, float]:
        number = max(self.versions) + 1
        metrics = self.pool.push_weights(source, number, self.bucket_bytes)
        self.versions[number] = version
        return {**metrics, "weight_sync/version": float(version)}

    def label(self, samples: list[RolloutSample]) -> list[RolloutSample]:
        """``samples`` with ``policy_version`` the learner version that sampled them."""
        return [dataclasses.replace(s, policy_version=self.versions[s.policy_version]) for s in samples]


def combine_rollout_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """One step's rollout metrics from several ``collect`` calls: times add up, throughput is overall."""
    if len(parts) <= 1:
        return dict(parts[0]) if parts else {}
    seconds = sum(p.get("rollout/seconds", 0.0) for p in parts)
    tokens = sum(p.get("rollout/tokens_per_s", 0.0) * p.get("rollout/seconds", 0.0) for p in parts)
    return {
        **parts[-1],
        "rollout/seconds": seconds,
        "rollout/wait_s": sum(p.get("rollout/wait_s", 0.0) for p in parts),
        "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }


def open_group_cache(root: Path, state: dict[str, Any], refresh_every: int) -> GroupCache:
    """The stage's group cache: clean for a fresh run, cut back to the checkpoint's position on resume.

    A checkpoint written before the cache moved to disk carries the groups themselves (``group_cache``
    in its trainer state): they are migrated into a clean cache, and the run goes on as from a new
    checkpoint. Under ``refresh_every > 0`` that is refused between two refreshes, because the rest of
    that generation would have to be sampled by a policy that no longer exists.
    """
    if CACHE_POSITION_KEY in state:
        return GroupCache(root, CachePosition.from_dict(state[CACHE_POSITION_KEY]))
    legacy = state.get(LEGACY_CACHE_KEY) or {}
    step = int(state.get("step", 0))
    if legacy and refresh_every and step % refresh_every:
        raise KexaoneError(
            f"this checkpoint (step {step}) keeps its sampled groups in the trainer state, the format "
            f"before the on-disk group cache, and lies between two refreshes (grouper.refresh_every="
            f"{refresh_every}); the rest of its generation cannot be sampled from the policy of step "
            f"{step - step % refresh_every} any more. Resume from a checkpoint at a multiple of "
            f"{refresh_every} steps, or start the stage again"
        )
    cache = GroupCache(root)
    if legacy:
        cache.append(CachedGroup(key, list(g.samples), list(g.rewards)) for key, g in legacy.items())
        logger.warning("grouper: moved %d cached group(s) from the checkpoint to %s", len(legacy), root)
    return cache
