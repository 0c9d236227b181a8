"""The built-in learner objectives: each stage's loss applied to one micro-batch.

A learner calls ``objective(token_logprobs [n, t], micro_batch) -> (loss, metrics)`` once per micro-batch
(``runtime.learner.Learner.train_step``) and combines the losses by the objective's aggregation:
``"sequences"`` weighs each micro-batch by its rows (the loss is a mean over responses, the paper's
``1/N sum_i``), ``"tokens"`` by its loss tokens (a mean over every supervised token). The metrics are
combined by name across micro-batches and ranks (``runtime.metric_reduce``).

Which keys a micro-batch carries depends on the stage that builds it; every stage gives ``input_ids``,
``attention_mask`` and ``loss_mask`` (1 on the tokens the loss reads); AGAPO adds ``rollout_logprobs`` and
``advantages`` (one per row), GROUPER adds ``advantages`` (one per row).
``kexaone_align.losses`` registers these under the names a recipe uses and loads a user's own.
"""

from __future__ import annotations

import math

from torch import Tensor

from kexaone_align.algorithms.agapo import agapo_loss, importance_ratio_stats
from kexaone_align.algorithms.grouper import grouper_loss
from kexaone_align.algorithms.sft import sft_loss


def agapo_objective(
    logprobs: Tensor, batch: dict[str, Tensor], *, is_cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 1 on the micro-batch's responses (aggregation ``sequences``), plus the rollout/learner
    mismatch partials (``importance_ratio_stats``; ``agapo.summarize_ratio_stats`` finishes them)."""
    mask = batch["loss_mask"]
    loss = agapo_loss(logprobs, batch["rollout_logprobs"], batch["advantages"], mask, is_cap)
    stats = importance_ratio_stats(logprobs, batch["rollout_logprobs"], mask, is_cap)
    return loss, {k: v for k, v in stats.items() if math.isfinite(v)}


def grouper_objective(logprobs: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Eq. 4 (group-wise SimPER) on the micro-batch's responses (aggregation ``sequences``)."""
    return grouper_loss(logprobs, batch["advantages"], batch["loss_mask"]), {}


def sft_objective(logprobs: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Assistant-token NLL (aggregation ``tokens``: every supervised token weighs the same)."""
    return sft_loss(logprobs, batch["loss_mask"]), {}
