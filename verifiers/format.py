"""The ``format`` verifier: reasoning-mode structure and answer length, for use as a shaping reward.

Checks (each reported in ``details['checks']``): exactly one ``<think>`` and one ``</think>``, in that
order (``<think>`` may be omitted when the chat template opened it in the prompt, sample metadata
``think_in_prompt=True``); a non-empty answer after ``</think>``; and optional answer length limits in
characters or words. Reward is 1/0 for all checks, or the fraction passed with ``partial=True``.
Options can be set per row through a dict reference with the same names as the constructor.
"""

from __future__ import annotations

from typing import Any

from kexaone_align.verifiers.answer import THINK_CLOSE, THINK_OPEN
from kexaone_align.verifiers.api import Sample, VerifyResult, register_verifier

from kexaone_align.errors import KexaoneError

_OPTIONS = ("require_think", "max_answer_chars", "max_answer_words", "min_answer_chars", "partial")


def format_checks(
    response: str,
    *,
    require_think: bool = True,
    think_in_prompt: bool = False,
    max_answer_chars: int | None = None,
    max_answer_words: int | None = None,
    min_answer_chars: int = 1,
) -> dict[str, bool]:
    """Each structural check by name -> passed."""
    opens, closes = response.count(THINK_OPEN), response.count(THINK_CLOSE)
    close_at = response.rfind(THINK_CLOSE)
    answer = response[close_at + len(THINK_CLOSE) :].strip() if close_at >= 0 else response.strip()
    checks: dict[str, bool] = {}
    if require_think:
        expected_opens = 0 if think_in_prompt else 1
        checks["one_think_block"] = opens == expected_opens and closes == 1
        checks["think_closed"] = closes >= 1 and (opens == 0 or response.find(THINK_OPEN) < close_at)
        if closes == 0:
            answer = ""
    else:
        checks["no_think_tags"] = opens == 0 and closes == 0
    checks["answer_present"] = len(answer) >= max(1, min_answer_chars)
    if max_answer_chars is not None:
        checks["answer_chars"] = len(answer) <= int(max_answer_chars)
    if max_answer_words is not None:
        checks["answer_words"] = len(answer.split()) <= int(max_answer_words)
    return checks


@register_verifier("format")
class FormatVerifier:
    """Reward for a well-formed reasoning-mode response (see the module docstring)."""

    name = "format"

    def __init__(
        self,
        require_think: bool = True,
        max_answer_chars: int | None = None,
        max_answer_words: int | None = None,
        min_answer_chars: int = 1,
        partial: bool = False,
    ) -> None:
        self.options: dict[str, Any] = {
            "require_think": require_think,
            "max_answer_chars": max_answer_chars,
            "max_answer_words": max_answer_words,
            "min_answer_chars": min_answer_chars,
            "partial": partial,
        }

    def verify(self, sample: Sample) -> VerifyResult:
        opts = dict(self.options)
        if isinstance(sample.reference, dict):
            unknown = set(sample.reference) - set(_OPTIONS)
            if unknown:
                raise KexaoneError(
                    f"format reference has unknown keys {sorted(unknown)}; known: {list(_OPTIONS)}"
                )
            opts.update(sample.reference)
        elif sample.reference is not None:
            raise KexaoneError(
                f"format reference must be a dict of options or empty, got {sample.reference!r}"
            )
        if not isinstance(sample.response, str):
            raise KexaoneError(f"response must be text, got {type(sample.response).__name__}")
        partial = bool(opts.pop("partial"))
        checks = format_checks(
            sample.response, think_in_prompt=bool(sample.metadata.get("think_in_prompt", False)), **opts
        )
        passed = sum(checks.values())
        reward = passed / len(checks) if partial else float(passed == len(checks))
        return VerifyResult(reward, {"checks": checks, "failed": [k for k, ok in checks.items() if not ok]})
