"""Settings derived from a recipe for the runtime, so stage code does not re-derive them by hand.

``learner_settings`` returns keyword arguments named like ``kexaone_align.runtime.learner.LearnerConfig``
(plain dict: this module does not import the runtime).
"""

from __future__ import annotations

from typing import Any

from kexaone_align.config.recipe import Recipe
from kexaone_align.errors import KexaoneError


def schedule_steps(recipe: Recipe, total_steps: int) -> dict[str, int]:
    """warmup / stable / decay step counts of the recipe's LR schedule for a run of ``total_steps``.

    wsd decays over the last ``decay_fraction`` of the steps after warmup; cosine decays over every step
    after warmup; constant has no decay.
    """
    if total_steps < 1:
        raise KexaoneError(f"total_steps must be >= 1, got {total_steps}")
    learn = recipe.learners
    warmup = min(learn.warmup_steps, total_steps)
    after = total_steps - warmup
    if learn.lr_schedule == "wsd":
        if not after:  # a run no longer than its warmup: the decay would start after the last step
            return {"warmup_steps": warmup, "stable_steps": 0, "decay_steps": 1}
        decay = max(1, round(after * learn.decay_fraction))
        return {"warmup_steps": warmup, "stable_steps": after - decay, "decay_steps": decay}
    if learn.lr_schedule == "cosine":
        return {"warmup_steps": warmup, "stable_steps": 0, "decay_steps": max(1, after)}
    return {"warmup_steps": warmup, "stable_steps": 0, "decay_steps": 0}


def learner_settings(recipe: Recipe, total_steps: int) -> dict[str, Any]:
    """LearnerConfig keyword arguments for this recipe's stage (learning rate from the stage section)."""
    learn, algo = recipe.learners, recipe.algorithm
    return {
        "zero_stage": learn.zero_stage,
        "precision": learn.precision,
        "backend": learn.backend,
        "lr": algo.lr,
        "weight_decay": learn.weight_decay,
        "betas": (learn.betas[0], learn.betas[1]),
        "eps": learn.eps,
        "grad_clip": learn.grad_clip or 0.0,
        "lr_schedule": learn.lr_schedule,
        **schedule_steps(recipe, total_steps),
        "min_lr_ratio": learn.min_lr_ratio,
        "micro_batch_tokens": learn.micro_batch_tokens,
        "sequence_packing": learn.sequence_packing,
        "share_prefixes": learn.share_prefixes,
        "balance_ranks": learn.balance_ranks,
        "threads": learn.threads,
        "gradient_checkpointing": bool(recipe.model and recipe.model.gradient_checkpointing),
        "attn_implementation": recipe.model.attn_implementation if recipe.model else None,
        "experts_implementation": recipe.model.experts_implementation if recipe.model else None,
        "freeze_router": recipe.freeze_router,
        "aux_loss_coef": algo.aux_loss_coef,
        "seed": recipe.seed,
    }
