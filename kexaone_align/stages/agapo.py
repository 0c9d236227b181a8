"""AGAPO: RL with verifiable rewards (K-EXAONE report, Eq. 1-2), as the recipe reads.

Each step: take ``prompts_per_step`` prompts (any mix of tasks; each row's ``task`` picks its verifier
from the recipe's ``verifiers`` map), sample G responses each on the rollout workers (every sample
tagged with the policy version that made it), grade them, then ``agapo_advantages`` (zero-variance
filtering, leave-one-out baseline, global normalisation) and one learner step of ``agapo_loss``
against the rollout log-probs. Routers stay frozen; there is no KL term and no reference model.
The new weights are then pushed to the rollout workers.

With ``agapo.eval_every_steps = K`` the held-out evaluation also runs every K steps; each evaluation
logs ``eval/accuracy`` and ``eval/train_seconds`` (loop wall time so far, evaluation time excluded), which
is what a time-to-accuracy measurement reads.

Off-policy pipelining: with ``rollout.max_staleness >= 1`` the rollout for step k+1 is launched
before learning on step k (and weights reach the workers one step later), so every sample is one
version old; groups more than ``max_staleness`` versions old are dropped and counted. With 0 the
loop is synchronous. A step whose prompts all have zero reward variance takes no learner step, but
its LR-schedule step (the schedule is sized in ``agapo.steps``).

The importance ratio compares the rollout's and the learner's probability of each sampled token under
one distribution, ``agapo.ratio_distribution`` (``algorithms.agapo`` explains both against Eq. 1): the
rollout workers report it (``SamplingConfig.logprobs``) and the learners compute it at the rollout
temperature (``rl.agapo_sampling``). Each step logs the mismatch: ratio min / mean / max over every
response token, the truncated fraction and the k3 KL estimate.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

import torch

from kexaone_align.algorithms.agapo import (
    agapo_advantages,
    global_normalize,
    leave_one_out_advantages,
    summarize_ratio_stats,
)
from kexaone_align.config import Recipe
from kexaone_align.errors import KexaoneError
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


def grade_with_verifiers(router: Any, samples: list[Any]) -> list[float]:
    """Rule rewards in [0, 1] in this process, with the default ``grading`` workers and limit (for
    callers without a recipe; the stage grades through ``rl.make_grader``)."""
    from kexaone_align.config import GradingConfig
    from kexaone_align.verifiers import score_batch

    if not samples:
        return []
    # Each sample gets its verifier's own worst case as its limit (grading.timeout_s 'auto'), so a slow
    # but legal program's verdict is kept and no sandbox outlives its grading thread.
    cfg = GradingConfig()
    return score_batch(samples, router, max_workers=cfg.num_workers, timeout_s=cfg.timeout_s).rewards


def advantages_for(rewards: torch.Tensor, zero_variance_filter: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept [P], advantages [P_kept, G])``: the paper's ``agapo_advantages``, or without the filter."""
    if zero_variance_filter:
        return agapo_advantages(rewards)
    keep = torch.ones(rewards.shape[0], dtype=torch.bool)
    return keep, global_normalize(leave_one_out_advantages(rewards))


