"""The recipe's ``tools`` section: bounds on multi-turn tool episodes (rows with an ``environment``)."""

from __future__ import annotations

from pydantic import Field

from kexaone_align.config.base import Section


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
