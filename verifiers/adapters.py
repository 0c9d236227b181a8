"""Adapters so existing reward code registers as verifiers unchanged.

* TRL reward functions: ``fn(prompts, completions, **kwargs) -> list[float | None]``, called with a
  batch of one. The reference is passed as the ``reference_key`` column (``"solution"`` by default,
  the name TRL's examples use), and every ``sample.metadata`` entry as a column too.
* verl ``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` returning a float or
  a dict with a ``"score"`` key.

Rewards are mapped into [0, 1]: ``scale="clamp"`` (default) cuts the value to [0, 1];
``scale="rescale"`` maps ``bounds=(lo, hi)`` linearly onto [0, 1] and then clamps, for rewards on
another range such as [-1, 1]. NaN, None and non-numbers are errors, never silent zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from kexaone_align.verifiers.api import Sample, VerifyResult, _register_factory

from kexaone_align.errors import KexaoneError

Scale = Literal["clamp", "rescale"]


def to_unit_interval(value: Any, scale: Scale = "clamp", bounds: tuple[float, float] = (0.0, 1.0)) -> float:
    """Map a foreign reward into [0, 1] by ``scale`` (see the module docstring)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)  # numpy and torch scalars
        except (TypeError, ValueError):
            raise KexaoneError(f"reward function returned {value!r}, not a number") from None
    value = float(value)
    if math.isnan(value):
        raise KexaoneError("reward function returned NaN")
    if scale == "rescale":
        lo, hi = bounds
        if not hi > lo:
            raise KexaoneError(f"rescale bounds must satisfy lo < hi, got {bounds}")
        value = (value - lo) / (hi - lo)
    elif scale != "clamp":
        raise KexaoneError(f"scale must be 'clamp' or 'rescale', got {scale!r}")
    return min(1.0, max(0.0, value))


class TRLRewardVerifier:
    """A TRL reward function seen as a verifier (one sample per call)."""

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        reference_key: str = "solution",
        scale: Scale = "clamp",
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.name, self.fn, self.reference_key = name, fn, reference_key
        self.scale, self.bounds = scale, bounds
        to_unit_interval(bounds[0], scale, bounds)  # validate options now, not on the first sample

    def verify(self, sample: Sample) -> VerifyResult:
        conversational = isinstance(sample.prompt, list) and all(isinstance(m, dict) for m in sample.prompt)
        completion: Any = (
            [{"role": "assistant", "content": sample.response}] if conversational else sample.response
        )
        columns = {k: [v] for k, v in sample.metadata.items()}
        columns[self.reference_key] = [sample.reference]
        columns.setdefault("task", [sample.task])
        out = self.fn(prompts=[sample.prompt], completions=[completion], **columns)
        try:
            values = list(out)
        except TypeError:
            raise KexaoneError(
                f"TRL reward {self.name!r} returned {out!r}, expected a list of floats"
            ) from None
        if len(values) != 1:
            raise KexaoneError(f"TRL reward {self.name!r} returned {len(values)} values for 1 completion")
        if values[0] is None:
            return VerifyResult(
                0.0, {"reason": "reward function returned None (not applicable)", "raw": None}
            )
        raw = values[0]
        return VerifyResult(to_unit_interval(raw, self.scale, self.bounds), {"raw": float(raw)})


class VerlScoreVerifier:
    """A verl ``compute_score`` function seen as a verifier."""

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        data_source: str | None = None,
        scale: Scale = "clamp",
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.name, self.fn, self.data_source = name, fn, data_source
        self.scale, self.bounds = scale, bounds
        to_unit_interval(bounds[0], scale, bounds)

    def verify(self, sample: Sample) -> VerifyResult:
        source = self.data_source or sample.metadata.get("data_source") or sample.task
        extra = dict(sample.metadata.get("extra_info") or {})
        extra.setdefault("prompt", sample.prompt)
        out = self.fn(source, sample.response, sample.reference, extra)
        details: dict[str, Any] = {"data_source": source}
        if isinstance(out, dict):
            if "score" not in out:
                raise KexaoneError(
                    f"verl compute_score {self.name!r} returned a dict without 'score': {out!r}"
                )
            details.update({k: v for k, v in out.items() if k != "score"})
            out = out["score"]
        details["raw"] = float(out) if isinstance(out, int | float) else out
        return VerifyResult(to_unit_interval(out, self.scale, self.bounds), details)


def register_trl_reward(
    name: str,
    fn: Callable[..., Any],
    *,
    reference_key: str = "solution",
    scale: Scale = "clamp",
    bounds: tuple[float, float] = (0.0, 1.0),
    overwrite: bool = False,
) -> TRLRewardVerifier:
    """Register a TRL reward function under ``name``; returns the verifier."""
    verifier = TRLRewardVerifier(name, fn, reference_key=reference_key, scale=scale, bounds=bounds)
    _register_factory(name, lambda: verifier, overwrite=overwrite)
    return verifier


def register_verl_compute_score(
    name: str,
    fn: Callable[..., Any],
    *,
    data_source: str | None = None,
    scale: Scale = "clamp",
    bounds: tuple[float, float] = (0.0, 1.0),
    overwrite: bool = False,
) -> VerlScoreVerifier:
    """Register a verl ``compute_score`` under ``name``.

    ``data_source`` fixes the first argument; without it the sample's ``metadata['data_source']`` or
    its ``task`` is passed, which lets one verl dispatcher serve several tasks.
    """
    verifier = VerlScoreVerifier(name, fn, data_source=data_source, scale=scale, bounds=bounds)
    _register_factory(name, lambda: verifier, overwrite=overwrite)
    return verifier
