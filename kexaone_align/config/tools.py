"""The recipe's ``tools`` section: bounds on multi-turn tool episodes (rows with an ``environment``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kexaone_align.config.base import Section


class CompressJudgeConfig(Section):
    """The judge backend that writes compression records (``tools.compress_producer: judge``)."""

    backend: Literal["openai", "local"] = Field(
        description="'openai' = any OpenAI-compatible HTTP endpoint; 'local' = a transformers checkpoint "
        "loaded on each rollout worker."
    )
    model: str = Field(min_length=1, description="Model name (openai) or checkpoint path (local).")
    base_url: str | None = Field(
        None, description="Endpoint of the openai backend, e.g. http://host:8000/v1."
    )
    timeout_s: float = Field(60.0, gt=0, description="Wall-clock limit of one record; past it the fallback.")

    @model_validator(mode="after")
    def _check_backend(self) -> CompressJudgeConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("base_url: the 'openai' compression judge needs base_url")
        return self


class ToolsConfig(Section):
    """Limits of the tool episodes of AGAPO / GROUPER rollouts and evaluation."""

    max_turns: int = Field(
        4, ge=1, description="Assistant turns per episode; calls made in the last allowed turn are not run."
    )
    call_timeout_s: float = Field(
        10.0, gt=0, description="Wall-clock limit of one tool call (process-isolated environments)."
    )
    max_output_chars: int = Field(2000, ge=1, description="A tool result longer than this is cut.")
    max_calls_per_turn: int = Field(4, ge=1, description="Tool calls run per turn; extra ones fail.")
    compress_after_calls: int | None = Field(
        None,
        ge=1,
        description="Trajectory compression: once an episode has made this many tool calls since its last "
        "record, its history is replaced by one JSON record (facts, open questions). None = off.",
    )
    compress_producer: Literal["policy", "judge"] = Field(
        "policy", description="Who writes the record: the policy itself, or the compress_judge backend."
    )
    compress_max_tokens: int = Field(
        256, ge=16, description="Tokens the producer may write for one record (a longer one falls back)."
    )
    compress_judge: CompressJudgeConfig | None = Field(
        None, description="The judge backend of compress_producer 'judge'."
    )

    @model_validator(mode="after")
    def _check_compression(self) -> ToolsConfig:
        if self.compress_after_calls is not None and self.compress_producer == "judge":
            if self.compress_judge is None:
                raise ValueError("compress_judge: compress_producer 'judge' needs a compress_judge backend")
        return self
