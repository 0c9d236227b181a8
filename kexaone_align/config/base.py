"""The base class every recipe section derives from.

Strict mode is deliberate: a recipe that says ``group_size: "8"`` or ``lr: "1e-5"`` is a mistake the
user should hear about, not something to coerce silently. Unknown keys are refused for the same reason.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section: strict types, unknown keys refused, defaults validated too."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        validate_default=True,
        validate_assignment=True,
    )
