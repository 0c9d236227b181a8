"""Learning-rate schedules as pure functions of the optimizer step.

Each returns the *multiplier* of the peak LR for the update that is about to be taken at ``step``
(0 for the first update), so it plugs straight into ``torch.optim.lr_scheduler.LambdaLR``, which
DeepSpeed steps once per optimizer step. Linear warmup reaches the peak on update ``warmup_steps - 1``
(the first update already moves, unlike schedules that start at exactly 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from kexaone_align.errors import KexaoneError

SCHEDULES = ("constant", "cosine", "wsd")


def _warmup(step: int, warmup_steps: int) -> float | None:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


def constant(step: int, *, warmup_steps: int = 0) -> float:
    """Linear warmup, then the peak LR forever."""
    w = _warmup(step, warmup_steps)
    return 1.0 if w is None else w


def cosine(step: int, *, warmup_steps: int = 0, decay_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup, then half a cosine from 1 to ``min_ratio`` over ``decay_steps``, then ``min_ratio``."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd(
    step: int, *, warmup_steps: int = 0, stable_steps: int, decay_steps: int, min_ratio: float = 0.0
) -> float:
    """Warmup-stable-decay: linear warmup, ``stable_steps`` at the peak, linear decay to ``min_ratio``."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    into_decay = step - warmup_steps - stable_steps
    if into_decay < 0:
        return 1.0
    progress = min(1.0, (into_decay + 1) / max(1, decay_steps))
    return 1.0 - (1.0 - min_ratio) * progress


def lr_multiplier_fn(
    name: str,
    *,
    warmup_steps: int = 0,
    stable_steps: int = 0,
    decay_steps: int = 0,
    min_ratio: float = 0.0,
) -> Callable[[int], float]:
    """The named schedule with its settings bound (a picklable ``functools.partial``)."""
    if warmup_steps < 0 or stable_steps < 0 or decay_steps < 0:
        raise KexaoneError(
            f"LR schedule step counts must be >= 0 (warmup={warmup_steps}, stable={stable_steps}, "
            f"decay={decay_steps})"
        )
    if not 0.0 <= min_ratio <= 1.0:
        raise KexaoneError(f"min_lr_ratio must be in [0, 1], got {min_ratio}")
    if name == "constant":
        return functools.partial(constant, warmup_steps=warmup_steps)
    if name == "cosine":
        if decay_steps < 1:
            raise KexaoneError("the cosine LR schedule needs decay_steps >= 1")
        return functools.partial(
            cosine, warmup_steps=warmup_steps, decay_steps=decay_steps, min_ratio=min_ratio
        )
    if name == "wsd":
        if decay_steps < 1:
            raise KexaoneError("the wsd LR schedule needs decay_steps >= 1")
        return functools.partial(
            wsd,
            warmup_steps=warmup_steps,
            stable_steps=stable_steps,
            decay_steps=decay_steps,
            min_ratio=min_ratio,
        )
    raise KexaoneError(f"unknown lr_schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, **settings
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` on the named schedule (for ``deepspeed.initialize``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier_fn(name, **settings))
