"""AGAPO: RL with verifiable rewards (K-EXAONE report, Eq. 1-2), as the recipe reads.

Each step: take ``prompts_per_step`` prompts (any mix of tasks; each row's ``task`` picks its verifier
from the recipe's ``verifiers`` map), sample G responses each on the rollout workers (every sample
tagged with the policy version that made it), grade them, then ``agapo_advantages`` (zero-variance
filtering, leave-one-out baseline, global normalisation) and one learner step of ``agapo.loss``
(``agapo_loss``, Eq. 1, unless the recipe names another) against the rollout log-probs. Routers stay
frozen; there is no KL term and no reference model. The new weights are then pushed to the rollout
workers. ``AgapoLoop`` holds what a run carries between steps; ``run`` reads as the steps above.

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
from dataclasses import dataclass, field
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
from kexaone_align.losses import stage_loss
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

COUNTERS = ("skipped_steps", "dropped_stale", "filtered_prompts")  # run totals, kept in checkpoints


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


@dataclass
class Launched:
    """One step's rollout in flight: its prompt rows, the pool's futures (or the samples and metrics a
    periodic evaluation already collected), and the cursor position to resume from if it is lost."""

    rows: list[Any]
    futures: Any
    resume_at: dict[str, Any]
    collected: tuple[list[Any], dict[str, Any]] | None = None


@dataclass
class AgapoLoop:
    """The state an AGAPO run carries from step to step, and the steps themselves as methods.

    ``version`` is the learners' policy version (one per optimizer step), ``synced`` the version the
    rollout workers hold; ``clock`` starts the training-loop time, from which ``eval_seconds`` (periodic
    evaluations) are subtracted.
    """

    recipe: Recipe
    run_: StageRun
    pool: Any
    learners: Any
    grader: Any
    tokenizer: Any
    cursor: Any
    held_rows: list[Any]
    loss: Any
    version: int
    counters: dict[str, int]
    synced: int = 0
    eval_seconds: float = 0.0
    clock: float = field(default_factory=time.perf_counter)
    pending: Launched | None = None
    # derived from the recipe in __post_init__
    cfg: Any = field(init=False)
    sampling: Any = field(init=False)
    tools: Any = field(init=False)
    compression: Any = field(init=False)
    pipelined: bool = field(init=False)
    pad: int = field(init=False)
    bucket_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = self.recipe.agapo
        self.sampling, _ = rl.agapo_sampling(self.recipe)
        self.tools = rl.tool_limits(self.recipe)
        self.compression = rl.compression_spec(self.recipe)  # tools.compress_*: None = off
        self.pipelined = self.recipe.rollout.max_staleness >= 1
        self.pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.bucket_bytes = self.recipe.rollout.weight_sync_bucket_mb << 20

    # -- rollout --------------------------------------------------------------------------------
    def launch(self) -> Launched:
        """Submit the next ``prompts_per_step`` prompts x G samples to the rollout workers."""
        resume_at = self.cursor.state_dict()
        rows = self.cursor.next_batch(self.cfg.prompts_per_step)
        # Request ids (hence sampling seeds) from the cursor position alone, not from when the batch is
        # launched, so a resumed run samples exactly what the uninterrupted one did.
        tag = f"e{self.cursor.epoch}-o{self.cursor.offset}"
        reqs = rl.build_requests(
            self.tokenizer, rows, self.cfg.group_size, tag, self.recipe.rollout.enable_thinking,
            tool_limits=self.tools, compression=self.compression,
        )  # fmt: skip
        return Launched(rows, self.pool.submit(reqs, self.sampling), resume_at)

    def collect(self, launched: Launched) -> tuple[list[Any], dict[str, Any]]:
        """Wait for a launched rollout; each worker's samples go to the graders as they arrive."""
        feed = functools.partial(rl.submit_for_grading, self.grader, self.tokenizer, launched.rows)
        if launched.collected is not None:  # a periodic evaluation collected it before its own grading
            samples, metrics = launched.collected
            feed(samples)
            return samples, metrics
        return self.pool.collect(launched.futures, on_result=feed)

    def sync(self) -> dict[str, float]:
        """Push the learners' weights to the rollout workers if they are behind."""
        if self.synced == self.version:
            return {}
        out = self.pool.push_weights(self.learners, self.version, self.bucket_bytes)
        self.synced = self.version
        return out

    # -- learning -------------------------------------------------------------------------------
    def rewards(self, groups: list[rl.Group], metrics: dict[str, Any]) -> torch.Tensor:
        """``[P, G]`` verifiable rewards of the step's groups, once the graders are done."""
        by_key, grading = self.grader.wait()
        rewards = rl.graded_rewards(self.tokenizer, groups, by_key)
        metrics.update(grading)
        metrics.update(rl.per_task_means(groups, "reward"))
        metrics.update(rl.response_stats([s for g in groups for s in g.samples]))
        metrics.update(rl.episode_metrics(groups))
        if groups:
            metrics["reward/mean"] = float(rewards.mean())
        return rewards

    def learn(self, groups: list[rl.Group], rewards: torch.Tensor) -> dict[str, float]:
        """Eq. 2's advantages over the groups that carry signal, then one learner step of the loss."""
        if groups:
            keep, adv = advantages_for(rewards, self.cfg.zero_variance_filter)
        else:
            keep, adv = torch.zeros(0, dtype=torch.bool), torch.zeros(0, self.cfg.group_size)
        kept = [g for g, k in zip(groups, keep.tolist(), strict=True) if k]
        self.counters["filtered_prompts"] += len(groups) - len(kept)
        metrics: dict[str, float] = {"zero_variance_frac": 1.0 - len(kept) / len(groups) if groups else 1.0}
        if not kept:  # nothing to learn from: no optimizer step, no new version; the LR schedule is sized
            # in stage steps (agapo.steps), so it moves on as if the step had been taken
            self.counters["skipped_steps"] += 1
            return metrics | {"lr": self.learners.advance_lr_schedule(), "skipped": 1.0}
        batch = rl.training_batch([s for g in kept for s in g.samples], adv.reshape(-1).tolist(), self.pad)
        self.pool.release_memory()  # colocated vLLM engines hand their GPU memory to the learners
        train = self.learners.train_step(batch, self.loss)
        self.pool.resume()
        self.version += 1
        learned = {k.removeprefix("loss/"): v for k, v in train.items()}
        metrics.update({k: v for k, v in learned.items() if not k.endswith("_sum")})
        metrics.update(summarize_ratio_stats(learned))  # mismatch: k3 KL, ratio min/mean/max
        metrics["learner_tokens_per_s"] = metrics.pop("tokens_per_s", 0.0)
        return metrics

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, label: str) -> dict[str, float]:
        """Held-out accuracy with the weights the rollout workers hold."""
        roll = self.recipe.rollout
        return rl.evaluate(
            self.pool, self.tokenizer, self.held_rows, functools.partial(rl.grade_mixed, self.grader.grade),
            samples_per_prompt=self.cfg.eval_samples_per_prompt, max_new_tokens=roll.max_new_tokens,
            seed=self.recipe.seed + 7919, tag="eval", enable_thinking=roll.enable_thinking,
            tool_limits=self.tools, compression=self.compression,
            on_samples=functools.partial(self.run_.log_samples, label),
        )  # fmt: skip

    def train_seconds(self) -> float:
        return time.perf_counter() - self.clock - self.eval_seconds

    def periodic_eval(self) -> dict[str, float]:
        """``eval/accuracy`` mid-run with the newest weights; its time is not training time."""
        if self.pipelined and self.pending is not None and self.pending.collected is None:
            # finish the in-flight rollout first: it is training work, not evaluation; collected through
            # the pool, so rollout.job_timeout_s and worker replacement apply
            self.pending.collected = self.pool.collect(self.pending.futures)
        self.sync()
        trained = self.train_seconds()
        started = time.perf_counter()
        result = self.evaluate("eval")
        self.eval_seconds += time.perf_counter() - started
        return {"eval/accuracy": result["accuracy"], "eval/train_seconds": trained}


