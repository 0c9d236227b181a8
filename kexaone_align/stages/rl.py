"""Pieces the two sampling stages (AGAPO, GROUPER) share: a pool of rollout workers, prompt -> request
-> graded sample plumbing, the learner batch built from samples, staleness accounting and held-out
evaluation.

Nothing here knows an equation: advantages and losses come from ``kexaone_align.algorithms`` (the losses
by name through ``kexaone_align.losses``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kexaone_align.data.chat_format import render_prompt
from kexaone_align.data.prompts import PromptCursor, PromptRow
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.batching import pad_sequences
from kexaone_align.runtime.rollout.base import RolloutRequest, RolloutSample, SamplingConfig
from kexaone_align.runtime.rollout.pool import RolloutPool
from kexaone_align.verifiers import Sample

logger = logging.getLogger(__name__)

EVAL_TEMPERATURE = 1.0  # held-out evaluation samples like the paper's rollouts: T = 1.0, top-p 0.95
EVAL_TOP_P = 0.95


# ------------------------------------------------------------------------------------------ sampling
def agapo_sampling(recipe: Any) -> tuple[SamplingConfig, dict[str, Any]]:
    """AGAPO's rollout sampling and the learner settings that match it under ``agapo.ratio_distribution``:
    the learner takes log-probs at the rollout temperature, and under ``sampler`` with its truncation."""
    roll, kind = recipe.rollout, recipe.agapo.ratio_distribution
    sampling = SamplingConfig.from_recipe(roll, seed=recipe.seed, logprobs=kind)
    truncated = kind == "sampler"
    return sampling, {
        "logprob_temperature": roll.temperature,
        "logprob_top_p": roll.top_p if truncated else 1.0,
        "logprob_top_k": roll.top_k if truncated else -1,
    }


# ------------------------------------------------------------------------------------------ prompts
def load_prompt_rows(recipe: Any) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, held-out) prompt rows of an RL stage: the offline generator, or ``train_files``/``eval_files``
    (mapped by ``data.columns``).

    Without ``eval_files`` or ``eval_split``, the last ``data.eval_fraction`` of the (file-ordered) training
    rows is held out.
    """
    from kexaone_align.data.columns import ColumnMap
    from kexaone_align.data.prompts import load_prompt_set
    from kexaone_align.data.sources import recipe_sources

    data = recipe.data
    if data is None:
        raise KexaoneError(f"stage {recipe.stage!r} needs a data section")
    if data.generator:
        from kexaone_align.data.tiny_tasks import generate_rows

        opts = dict(data.generator_options)
        # The stage generator's own default (reasoning mode for RL prompts) unless the recipe sets one.
        frac = data.reasoning_fraction if "reasoning_fraction" in data.model_fields_set else None
        train = generate_rows(data.generator, recipe.stage, data.num_train, recipe.seed, "train",
                              reasoning_fraction=frac, **opts)  # fmt: skip
        held = generate_rows(data.generator, recipe.stage, data.num_eval, recipe.seed, "heldout",
                             reasoning_fraction=frac, **opts)  # fmt: skip
        return load_prompt_set(train), load_prompt_set(held)
    if not data.train_files:
        raise KexaoneError(f"data: give train_files or a generator for stage {recipe.stage!r}")
    src = recipe_sources(data)
    columns = ColumnMap.from_section(data.columns)
    train_rows = load_prompt_set(src.train, columns=columns, options=src.train_options)
    if src.held is not None:
        return train_rows, load_prompt_set(src.held, columns=columns, options=src.held_options)
    n_held = max(1, int(len(train_rows) * data.eval_fraction))
    if n_held >= len(train_rows):
        raise KexaoneError(f"data: {len(train_rows)} prompt rows are too few to hold {n_held} out")
    return train_rows[:-n_held], train_rows[-n_held:]


def thinking_mode(recipe: Any, row: PromptRow) -> bool | None:
    """A row's rendering mode: ``rollout.enable_thinking`` when the recipe forces one, else the row's."""
    forced = recipe.rollout.enable_thinking
    return row.enable_thinking if forced is None else forced


