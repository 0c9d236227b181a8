"""The algorithm section of each stage: ``sft``, ``agapo`` and ``grouper``.

Defaults follow the paper where it states a value (no KL term, router frozen during RL, zero-variance
filtering, responses for GROUPER sampled once from the initial policy); everything else is a small,
CPU-friendly default that the tiny recipes can rely on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kexaone_align.config.base import Section


def _loss_field(default: str) -> Any:
    return Field(
        default,
        min_length=1,
        description="The objective the learners minimise (kexaone_align.losses): a registered name "
        f"({default!r} is the paper's), an installed kexaone_align.losses entry point, 'module:attr' or "
        "'path/to/file.py:attr'.",
    )


def _loss_options_field() -> Any:
    return Field(
        default_factory=dict,
        description="Keyword arguments for the loss; each must be a parameter the loss function takes.",
    )


class SftConfig(Section):
    """Supervised fine-tuning on chat data (assistant tokens only)."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (None = run all epochs)."
    )
    batch_size: int = Field(8, ge=1, description="Sequences (or packed rows) per optimizer step.")
    max_seq_len: int = Field(1024, ge=8, description="Longest tokenized conversation / packed row.")
    packing: bool = Field(
        True, description="Pack several conversations per row with a block-diagonal mask (no leakage)."
    )
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only (system/user masked).")
    eval_every_steps: int = Field(0, ge=0, description="Evaluate every N steps (0 = only at the end).")
    freeze_router: bool = Field(False, description="Freeze MoE routers during SFT.")
    aux_loss_coef: float = Field(0.0, ge=0, description="Router load-balancing loss coefficient.")
    loss: str = _loss_field("sft")
    loss_options: dict[str, Any] = _loss_options_field()


class AgapoConfig(Section):
    """AGAPO: off-policy policy gradient with truncated importance sampling (paper Eq. 1-2)."""

    group_size: int = Field(
        8,
        ge=2,
        description="G, responses sampled per prompt; >= 2 because the leave-one-out baseline "
        "needs at least one peer.",
    )
    is_cap: float = Field(
        2.0, gt=0, description="epsilon, the cap of the truncated importance ratio sg(min(rho, epsilon))."
    )
    ratio_distribution: Literal["sampler", "model_at_temperature"] = Field(
        "model_at_temperature",
        description="Which distribution both sides of the importance ratio rho = pi_theta / pi_rollout "
        "(Eq. 1) are taken under. 'model_at_temperature': the model's softmax at rollout.temperature over "
        "the full vocabulary, learner and rollout alike (top-p / top-k truncation is not corrected for). "
        "'sampler': the processed sampler's distribution (temperature, then top-k / top-p, renormalised "
        "over the tokens kept), which the learner recomputes with the same truncation. Either way an "
        "on-policy ratio is 1; with rollout.backend vllm, 'model_at_temperature' needs temperature 1.0 "
        "or no top-p / top-k.",
    )
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per optimizer step (each sampled G times).")
    steps: int = Field(10, ge=1, description="Optimizer steps to run.")
    zero_variance_filter: bool = Field(
        True, description="Drop prompts whose G rewards are all equal (their advantages are all zero)."
    )
    freeze_router: bool = Field(True, description="Keep the MoE routers frozen during RL (paper).")
    aux_loss_coef: float = Field(0.0, ge=0, description="Router load-balancing loss coefficient (0 in RL).")
    eval_every_steps: int = Field(0, ge=0, description="Evaluate held-out accuracy every N steps (0 = end).")
    eval_samples_per_prompt: int = Field(1, ge=1, description="Samples per held-out prompt at evaluation.")
    loss: str = _loss_field("agapo")
    loss_options: dict[str, Any] = _loss_options_field()


class RewardComponent(Section):
    """One term of a preference reward: a verifier's reward or the rubric judge's, times a weight."""

    source: str = Field(
        min_length=1, description="A verifier name (key of `verifiers` or a registered name) or 'judge'."
    )
    weight: float = Field(1.0, ge=0, description="Weight of this component in the weighted sum.")


