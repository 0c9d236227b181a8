"""Robust extraction of per-dimension scores from free-form judge text.

Judges (especially small or sampled ones) wrap their JSON in prose or code fences, write ``"7/10"`` as a
string, answer with ``Helpfulness: 7/10`` lines instead, think aloud in ``<think>`` blocks, skip a
dimension or go off the scale. ``parse_scores`` accepts all of that and raises ``ParseFailure`` (a counted,
retryable event for the judge, never a user error) only when too little of the rubric could be read.

Rules, in order:
  * ``<think>...</think>`` reasoning is dropped; so is everything before a lone ``</think>``.
  * Every JSON object in the text is a candidate (a nested ``{"scores": {...}}`` is looked into); values may
    be numbers, numeric strings, ``"x/y"`` strings or ``{"score": x}``. ``name: x``, ``name = x``,
    ``**Name**: x/10`` and ``name - x out of 10`` lines are candidates too; the later mention wins.
  * Keys match dimension names case-insensitively, with spaces and hyphens read as ``_``. A one-dimension
    rubric also accepts ``score``/``overall``/``rating``.
  * ``x/y`` with ``y`` different from the rubric's ``scale_max`` is rescaled onto the rubric scale.
  * A score outside ``[scale_min, scale_max]`` is not clamped (``85`` on a 1-10 scale is a misunderstanding,
    not a 10): that dimension counts as missing and is reported in ``out_of_range``.
  * Missing dimensions are allowed while the weight of the readable ones is at least ``min_coverage`` of the
    rubric's total weight; the reward is then the weighted mean over the readable ones.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from kexaone_align.reward_models.rubric import Rubric

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_NUM = r"[-+]?\d+(?:\.\d+)?"
_LINE_RE = re.compile(
    r"(?:^|[,;|])[\s>*#\-•]*(?P<name>[A-Za-z][A-Za-z0-9 _\-]{0,60}?)[\s*_\"']*"
    r"(?:\([^)]*\))?\s*[:=]\s*[*\"'\[]*\s*(?P<val>" + _NUM + r")"
    r"(?:\s*(?:/|out\s+of)\s*(?P<den>" + _NUM + r"))?",
    re.MULTILINE | re.IGNORECASE,
)
_VALUE_RE = re.compile(r"^\s*(?P<val>" + _NUM + r")\s*(?:(?:/|out\s+of)\s*(?P<den>" + _NUM + r"))?\s*$", re.I)
_SINGLE_ALIASES = ("score", "overall", "overall_score", "rating", "final_score")
_EXCERPT = 300
_MAX_CHARS = 20_000  # scores come at the end; bounds regex work on runaway outputs


class ParseFailure(ValueError):
    """The judge's text did not yield enough rubric scores; ``reason`` says why, ``text`` is an excerpt."""

    def __init__(self, reason: str, text: str = "") -> None:
        self.reason = reason
        self.text = text[:_EXCERPT]
        super().__init__(f"{reason}; judge said: {self.text!r}")


@dataclass
class ParsedScores:
    """Raw scores on the rubric scale, what was missing or off the scale, and the reward they give."""

    scores: dict[str, float]
    reward: float
    coverage: float
    missing: list[str] = field(default_factory=list)
    out_of_range: dict[str, float] = field(default_factory=dict)
    source: str = "json"


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().strip("*_\"'").strip()).lower()


def _strip_reasoning(text: str) -> str:
    text = _THINK_RE.sub(" ", text)
    low = text.lower()
    if "</think>" in low:
        text = text[low.rindex("</think>") + len("</think>") :]
    return text


def _to_score(value: Any, rubric: Rubric) -> float | None:
    """A number on the rubric scale from a JSON value, or None when it is not a score at all."""
    if isinstance(value, dict):
        for k in ("score", "value", "rating"):
            if k in value:
                return _to_score(value[k], rubric)
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _VALUE_RE.match(value)
        if m:
            return _scaled(m.group("val"), m.group("den"), rubric)
    return None


