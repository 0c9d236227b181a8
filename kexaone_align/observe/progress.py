"""A progress bar showing step, reward and throughput; silent when disabled or not a terminal."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class Progress:
    """Thin wrapper over tqdm so stage loops stay one line: ``progress.update(metrics)``."""

    SHOWN = ("loss", "reward_mean", "eval_accuracy", "rollout_tokens_per_s", "learner_tokens_per_s")

    def __init__(self, stage: str, total: int, *, enabled: bool = True, initial: int = 0) -> None:
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=stage,
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def update(self, metrics: dict[str, Any], steps: int = 1) -> None:
        shown = {k: f"{metrics[k]:.3g}" for k in self.SHOWN if isinstance(metrics.get(k), int | float)}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
