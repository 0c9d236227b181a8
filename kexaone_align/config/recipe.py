"""The whole recipe: one stage (sft | agapo | grouper) or a pipeline chaining stage recipes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from kexaone_align.config.algorithms import AgapoConfig, GrouperConfig, SftConfig
from kexaone_align.config.base import Section
from kexaone_align.config.infra import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    GradingConfig,
    LearnersConfig,
    LoggingConfig,
    RolloutConfig,
)
from kexaone_align.config.model import ModelConfig, TokenizerConfig
from kexaone_align.config.tools import ToolsConfig

Stage = Literal["sft", "agapo", "grouper", "pipeline"]
ALGORITHM_STAGES = ("sft", "agapo", "grouper")

# A verifier reference: a registered name, `package.module:attr`, or `path/to/file.py:attr`.
_VERIFIER_REF = re.compile(
    r"^(?:[A-Za-z_][\w.-]*|[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
    r"|[^:]+\.py:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$"
)


class PipelineEntry(Section):
    """One stage of a pipeline: a stage recipe file plus dotted overrides."""

    recipe: str = Field(min_length=1, description="Stage recipe file, relative to the pipeline file.")
    overrides: list[str] = Field(
        default_factory=list, description="Dotted overrides applied to that recipe, e.g. 'agapo.steps=5'."
    )


class Recipe(Section):
    """A validated recipe. Stage code reads it; it is never mutated after loading."""

    stage: Stage = Field(description="'sft', 'agapo', 'grouper', or 'pipeline' (a list of stage recipes).")
    name: str | None = Field(None, description="Human-readable run name (shown in logs).")
    model: ModelConfig | None = Field(
        None,
        description="The policy. Required for a stage; in a pipeline it replaces the first stage's model.",
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The tokenizer.")
    data: DataConfig | None = Field(None, description="Training / evaluation data (required for a stage).")
    sft: SftConfig | None = Field(None, description="SFT hyper-parameters (stage 'sft' only).")
    agapo: AgapoConfig | None = Field(None, description="AGAPO hyper-parameters (stage 'agapo' only).")
    grouper: GrouperConfig | None = Field(
        None, description="GROUPER hyper-parameters (stage 'grouper' only)."
    )
    pipeline: list[PipelineEntry] | None = Field(
        None, description="Stage recipes run in order; each starts from the previous stage's export."
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers.")
    learners: LearnersConfig = Field(default_factory=LearnersConfig, description="DeepSpeed learners.")
    tools: ToolsConfig = Field(default_factory=ToolsConfig, description="Bounds on multi-turn tool episodes.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster and placement.")
    verifiers: dict[str, str] = Field(
        default_factory=dict,
        description="task -> verifier reference: a registered name, 'module:attr' or 'path/to/file.py:attr'.",
    )
    grading: GradingConfig = Field(
        default_factory=GradingConfig, description="Rule-verifier grading of rollouts (workers, limits)."
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics sinks.")
    run_dir: str | None = Field(
        None, description="Output directory (relative to the working directory). None = runs/<name or stage>."
    )
    seed: int = Field(0, ge=0, description="Seed for data order, sampling and init.")

    _source: Path | None = PrivateAttr(default=None)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @field_validator("verifiers")
    @classmethod
    def _verifier_refs(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {task: ref for task, ref in value.items() if not _VERIFIER_REF.match(ref)}
        if bad:
            task, ref = next(iter(bad.items()))
            raise ValueError(
                f"verifier reference {ref!r} for task {task!r} is not a registered name, 'module:attr' "
                "or 'path/to/file.py:attr'"
            )
        return value

    @model_validator(mode="after")
    def _check_stage_sections(self) -> Recipe:
        given = [s for s in ALGORITHM_STAGES if getattr(self, s) is not None]
        if self.stage == "pipeline":
            if not self.pipeline:
                raise ValueError("pipeline: a 'pipeline' recipe needs a non-empty list of stage recipes")
            if given:
                raise ValueError(
                    f"{given[0]}: a pipeline recipe cannot have an algorithm section; "
                    "put it in the stage recipe"
                )
            return self
        if self.pipeline is not None:
            raise ValueError(f"pipeline: only allowed when stage is 'pipeline' (stage is {self.stage!r})")
        others = [s for s in given if s != self.stage]
        if others:
            raise ValueError(f"{others[0]}: section not allowed, stage is {self.stage!r}")
        if self.model is None:
            raise ValueError("model: section is required")
        if self.data is None:
            raise ValueError("data: section is required")
        if not self.data.train_files and self.data.generator is None:
            raise ValueError("data: needs train_files or a generator")
        cols = self.data.columns
        mapped = cols.preset != "none" or cols.prompt is not None or cols.messages is not None
        needs_task = self.stage != "sft" and cols.preset in ("none", "chat")
        if mapped and needs_task and not (cols.task or cols.task_column):
            raise ValueError(
                "data.columns.task: rows mapped from columns need a verifier task for every row "
                "(e.g. task: math) or a task_column"
            )
        if self.stage == "sft" and cols.preset == "none" and cols.prompt and not cols.response:
            raise ValueError("data.columns.response: SFT from a prompt column needs the column to train on")
        if getattr(self, self.stage) is None:
            default = {"sft": SftConfig, "agapo": AgapoConfig, "grouper": GrouperConfig}[self.stage]()
            object.__setattr__(self, self.stage, default)
        return self

    @model_validator(mode="after")
    def _check_layout(self) -> Recipe:
        if self.stage == "pipeline":
            return self
        c, r, learn = self.cluster, self.rollout, self.learners
        uses_rollout = self.stage != "sft"
        if learn.backend == "nccl" and c.gpus_per_node == 0:
            raise ValueError("learners.backend: 'nccl' needs GPUs (cluster.gpus_per_node is 0); use 'gloo'")
        if c.simulated_gpus and c.gpus_per_node == 0:
            raise ValueError("cluster.simulated_gpus: needs cluster.gpus_per_node > 0 (the GPUs to declare)")
        if c.simulated_gpus and learn.backend == "nccl":
            raise ValueError("learners.backend: 'nccl' needs real GPUs; use 'gloo' with simulated_gpus")
        if uses_rollout and r.mtp_speculative and r.backend != "vllm":
            raise ValueError("rollout.mtp_speculative: needs rollout.backend 'vllm'")
        agapo = self.agapo
        if (
            agapo is not None
            and r.backend == "vllm"
            and agapo.ratio_distribution == "model_at_temperature"
            and r.temperature != 1.0
            and (r.top_p < 1.0 or r.top_k > 0)
        ):
            raise ValueError(
                "agapo.ratio_distribution: 'model_at_temperature' with rollout.backend 'vllm' needs "
                "rollout.temperature 1.0 or no truncation (top_p 1.0, top_k -1): vLLM reports the "
                "processed sampler's log-probs or the model's at T=1, not the model's at another "
                "temperature; use 'sampler'"
            )
        if c.gpus_per_node:
            total = c.nodes * c.gpus_per_node
            learner_gpus = learn.num_learners
            rollout_gpus = r.num_workers * r.tensor_parallel_size if uses_rollout else 0
            need = (
                learner_gpus + rollout_gpus
                if c.placement == "disaggregated"
                else max(learner_gpus, rollout_gpus)
            )
            if need > total:
                raise ValueError(
                    f"cluster: the layout needs {need} GPUs ({learner_gpus} learners, {rollout_gpus} "
                    f"rollout, {c.placement}) but the cluster has {c.nodes} x {c.gpus_per_node} = {total}"
                )
            if uses_rollout and r.tensor_parallel_size > c.gpus_per_node:
                raise ValueError("rollout.tensor_parallel_size: exceeds cluster.gpus_per_node")
        arch = self.model.architecture if self.model else None
        if arch is not None and uses_rollout:
            if arch.num_attention_heads % r.tensor_parallel_size:
                raise ValueError(
                    f"rollout.tensor_parallel_size: {r.tensor_parallel_size} must divide "
                    f"num_attention_heads ({arch.num_attention_heads})"
                )
            if r.max_new_tokens > arch.max_position_embeddings:
                raise ValueError("rollout.max_new_tokens: exceeds model.architecture.max_position_embeddings")
        return self

    @property
    def source_path(self) -> Path | None:
        """The YAML file this recipe was loaded from (None when built in code)."""
        return self._source

    @property
    def warnings(self) -> list[str]:
        """Non-fatal findings of loading, e.g. data files that do not exist on this machine."""
        return list(self._warnings)

    @property
    def algorithm(self) -> SftConfig | AgapoConfig | GrouperConfig:
        """The stage's algorithm section (never None for a stage recipe)."""
        section = getattr(self, self.stage, None)
        if section is None:
            raise AttributeError("a pipeline recipe has no algorithm section")
        return section

    @property
    def freeze_router(self) -> bool:
        """Whether MoE routers are frozen: model.freeze_router if set, else the stage's default."""
        if self.model is not None and self.model.freeze_router is not None:
            return self.model.freeze_router
        return bool(getattr(self.algorithm, "freeze_router", False))

    @property
    def resolved_run_dir(self) -> Path:
        """run_dir, or runs/<name or stage> when unset."""
        return Path(self.run_dir or f"runs/{self.name or self.stage}")