def drop_long_prompts(recipe: Any, tokenizer: Any, rows: Sequence[PromptRow]) -> tuple[list[PromptRow], int]:
    """Rows whose rendered prompt fits ``data.max_prompt_tokens``, and how many were dropped."""
    limit = recipe.data.max_prompt_tokens
    kept = [r for r in rows if len(row_prompt_ids(tokenizer, r, thinking_mode(recipe, r))) <= limit]
    return kept, len(rows) - len(kept)


def row_tools(row: PromptRow) -> list[dict[str, Any]] | None:
    """The tool schemas a row's prompt lists: its own, else its environment's (None without tools)."""
    if row.tools is not None:
        return row.tools
    if row.environment:
        from kexaone_align.environments import resolve_environment

        return resolve_environment(row.environment).tools(row) or None
    return None


def row_prompt_ids(tokenizer: Any, row: PromptRow, enable_thinking: bool | None) -> list[int]:
    """A row's prompt tokens, its tools listed as the chat template does."""
    thinking = row.enable_thinking if enable_thinking is None else enable_thinking
    return render_prompt(tokenizer, row.messages, thinking, tools=row_tools(row))


def tool_limits(recipe: Any) -> Any:
    """The recipe's ``tools`` section as the environments' ``ToolLimits``."""
    from kexaone_align.environments import ToolLimits

    t = recipe.tools
    return ToolLimits(t.max_turns, t.call_timeout_s, t.max_output_chars, t.max_calls_per_turn)


def compression_spec(recipe: Any) -> Any:
    """The ``tools`` section's trajectory compression as a ``CompressionSpec`` (None when it is off)."""
    from kexaone_align.runtime.rollout.compression import CompressionSpec

    t = recipe.tools
    if t.compress_after_calls is None:
        return None
    judge = t.compress_judge.model_dump() if t.compress_judge is not None else None
    return CompressionSpec(t.compress_after_calls, t.compress_producer, t.compress_max_tokens, judge)


def prompt_sets(recipe: Any, tokenizer: Any) -> tuple[list[PromptRow], list[PromptRow], dict[str, int]]:
    """(train, held-out) prompt rows with over-long prompts dropped, and the counts of what was dropped
    (``dropped_long_prompts`` / ``dropped_long_eval_prompts``, for the stage summary)."""
    train, held = load_prompt_rows(recipe)
    train, n_train = drop_long_prompts(recipe, tokenizer, train)
    held, n_held = drop_long_prompts(recipe, tokenizer, held)
    limit = recipe.data.max_prompt_tokens
    if n_train or n_held:
        logger.warning(
            "data.max_prompt_tokens=%d: dropped %d training and %d held-out prompt(s) longer than that",
            limit, n_train, n_held,
        )  # fmt: skip
    if not train or not held:
        which = "training" if not train else "held-out"
        raise KexaoneError(
            f"data.max_prompt_tokens={limit}: every {which} prompt is longer than that once rendered with "
            "the chat template; raise data.max_prompt_tokens or shorten the prompts"
        )
    return train, held, {"dropped_long_prompts": n_train, "dropped_long_eval_prompts": n_held}


# ---------------------------------------------------------------------------------------- requests
@dataclass
class Group:
    """One prompt's G samples after grading, in sample order."""

    row: PromptRow
    samples: list[RolloutSample]
    texts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


def build_requests(
    tokenizer: Any,
    rows: Sequence[PromptRow],
    group_size: int,
    tag: str,
    enable_thinking: bool | None = None,
    *,
    tool_limits: Any = None,
    compression: Any = None,
) -> list[RolloutRequest]:
    """One request per prompt row (``group_size`` samples each); ``tag`` keeps request ids unique per call.

    ``enable_thinking`` forces reasoning (True) or non-reasoning (False) mode (``rollout.enable_thinking``);
    None renders each row in its own mode. A row with an ``environment`` becomes a tool episode
    (``runtime.rollout.episodes``) bounded by ``tool_limits``, compressed as ``compression`` says (None:
    never); the worker loads ``tokenizer``'s path."""
    from kexaone_align.runtime.rollout.episodes import episode_metadata

    requests = []
    for i, row in enumerate(rows):
        thinking = row.enable_thinking if enable_thinking is None else enable_thinking
        ids = row_prompt_ids(tokenizer, row, thinking)
        meta: dict[str, Any] = {"row": i}
        if row.environment:
            path = getattr(tokenizer, "name_or_path", None) or None
            meta["episode"] = episode_metadata(
                row, row.environment, enable_thinking=thinking, limits=tool_limits, tokenizer_path=path,
                compression=compression,
            )  # fmt: skip
        requests.append(RolloutRequest(f"{tag}-{i}-{row.id}", ids, group_size, meta))
    return requests


