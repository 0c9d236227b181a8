"""The stage loops (sft, agapo, grouper) and the pipeline runner; `run_recipe` dispatches on the stage.

Stage modules are imported only when their stage runs, so a missing or broken one fails that stage with
a ``KexaoneError`` naming it instead of breaking the whole package.
"""

from __future__ import annotations

import importlib
from typing import Any

from kexaone_align.config import Recipe
from kexaone_align.errors import KexaoneError

STAGES = ("sft", "agapo", "grouper", "pipeline")


def stage_module(stage: str) -> Any:
    """``kexaone_align.stages.<stage>``, or a ``KexaoneError`` saying that stage is not available."""
    if stage not in STAGES:
        raise KexaoneError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    name = f"kexaone_align.stages.{stage}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise KexaoneError(f"stage {stage!r} is not available: module {name} is missing") from None
    if not callable(getattr(module, "run", None)):
        raise KexaoneError(f"stage {stage!r} is not available: {name} has no run(recipe) function")
    return module


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe's stage (or pipeline) to completion; returns its summary (also in summary.json).

    A stage whose Ray actors die mid-run restarts from its newest checkpoint, up to
    ``checkpoint.max_restarts`` times (``stages.common.run_with_restarts``); a pipeline applies that to
    each of its stages.
    """
    module = stage_module(recipe.stage)
    if recipe.logging.wandb is not None:  # a missing optional package fails now, not after Ray starts
        from kexaone_align.observe.wandb_logger import import_wandb

        import_wandb()
    if recipe.stage == "pipeline":
        return module.run(recipe)
    from kexaone_align.stages.common import run_with_restarts

    return run_with_restarts(module.run, recipe)


__all__ = ["STAGES", "run_recipe", "stage_module"]