class RewardGate(Section):
    """A verifier that must pass for the reward to count (e.g. a failed format check zeroes it)."""

    verifier: str = Field(min_length=1, description="Verifier name whose reward is checked.")
    threshold: float = Field(1.0, ge=0, le=1, description="Reward at or above which the gate is open.")


class TaskReward(Section):
    """How a task's preference reward is combined."""

    components: list[RewardComponent] = Field(min_length=1, description="Weighted reward terms.")
    gates: list[RewardGate] = Field(default_factory=list, description="Gates multiplying the reward by 0/1.")

    @model_validator(mode="after")
    def _positive_total(self) -> TaskReward:
        if sum(c.weight for c in self.components) <= 0:
            raise ValueError("components: the weights must sum to a positive number")
        return self


class JudgeConfig(Section):
    """The rubric LLM judge used by GROUPER's generative reward."""

    backend: Literal["none", "openai", "local"] = Field(
        "none",
        description="'openai' = any OpenAI-compatible HTTP endpoint; 'local' = a transformers "
        "model in-process / Ray actor; 'none' = no judge.",
    )
    model: str | None = Field(None, description="Judge model name (openai) or checkpoint path (local).")
    base_url: str | None = Field(
        None, description="Endpoint for the openai backend, e.g. http://host:8000/v1."
    )
    rubric: str = Field("chat_helpfulness", description="Built-in rubric name or path to a rubric file.")
    max_concurrency: int = Field(8, ge=1, description="Concurrent judge requests.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    retries: int = Field(2, ge=0, description="Retries on parse failure / HTTP error.")

    @model_validator(mode="after")
    def _check_backend(self) -> JudgeConfig:
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ValueError("backend: 'openai' needs base_url and model")
        if self.backend == "local" and not self.model:
            raise ValueError("model: the 'local' judge backend needs a checkpoint path")
        return self


class GrouperRewardConfig(Section):
    """Preference reward = gates x weighted sum of rule-verifier rewards and the rubric judge."""

    per_task: dict[str, TaskReward] = Field(
        default_factory=dict,
        description="task -> combination. A task not listed uses its verifier alone (weight 1).",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The rubric judge.")

    @model_validator(mode="after")
    def _judge_needed(self) -> GrouperRewardConfig:
        uses_judge = any(
            c.source == "judge" and c.weight > 0 for t in self.per_task.values() for c in t.components
        )
        if uses_judge and self.judge.backend == "none":
            raise ValueError("judge.backend: a reward component uses 'judge' but judge.backend is 'none'")
        return self


class GrouperConfig(Section):
    """GROUPER: group-wise SimPER preference learning (paper Eq. 3-4)."""

    group_size: int = Field(8, ge=2, description="G, responses per prompt (min-max scaling needs >= 2).")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per optimizer step.")
    steps: int = Field(10, ge=1, description="Optimizer steps to run.")
    refresh_every: int = Field(
        0,
        ge=0,
        description="Every N steps the current policy samples the groups of the next N steps (all at "
        "once, at the refresh); 0 = each prompt's group is sampled once, from the initial policy (the "
        "paper's pi_init).",
    )
    freeze_router: bool = Field(True, description="Keep the MoE routers frozen.")
    aux_loss_coef: float = Field(0.0, ge=0, description="Router load-balancing loss coefficient.")
    eval_every_steps: int = Field(
        0,
        ge=0,
        description="Evaluate held-out preference reward every N steps (eval/reward, eval/train_seconds; "
        "0 = only before and after). With refresh_every 0 the initial policy is pushed back to the "
        "rollout workers afterwards, before new groups are sampled.",
    )
    reward: GrouperRewardConfig = Field(
        default_factory=GrouperRewardConfig, description="How rule and judge rewards are combined."
    )
    loss: str = _loss_field("grouper")
    loss_options: dict[str, Any] = _loss_options_field()