def decode_response(tokenizer: Any, sample: RolloutSample) -> str:
    """Response text for a verifier: special tokens like ``</think>`` kept, the final end-of-turn dropped."""
    ids = list(sample.token_ids)
    if sample.finish_reason == "stop" and ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def group_samples(rows: Sequence[PromptRow], samples: Sequence[RolloutSample]) -> list[Group]:
    """Gather the flat sample list back into one group per row (order of ``rows``, then sample index)."""
    groups = [Group(row, []) for row in rows]
    for sample in samples:
        groups[int(sample.metadata["row"])].samples.append(sample)
    for g in groups:
        g.samples.sort(key=lambda s: s.sample_index)
    return groups


def verifier_samples(tokenizer: Any, groups: Sequence[Group]) -> list[Sample]:
    """One ``verifiers.Sample`` per response (groups in order), routed by the row's ``task``."""
    out = []
    for g in groups:
        g.texts = [decode_response(tokenizer, s) for s in g.samples]
        for s, text in zip(g.samples, g.texts, strict=True):
            meta = dict(g.row.metadata)
            if "episode" in s.metadata:  # a tool episode: the environment already scored it
                meta["episode"] = s.metadata["episode"]
            out.append(Sample(g.row.messages, text, g.row.reference, g.row.task, meta))
    return out


def grade_mixed(grade: Any, samples: Sequence[Sample]) -> list[float]:
    """Rewards for a batch mixing tool episodes (scored by their environment on the rollout worker) with
    single-turn samples (scored by ``grade``, the recipe's verifiers or preference reward)."""
    rewards: list[float] = [0.0] * len(samples)
    plain = [i for i, s in enumerate(samples) if "episode" not in s.metadata]
    for i, s in enumerate(samples):
        if "episode" in s.metadata:
            rewards[i] = float(s.metadata["episode"]["reward"])
    if plain:
        for i, r in zip(plain, grade([samples[i] for i in plain]), strict=True):
            rewards[i] = float(r)
    return rewards


def episode_metrics(groups: Sequence[Group], prefix: str = "tools") -> dict[str, float]:
    """Tool-use counters over the episodes of ``groups``: turns per episode, tool calls, tool errors and
    environment seconds, trajectory compressions and their fallback records (means per episode), and the
    pass rate per environment."""
    infos = [s.metadata["episode"] for g in groups for s in g.samples if "episode" in s.metadata]
    if not infos:
        return {}
    n = len(infos)
    out = {f"{prefix}/episodes": float(n)}
    for key in ("turns", "tool_calls", "tool_errors", "env_seconds", "compressions", "compress_fallbacks"):
        out[f"{prefix}/{key}"] = sum(float(i.get(key, 0)) for i in infos) / n
    by_env: dict[str, list[float]] = {}
    for info in infos:
        by_env.setdefault(str(info["environment"]), []).append(float(bool(info["passed"])))
    out.update({f"{prefix}/pass_rate/{env}": sum(v) / len(v) for env, v in by_env.items()})
    return out


def make_grader(recipe: Any, router: Any) -> Any:
    """The recipe's ``grading`` section as a ``runtime.grading.StreamingGrader`` over ``router``."""
    from kexaone_align.runtime.grading import StreamingGrader

    g = recipe.grading
    return StreamingGrader(
        router, backend=g.backend, num_workers=g.num_workers, chunk_size=g.chunk_size,
        timeout_s=g.timeout_s, cpus_per_task=g.cpus_per_task,
    )  # fmt: skip


def sample_key(sample: RolloutSample) -> tuple[str, int]:
    """What names a sample's reward while grading streams: its request and index in the group."""
    return (sample.request_id, sample.sample_index)


