"""How a loss function's per-micro-batch metrics combine into one step's value, across micro-batches and
data-parallel ranks alike.

The metric's name says it: ``*_max`` takes the largest value, ``*_min`` the smallest, ``*_sum`` adds
them up; any other name is a mean weighted by each micro-batch's loss weight (as before). So an extreme
is the true extreme of the whole step, never an average of per-micro-batch extremes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def reduction(name: str) -> str:
    """``"max"``, ``"min"``, ``"sum"`` or ``"mean"`` for a metric named ``name``."""
    for op in ("max", "min", "sum"):
        if name.endswith(f"_{op}"):
            return op
    return "mean"


class MetricAccumulator:
    """Combines the metrics of one step's micro-batches (then of its ranks) by their names' reductions."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        """One micro-batch's (or one rank's already combined) ``metrics``, carrying loss ``weight``."""
        self.weight += weight
        for key, value in metrics.items():
            value = float(value)
            op = reduction(key)
            if op == "mean":
                value *= weight
            if key not in self.values:
                self.values[key] = value
            elif op == "max":
                self.values[key] = max(self.values[key], value)
            elif op == "min":
                self.values[key] = min(self.values[key], value)
            else:
                self.values[key] += value

    def result(self) -> dict[str, float]:
        """The combined metrics (means divided by the total weight; 0 with no weight)."""
        out = {}
        for key, value in self.values.items():
            if reduction(key) == "mean":
                value = value / self.weight if self.weight > 0 else 0.0
            out[key] = value
        return out


def combine(parts: Iterable[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """``(metrics, weight)`` pairs (ranks) combined into one dict (see the module docstring)."""
    acc = MetricAccumulator()
    for metrics, weight in parts:
        acc.add({k: v for k, v in metrics.items() if math.isfinite(float(v))}, weight)
    return acc.result()
