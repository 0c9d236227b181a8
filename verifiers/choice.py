"""The ``choice`` verifier (alias ``stem``): multiple-choice answers graded by the chosen letter.

Reference: a letter (``"B"``, ``"(B)"``), a 0-based index, or a dict ``{"answer": ..., "choices": [...]}``
where the answer may also be the text of one choice. The chosen letter is read, in order of trust,
from ``\\boxed{}``, from "answer is / Answer: / 정답" phrases, from a response that is just a letter, or
from a last line starting with an option label. Several different letters stated as final -> 0.
"""

from __future__ import annotations

import re
import string
from typing import Any

from kexaone_align.verifiers.answer import MAX_ANSWER_CHARS, boxed_answers, last_line, strip_reasoning
from kexaone_align.verifiers.api import Sample, VerifyResult, register_verifier

from kexaone_align.errors import KexaoneError

LETTERS = string.ascii_uppercase[:26]
_WRAPPED = r"[\s(\[{*_$]*(?:\\text(?:bf)?\{)?\s*\(?([A-Z])\)?\s*\}?[\s)\]}*_.:,$]*"
_ANSWER_RE = re.compile(
    r"(?i:final\s+answer|correct\s+(?:answer|option|choice)|answer|정답|답)"
    r"\s*(?i:is|:|=|는|은)?\s*(?i:option|choice)?\s*:?" + r"[\s*]*\(?\**([A-Z])\**\)?(?![A-Za-z])",
)
_ONLY_LETTER_RE = re.compile(r"^" + _WRAPPED + r"$")
_LEADING_LABEL_RE = re.compile(r"^[\s*]*\(?([A-Z])[).:](?:\s|$)")


def _reference_letter(reference: Any, choices: list[str] | None) -> str:
    ref = reference
    if isinstance(ref, dict):
        choices = ref.get("choices", choices)
        ref = ref.get("answer", ref.get("label"))
    if isinstance(ref, int) and not isinstance(ref, bool):
        if ref < 0 or ref >= len(LETTERS):
            raise KexaoneError(f"choice reference index {ref} is out of range")
        return LETTERS[ref]
    if isinstance(ref, str):
        text = ref.strip()
        m = _ONLY_LETTER_RE.match(text.upper()) if len(text) <= 12 else None
        if m:
            return m.group(1)
        if choices:
            for i, c in enumerate(choices):
                if str(c).strip().lower() == text.lower():
                    return LETTERS[i]
    raise KexaoneError(
        f"choice reference must be a letter, an index, or the text of one choice; got {reference!r}"
    )


def chosen_letters(answer: str, choices: list[str] | None = None) -> tuple[list[str], str]:
    """Letters the response commits to and the rule that found them (empty when none)."""
    text = answer[-MAX_ANSWER_CHARS:]
    boxed = [m.group(1) for b in boxed_answers(text) if (m := _ONLY_LETTER_RE.match(b))]
    if boxed:
        return boxed, "boxed"
    phrases = [m.group(1) for m in _ANSWER_RE.finditer(text)]
    if phrases:
        return phrases, "answer_is"
    m = _ONLY_LETTER_RE.match(text.strip()) if len(text.strip()) <= 20 else None
    if m:
        return [m.group(1)], "only_letter"
    line = last_line(text)
    m = _LEADING_LABEL_RE.match(line)
    if m:
        return [m.group(1)], "last_line_label"
    if choices:
        hits = [
            LETTERS[i]
            for i, c in enumerate(choices)
            if str(c).strip() and str(c).strip().lower() == line.lower()
        ]
        if len(hits) == 1:
            return hits, "choice_text"
    return [], "none"


@register_verifier("stem")
@register_verifier("choice")
class ChoiceVerifier:
    """Reward 1 when the single letter the response commits to is the reference letter."""

    name = "choice"

    def verify(self, sample: Sample) -> VerifyResult:
        choices = sample.metadata.get("choices")
        gold = _reference_letter(sample.reference, choices)
        if isinstance(sample.reference, dict):
            choices = sample.reference.get("choices", choices)
        stripped = strip_reasoning(sample.response, reasoning=sample.metadata.get("reasoning"))
        if stripped.answer is None:
            return VerifyResult(0.0, {"reason": stripped.reason, "gold": gold})
        letters, source = chosen_letters(stripped.answer, choices)
        if choices:
            letters = [x for x in letters if LETTERS.index(x) < len(choices)] or letters
        distinct = sorted(set(letters))
        details = {"gold": gold, "chosen": distinct, "source": source}
        if not distinct:
            return VerifyResult(0.0, {**details, "reason": "no choice letter found"})
        if len(distinct) > 1:
            return VerifyResult(0.0, {**details, "reason": "several different choices"})
        ok = distinct[0] == gold
        return VerifyResult(float(ok), {**details, "reason": "correct" if ok else "wrong choice"})