def submit_for_grading(
    grader: Any, tokenizer: Any, rows: Sequence[PromptRow], part: Sequence[RolloutSample]
) -> None:
    """``RolloutPool.collect``'s ``on_result`` (bind the first three arguments): grade ``part`` now."""
    plain = [s for s in part if "episode" not in s.metadata]  # tool episodes: their environment scored them
    out, content = [], []
    for s in plain:
        row = rows[int(s.metadata["row"])]
        text = decode_response(tokenizer, s)
        out.append(Sample(row.messages, text, row.reference, row.task, dict(row.metadata)))
        content.append((int(s.metadata["row"]), text))  # a repeated response to one row is graded once
    grader.submit([sample_key(s) for s in plain], out, content=content)


def graded_rewards(tokenizer: Any, groups: Sequence[Group], rewards: dict[Any, float]) -> Tensor:
    """Store streamed rewards (by ``sample_key``) and response texts on ``groups``; ``[P, G]`` rewards."""
    for g in groups:
        g.texts = [decode_response(tokenizer, s) for s in g.samples]
    flat = [
        float(s.metadata["episode"]["reward"]) if "episode" in s.metadata else rewards[sample_key(s)]
        for g in groups
        for s in g.samples
    ]
    return assign_rewards(groups, flat)


def assign_rewards(groups: Sequence[Group], rewards: Sequence[float]) -> Tensor:
    """Store rewards on their groups and return them as ``[P, G]`` (every group must have G samples)."""
    sizes = {len(g.samples) for g in groups}
    if len(sizes) > 1:
        raise KexaoneError(f"groups have different sizes {sorted(sizes)}; every prompt needs G samples")
    pos = 0
    for g in groups:
        g.rewards = [float(r) for r in rewards[pos : pos + len(g.samples)]]
        pos += len(g.samples)
    return torch.tensor([g.rewards for g in groups], dtype=torch.float32)


def split_stale(
    groups: Sequence[Group], learner_version: int, max_staleness: int
) -> tuple[list[Group], int, float]:
    """Keep groups whose oldest sample is at most ``max_staleness`` versions behind the learner.

    Returns ``(kept groups, number of dropped samples, mean staleness of the kept samples)``.
    """
    kept, dropped, ages = [], 0, []
    for g in groups:
        age = max(learner_version - s.policy_version for s in g.samples)
        if age > max_staleness:
            dropped += len(g.samples)
        else:
            kept.append(g)
            ages.extend(learner_version - s.policy_version for s in g.samples)
    return kept, dropped, (sum(ages) / len(ages) if ages else 0.0)


def per_task_means(groups: Sequence[Group], prefix: str) -> dict[str, float]:
    """``{prefix/<task>: mean reward}`` over every sample of ``groups``."""
    sums: dict[str, list[float]] = {}
    for g in groups:
        sums.setdefault(g.row.task, []).extend(g.rewards)
    return {f"{prefix}/{task}": sum(v) / len(v) for task, v in sums.items() if v}


# ------------------------------------------------------------------------------------------ batches
def training_batch(
    samples: Sequence[RolloutSample], advantages: Sequence[float], pad_token_id: int
) -> dict[str, Tensor]:
    """Right-padded learner batch: prompt + response ids, loss on response tokens, rollout log-probs
    aligned with ``input_ids`` (the learner's column t scores token t), one advantage per row."""
    if len(samples) != len(advantages):
        raise KexaoneError(f"{len(samples)} samples but {len(advantages)} advantages")
    if not samples:
        raise KexaoneError("training_batch needs at least one sample")
    ids, masks, old = [], [], []
    for s in samples:
        n_prompt = len(s.prompt_token_ids)
        ids.append(list(s.prompt_token_ids) + list(s.token_ids))
        masks.append([0] * n_prompt + policy_mask(s))
        old.append([0.0] * n_prompt + [float(x) for x in s.logprobs])
    loss_mask = pad_sequences(masks, 0).long()
    return {
        "input_ids": pad_sequences(ids, pad_token_id).long(),
        "attention_mask": pad_sequences([[1] * len(x) for x in ids], 0).long(),
        "loss_mask": loss_mask,
        "rollout_logprobs": pad_sequences(old, 0.0).float(),
        "advantages": torch.tensor([float(a) for a in advantages], dtype=torch.float32),
    }