def run(recipe: Recipe) -> dict[str, Any]:
    """Run the AGAPO stage; returns its summary with ``eval_before`` / ``eval_after`` held-out accuracy."""
    from kexaone_align.verifiers import TaskRouter

    cfg = recipe.agapo
    if cfg is None:
        raise KexaoneError("stage 'agapo' needs an agapo section")
    if cfg.group_size < 2:
        raise KexaoneError("agapo.group_size must be >= 2 (the leave-one-out baseline needs peers)")
    start_ray(recipe)
    model_path = prepare_policy(recipe)
    tok_path = tokenizer_source(recipe, model_path)
    tokenizer = load_stage_tokenizer(recipe, model_path)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    train_rows, held_rows, long_prompts = rl.prompt_sets(recipe, tokenizer)
    router = TaskRouter(recipe.verifiers or None)
    grader = rl.make_grader(recipe, router)  # Ray tasks, fed as each worker's samples arrive
    grade = functools.partial(rl.grade_mixed, grader.grade)
    roll = recipe.rollout
    sampling, logprob_settings = rl.agapo_sampling(recipe)  # agapo.ratio_distribution, both sides
    tools = rl.tool_limits(recipe)  # bounds of the tool episodes (rows with an environment)
    max_staleness = roll.max_staleness
    pipelined = max_staleness >= 1
    loss_fn = functools.partial(rl.agapo_loss_fn, is_cap=cfg.is_cap)
    bucket_bytes = roll.weight_sync_bucket_mb << 20
    steps = cfg.steps

    with StageRun(recipe, steps) as run_:
        overrides = {"loss_aggregation": "sequences", **logprob_settings}
        learners = make_learners(recipe, model_path, steps, overrides=overrides)
        pool = None
        try:
            pool = rl.rollout_pool_for(recipe, model_path, learners)
            state = run_.restore(learners)
            cursor = rl.restored_cursor(recipe, train_rows, state)
            version = int(state.get("version", 0))
            counter_names = ("skipped_steps", "dropped_stale", "filtered_prompts")
            counters = {k: int(state.get(k, 0)) for k in counter_names}
            synced = 0
            if version > 0:  # resumed: the workers start from the initial checkpoint
                pool.push_weights(learners, version, bucket_bytes)
                synced = version

            def evaluate(tag: str, label: str) -> dict[str, float]:
                return rl.evaluate(
                    pool, tokenizer, held_rows, grade, samples_per_prompt=cfg.eval_samples_per_prompt,
                    max_new_tokens=roll.max_new_tokens, seed=recipe.seed + 7919, tag=tag,
                    enable_thinking=roll.enable_thinking, tool_limits=tools,
                    on_samples=functools.partial(run_.log_samples, label),
                )  # fmt: skip

            eval_before = state.get("eval_before") or evaluate("eval", "eval_before")
            run_.log_eval({f"eval_before/{k}": v for k, v in eval_before.items()})
            logger.warning("agapo: held-out accuracy before = %.3f", eval_before["accuracy"])

            def sync() -> dict[str, float]:
                nonlocal synced
                if synced == version:
                    return {}
                out = pool.push_weights(learners, version, bucket_bytes)
                synced = version
                return out

            def launch() -> tuple[list[Any], list[Any], dict[str, Any]]:
                resume_at = cursor.state_dict()
                rows = cursor.next_batch(cfg.prompts_per_step)
                # Request ids (hence sampling seeds) from the cursor position alone, not from when the
                # batch is launched, so a resumed run samples exactly what the uninterrupted one did.
                tag = f"e{cursor.epoch}-o{cursor.offset}"
                reqs = rl.build_requests(
                    tokenizer, rows, cfg.group_size, tag, roll.enable_thinking, tool_limits=tools
                )
                return rows, pool.submit(reqs, sampling), resume_at

            clock = time.perf_counter()  # training-loop clock; periodic evaluations are subtracted
            eval_seconds = 0.0

            def train_seconds() -> float:
                return time.perf_counter() - clock - eval_seconds

            def periodic_eval() -> dict[str, float]:
                nonlocal eval_seconds
                nonlocal pending
                if pipelined:  # finish the in-flight rollout first: it is training work, not evaluation;
                    # collected through the pool, so rollout.job_timeout_s and worker replacement apply
                    rows, futures, resume_at = pending
                    pending = (rows, pool.collect(futures), resume_at)
                sync()
                trained = train_seconds()
                started = time.perf_counter()
                result = evaluate("eval", "eval")
                eval_seconds += time.perf_counter() - started
                return {"eval/accuracy": result["accuracy"], "eval/train_seconds": trained}

            pending = launch()
            while run_.step < steps:
                rows, launched, _ = pending  # futures, or (samples, metrics) a periodic eval collected
                feed = functools.partial(rl.submit_for_grading, grader, tokenizer, rows)
                if isinstance(launched, tuple):  # collected before the evaluation's own grading: graded now
                    samples, metrics = launched
                    feed(samples)
                else:
                    samples, metrics = pool.collect(launched, on_result=feed)
                more = run_.step + 1 < steps
                sync_metrics: dict[str, float] = {}
                if pipelined and more:  # step k+1's rollout runs while the learner works on step k
                    sync_metrics = sync()
                    pending = launch()
                groups = rl.group_samples(rows, samples)
                groups, dropped, staleness = rl.split_stale(groups, version, max_staleness)
                counters["dropped_stale"] += dropped
                by_key, grading = grader.wait()
                rewards = rl.graded_rewards(tokenizer, groups, by_key)
                metrics.update(grading)
                metrics.update(rl.per_task_means(groups, "reward"))
                metrics.update(rl.response_stats([s for g in groups for s in g.samples]))
                metrics.update(rl.episode_metrics(groups))
                metrics.update(staleness=staleness, dropped_stale=float(dropped))
                metrics["policy_version"] = float(version)
                if groups:
                    metrics["reward/mean"] = float(rewards.mean())
                    keep, adv = advantages_for(rewards, cfg.zero_variance_filter)
                else:
                    keep, adv = torch.zeros(0, dtype=torch.bool), torch.zeros(0, cfg.group_size)
                kept = [g for g, k in zip(groups, keep.tolist(), strict=True) if k]
                counters["filtered_prompts"] += len(groups) - len(kept)
                metrics["zero_variance_frac"] = 1.0 - len(kept) / len(groups) if groups else 1.0
                if kept:
                    batch = rl.training_batch(
                        [s for g in kept for s in g.samples], adv.reshape(-1).tolist(), pad
                    )
                    pool.release_memory()  # colocated vLLM engines hand their GPU memory to the learners
                    train = learners.train_step(batch, loss_fn)
                    pool.resume()
                    version += 1
                    learned = {k.removeprefix("loss/"): v for k, v in train.items()}
                    metrics.update({k: v for k, v in learned.items() if not k.endswith("_sum")})
                    metrics.update(summarize_ratio_stats(learned))  # mismatch: k3 KL, ratio min/mean/max
                    metrics["learner_tokens_per_s"] = metrics.pop("tokens_per_s", 0.0)
                else:  # nothing to learn from: no optimizer step, no new version; the LR schedule is
                    # sized in stage steps (agapo.steps), so it moves on as if the step had been taken
                    metrics["lr"] = learners.advance_lr_schedule()
                    counters["skipped_steps"] += 1
                    metrics["skipped"] = 1.0
                every = cfg.eval_every_steps
                periodic = periodic_eval() if every and more and (run_.step + 1) % every == 0 else {}
                if not pipelined and more:
                    sync_metrics = sync()
                    pending = launch()
                metrics.update(sync_metrics)
                metrics.update({f"total/{k}": float(v) for k, v in counters.items()})
                _save_rollouts(run_, recipe, groups)
                run_.log(metrics)
                if periodic:
                    run_.log_eval(periodic)
                next_cursor = pending[2] if more else cursor.state_dict()
                run_.maybe_checkpoint(
                    learners,
                    {"cursor": next_cursor, "version": version, "eval_before": eval_before, **counters},
                )
            trained = train_seconds()
            sync()
            eval_after = evaluate("eval", "eval_after")
            final = {"eval/accuracy": eval_after["accuracy"], "eval/train_seconds": trained}
            run_.log_eval({f"eval_after/{k}": v for k, v in eval_after.items()} | final)
            logger.warning("agapo: held-out accuracy after = %.3f", eval_after["accuracy"])
            summary = {
                "eval_before": eval_before,
                "eval_after": eval_after,
                "accuracy_gain": eval_after["accuracy"] - eval_before["accuracy"],
                "policy_version": version,
                **counters,
                **long_prompts,
            }
            return finish_stage(run_, learners, summary, tokenizer=tok_path)
        finally:
            grader.close()
            if pool is not None:
                pool.shutdown()
            learners.shutdown()


def _save_rollouts(run_: StageRun, recipe: Recipe, groups: list[rl.Group]) -> None:
    """Append this step's graded responses to ``<run_dir>/rollouts.jsonl`` (``logging.save_rollouts``)."""
    if not recipe.logging.save_rollouts:
        return
    with open(run_.run_dir / "rollouts.jsonl", "a", encoding="utf-8") as fh:
        for g in groups:
            for s, text, reward in zip(g.samples, g.texts, g.rewards, strict=True):
                row = {"step": run_.step + 1, "prompt_id": g.row.id, "task": g.row.task, "response": text,
                       "reward": reward, "policy_version": s.policy_version}  # fmt: skip
                fh.write(json.dumps(row) + "\n")