def _scaled(val: str, den: str | None, rubric: Rubric) -> float | None:
    v = float(val)
    if den is None:
        return v
    d = float(den)
    if d <= 0:
        return None
    if math.isclose(d, float(rubric.scale_max)):
        return v
    lo, hi = float(rubric.scale_min), float(rubric.scale_max)
    return lo + (v / d) * (hi - lo) if 0 <= v <= d else float("nan")


def _json_objects(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
            for v in obj.values():  # {"scores": {...}} or {"helpfulness": {"score": 7, ...}}
                if isinstance(v, dict):
                    found.append(v)
        i = text.find("{", end)
    return found


def _match(raw: dict[str, float | None], rubric: Rubric) -> dict[str, float | None]:
    """Map normalised keys onto dimension names."""
    by_key = {_key(d.name): d.name for d in rubric.dimensions}
    if len(rubric.dimensions) == 1:
        for alias in _SINGLE_ALIASES:
            by_key.setdefault(alias, rubric.dimensions[0].name)
    out: dict[str, float | None] = {}
    for k, v in raw.items():
        name = by_key.get(_key(k))
        if name is not None and v is not None:
            out[name] = v
    return out


def _from_json(text: str, rubric: Rubric) -> dict[str, float | None]:
    best: dict[str, float | None] = {}
    for obj in _json_objects(text):
        got = _match({str(k): _to_score(v, rubric) for k, v in obj.items()}, rubric)
        if len(got) >= len(best):  # ties go to the later object: the judge's final answer
            best = got
    return best


def _from_lines(text: str, rubric: Rubric) -> dict[str, float | None]:
    raw: dict[str, float | None] = {}
    for m in _LINE_RE.finditer(text):
        raw[m.group("name")] = _scaled(m.group("val"), m.group("den"), rubric)
    # A later line for the same dimension overrides an earlier one (dict keeps insertion, so re-key).
    ordered: dict[str, float | None] = {}
    for k, v in raw.items():
        ordered.pop(k, None)
        ordered[k] = v
    return _match(ordered, rubric)


def parse_scores(text: str, rubric: Rubric, *, min_coverage: float = 1.0) -> ParsedScores:
    """Scores for ``rubric`` read from judge ``text``; raises ``ParseFailure`` if too little is readable."""
    if not isinstance(text, str) or not text.strip():
        raise ParseFailure("empty judge output", text if isinstance(text, str) else repr(text))
    body = _strip_reasoning(text)[-_MAX_CHARS:]
    from_json = _from_json(body, rubric)
    from_lines = _from_lines(body, rubric)
    if len(from_json) >= len(from_lines):
        merged, source = {**from_lines, **from_json}, "json" if from_json else "none"
    else:
        merged, source = {**from_json, **from_lines}, "lines"
    lo, hi = float(rubric.scale_min), float(rubric.scale_max)
    scores: dict[str, float] = {}
    out_of_range: dict[str, float] = {}
    for name, value in merged.items():
        if value is None:
            continue
        if math.isnan(value) or not lo - 1e-9 <= value <= hi + 1e-9:
            out_of_range[name] = value
        else:
            scores[name] = value
    missing = [d.name for d in rubric.dimensions if d.name not in scores]
    present_weight = sum(d.weight for d in rubric.dimensions if d.name in scores)
    coverage = present_weight / rubric.total_weight
    if not scores or coverage + 1e-12 < min_coverage:
        detail = f"missing {', '.join(missing)}" if missing else "no scores"
        if out_of_range:
            detail += f"; off the {rubric.scale_min:g}-{rubric.scale_max:g} scale: {out_of_range}"
        raise ParseFailure(f"could not read rubric scores ({detail})", text)
    reward = sum(d.weight * rubric.normalise(scores[d.name]) for d in rubric.dimensions if d.name in scores)
    return ParsedScores(
        scores=scores,
        reward=reward / present_weight,
        coverage=coverage,
        missing=missing,
        out_of_range=out_of_range,
        source=source,
    )