def run(recipe: Recipe) -> dict[str, Any]:
    """Run the AGAPO stage; returns its summary with ``eval_before`` / ``eval_after`` held-out accuracy."""
    from kexaone_align.verifiers import TaskRouter

    cfg = recipe.agapo
    if cfg is None:
        raise KexaoneError("stage 'agapo' needs an agapo section")
    if cfg.group_size < 2:
        raise KexaoneError("agapo.group_size must be >= 2 (the leave-one-out baseline needs peers)")
    loss = stage_loss(recipe, "agapo", {"is_cap": cfg.is_cap})  # agapo.loss, checked before Ray starts
    start_ray(recipe)
    model_path = prepare_policy(recipe)
    tok_path = tokenizer_source(recipe, model_path)
    tokenizer = load_stage_tokenizer(recipe, model_path)
    train_rows, held_rows, long_prompts = rl.prompt_sets(recipe, tokenizer)
    grader = rl.make_grader(recipe, TaskRouter(recipe.verifiers or None))  # Ray tasks, fed on arrival
    _, logprob_settings = rl.agapo_sampling(recipe)  # agapo.ratio_distribution, learner side
    max_staleness = recipe.rollout.max_staleness
    steps = cfg.steps

    with StageRun(recipe, steps) as run_:
        overrides = {"loss_aggregation": loss.aggregation, **logprob_settings}
        learners = make_learners(recipe, model_path, steps, overrides=overrides)
        pool = None
        try:
            pool = rl.rollout_pool_for(recipe, model_path, learners)
            state = run_.restore(learners)
            counters = {k: int(state.get(k, 0)) for k in COUNTERS}
            loop = AgapoLoop(
                recipe, run_, pool, learners, grader, tokenizer,
                cursor=rl.restored_cursor(recipe, train_rows, state), held_rows=held_rows, loss=loss,
                version=int(state.get("version", 0)), counters=counters,
            )  # fmt: skip
            loop.sync()  # resumed: the workers start from the initial checkpoint

            eval_before = state.get("eval_before") or loop.evaluate("eval_before")
            run_.log_eval({f"eval_before/{k}": v for k, v in eval_before.items()})
            logger.warning("agapo: held-out accuracy before = %.3f", eval_before["accuracy"])

            loop.clock = time.perf_counter()  # training-loop clock; periodic evaluations are subtracted
            loop.pending = loop.launch()
            while run_.step < steps:
                # 1. G responses per prompt from the rollout workers (policy version tagged per sample)
                current = loop.pending
                samples, metrics = loop.collect(current)
                more = run_.step + 1 < steps
                sync_metrics: dict[str, float] = {}
                if loop.pipelined and more:  # step k+1's rollout runs while the learner works on step k
                    sync_metrics = loop.sync()
                    loop.pending = loop.launch()
                # 2. groups older than rollout.max_staleness versions are dropped (off-policy bound)
                groups = rl.group_samples(current.rows, samples)
                groups, dropped, staleness = rl.split_stale(groups, loop.version, max_staleness)
                loop.counters["dropped_stale"] += dropped
                metrics.update(staleness=staleness, dropped_stale=float(dropped))
                metrics["policy_version"] = float(loop.version)
                # 3. verifiable rewards; 4. advantages (Eq. 2) and one step of the loss (Eq. 1)
                rewards = loop.rewards(groups, metrics)
                metrics.update(loop.learn(groups, rewards))
                every = cfg.eval_every_steps
                periodic = loop.periodic_eval() if every and more and (run_.step + 1) % every == 0 else {}
                # 5. synchronous mode: the new weights reach the workers, then the next rollout starts
                if not loop.pipelined and more:
                    sync_metrics = loop.sync()
                    loop.pending = loop.launch()
                metrics.update(sync_metrics)
                metrics.update({f"total/{k}": float(v) for k, v in loop.counters.items()})
                _save_rollouts(run_, recipe, groups)
                run_.log(metrics)
                if periodic:
                    run_.log_eval(periodic)
                next_cursor = loop.pending.resume_at if more else loop.cursor.state_dict()
                run_.maybe_checkpoint(
                    learners,
                    {
                        "cursor": next_cursor,
                        "version": loop.version,
                        "eval_before": eval_before,
                        **loop.counters,
                    },
                )
            trained = loop.train_seconds()
            loop.sync()
            eval_after = loop.evaluate("eval_after")
            final = {"eval/accuracy": eval_after["accuracy"], "eval/train_seconds": trained}
            run_.log_eval({f"eval_after/{k}": v for k, v in eval_after.items()} | final)
            logger.warning("agapo: held-out accuracy after = %.3f", eval_after["accuracy"])
            summary = {
                "eval_before": eval_before,
                "eval_after": eval_after,
                "accuracy_gain": eval_after["accuracy"] - eval_before["accuracy"],
                "policy_version": loop.version,
                **loop.counters,
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