def policy_mask(sample: RolloutSample) -> list[int]:
    """1 where the policy sampled the response token, 0 for a tool episode's environment tokens."""
    return list(sample.policy_mask) if sample.policy_mask is not None else [1] * len(sample.token_ids)


def response_stats(samples: Sequence[RolloutSample]) -> dict[str, float]:
    """Mean response length, truncated fraction, and the sampled-token entropy estimate (-mean log-prob)."""
    if not samples:
        return {}
    lengths = [len(s.token_ids) for s in samples]
    logps = [lp for s in samples for lp, m in zip(s.logprobs, policy_mask(s), strict=True) if m]
    return {
        "response_length": sum(lengths) / len(lengths),
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "entropy_estimate": -sum(logps) / len(logps) if logps else 0.0,
    }


# -------------------------------------------------------------------------------------- evaluation
def evaluate(
    pool: RolloutPool,
    tokenizer: Any,
    rows: Sequence[PromptRow],
    grade: Any,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    seed: int,
    tag: str,
    enable_thinking: bool | None = None,
    tool_limits: Any = None,
    compression: Any = None,
    on_samples: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, float]:
    """Held-out score by sampling (T=1.0, top-p 0.95): mean reward overall (``accuracy``) and per task.

    ``grade(samples) -> list[float]`` scores verifier samples (rule verifiers or the reward combiner).
    Calling it with the same ``tag`` and ``seed`` before and after training draws the same random
    numbers for each (prompt, sample), which takes sampling noise out of the before/after difference.
    ``on_samples`` receives ``sample_rows`` of the graded responses (for the W&B sample table).
    """
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P, seed=seed
    )
    requests = build_requests(
        tokenizer, rows, samples_per_prompt, tag, enable_thinking, tool_limits=tool_limits,
        compression=compression,
    )  # fmt: skip
    groups = group_samples(rows, pool.generate(requests, sampling))
    rewards = grade_mixed(grade, verifier_samples(tokenizer, groups))
    assign_rewards(groups, rewards)
    if on_samples is not None:
        on_samples(sample_rows(groups))
    flat = [r for g in groups for r in g.rewards]
    out = {"accuracy": sum(flat) / len(flat) if flat else 0.0, "num_samples": float(len(flat))}
    out.update({k.split("/", 1)[1]: v for k, v in per_task_means(groups, "task").items()})
    lengths = response_stats([s for g in groups for s in g.samples])
    out["response_length"] = lengths.get("response_length", 0.0)
    out.update(episode_metrics(groups))
    return out


def _prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    if len(messages) == 1:
        return str(messages[0].get("content"))
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)


def sample_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per graded response: prompt id, task, prompt text, response, reward, reference."""
    rows = []
    for g in groups:
        ref = g.row.reference
        reference = ref if isinstance(ref, str) else json.dumps(ref, default=str)
        prompt = _prompt_text(g.row.messages)
        for text, reward in zip(g.texts, g.rewards, strict=True):
            rows.append({"prompt_id": g.row.id, "task": g.row.task, "prompt": prompt, "response": text,
                         "reward": float(reward), "reference": reference})  # fmt: skip
    return rows


def rollout_pool_for(recipe: Any, model_path: Any, learners: Any = None) -> RolloutPool:
    """The recipe's rollout workers serving ``model_path``, placed as ``runtime.rollout.resources`` derives
    (a colocated layout shares ``learners``' placement group)."""
    from kexaone_align.runtime.rollout.resources import rollout_plan

    roll = recipe.rollout
    plan = rollout_plan(recipe)
    group = getattr(learners, "placement_group", None) if plan.layout == "colocated" else None
    return RolloutPool(
        str(model_path), roll.backend, roll.num_workers, plan=plan, placement_group=group,
        max_worker_restarts=roll.max_worker_restarts, job_timeout_s=roll.job_timeout_s,
        weight_sync_transport=roll.weight_sync_transport,
    )  # fmt: skip


def restored_cursor(recipe: Any, train_rows: Sequence[PromptRow], state: dict[str, Any]) -> PromptCursor:
    """The training-prompt cursor, at the position a resumed checkpoint's trainer state recorded."""
    cursor = PromptCursor(train_rows, recipe.seed, shuffle=recipe.data.shuffle)
    if state.get("cursor"):
        cursor.load_state_dict(state["cursor"])
    return cursor
